"""DuckDB, the embedded default: one file in the data directory.

Loading: a batch travels as Arrow columns, one array per column built by ``nanoarrow``
from the planned values and read by DuckDB without a copy, in a single ``INSERT ... SELECT``
that skips ``message_id``s already in the table. One JSON text per row unpacked by
``json_transform`` cost DuckDB twice as much per row; row-at-a-time inserts (``executemany``)
cost milliseconds per row (``bench/warehouse_bench.py``, ``bench/warehouse_floor_bench.py``).

Locking: DuckDB locks the file for one process. While the relay writes, no other process
can open it, not even read-only, so ``tagrelay sql`` asks the running relay, which answers
with ``query`` on a cursor of its own (safe alongside the writer; each query sees one
snapshot). When the relay is down, the CLI opens the file itself with ``read_only=True``.

Read-only queries are enforced three times: the statement type must be a read
(``extract_statements``), the statement runs in a ``READ ONLY`` transaction, and the
database has no access to other files (``enable_external_access = false``: no
``read_csv('/etc/...')``, ``ATTACH``, ``COPY``, extensions).
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import duckdb
import nanoarrow as na
import orjson

from tagrelay.datadir import PRIVATE_DIR_MODE, tighten
from tagrelay.errors import QueryRejected, QueryTimeout, WarehouseError, WarehouseLocked
from tagrelay.warehouse.dialects.base import QueryResult, quote_identifier
from tagrelay.warehouse.schema import ColumnType, json_safe

_NATIVE_TYPES: Final[Mapping[str, str]] = {
    ColumnType.VARCHAR: "VARCHAR",
    ColumnType.BIGINT: "BIGINT",
    ColumnType.DOUBLE: "DOUBLE",
    ColumnType.BOOLEAN: "BOOLEAN",
    ColumnType.TIMESTAMPTZ: "TIMESTAMPTZ",
    ColumnType.JSON: "JSON",
}
_LOGICAL_TYPES: Final[Mapping[str, str]] = {
    "VARCHAR": ColumnType.VARCHAR,
    "BIGINT": ColumnType.BIGINT,
    "DOUBLE": ColumnType.DOUBLE,
    "BOOLEAN": ColumnType.BOOLEAN,
    "TIMESTAMP WITH TIME ZONE": ColumnType.TIMESTAMPTZ,
    "JSON": ColumnType.JSON,
}
_TEXT_CASTS: Final[Mapping[str, str]] = {
    # Arrow carries these as text: the ISO-8601 time (DuckDB's cast reads its offset), and
    # the JSON document.
    ColumnType.TIMESTAMPTZ: "TIMESTAMPTZ",
    ColumnType.JSON: "JSON",
}
_BATCH_VIEW: Final = "tagrelay_batch"
"""The name a batch's Arrow columns are registered under while its INSERT runs."""

_READ_PRAGMAS: Final = frozenset(
    {
        "collations",
        "database_list",
        "database_size",
        "functions",
        "metadata_info",
        "platform",
        "show",
        "show_databases",
        "show_tables",
        "show_tables_expanded",
        "storage_info",
        "table_info",
        "user_agent",
        "version",
    }
)
_PRAGMA_NAME_RE: Final = re.compile(r"\s*pragma\s+(\w+)", re.IGNORECASE)
_EXPLAIN_PREFIX_RE: Final = re.compile(
    r"\s*explain\s+(?:\([^)]*\)\s*)?(?:analy[sz]e\s+)?", re.IGNORECASE
)
_ALLOWED_HINT: Final = (
    "SELECT, FROM, WITH, VALUES, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE, PRAGMA table_info"
)

CLOSE_WAIT_SECS: Final = 10.0
"""How long ``close`` waits for interrupted queries to stop."""

_DEFAULT_CONFIG: Final[Mapping[str, str | int | bool]] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}


class DuckDBDialect:
    """A DuckDB database file. ``settings`` are DuckDB configuration options applied at
    connect (e.g. ``{"threads": 1}``); external file access is always off."""

    name = "duckdb"
    placeholder = "?"
    widenings: frozenset[tuple[str, str]] = frozenset({(ColumnType.BIGINT, ColumnType.DOUBLE)})

    def __init__(
        self,
        path: str,
        *,
        read_only: bool = False,
        settings: Mapping[str, str | int | bool] | None = None,
    ) -> None:
        self.path = path
        self.read_only = read_only
        self.settings = dict(settings or {})
        self._con: duckdb.DuckDBPyConnection | None = None
        self._readers: duckdb.DuckDBPyConnection | None = None
        """Where query cursors come from: a connection that loads never use, so that
        opening a cursor never waits for an insert running on ``_con``."""
        self._running: set[duckdb.DuckDBPyConnection] = set()
        self._queries_done = threading.Condition()
        """Guards ``_readers`` and ``_running``; notified when a query ends."""
        self._insert_sql: dict[tuple[str, tuple[tuple[str, str], ...], bool], str] = {}

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        if not self.read_only:
            self._tighten_files()
        config: dict[str, str | bool | int | float | list[str]] = {
            **self.settings,
            **_DEFAULT_CONFIG,
        }
        try:
            con = duckdb.connect(self.path, read_only=self.read_only, config=config)
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise WarehouseLocked(
                    f"cannot open {self.path}: another process has it open (a running relay "
                    "keeps it locked; query through the relay, or stop it first). "
                    f"DuckDB said: {e}"
                ) from e
            raise WarehouseError(f"cannot open {self.path}: {e}") from e
        except duckdb.Error as e:
            raise WarehouseError(f"cannot open {self.path}: {e}") from e
        try:
            # Results and now() in UTC whatever the host's zone; then freeze the settings so
            # that nothing run later (a query) can turn external access back on.
            con.execute("SET GLOBAL TimeZone = 'UTC'")
            con.execute("SET GLOBAL lock_configuration = true")
        except duckdb.Error as e:
            con.close()
            raise WarehouseError(f"cannot configure {self.path}: {e}") from e
        if not self.read_only:
            # A new file holds only DuckDB's header yet: private before the first row.
            self._tighten_files()
        self._con = con
        self._readers = con.cursor()

    def _tighten_files(self) -> None:
        """The database, its write-ahead log and its spill directory to the relay's user
        alone (``tagrelay.datadir``): DuckDB creates them with the process's umask, and
        files of an older relay may be looser. A database in memory has no files."""
        if self.path == ":memory:" or self.path.startswith(":memory:"):
            return
        path = Path(self.path)
        tighten(path)
        tighten(path.with_name(path.name + ".wal"))
        tighten(path.with_name(path.name + ".tmp"), PRIVATE_DIR_MODE)

    def close(self) -> None:
        """Interrupt the queries still running, wait for them to stop, then close."""
        deadline = time.monotonic() + CLOSE_WAIT_SECS
        with self._queries_done:
            readers, self._readers = self._readers, None
            # DuckDB refuses to close a connection whose cursor is still working, and an
            # interrupted query stops within moments. Again and again: an interrupt is lost
            # on a cursor that has not started its statement yet.
            while self._running and time.monotonic() < deadline:
                for cursor in self._running:
                    cursor.interrupt()
                self._queries_done.wait(0.05)
            if readers is not None and not self._running:
                readers.close()
        con, self._con = self._con, None
        if con is not None:
            con.close()

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise WarehouseError(f"the warehouse {self.path} is not open")
        return self._con

    # -- schema ----------------------------------------------------------------------

    def existing_columns(self, table: str) -> dict[str, str] | None:
        try:
            rows = (
                self._connection()
                .execute(
                    "SELECT column_name, data_type FROM duckdb_columns() "
                    "WHERE database_name = current_database() AND schema_name = 'main' "
                    "AND table_name = ? ORDER BY column_index",
                    [table],
                )
                .fetchall()
            )
        except duckdb.Error as e:
            raise WarehouseError(f"cannot read the columns of {table}: {e}") from e
        if not rows:
            return None
        return {name: _LOGICAL_TYPES.get(native, native) for name, native in rows}

    def create_table(self, table: str, columns: Mapping[str, str], primary_key: str) -> None:
        definitions = ", ".join(
            f"{quote_identifier(name)} {_NATIVE_TYPES[kind]}"
            + (" PRIMARY KEY" if name == primary_key else "")
            for name, kind in columns.items()
        )
        self._execute(f"CREATE TABLE IF NOT EXISTS {quote_identifier(table)} ({definitions})")

    def add_columns(self, table: str, columns: Mapping[str, str]) -> None:
        con = self._connection()
        try:
            con.begin()
            for name, kind in columns.items():
                con.execute(
                    f"ALTER TABLE {quote_identifier(table)} "
                    f"ADD COLUMN IF NOT EXISTS {quote_identifier(name)} {_NATIVE_TYPES[kind]}"
                )
            con.commit()
        except duckdb.Error as e:
            _rollback(con)
            raise WarehouseError(f"cannot add columns to {table}: {e}") from e

    def widen_column(self, table: str, column: str, from_type: str, to_type: str) -> bool:
        if (from_type, to_type) not in self.widenings:
            raise WarehouseError(f"cannot change a {from_type} column to {to_type}")
        con = self._connection()
        quoted_table, quoted = quote_identifier(table), quote_identifier(column)
        wider, narrower = _NATIVE_TYPES[to_type], _NATIVE_TYPES[from_type]
        try:
            con.begin()
            # ALTER ... SET DATA TYPE casts every value, rounding an int beyond 2**53
            # silently: first make sure none would change.
            lossy = con.execute(
                f"SELECT EXISTS (SELECT 1 FROM {quoted_table} WHERE {quoted} IS NOT NULL AND "
                f"TRY_CAST(CAST({quoted} AS {wider}) AS {narrower}) IS DISTINCT FROM {quoted})"
            ).fetchone()
            if lossy is None or lossy[0]:
                _rollback(con)
                return False
            con.execute(f"ALTER TABLE {quoted_table} ALTER COLUMN {quoted} SET DATA TYPE {wider}")
            con.commit()
        except duckdb.Error as e:
            _rollback(con)
            raise WarehouseError(f"cannot change {table}.{column} to {to_type}: {e}") from e
        return True

    # -- loading ---------------------------------------------------------------------

    def insert_rows(
        self,
        table: str,
        columns: Mapping[str, str],
        values: Mapping[str, Sequence[Any]],
        count: int,
    ) -> int:
        if not count:
            return 0
        try:
            batch = _arrow_batch(columns, values, count)
        except (ValueError, TypeError, OverflowError) as e:
            raise WarehouseError(f"cannot convert {count} rows for {table}: {e}") from e
        con = self._connection()
        try:
            con.register(_BATCH_VIEW, batch)
            try:
                # Optimistic: a plain INSERT is several times cheaper than ON CONFLICT on a
                # wide table, and fresh ids are the rule. The statement is atomic: on a
                # duplicate key nothing of it stays, and the batch goes again, skipping.
                sql = self._insert_statement(table, columns, skip_existing=False)
                result = con.execute(sql).fetchone()
            except duckdb.ConstraintException:
                sql = self._insert_statement(table, columns, skip_existing=True)
                result = con.execute(sql).fetchone()
            finally:
                con.unregister(_BATCH_VIEW)
        except duckdb.Error as e:
            raise WarehouseError(f"cannot insert {count} rows into {table}: {e}") from e
        return int(result[0]) if result else 0

    def _insert_statement(
        self, table: str, columns: Mapping[str, str], *, skip_existing: bool
    ) -> str:
        key = (table, tuple(columns.items()), skip_existing)
        sql = self._insert_sql.get(key)
        if sql is None:
            names = [quote_identifier(name) for name in columns]
            values = ", ".join(
                f"CAST({name} AS {_TEXT_CASTS[kind]})" if kind in _TEXT_CASTS else name
                for name, kind in zip(names, columns.values(), strict=True)
            )
            sql = (
                f"INSERT INTO {quote_identifier(table)} ({', '.join(names)}) "
                f"SELECT {values} FROM {_BATCH_VIEW}"
                + (" ON CONFLICT DO NOTHING" if skip_existing else "")
            )
            if len(self._insert_sql) > 256:
                self._insert_sql.clear()
            self._insert_sql[key] = sql
        return sql

    def delete_older_than(self, table: str, before: str) -> int:
        try:
            row = (
                self._connection()
                .execute(
                    f"DELETE FROM {quote_identifier(table)} "
                    'WHERE COALESCE("received_at", "timestamp") < CAST(? AS TIMESTAMPTZ)',
                    [before],
                )
                .fetchone()
            )
        except duckdb.Error as e:
            raise WarehouseError(f"cannot delete old rows from {table}: {e}") from e
        return int(row[0]) if row else 0

    def select_where(self, table: str, where: str, params: Sequence[Any]) -> QueryResult:
        try:
            cursor = self._connection().execute(
                f"SELECT * FROM {quote_identifier(table)} WHERE {where}", list(params)
            )
            columns = tuple(d[0] for d in cursor.description or ())
            rows = cursor.fetchall()
        except duckdb.Error as e:
            raise WarehouseError(f"cannot read rows of {table}: {e}") from e
        return QueryResult(columns, rows, False)

    def delete_where(self, table: str, where: str, params: Sequence[Any]) -> int:
        try:
            row = (
                self._connection()
                .execute(f"DELETE FROM {quote_identifier(table)} WHERE {where}", list(params))
                .fetchone()
            )
        except duckdb.Error as e:
            raise WarehouseError(f"cannot delete rows from {table}: {e}") from e
        return int(row[0]) if row else 0

    def checkpoint(self) -> None:
        self._execute("CHECKPOINT")

    def compact(self) -> None:
        """Rewrite the database file with its live rows only. DuckDB leaves the blocks of
        deleted rows in the file, free but unchanged, where a raw read finds them: after an
        erasure, the database is copied into a new file (``COPY FROM DATABASE``, which keeps
        the tables and their keys), the new file replaces the old, and the database is
        opened again. Interrupts the queries running; takes as long as copying the data."""
        if self.read_only or self.path.startswith(":memory:"):
            return
        path = Path(self.path)
        fresh = path.with_name(path.name + ".compact")
        for leftover in (fresh, fresh.with_name(fresh.name + ".wal")):
            leftover.unlink(missing_ok=True)
        self.close()
        try:
            con = duckdb.connect(str(fresh))
            try:
                (name,) = con.execute("SELECT current_database()").fetchone() or ("",)
                con.execute(f"ATTACH {_string_literal(str(path))} AS erasure_source (READ_ONLY)")
                con.execute(f"COPY FROM DATABASE erasure_source TO {quote_identifier(name)}")
                con.execute("DETACH erasure_source")
                con.execute("CHECKPOINT")
            finally:
                con.close()
            tighten(fresh)
            with open(fresh, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(fresh, path)
            path.with_name(path.name + ".wal").unlink(missing_ok=True)
        except (duckdb.Error, OSError) as e:
            fresh.unlink(missing_ok=True)
            raise WarehouseError(f"cannot rewrite {self.path} without the erased rows: {e}") from e
        finally:
            self.open()

    def _execute(self, sql: str) -> None:
        try:
            self._connection().execute(sql)
        except duckdb.Error as e:
            raise WarehouseError(f"{e} (in: {sql[:200]})") from e

    # -- reading ---------------------------------------------------------------------

    def query(self, sql: str, max_rows: int, timeout_secs: float | None) -> QueryResult:
        # A cursor is a connection of its own on the same database: it runs in its own
        # thread while the writer inserts (DuckDB releases the GIL while it works), and
        # sees a consistent snapshot.
        with self._queries_done:
            if self._readers is None:
                raise WarehouseError(f"the warehouse {self.path} is not open")
            try:
                cursor = self._readers.cursor()
            except duckdb.Error as e:
                raise WarehouseError(f"cannot open a cursor: {e}") from e
            self._running.add(cursor)
        try:
            statement = _read_only_statement(cursor, sql)
            return _run_read_only(cursor, statement, max_rows, timeout_secs)
        finally:
            cursor.close()
            with self._queries_done:
                self._running.discard(cursor)
                self._queries_done.notify_all()


def _read_only_statement(cursor: duckdb.DuckDBPyConnection, sql: str) -> duckdb.Statement:
    """The single statement of ``sql`` if it only reads; else ``QueryRejected``."""
    statements = _parse(cursor, sql)
    if len(statements) != 1:
        raise QueryRejected(
            f"expected exactly one statement, got {len(statements)}; run them one at a time"
        )
    statement = statements[0]
    kind = statement.type
    if kind == duckdb.StatementType.SELECT:
        return statement
    if kind == duckdb.StatementType.EXPLAIN:
        prefix = _EXPLAIN_PREFIX_RE.match(statement.query)
        inner = _parse(cursor, statement.query[prefix.end() :]) if prefix else []
        if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
            return statement
        raise QueryRejected("EXPLAIN is allowed for a SELECT only")
    if kind == duckdb.StatementType.PRAGMA:
        pragma = _PRAGMA_NAME_RE.match(statement.query)
        if pragma and pragma.group(1).lower() in _READ_PRAGMAS:
            return statement
        allowed = ", ".join(sorted(_READ_PRAGMAS))
        raise QueryRejected(f"only these PRAGMAs may run here: {allowed}")
    raise QueryRejected(
        f"only read-only queries may run here ({_ALLOWED_HINT}); got a {kind.name} statement"
    )


def _parse(cursor: duckdb.DuckDBPyConnection, sql: str) -> list[duckdb.Statement]:
    try:
        return list(cursor.extract_statements(sql))
    except duckdb.Error as e:
        raise WarehouseError(f"cannot parse the query: {e}") from e


def _run_read_only(
    cursor: duckdb.DuckDBPyConnection,
    statement: duckdb.Statement,
    max_rows: int,
    timeout_secs: float | None,
) -> QueryResult:
    timed_out, finished = threading.Event(), threading.Event()

    def stop() -> None:
        timed_out.set()
        # Until it ends: an interrupt is lost on a cursor between two statements.
        while True:
            cursor.interrupt()
            if finished.wait(0.05):
                return

    timer = threading.Timer(timeout_secs, stop) if timeout_secs else None
    try:
        cursor.execute("BEGIN TRANSACTION READ ONLY")
        if timer is not None:
            timer.start()
        cursor.execute(statement)
        columns = tuple(d[0] for d in cursor.description or ())
        rows = cursor.fetchmany(max_rows + 1) if columns else []
    except duckdb.InterruptException as e:
        if not timed_out.is_set():
            raise WarehouseError("the query was stopped: the warehouse is closing") from e
        raise QueryTimeout(
            f"the query ran longer than {timeout_secs:g} s and was stopped; narrow it "
            "(a WHERE on timestamp, a LIMIT)"
        ) from e
    except duckdb.Error as e:
        raise WarehouseError(f"the query failed: {e}") from e
    finally:
        finished.set()
        if timer is not None:
            timer.cancel()
            if timer.ident is not None:  # started: its last interrupt is done after this
                timer.join()
        _rollback(cursor)
    return QueryResult(columns=columns, rows=rows[:max_rows], truncated=len(rows) > max_rows)


_ARROW_TYPES: Final[Mapping[str, na.Schema]] = {
    ColumnType.VARCHAR: na.string(),
    ColumnType.BIGINT: na.int64(),
    ColumnType.DOUBLE: na.float64(),
    ColumnType.BOOLEAN: na.bool_(),
    ColumnType.TIMESTAMPTZ: na.string(),
    ColumnType.JSON: na.string(),
}
_DENSE_FORMATS: Final[Mapping[str, str]] = {ColumnType.BIGINT: "q", ColumnType.DOUBLE: "d"}
"""``array`` type codes of the number columns: a column without NULLs becomes its Arrow
buffer in one C call, several times faster than nanoarrow's conversion value by value."""


def _arrow_batch(
    columns: Mapping[str, str], values: Mapping[str, Sequence[Any]], count: int
) -> na.Array:
    """The batch as one Arrow struct array (a table DuckDB can scan), a child per column."""
    children = [_arrow_column(kind, values[name]) for name, kind in columns.items()]
    schema = na.struct({name: _ARROW_TYPES[kind] for name, kind in columns.items()})
    return na.Array(na.c_array_from_buffers(schema, count, [None], children=children))


def _arrow_column(kind: str, values: Sequence[Any]) -> na.CArray:
    if kind == ColumnType.JSON:
        values = [None if value is None else _json_text(value) for value in values]
    dense = _DENSE_FORMATS.get(kind)
    if dense is not None and None not in values:
        data = array.array(dense, values)
        return na.c_array_from_buffers(_ARROW_TYPES[kind], len(data), [None, data])
    try:
        return na.c_array(values, _ARROW_TYPES[kind])
    except ValueError:  # nanoarrow's, around the UnicodeEncodeError
        # A lone surrogate (from a JSON "\udc80" escape) has no UTF-8: stored as U+FFFD,
        # as the JSON documents of the other dialect store it (rare).
        return na.c_array([json_safe(value) for value in values], _ARROW_TYPES[kind])


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return orjson.dumps(json_safe(value)).decode()


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    # No transaction open, or the connection is going away anyway: nothing to undo.
    with contextlib.suppress(duckdb.Error):
        con.rollback()


def _string_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
