"""The SQL warehouse: events loaded into one table whose columns evolve with the data.

The path of a batch: ``Warehouse.insert`` flattens and types it against the table's known
columns (``schema.plan``, pure), has the dialect widen the columns a value needs widened
(BIGINT -> DOUBLE for a fraction, ``Dialect.widenings``) and add the new ones, then load
every row in one statement that skips message ids already in the table. Values that still
do not fit their column land in the row's ``_unmapped_data`` JSON; no event is dropped
except duplicates.

With a ``PiiHasher`` (the forwarder's ``hash_pii``), emails and phones are replaced by keyed
hashes before planning (``tagrelay.warehouse.pii``). ``Warehouse.expire`` deletes the rows
received before a time (the forwarder's ``retention_days``).

``Warehouse.link``, ``rows_of`` and ``erase`` find and delete one person's rows for
``tagrelay forget`` and ``tagrelay export`` (``tagrelay.warehouse.erasure``).

``Warehouse.query`` answers ``tagrelay sql``: one read-only statement, a row cap, a timeout;
it runs in another thread while a batch is loading, and never waits for it.

Dialects live in ``tagrelay.warehouse.dialects``: ``duckdb`` (the embedded default) and
``postgres`` (a shared database for several replicas); ``schema`` is the same for both.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from tagrelay.errors import WarehouseError, WarehouseLocked
from tagrelay.model import Event
from tagrelay.model.subject import Subject
from tagrelay.warehouse.dialects.base import Dialect, QueryResult
from tagrelay.warehouse.erasure import EMAIL_COLUMNS, person_condition
from tagrelay.warehouse.pii import PiiHasher
from tagrelay.warehouse.schema import BASE_COLUMNS, DEDUP_KEY, UNMAPPED_COLUMN, ColumnType
from tagrelay.warehouse.shapes import plan

__all__ = [
    "DIALECTS",
    "ColumnType",
    "InsertResult",
    "QueryResult",
    "Warehouse",
    "open_when_unlocked",
]

log = logging.getLogger(__name__)

DialectFactory = Callable[..., Dialect]


def _duckdb(*args: Any, **kwargs: Any) -> Dialect:
    # Imported on first use: the relay's own process never loads DuckDB (the warehouse runs
    # in a child process), which keeps tens of megabytes out of it.
    from tagrelay.warehouse.dialects.duckdb import DuckDBDialect

    return DuckDBDialect(*args, **kwargs)


def _postgres(*args: Any, **kwargs: Any) -> Dialect:
    from tagrelay.warehouse.dialects.postgres import PostgresDialect

    return PostgresDialect(*args, **kwargs)


DIALECTS: Final[Mapping[str, DialectFactory]] = MappingProxyType(
    {"duckdb": _duckdb, "postgres": _postgres}
)
"""Dialect name -> factory ``(target, *, read_only, settings) -> Dialect``."""

_TABLE_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class InsertResult:
    """What one ``insert`` did."""

    inserted: int
    """Rows written."""
    duplicates: int
    """Events not written because their message_id was earlier in the batch or already in
    the table."""
    unmapped_values: int
    """Values stored in ``_unmapped_data`` instead of a column (type misfit, name collision,
    name too long, column limit)."""
    new_columns: Mapping[str, str]
    """Columns added to the table for this batch, name -> type, in order."""
    widened_columns: Mapping[str, str]
    """Columns of the table changed to a wider type for this batch, name -> new type."""
    unmapped_reasons: Mapping[str, int]
    """``unmapped_values`` by reason, the reasons with a count only: ``type_mismatch`` (the
    value does not fit its column's type, even widened), ``name_collision`` (another key
    of the event has its column name), ``over_limit`` (its name is too long, or the table
    has ``max_columns``)."""
    misfit_columns: Mapping[str, str]
    """Columns whose values did not fit their type -> the JSON kind of the first one."""


class Warehouse:
    """One table in one database, with its columns known in memory.

    ``insert`` and ``close`` are meant for one thread (the forwarder's); ``query`` may be
    called from other threads meanwhile, several at once."""

    def __init__(
        self,
        dialect: Dialect,
        table: str,
        max_columns: int,
        *,
        read_only: bool = False,
        pii: PiiHasher | None = None,
    ) -> None:
        self.dialect = dialect
        self.pii = pii
        """Hashes emails and phones before they are stored (``hash_pii``), or None."""
        self.table = table
        self.max_columns = max_columns
        self.read_only = read_only
        self._columns: dict[str, str] = {}
        self._fixed_columns: set[str] = set()
        """Columns the dialect refused to widen (a value would not survive): not asked
        again while this process lives."""

    @classmethod
    def open(
        cls,
        dialect: str,
        target: str,
        *,
        table: str = "events",
        max_columns: int = 1000,
        read_only: bool = False,
        settings: Mapping[str, str | int | bool] | None = None,
        hash_pii_salt: bytes | None = None,
    ) -> Warehouse:
        """Open the database at ``target`` (a file path for duckdb, a connection string for
        postgres) and read ``table``'s
        columns; create the table with the base columns when it is missing (unless
        ``read_only``). ``settings`` go to the engine (DuckDB: e.g. ``{"threads": 1}``).
        With ``hash_pii_salt``, emails and phones are stored hashed (``warehouse.pii``)."""
        factory = DIALECTS.get(dialect)
        if factory is None:
            raise WarehouseError(
                f"unknown warehouse dialect {dialect!r}; expected one of {sorted(DIALECTS)}"
            )
        if not _TABLE_NAME_RE.fullmatch(table):
            raise WarehouseError(
                f"invalid table name {table!r}: expected lower-case letters, digits and _, "
                "not starting with a digit, at most 63 characters"
            )
        if max_columns < len(BASE_COLUMNS):
            raise WarehouseError(
                f"max_columns is {max_columns}; it must be at least {len(BASE_COLUMNS)}"
            )
        pii = PiiHasher(hash_pii_salt) if hash_pii_salt is not None else None
        engine = factory(target, read_only=read_only, settings=settings)
        engine.open()
        warehouse = cls(engine, table, max_columns, read_only=read_only, pii=pii)
        try:
            warehouse._load_columns(create=not read_only)
            if not read_only:
                warehouse._add_missing_base_columns()
        except BaseException:
            engine.close()
            raise
        return warehouse

    @property
    def columns(self) -> Mapping[str, str]:
        """The table's columns as last read or written: name -> type, in table order."""
        return MappingProxyType(self._columns)

    def _load_columns(self, *, create: bool) -> None:
        columns = self.dialect.existing_columns(self.table)
        if columns is None and create:
            self.dialect.create_table(self.table, BASE_COLUMNS, primary_key=DEDUP_KEY)
            columns = self.dialect.existing_columns(self.table)
        if columns is not None and not self.read_only:
            for name in (DEDUP_KEY, UNMAPPED_COLUMN):
                if columns.get(name) != BASE_COLUMNS[name]:
                    raise WarehouseError(
                        f"table {self.table} exists but its column {name} is "
                        f"{columns.get(name, 'missing')}, not {BASE_COLUMNS[name]}: it was not "
                        "created by tagrelay; choose another table name"
                    )
        self._columns = columns or {}

    def _add_missing_base_columns(self) -> None:
        """A table made by an older version may lack base columns added since: add them,
        so that the queries the base columns exist for work on every table."""
        room = max(self.max_columns - len(self._columns), 0)
        absent = [(name, kind) for name, kind in BASE_COLUMNS.items() if name not in self._columns]
        missing = dict(absent[:room])
        if missing:
            self.dialect.add_columns(self.table, missing)
            self._columns.update(missing)

    def insert(self, events: Sequence[Event]) -> InsertResult:
        """Load ``events``: add the columns they need, then insert them, skipping message
        ids already present. Raises ``WarehouseError`` when the database fails; the batch
        can then be retried as a whole (nothing is written twice)."""
        if self.read_only:
            raise WarehouseError(f"the warehouse of table {self.table} was opened read-only")
        if self.pii is not None:
            events = self.pii.events(events)
        widened: dict[str, str] = {}
        try:
            while True:
                batch = plan(
                    events,
                    self._columns,
                    self.max_columns,
                    widenings=self.dialect.widenings,
                    fixed_columns=self._fixed_columns,
                )
                if self._widen(batch.widened_columns, widened):
                    break
                # a column could not widen: plan again with it fixed (rare: once per column)
            if batch.new_columns:
                self.dialect.add_columns(self.table, batch.new_columns)
                self._columns.update(batch.new_columns)
            inserted = self.dialect.insert_rows(
                self.table, batch.insert_columns, batch.columns, batch.row_count
            )
        except WarehouseError:
            self._reload_after_failure()
            raise
        reasons = {
            "type_mismatch": batch.misfits,
            "name_collision": batch.collisions,
            "over_limit": batch.over_limit,
        }
        return InsertResult(
            inserted=inserted,
            duplicates=batch.duplicates + batch.row_count - inserted,
            unmapped_values=batch.unmapped_values,
            new_columns=dict(batch.new_columns),
            widened_columns=widened,
            unmapped_reasons={reason: n for reason, n in reasons.items() if n},
            misfit_columns=dict(batch.misfit_columns),
        )

    def _widen(self, columns: Mapping[str, str], widened: dict[str, str]) -> bool:
        """Widen ``columns`` in the table (recording them in ``widened``); False when one
        could not be, which is then fixed at its type."""
        done = True
        for name, kind in columns.items():
            if self.dialect.widen_column(self.table, name, self._columns[name], kind):
                self._columns[name] = widened[name] = kind
                log.debug("warehouse %s: widened %s to %s", self.table, name, kind)
            else:
                self._fixed_columns.add(name)
                done = False
        return done

    def _reload_after_failure(self) -> None:
        """After a failed write the table may or may not have the new columns: ask it."""
        try:
            self._load_columns(create=False)
        except WarehouseError:
            log.debug("warehouse %s: cannot re-read the columns", self.table, exc_info=True)

    def expire(self, before: str) -> int:
        """Delete the rows received before ``before`` (an ISO-8601 time with its zone):
        by ``received_at``, else ``timestamp`` for a row without one. How many were."""
        if self.read_only:
            raise WarehouseError(f"the warehouse of table {self.table} was opened read-only")
        return self.dialect.delete_older_than(self.table, before)

    # -- erasure and access (``tagrelay forget``, ``tagrelay export``) -------------------

    LINK_ROUNDS = 3
    """How many times ``link`` follows ids to more ids (email -> user id -> anonymous ids)."""

    def link(self, subject: Subject) -> Subject:
        """``subject`` with the ids its rows carry: the user ids its emails were given
        under, the anonymous ids its user ids were seen with, and the emails (or, with
        ``hash_pii``, their hashes) its rows hold (``warehouse.erasure``)."""
        for _ in range(self.LINK_ROUNDS):
            found = self._person_rows(subject)
            if found is None:
                return subject
            users, anonymous, emails = found
            wider = subject.widened(user_ids=users, anonymous_ids=anonymous, emails=emails)
            if wider == subject:
                return subject
            subject = wider
        return subject

    def _person_rows(self, subject: Subject) -> tuple[set[str], set[str], set[str]] | None:
        """The user ids, anonymous ids and emails of the rows found by ``subject``'s user
        ids and emails. Not by its anonymous ids: one may be shared (``model.subject``)."""
        direct = Subject(subject.user_ids, frozenset(), subject.emails)
        condition = person_condition(direct, self._columns, self.pii, self.dialect.placeholder)
        if condition is None:
            return None
        result = self.dialect.select_where(self.table, *condition)
        found: dict[str, set[str]] = {"user_id": set(), "anonymous_id": set(), "email": set()}
        for index, column in enumerate(result.columns):
            kind = "email" if column in EMAIL_COLUMNS else column
            if kind in found:
                found[kind].update(str(row[index]) for row in result.rows if row[index])
        return found["user_id"], found["anonymous_id"], found["email"]

    def rows_of(self, subject: Subject) -> QueryResult:
        """Every row of ``subject`` (an access request)."""
        condition = person_condition(subject, self._columns, self.pii, self.dialect.placeholder)
        if condition is None:
            return QueryResult(tuple(self._columns), [], False)
        return self.dialect.select_where(self.table, *condition)

    def erase(self, subject: Subject) -> int:
        """Delete every row of ``subject``; how many there were."""
        if self.read_only:
            raise WarehouseError(f"the warehouse of table {self.table} was opened read-only")
        condition = person_condition(subject, self._columns, self.pii, self.dialect.placeholder)
        if condition is None:
            return 0
        deleted = self.dialect.delete_where(self.table, *condition)
        if deleted:
            self.dialect.compact()
        return deleted

    def query(
        self, sql: str, max_rows: int = 10_000, timeout_secs: float | None = 60.0
    ) -> QueryResult:
        """Run one read-only statement (SELECT, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE, reading
        PRAGMAs) and return at most ``max_rows`` rows, ``truncated`` saying whether there
        were more. Raises ``QueryRejected`` for anything else, ``QueryTimeout`` when it runs
        past ``timeout_secs`` (None: no limit), ``WarehouseError`` when it fails."""
        if max_rows < 1:
            raise WarehouseError(f"max_rows must be at least 1, got {max_rows}")
        return self.dialect.query(sql, max_rows, timeout_secs)

    def checkpoint(self) -> None:
        """Make what is stored durable in the database's own file (DuckDB's CHECKPOINT;
        nothing to do on PostgreSQL)."""
        if not self.read_only:
            self.dialect.checkpoint()

    def close(self) -> None:
        """Close the database. Idempotent."""
        self.dialect.close()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_when_unlocked(
    open_warehouse: Callable[[], Warehouse], wait_secs: float, poll_secs: float = 0.1
) -> Warehouse:
    """``open_warehouse()``, tried again while another process still holds the file (a relay
    that is stopping or has just died closes it within moments) for up to ``wait_secs``.
    Raises ``WarehouseLocked`` after that, and any other error at once."""
    deadline = time.monotonic() + wait_secs
    while True:
        try:
            return open_warehouse()
        except WarehouseLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(poll_secs)
