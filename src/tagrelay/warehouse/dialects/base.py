"""The dialect contract: what a SQL engine must do for the warehouse.

``tagrelay.warehouse.Warehouse`` plans every batch with the pure ``shapes.plan`` and hands
a dialect only finished work: columns to add (logical ``ColumnType`` names), and rows whose
values already fit their column types. A dialect maps the logical types to its own, quotes
identifiers, loads a batch in one statement, deduplicates on ``message_id`` against the
table, and runs read-only queries. Methods are synchronous: the forwarder calls them from
its own thread; ``query`` may be called from another thread at the same time as the others.

Errors: every database failure surfaces as ``WarehouseError`` (``QueryRejected`` for a
statement ``query`` may not run), with the engine's message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class QueryResult:
    """The answer to a read-only query."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    """Python values as the driver returns them (datetime, Decimal, str for JSON, ...)."""
    truncated: bool
    """True when the query had more rows than ``max_rows``; ``rows`` holds the first ones."""


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (standard SQL; DuckDB and PostgreSQL)."""
    return '"' + name.replace('"', '""') + '"'


class Dialect(Protocol):
    """One SQL engine. Created closed; ``open`` connects."""

    name: str
    widenings: frozenset[tuple[str, str]]
    """The ``(from, to)`` logical type changes ``widen_column`` makes in place, keeping the
    column's rows (DuckDB: BIGINT -> DOUBLE). ``schema.plan`` asks for no other; a dialect
    that can make none declares an empty set, and a misfit value then goes to
    ``_unmapped_data`` as before."""

    def open(self) -> None:
        """Connect (creating the database file where the engine does that)."""

    def close(self) -> None:
        """Disconnect. Idempotent."""

    def existing_columns(self, table: str) -> dict[str, str] | None:
        """``table``'s columns in table order, name -> logical type (``ColumnType`` value,
        or the engine's own type name for a type the warehouse does not manage); None when
        the table does not exist."""

    def create_table(self, table: str, columns: Mapping[str, str], primary_key: str) -> None:
        """Create ``table`` with ``columns`` (logical types) unless it exists."""

    def add_columns(self, table: str, columns: Mapping[str, str]) -> None:
        """Add nullable ``columns`` (logical types) to ``table``; existing ones are skipped."""

    def widen_column(self, table: str, column: str, from_type: str, to_type: str) -> bool:
        """Change ``column`` of ``table`` from ``from_type`` to ``to_type`` (a pair of
        ``widenings``) in place, in one transaction, if every value it holds converts
        exactly (converted back, it is the same value); return False, changing nothing, if
        one would not (an int beyond 2**53 into DOUBLE)."""

    def insert_rows(
        self,
        table: str,
        columns: Mapping[str, str],
        values: Mapping[str, Sequence[Any]],
        count: int,
    ) -> int:
        """Insert ``count`` rows into the ``columns`` of ``table`` in one statement,
        skipping rows whose primary key is already in the table. ``values`` holds the rows
        by column, ``count`` values per column, already converted (``schema.Plan.columns``:
        None is NULL). Returns the number of rows inserted."""

    def delete_older_than(self, table: str, before: str) -> int:
        """Delete the rows of ``table`` whose ``received_at`` (or, when it is NULL,
        ``timestamp``) is before ``before`` (ISO-8601 with a zone); how many there were."""

    placeholder: str
    """How a statement marks a parameter (``?``, ``%s``), for ``select_where`` and
    ``delete_where``."""

    def select_where(self, table: str, where: str, params: Sequence[Any]) -> QueryResult:
        """Every row of ``table`` that meets ``where`` (with ``params``), all columns
        (erasure and access requests: ``tagrelay.warehouse.erasure``)."""

    def delete_where(self, table: str, where: str, params: Sequence[Any]) -> int:
        """Delete the rows of ``table`` that meet ``where``, in one transaction; how
        many there were."""

    def checkpoint(self) -> None:
        """Write what the engine holds only in its log to its data file (DuckDB: the log
        and the memory it took since the last checkpoint); nothing where the engine does
        this itself."""

    def compact(self) -> None:
        """After an erasure: make sure the deleted rows are gone from the storage, not only
        from the table (DuckDB rewrites its file; PostgreSQL leaves it to vacuum)."""

    def query(self, sql: str, max_rows: int, timeout_secs: float | None) -> QueryResult:
        """Run one read-only statement and return at most ``max_rows`` rows. Raises
        ``QueryRejected`` for anything that could write, ``QueryTimeout`` when it runs
        past ``timeout_secs`` (it is interrupted), ``WarehouseError`` when it fails. Safe
        to call from other threads, several at once, while the other methods run: a query
        never waits for a load. ``close`` interrupts the queries still running."""
