"""Schema planning: from a batch of events to typed columns and rows ready to insert.

This is the pure core of the warehouse forwarder (no I/O, no database): every dialect
(DuckDB now, PostgreSQL and ClickHouse later) loads what ``plan`` returns, so the rules
below hold on every engine.

Flattening
    Keys become snake_case (``anonymousId`` -> ``anonymous_id``); nested objects are joined
    with ``_`` (``context.page.path`` -> ``context_page_path``); any character outside
    ``[a-z0-9_]`` becomes ``_``; a name that would start with a digit gets a leading ``_``.
    Arrays are one JSON value; empty objects and ``None`` produce no column.

Types
    A new column takes the type of the first value seen for it, in batch order:
    bool -> BOOLEAN, int (int64) -> BIGINT, larger int or float -> DOUBLE, array -> JSON,
    str -> VARCHAR, or TIMESTAMPTZ for a strict ISO-8601 date-time with a time zone.

Widening
    A column changes type only to widen, by the rules of ``WIDENINGS``: one so far, BIGINT
    -> DOUBLE, when a number with a fraction arrives (a first ``revenue: 20`` must not send
    every later ``19.99`` to ``_unmapped_data``). A column new in the batch widens as its
    values come (``20`` then ``19.99``: created DOUBLE); a column of the table widens when
    the dialect can change it in place (``Dialect.widenings``) and ``plan`` lists it in
    ``widened_columns``. A column widens only if every value it holds, in the batch and in
    the table, stays exact (an int beyond 2**53 would not: the dialect checks the table's).
    No other change is safe: a BOOLEAN never becomes a number, a number never becomes
    VARCHAR (``sum()`` would stop working), a TIMESTAMPTZ never becomes VARCHAR.

Misfits
    A value that cannot be stored losslessly in its column's type, even widened (``'abc'``
    into BIGINT or DOUBLE, ``true`` into BIGINT, an int beyond 2**53 into DOUBLE, a string
    into BOOLEAN) goes, under its column name, into the row's ``_unmapped_data`` JSON object;
    the row is kept. So do keys whose column name is longer than ``MAX_IDENTIFIER_LENGTH``
    or would add a column past ``max_columns``, and (under their original dotted key path)
    keys whose name is already taken in the same event.

Deduplication
    ``message_id`` is the key: a batch keeps the first event of each id. An event with no
    usable ``messageId`` gets a deterministic id derived from its content, so that a resend
    of the same event still deduplicates.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

import orjson

from tagrelay.model import Event


class ColumnType(StrEnum):
    """Logical column types. Each dialect maps them to its own (e.g. JSON -> JSONB)."""

    VARCHAR = "VARCHAR"
    BIGINT = "BIGINT"
    DOUBLE = "DOUBLE"
    BOOLEAN = "BOOLEAN"
    TIMESTAMPTZ = "TIMESTAMPTZ"
    JSON = "JSON"


DEDUP_KEY: Final = "message_id"
UNMAPPED_COLUMN: Final = "_unmapped_data"
MAX_IDENTIFIER_LENGTH: Final = 63
"""PostgreSQL's identifier limit, applied on every dialect so that tables stay portable."""

BASE_COLUMNS: Final[Mapping[str, ColumnType]] = {
    DEDUP_KEY: ColumnType.VARCHAR,
    "type": ColumnType.VARCHAR,
    "event": ColumnType.VARCHAR,
    "name": ColumnType.VARCHAR,
    "anonymous_id": ColumnType.VARCHAR,
    "user_id": ColumnType.VARCHAR,
    "group_id": ColumnType.VARCHAR,
    "previous_id": ColumnType.VARCHAR,
    "timestamp": ColumnType.TIMESTAMPTZ,
    "original_timestamp": ColumnType.TIMESTAMPTZ,
    "sent_at": ColumnType.TIMESTAMPTZ,
    "received_at": ColumnType.TIMESTAMPTZ,
    "context_page_path": ColumnType.VARCHAR,
    "context_page_url": ColumnType.VARCHAR,
    "context_page_title": ColumnType.VARCHAR,
    "context_page_referrer": ColumnType.VARCHAR,
    "context_page_search": ColumnType.VARCHAR,
    "context_ip": ColumnType.VARCHAR,
    "context_user_agent": ColumnType.VARCHAR,
    "context_locale": ColumnType.VARCHAR,
    "context_campaign_source": ColumnType.VARCHAR,
    "context_campaign_medium": ColumnType.VARCHAR,
    "context_campaign_name": ColumnType.VARCHAR,
    "context_library_name": ColumnType.VARCHAR,
    "context_library_version": ColumnType.VARCHAR,
    "context_source": ColumnType.VARCHAR,
    UNMAPPED_COLUMN: ColumnType.JSON,
}
"""Columns every table has from its creation, in this order: Segment's top-level fields and
the context every web event carries. ``message_id`` is the primary key; the four
well-known times are TIMESTAMPTZ. Declaring them up front means the queries users write
first (``where context_page_path = '/signup' and timestamp > now() - interval '1 day'``)
work on a new, even empty, table instead of failing on a missing column."""

WIDENINGS: Final[Mapping[str, ColumnType]] = MappingProxyType(
    {ColumnType.BIGINT: ColumnType.DOUBLE}
)
"""Column type -> the wider type it becomes when a value fits only that one (exactly: an
int beyond 2**53 never widens BIGINT). The only rules the planner applies; see the module
docstring for the changes it never makes."""

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
EXACT_DOUBLE_INT: Final = 2**53

_TIMESTAMP_RE: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,9})?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
)
_CAMEL_ACRONYM_RE: Final = re.compile(r"([A-Z]+)([A-Z][a-z])")
_CAMEL_RE: Final = re.compile(r"([a-z0-9])([A-Z])")
_NOT_IDENTIFIER_RE: Final = re.compile(r"[^a-z0-9_]")
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one batch: columns to add, then rows to insert."""

    new_columns: Mapping[str, ColumnType]
    """Columns to add before inserting, in order of first appearance in the batch."""
    widened_columns: Mapping[str, ColumnType]
    """Columns of the table to change to a wider type before inserting (``WIDENINGS``)."""
    insert_columns: Mapping[str, ColumnType]
    """Every column some row has a value for (table order, then new ones): the insert's
    column list."""
    columns: Mapping[str, Sequence[Any]]
    """The rows to insert as columns: for each of ``insert_columns``, one value per kept
    event, in batch order, converted for its column type; None is NULL. TIMESTAMPTZ values
    are ISO-8601 strings, JSON values are Python JSON values, ``_unmapped_data`` is a
    dict."""
    row_count: int
    """How many rows: the events kept (the length of every column)."""
    duplicates: int
    """Events dropped because an earlier event of the batch had the same message_id."""
    misfits: int
    """Values moved to ``_unmapped_data`` because they do not fit their column's type."""
    collisions: int
    """Values moved to ``_unmapped_data`` because another key of the event had the name."""
    over_limit: int
    """Values moved to ``_unmapped_data`` because of the name length or ``max_columns``."""
    generated_ids: int
    """Events without a usable messageId that got an id derived from their content."""
    misfit_columns: Mapping[str, str]
    """Columns that had misfits -> the JSON kind of the first one (``string``, ``number``,
    ``boolean``, ``array``), for a message that names the column and never the value."""

    @property
    def unmapped_values(self) -> int:
        return self.misfits + self.collisions + self.over_limit

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows one mapping each, column -> value, NULLs left out (built on each call:
        for tests and for a dialect's rare per-row path)."""
        names = list(self.columns)
        return (
            [
                {
                    name: value
                    for name, value in zip(names, values, strict=True)
                    if value is not None
                }
                for values in zip(*self.columns.values(), strict=True)
            ]
            if names
            else [{} for _ in range(self.row_count)]
        )


def snake_case(key: str) -> str:
    """One key as a column name part: ``anonymousId`` -> ``anonymous_id``,
    ``HTTPReferrer`` -> ``http_referrer``, ``utm-source`` -> ``utm_source``."""
    name = _CAMEL_ACRONYM_RE.sub(r"\1_\2", key)
    name = _CAMEL_RE.sub(r"\1_\2", name).lower()
    return _NOT_IDENTIFIER_RE.sub("_", name)


def column_name(prefix: str, key: str) -> str:
    """The column name of ``key`` inside the object whose column prefix is ``prefix``
    (empty at the top level)."""
    if prefix:
        return f"{prefix}_{snake_case(key)}"
    name = snake_case(key)
    if not name or name[0].isdigit():
        return f"_{name}"
    return name


# prefix -> key -> column name. Events repeat the same keys endlessly, and computing a name
# costs three regex passes. A cache, not state: it never changes a result. Bounded, since
# keys can be unbounded (ids used as keys).
_NAME_CACHE: dict[str, dict[str, str]] = {}
_NAME_CACHE_LIMIT: Final = 4096


def flatten(event: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(column name, value)`` for every leaf of ``event``, in key order. Arrays are leaves;
    empty objects produce nothing; ``None`` leaves are kept (they mean NULL)."""
    out: list[tuple[str, Any]] = []
    _flatten_into(out, "", event)
    return out


def _names_under(prefix: str) -> dict[str, str]:
    names = _NAME_CACHE.get(prefix)
    if names is None:
        if len(_NAME_CACHE) >= _NAME_CACHE_LIMIT:
            _NAME_CACHE.clear()
        names = _NAME_CACHE[prefix] = {}
    return names


def _name_miss(names: dict[str, str], prefix: str, key: Any) -> str:
    if len(names) >= _NAME_CACHE_LIMIT:
        names.clear()
    name = names[key] = column_name(prefix, key if isinstance(key, str) else str(key))
    return name


def cached_column_name(prefix: str, key: Any) -> str:
    """``column_name(prefix, key)`` through the cache ``flatten`` uses."""
    names = _names_under(prefix)
    return names.get(key) or _name_miss(names, prefix, key)


def _flatten_into(out: list[tuple[str, Any]], prefix: str, obj: Mapping[str, Any]) -> None:
    names = _names_under(prefix)
    append = out.append
    for key, value in obj.items():
        name = names.get(key) or _name_miss(names, prefix, key)
        if isinstance(value, dict):
            _flatten_into(out, name, value)
        else:
            append((name, value))


def _key_paths(obj: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Any]]:
    """Like ``flatten`` but yields the original dotted key path (used for collisions)."""
    for key, value in obj.items():
        here = f"{path}.{key}" if path else str(key)
        if isinstance(value, dict):
            yield from _key_paths(value, here)
        else:
            yield here, value


def is_timestamp(value: str) -> bool:
    """True for a strict ISO-8601 date-time with a time zone, as every dialect can parse it:
    ``2024-05-01T10:00:00Z``, ``2024-05-01T12:00:00.123+02:00`` (1 to 9 fractional
    digits, ``T`` and ``Z`` upper case, offset ``+HH:MM``, a real calendar date, years 0002
    to 9998 so that the instant stays in every engine's and Python's range)."""
    if _TIMESTAMP_RE.fullmatch(value) is None:
        return False
    if not 1 < int(value[:4]) < 9999:
        return False
    try:
        date.fromisoformat(value[:10])
    except ValueError:
        return False
    return True


def infer_type(value: Any) -> ColumnType | None:
    """The column type a new column gets from its first value; None for a value that makes
    no column (None, non-finite floats). Dicts are flattened before this is called."""
    if value is None:
        return None
    if isinstance(value, bool):
        return ColumnType.BOOLEAN
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return ColumnType.BIGINT
        return ColumnType.DOUBLE if _fits_double(value) else ColumnType.VARCHAR
    if isinstance(value, float):
        return ColumnType.DOUBLE if math.isfinite(value) else None
    if isinstance(value, str):
        return ColumnType.TIMESTAMPTZ if is_timestamp(value) else ColumnType.VARCHAR
    if isinstance(value, list | tuple | dict):
        return ColumnType.JSON
    return ColumnType.VARCHAR


_MISFIT: Final = object()
_KNOWN_TYPES: Final[Mapping[str, ColumnType]] = {kind.value: kind for kind in ColumnType}


def convert(column_type: str, value: Any) -> Any:
    """``value`` converted losslessly for a column of ``column_type``, or ``MISFIT``.

    Same type fits; an int fits DOUBLE when ``|n| <= 2**53``; any scalar fits VARCHAR (bools
    as ``'true'``/``'false'``, numbers as their JSON text); a timestamp string fits
    TIMESTAMPTZ; anything fits JSON. A type this module does not know accepts nothing."""
    if column_type == ColumnType.VARCHAR:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            return _json_text(value)
        if isinstance(value, list | tuple | dict):
            return _MISFIT
        return str(value)
    if column_type == ColumnType.BIGINT:
        if isinstance(value, int) and not isinstance(value, bool):
            return value if INT64_MIN <= value <= INT64_MAX else _MISFIT
        return _MISFIT
    if column_type == ColumnType.DOUBLE:
        if isinstance(value, float):
            return value
        exact = isinstance(value, int) and -EXACT_DOUBLE_INT <= value <= EXACT_DOUBLE_INT
        return float(value) if exact and not isinstance(value, bool) else _MISFIT
    if column_type == ColumnType.BOOLEAN:
        return value if isinstance(value, bool) else _MISFIT
    if column_type == ColumnType.TIMESTAMPTZ:
        return value if isinstance(value, str) and is_timestamp(value) else _MISFIT
    if column_type == ColumnType.JSON:
        return value
    return _MISFIT


MISFIT: Final = _MISFIT
"""The sentinel ``convert`` returns for a value that does not fit."""


def _fits_double(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _json_text(value: float) -> str:
    return orjson.dumps(value).decode()


def _value_for_new_column(column_type: ColumnType, value: Any) -> Any:
    """The first value of a new column, converted (large ints become floats, etc.)."""
    if column_type == ColumnType.DOUBLE:
        return float(value)
    if column_type == ColumnType.VARCHAR and not isinstance(value, str):
        return str(value)
    return value


def json_safe(value: Any) -> Any:
    """``value`` made encodable as strict JSON by any encoder: non-finite floats become None,
    lone surrogates in strings become U+FFFD, ints beyond 64 bits and other Python objects
    their text, tuples lists, keys strings. For the rare batch a fast encoder refuses."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return _SURROGATE_RE.sub("\ufffd", value)
        return value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= 2**64 - 1 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    return str(value)


def _put(unmapped: dict[str, Any], key: str, value: Any) -> None:
    """Store under ``key``, or ``key#2``, ``key#3``... so that no value overwrites another."""
    if key in unmapped:
        n = 2
        while f"{key}#{n}" in unmapped:
            n += 1
        key = f"{key}#{n}"
    unmapped[key] = value


def content_id(event: Mapping[str, Any]) -> str:
    """A deterministic message id for an event that has none: the hash of its content."""
    try:
        text = orjson.dumps(event, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        text = json.dumps(event, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(text).hexdigest()


def json_kind(value: Any) -> str:
    """The JSON kind of a value, as a message may name it (never the value itself)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def plan_rows(
    events: Sequence[Event],
    existing_columns: Mapping[str, str],
    max_columns: int,
    *,
    widenings: Collection[tuple[str, str]] = frozenset(),
    fixed_columns: Collection[str] = frozenset(),
) -> Plan:
    """Plan the load of ``events`` into a table that has ``existing_columns`` (name -> type,
    in table order; types outside ``ColumnType`` accept no value). ``widenings`` are the
    ``(from, to)`` type changes the dialect can make to a column of the table (columns new
    in the batch widen by ``WIDENINGS`` regardless); ``fixed_columns`` never widen (the
    dialect found a value that would not survive). Deterministic: the same input gives the
    same plan. See the module docstring for the rules.

    Event by event and value by value: the reference implementation of the rules.
    ``tagrelay.warehouse.shapes.plan`` gives the same plan for a batch, faster, and hands
    this function only the events it cannot plan by their shape."""
    # Known types as ColumnType members, so that the loop can compare with ``is``.
    types: dict[str, str] = {
        name: _KNOWN_TYPES.get(kind, kind)
        for name, kind in existing_columns.items()
        if name != UNMAPPED_COLUMN
    }
    new_columns: dict[str, ColumnType] = {}
    widened: dict[str, ColumnType] = {}
    misfit_columns: dict[str, str] = {}
    room = max_columns - len(existing_columns)
    rows: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    duplicates = misfits = collisions = over_limit = generated_ids = 0
    varchar, bigint, double = ColumnType.VARCHAR, ColumnType.BIGINT, ColumnType.DOUBLE
    boolean, timestamptz, json_ = ColumnType.BOOLEAN, ColumnType.TIMESTAMPTZ, ColumnType.JSON
    isfinite = math.isfinite

    for event in events:
        message_id = message_id_of(event)
        generated = message_id is None
        if message_id is None:
            message_id = content_id(event)
        if message_id in seen_ids:
            duplicates += 1
            continue
        seen_ids.add(message_id)
        generated_ids += generated

        row: dict[str, Any] = {}
        unmapped: dict[str, Any] = {}
        collided = False
        for name, value in flatten(event):
            cls = value.__class__
            if value is None or (cls is float and not isfinite(value)):
                continue
            if name in row or (unmapped and name in unmapped):
                collided = True
                continue
            column_type = types.get(name)
            if column_type is None:
                if name == UNMAPPED_COLUMN:
                    collided = True
                    continue
                new_type = infer_type(value)
                if new_type is None:
                    continue
                if len(name) > MAX_IDENTIFIER_LENGTH or room <= 0:
                    _put(unmapped, name, value)
                    over_limit += 1
                    continue
                types[name] = new_columns[name] = new_type
                room -= 1
                row[name] = _value_for_new_column(new_type, value)
                continue
            # The common cases inline; everything else through convert().
            if cls is str:
                if column_type is varchar or (column_type is timestamptz and is_timestamp(value)):
                    row[name] = value
                    continue
            elif cls is int:
                if column_type is bigint and INT64_MIN <= value <= INT64_MAX:
                    row[name] = value
                    continue
            elif cls is float:
                if column_type is double:
                    row[name] = value
                    continue
            elif cls is bool and column_type is boolean:
                row[name] = value
                continue
            if column_type is json_:
                row[name] = value
                continue
            converted = convert(column_type, value)
            if converted is not _MISFIT:
                row[name] = converted
                continue
            wider = WIDENINGS.get(column_type)
            if (
                wider is not None
                and (
                    name in new_columns
                    or ((column_type, wider) in widenings and name not in fixed_columns)
                )
                and (converted := convert(wider, value)) is not _MISFIT
                and _widen_planned(rows, name, wider)
            ):
                types[name] = wider
                if name in new_columns:
                    new_columns[name] = wider
                else:
                    widened[name] = wider
                row[name] = converted
                continue
            _put(unmapped, name, value)
            misfits += 1
            if name not in misfit_columns:
                misfit_columns[name] = json_kind(value)

        if collided:
            collisions += _move_collisions(event, unmapped)
        row[DEDUP_KEY] = message_id
        if unmapped:
            row[UNMAPPED_COLUMN] = unmapped
        rows.append(row)

    used: set[str] = set()
    for row in rows:
        used.update(row)
    types[UNMAPPED_COLUMN] = json_
    insert_columns = {name: ColumnType(types[name]) for name in types if name in used}
    return Plan(
        new_columns=new_columns,
        widened_columns=widened,
        insert_columns=insert_columns,
        columns={name: [row.get(name) for row in rows] for name in insert_columns},
        row_count=len(rows),
        duplicates=duplicates,
        misfits=misfits,
        collisions=collisions,
        over_limit=over_limit,
        generated_ids=generated_ids,
        misfit_columns=misfit_columns,
    )


def _widen_planned(rows: list[dict[str, Any]], name: str, wider: ColumnType) -> bool:
    """Convert the values the batch's earlier rows have for column ``name`` to ``wider``,
    if every one of them fits it exactly; else change nothing and return False. Walks the
    rows planned so far: a column widens once, not per row."""
    converted: list[tuple[dict[str, Any], Any]] = []
    for row in rows:
        if name in row:
            value = convert(wider, row[name])
            if value is _MISFIT:
                return False
            converted.append((row, value))
    for row, value in converted:
        row[name] = value
    return True


def message_id_of(event: Mapping[str, Any]) -> str | None:
    """The value the ``message_id`` column gets: that of the first top-level key named so
    (``messageId`` in practice) with a value, as text; None when it is missing, empty or
    not a scalar."""
    names = _names_under("")
    for key, value in event.items():
        if value is None or isinstance(value, dict):
            continue
        if value.__class__ is float and not math.isfinite(value):
            continue
        if (names.get(key) or _name_miss(names, "", key)) == DEDUP_KEY:
            converted = convert(ColumnType.VARCHAR, value)
            return converted if isinstance(converted, str) and converted else None
    return None


def _move_collisions(event: Mapping[str, Any], unmapped: dict[str, Any]) -> int:
    """Put the values of keys that lost their column name to an earlier key into
    ``unmapped`` under their dotted key path. Walks the event again: collisions are rare."""
    claimed: set[str] = set()
    moved = 0
    for (name, value), (path, _) in zip(flatten(event), _key_paths(event), strict=True):
        if value is None or (value.__class__ is float and not math.isfinite(value)):
            continue
        if name in claimed or name == UNMAPPED_COLUMN:
            _put(unmapped, path, value)
            moved += 1
        else:
            claimed.add(name)
    return moved
