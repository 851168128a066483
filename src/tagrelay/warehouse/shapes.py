"""Planning a batch by the shapes of its events: the warehouse's fast path.

``schema.plan_rows`` applies the rules of ``tagrelay.warehouse.schema`` value by value, in
Python: 15-20 us per event of the bench's, more than DuckDB takes to store it. Yet the events
of one source almost all have the same shape: the same keys, nested the same way. ``plan``
decides the rules once per shape and applies them to whole columns:

1. Each event is read into the tuple of its values, object after object, with C-level calls
   (``tuple(obj.values())``). Its top-level keys find the shapes seen with them; a shape
   knows where its nested objects are and which keys each has, compared rather than
   hashed (``_read_as``). An event of a shape new to the cache is walked once (``_read``).
2. For each shape, once per set of table columns, every leaf gets its column: a shape
   whose leaves collide, or take ``_unmapped_data``'s name, is not stored here; a leaf
   without a column may stay, as long as its values are null.
3. The events of one shape become columns with ``zip(*rows)``, and each column is checked
   and converted as a whole by the types its values have (``_checked``): strings into
   VARCHAR as they are, ints within BIGINT by their min and max, floats finite, every
   timestamp of a column by one regular expression, ints into DOUBLE exact; a column of
   mixed types value by value. An event with a value that does not fit leaves its group.
4. What the shapes do not store (an event that adds a column, a misfit, a collision, an
   odd id) goes through ``schema.plan_rows`` with the table's columns, in batch order: new
   columns, ``_unmapped_data`` and its counts are decided there, as always. If that widens
   a column of the table, the whole batch is planned by ``plan_rows``: a widening converts
   the values of earlier events too, and happens once in a column's life.

The result is the ``Plan`` ``plan_rows`` gives for the same batch, its columns in batch
order: ``tests/warehouse/test_shapes.py`` compares the two on targeted and generated
batches, and ``tests/warehouse/test_schema.py`` runs every rule against both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, Final

from tagrelay.model import Event
from tagrelay.warehouse.schema import (
    DEDUP_KEY,
    EXACT_DOUBLE_INT,
    INT64_MAX,
    INT64_MIN,
    MISFIT,
    UNMAPPED_COLUMN,
    ColumnType,
    Plan,
    cached_column_name,
    content_id,
    convert,
    is_timestamp,
    message_id_of,
    plan_rows,
)

_NONE: Final = type(None)

Shape = tuple[Any, ...]
"""``(keys,)`` for an object without nested objects, else ``(keys, positions of the nested
objects, shape of each)``: hashable."""
Column = Sequence[Any]
Check = Callable[[Column], Column | None]
"""A column's values (none of them None) -> the values to store, or None when one of them
does not fit. Returns its argument itself when nothing needs converting."""

# A timestamp ``schema.is_timestamp`` accepts, written so that one regular expression checks
# a whole column joined by newlines: ASCII digits, years 0002-9998, and real calendar days
# except 29 February, which (with anything else this refuses) is left to ``is_timestamp``.
_DAY: Final = (
    r"(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
    r"|(?:0[13-9]|1[0-2])-(?:29|30)"
    r"|(?:0[13578]|1[02])-31)"
)
_ONE_TIMESTAMP: Final = (
    r"(?!000[01]|9999)[0-9]{4}-" + _DAY + r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_TIMESTAMP_COLUMN_RE: Final = re.compile(f"(?:{_ONE_TIMESTAMP}\n)*{_ONE_TIMESTAMP}")


def _timestamps(values: Column) -> Column | None:
    joined = "\n".join(values)
    if joined.count("\n") == len(values) - 1 and _TIMESTAMP_COLUMN_RE.fullmatch(joined):
        return values
    return values if all(map(is_timestamp, values)) else None


def _bigints(values: Column) -> Column | None:
    return values if min(values) >= INT64_MIN and max(values) <= INT64_MAX else None


def _exact_doubles(values: Column) -> Column | None:
    if min(values) >= -EXACT_DOUBLE_INT and max(values) <= EXACT_DOUBLE_INT:
        return list(map(float, values))
    return None


def _finite(values: Column) -> Column | None:
    return values if all(map(math.isfinite, values)) else None


def _as_is(values: Column) -> Column:
    return values


_CHECKS: Final[Mapping[tuple[type, str], Check]] = {
    (str, ColumnType.VARCHAR): _as_is,
    (str, ColumnType.TIMESTAMPTZ): _timestamps,
    (str, ColumnType.JSON): _as_is,
    (int, ColumnType.BIGINT): _bigints,
    (int, ColumnType.DOUBLE): _exact_doubles,
    (int, ColumnType.JSON): _as_is,
    (float, ColumnType.DOUBLE): _finite,
    (float, ColumnType.JSON): _finite,
    (bool, ColumnType.BOOLEAN): _as_is,
    (bool, ColumnType.JSON): _as_is,
    (list, ColumnType.JSON): _as_is,
    (tuple, ColumnType.JSON): _as_is,
}
"""(value type, column type) -> the check of a column whose values all have that type. Any
other column goes value by value through ``schema.convert`` (``_converted``). Types are
exact: a ``bool`` is not an ``int`` here, nor a subclass of ``str`` a ``str``."""


def _converted(values: Column, column_type: str) -> Column | None:
    """A column of mixed types (or with NULLs) value by value, as ``plan_rows`` converts
    them: None and non-finite floats are NULL; None when one does not fit."""
    out: list[Any] = []
    append = out.append
    for value in values:
        if value is None or (value.__class__ is float and not math.isfinite(value)):
            append(None)
            continue
        if isinstance(value, dict):
            return None  # an object where the shape has a value: planned the slow way
        converted = convert(column_type, value)
        if converted is MISFIT:
            return None
        append(converted)
    return out


def _checked(values: Column, column_type: str) -> Column | None:
    """``values`` ready to store in a column of ``column_type``, or None when one does not
    fit: a check of the whole column where the column has one type (and NULLs), else, or
    when that check fails, value by value (``_converted``, which decides)."""
    kinds = set(map(type, values))
    nulls = _NONE in kinds
    if nulls:
        kinds.discard(_NONE)
    if len(kinds) == 1:
        check = _CHECKS.get((kinds.pop(), column_type))
        if check is _as_is:
            return values
        if check is not None:
            present = [value for value in values if value is not None] if nulls else values
            checked = check(present)
            if checked is not None and (checked is present or not nulls):
                return values if nulls else checked
    return _converted(values, column_type)


Step = tuple[int, int, tuple[Any, ...]]
"""(index of the parent's values, position among them, the keys the object there has)."""


@dataclass(frozen=True, slots=True, eq=False)
class _ShapePlan:
    """What is known of one shape: how to read its events, and how to store them."""

    steps: tuple[Step, ...]
    """The shape's nested objects in reading order (``_read_as``)."""
    stored: bool
    """False: its events go to ``plan_rows`` (a new column, a collision, ...)."""
    leaves: tuple[tuple[int, str, str], ...]
    """(position in the event's values, column, column type) for every leaf but the id."""
    nulls: tuple[int, ...]
    """Positions of leaves without a column: planned only while their values are None
    (a key that is always null makes no column)."""
    id_position: int | None
    """Where the value of the top-level key named ``message_id`` is; None: no key is."""


_NO_PLAN: Final = _ShapePlan((), False, (), (), None)
"""The plan of an event read no other way (its objects are not where the cache said)."""

_NESTED_AT: dict[tuple[Any, ...], tuple[int, ...]] = {}
"""An object's keys -> the positions of its values that were objects the first time these
keys were seen. A cache, not state (``_read`` checks it); bounded."""
_NESTED_AT_LIMIT: Final = 4096


class _Irregular(Exception):
    """An object whose nested objects are not where ``_NESTED_AT`` says."""


def _read(obj: Mapping[str, Any], parts: list[tuple[Any, ...]]) -> Shape:
    """The object's shape; its values go to ``parts``: its own first, then those of each
    nested object in key order, recursively (an object's own entry keeps its place,
    unused). C-level calls only, but for the objects nested in it."""
    keys = tuple(obj)
    values = tuple(obj.values())
    parts.append(values)
    nested_at = _NESTED_AT.get(keys)
    if nested_at is None:
        if len(_NESTED_AT) >= _NESTED_AT_LIMIT:
            _NESTED_AT.clear()
        nested_at = _NESTED_AT[keys] = tuple(
            index for index, value in enumerate(values) if value.__class__ is dict
        )
    if not nested_at:
        return (keys,)
    shape: list[Any] = [keys, nested_at]
    for index in nested_at:
        value = values[index]
        if value.__class__ is not dict:
            raise _Irregular
        shape.append(_read(value, parts))
    return tuple(shape)


def _leaves_of(shape: Shape, prefix: str, start: int, out: list[tuple[int, str]]) -> int:
    """Append ``(position, column name)`` for every leaf of ``shape`` in flattening order
    (``schema.flatten``); return the position after its values."""
    keys = shape[0]
    nested_at = shape[1] if len(shape) > 1 else ()
    after = start + len(keys)
    nested = iter(shape[2:])
    for index, key in enumerate(keys):
        name = cached_column_name(prefix, key)
        if index in nested_at:
            after = _leaves_of(next(nested), name, after, out)
        else:
            out.append((start + index, name))
    return after


def _steps_of(shape: Shape, part: int, out: list[Step]) -> None:
    """``shape``'s nested objects as ``Step`` s, in the order ``_read`` visits them."""
    if len(shape) == 1:
        return
    for position, nested in zip(shape[1], shape[2:], strict=True):
        out.append((part, position, nested[0]))
        _steps_of(nested, len(out), out)


def _read_as(steps: Sequence[Step], event: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The values of ``event`` (whose top-level keys are the shape's) read by ``steps``, as
    ``_read`` would give them; None when a nested object is not as the shape has it. Keys
    are compared, not hashed, and no function is called per object."""
    parts = [tuple(event.values())]
    for parent, position, keys in steps:
        value = parts[parent][position]
        if value.__class__ is not dict or tuple(value) != keys:
            return None
        parts.append(tuple(value.values()))
    return parts[0] if len(parts) == 1 else tuple(chain.from_iterable(parts))


def _plan_shape(shape: Shape, types: Mapping[str, str]) -> _ShapePlan:
    """How to read the events of ``shape``, and to store them into a table of ``types``
    if they can be: every leaf must have a column of the table (or be null) and a name of
    its own; the values are checked later, column by column."""
    steps: list[Step] = []
    _steps_of(shape, 0, steps)
    leaves: list[tuple[int, str]] = []
    _leaves_of(shape, "", 0, leaves)
    planned: list[tuple[int, str, str]] = []
    nulls: list[int] = []
    claimed: set[str] = set()
    id_position = None
    for position, name in leaves:
        if name in claimed or name == UNMAPPED_COLUMN:
            # a collision (its value would go to _unmapped_data)
            return _ShapePlan(tuple(steps), False, (), (), None)
        claimed.add(name)
        column_type = types.get(name)
        if column_type is None:
            nulls.append(position)  # a new column, unless its values are all null
        elif name == DEDUP_KEY:
            if position >= len(shape[0]):
                # a nested key named so: rare, and not the event's id
                return _ShapePlan(tuple(steps), False, (), (), None)
            id_position = position
        else:
            planned.append((position, name, column_type))
    return _ShapePlan(tuple(steps), True, tuple(planned), tuple(nulls), id_position)


class _ShapeCache:
    """The shapes seen with one set of table columns, by their top-level keys; forgotten
    when the columns change."""

    LIMIT: Final = 4096
    PER_KEYS: Final = 16
    """Shapes kept per set of top-level keys (they differ in their nested objects)."""

    def __init__(self) -> None:
        self._columns: dict[str, str] = {}
        self._by_keys: dict[tuple[Any, ...], list[_ShapePlan]] = {}

    def shapes_for(self, columns: dict[str, str]) -> dict[tuple[Any, ...], list[_ShapePlan]]:
        if columns != self._columns or len(self._by_keys) > self.LIMIT:
            self._columns, self._by_keys = columns, {}
        return self._by_keys

    def first_of_shape(
        self, event: Mapping[str, Any], keys: tuple[Any, ...]
    ) -> tuple[_ShapePlan, tuple[Any, ...]]:
        """The plan of ``event``'s shape, new to the cache, and the event's values."""
        parts: list[tuple[Any, ...]] = []
        try:
            shape = _read(event, parts)
        except _Irregular:
            return _NO_PLAN, ()
        shape_plan = _plan_shape(shape, self._columns)
        known = self._by_keys.setdefault(keys, [])
        if len(known) < self.PER_KEYS:
            known.append(shape_plan)
        return shape_plan, tuple(chain.from_iterable(parts))


_SHAPES: Final = _ShapeCache()

_ID_TYPES: Final = frozenset({str, int, float, bool, _NONE})
"""Types of a ``messageId`` value that ``plan_rows`` would store in ``message_id`` (or skip):
the column's values come from ``schema.message_id_of`` for these."""


@dataclass(slots=True)
class _Group:
    """The kept events of one shape: their places among the batch's kept events, and their
    values."""

    plan: _ShapePlan
    places: list[int]
    values: list[tuple[Any, ...]]


def plan(
    events: Sequence[Event],
    existing_columns: Mapping[str, str],
    max_columns: int,
    *,
    widenings: Collection[tuple[str, str]] = frozenset(),
    fixed_columns: Collection[str] = frozenset(),
) -> Plan:
    """The plan ``schema.plan_rows`` gives for these arguments, made by shape (see the
    module docstring)."""
    columns = {name: kind for name, kind in existing_columns.items() if name != UNMAPPED_COLUMN}
    shapes = _SHAPES.shapes_for(columns)
    groups: dict[_ShapePlan, _Group] = {}  # by identity: one group per shape
    kept: list[Event] = []
    ids: list[str] = []
    seen: set[str] = set()
    duplicates = generated = 0
    for event in events:
        keys = tuple(event)
        values = None
        for shape_plan in shapes.get(keys, ()):
            values = _read_as(shape_plan.steps, event)
            if values is not None:
                break
        if values is None:
            shape_plan, values = _SHAPES.first_of_shape(event, keys)
        message_id: str | None = None
        if shape_plan.id_position is not None:
            value = values[shape_plan.id_position]
            if value.__class__ is str:
                message_id = value
            elif value.__class__ not in _ID_TYPES:
                shape_plan = _NO_PLAN  # a list or the like: a misfit id
        if message_id is None:
            message_id = message_id_of(event)
        made = not message_id
        if not message_id:
            message_id = content_id(event)
        if message_id in seen:
            duplicates += 1
            continue
        seen.add(message_id)
        generated += made
        group = groups.get(shape_plan)
        if group is None:
            group = groups[shape_plan] = _Group(shape_plan, [], [])
        group.places.append(len(ids))
        group.values.append(values)
        kept.append(event)
        ids.append(message_id)

    stored: list[tuple[list[int], dict[str, Column]]] = []
    slow: list[int] = []
    for group in groups.values():
        group_columns = _columns_of(group, slow)
        if group_columns is not None:
            stored.append((group.places, group_columns))
    rest = None
    if slow:
        slow.sort()
        by_rows = partial(
            plan_rows,
            existing_columns=existing_columns,
            max_columns=max_columns,
            widenings=widenings,
            fixed_columns=fixed_columns,
        )
        rest = by_rows([kept[place] for place in slow])
        if rest.widened_columns:
            # A widening converts the values of earlier events as well: plan the batch
            # event by event (once in a column's life).
            return by_rows(events)
        stored.append((slow, dict(rest.columns)))
    insert_columns = _insert_columns(columns, rest, stored)
    return Plan(
        new_columns=dict(rest.new_columns) if rest else {},
        widened_columns={},
        insert_columns=insert_columns,
        columns=_in_batch_order(insert_columns, stored, ids),
        row_count=len(ids),
        duplicates=duplicates,
        misfits=rest.misfits if rest else 0,
        collisions=rest.collisions if rest else 0,
        over_limit=rest.over_limit if rest else 0,
        generated_ids=generated,
        misfit_columns=dict(rest.misfit_columns) if rest else {},
    )


def _columns_of(group: _Group, slow: list[int]) -> dict[str, Column] | None:
    """The group's values as checked columns, column name -> values (a column of NULLs
    left out); None when the shape has no plan. The events with a value that does not fit
    its column leave the group for ``slow`` (then the rest is checked again)."""
    if not group.plan.stored:
        slow.extend(group.places)
        return None
    while group.places:
        checked = _checked_columns(group)
        if isinstance(checked, dict):
            return checked
        if not checked or len(checked) == len(group.places):
            break
        keep = [row for row in range(len(group.places)) if row not in checked]
        slow.extend(group.places[row] for row in checked)
        group.places = [group.places[row] for row in keep]
        group.values = [group.values[row] for row in keep]
    slow.extend(group.places)
    return None


def _checked_columns(group: _Group) -> dict[str, Column] | set[int]:
    """The group's checked columns; or, when a column's check fails, the rows whose value
    in that column does not fit (each value of it tried)."""
    by_position = list(zip(*group.values, strict=True))
    for position in group.plan.nulls:
        values = by_position[position]
        if values.count(None) != len(values):
            return {row for row, value in enumerate(values) if value is not None}
    out: dict[str, Column] = {}
    for position, name, column_type in group.plan.leaves:
        values = by_position[position]
        if values.count(None) == len(values):
            continue
        checked = _checked(values, column_type)
        if checked is None:
            return {row for row, value in enumerate(values) if not _fits(value, column_type)}
        if checked.count(None) != len(checked):
            out[name] = checked
    return out


def _fits(value: Any, column_type: str) -> bool:
    """Whether ``plan_rows`` would store ``value`` in a column of ``column_type`` (None and
    non-finite floats are NULL, which fits)."""
    if value is None or (value.__class__ is float and not math.isfinite(value)):
        return True
    return not isinstance(value, dict) and convert(column_type, value) is not MISFIT


def _insert_columns(
    columns: Mapping[str, str],
    rest: Plan | None,
    stored: Iterable[tuple[list[int], Mapping[str, Column]]],
) -> dict[str, ColumnType]:
    """The columns some row has a value for, in ``plan_rows``'s order: the table's, then
    the new ones, then ``_unmapped_data``."""
    used = {DEDUP_KEY}
    for _, group_columns in stored:
        used.update(group_columns)
    out = {name: ColumnType(kind) for name, kind in columns.items() if name in used}
    if rest is not None:
        out.update((name, ColumnType(kind)) for name, kind in rest.new_columns.items())
        if UNMAPPED_COLUMN in rest.insert_columns:
            out[UNMAPPED_COLUMN] = ColumnType.JSON
    return out


def _in_batch_order(
    insert_columns: Iterable[str],
    stored: Sequence[tuple[list[int], Mapping[str, Column]]],
    ids: list[str],
) -> dict[str, Column]:
    """Each column's values, group after group, then put back in the order of the batch."""
    places = [place for group_places, _ in stored for place in group_places]
    in_order = places == list(range(len(places)))
    reorder: Callable[[Column], Column] | None = None
    if not in_order:
        positions = [0] * len(places)
        for index, place in enumerate(places):
            positions[place] = index
        reorder = itemgetter(*positions)  # len(places) >= 2 when not in order
    out: dict[str, Column] = {}
    for name in insert_columns:
        if name == DEDUP_KEY:
            out[name] = ids
            continue
        values: list[Any] = []
        for group_places, group_columns in stored:
            column = group_columns.get(name)
            if column is None:
                values.extend(repeat(None, len(group_places)))
            else:
                values.extend(column)
        out[name] = values if reorder is None else reorder(values)
    return out
