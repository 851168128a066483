"""PostgreSQL: the warehouse a team already runs, shared by every replica of the relay.

Loading: a batch is copied (``COPY ... FROM STDIN``, typed columns) into a temporary
staging table of the session, then moved with one ``INSERT ... SELECT`` that skips message
ids the table already has (``ON CONFLICT (message_id) DO NOTHING``): two statements per
batch, whatever its size, in one transaction. A batch holding a value PostgreSQL's text
cannot (NUL) or UTF-8 cannot (a lone surrogate) goes again as one JSON document per row,
unpacked by ``json_to_record``, with those replaced.

Several replicas load into one table at once. Every change of the table's shape (create,
add columns, widen) runs in a transaction holding a transaction-level advisory lock named
after the table, so that two replicas adding the same column one after the other is the
worst that happens (``ADD COLUMN IF NOT EXISTS`` makes the second a no-op). A replica whose
idea of the columns is stale finds out when its insert fails; ``Warehouse`` then reads them
again and plans the batch anew.

PostgreSQL refuses the NUL character in text and ``jsonb``: a NUL in an event becomes
U+FFFD, the replacement character, rather than failing the batch.

Queries (``tagrelay sql``): one statement per call (the extended protocol takes no more),
which must start with SELECT, WITH, VALUES, TABLE, EXPLAIN or SHOW, run on a connection of
their own in a ``READ ONLY`` transaction with ``statement_timeout``. For more than that,
give the relay's ``dsn`` a role that may not read files or run programs (not a superuser).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql as pg_sql
from psycopg.types.string import TextLoader

from tagrelay.errors import QueryRejected, QueryTimeout, WarehouseError
from tagrelay.warehouse.dialects.base import QueryResult, quote_identifier
from tagrelay.warehouse.schema import ColumnType, json_safe

_NATIVE_TYPES: Final[Mapping[str, str]] = {
    ColumnType.VARCHAR: "TEXT",
    ColumnType.BIGINT: "BIGINT",
    ColumnType.DOUBLE: "DOUBLE PRECISION",
    ColumnType.BOOLEAN: "BOOLEAN",
    ColumnType.TIMESTAMPTZ: "TIMESTAMPTZ",
    ColumnType.JSON: "JSONB",
}
_LOGICAL_TYPES: Final[Mapping[str, str]] = {
    "text": ColumnType.VARCHAR,
    "character varying": ColumnType.VARCHAR,
    "bigint": ColumnType.BIGINT,
    "double precision": ColumnType.DOUBLE,
    "boolean": ColumnType.BOOLEAN,
    "timestamp with time zone": ColumnType.TIMESTAMPTZ,
    "jsonb": ColumnType.JSON,
}

_STAGE: Final = "tagrelay_stage"
_SCHEMA_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_FIRST_WORD_RE: Final = re.compile(
    r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*(\(|[a-z]+)", re.IGNORECASE | re.DOTALL
)
_OTHER_COMMANDS: Final = frozenset(
    [
        "abort",
        "alter",
        "analyze",
        "begin",
        "call",
        "checkpoint",
        "close",
        "cluster",
        "comment",
        "commit",
        "copy",
        "create",
        "deallocate",
        "declare",
        "delete",
        "discard",
        "do",
        "drop",
        "end",
        "execute",
        "fetch",
        "grant",
        "import",
        "insert",
        "listen",
        "load",
        "lock",
        "merge",
        "move",
        "notify",
        "prepare",
        "reassign",
        "refresh",
        "reindex",
        "release",
        "reset",
        "revoke",
        "rollback",
        "savepoint",
        "security",
        "set",
        "start",
        "truncate",
        "unlisten",
        "update",
        "vacuum",
    ]
)
"""PostgreSQL's other commands, refused without asking the server. A first word that is no
command at all goes to the server, which answers with its syntax error."""
_ALLOWED_HINT: Final = "SELECT, WITH, VALUES, TABLE, EXPLAIN, SHOW"
# A NUL escape in JSON text: \u0000 preceded by an even number of backslashes (an odd
# number would make the first of them part of an escaped backslash, "\\u0000").
_NUL_ESCAPE_RE: Final = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
# Integers a DOUBLE holds exactly for sure; beyond them, the round trip is checked (and the
# last ones before 2**63 are refused: converting them back overflows BIGINT).
_EXACT_IN_DOUBLE: Final = 2**53
_NEAR_INT64_LIMIT: Final = 2**63 - 1024

CONNECT_TIMEOUT_SECS: Final = 10
CLOSE_WAIT_SECS: Final = 10.0
"""How long ``close`` waits for cancelled queries to stop."""


class PostgresDialect:
    """A table in a PostgreSQL database, reached by ``dsn`` (a libpq connection string or
    ``postgresql://`` URL). ``settings``: ``schema`` (default ``public``, created when
    missing), ``application_name``."""

    name = "postgres"
    placeholder = "%s"
    widenings: frozenset[tuple[str, str]] = frozenset({(ColumnType.BIGINT, ColumnType.DOUBLE)})

    def __init__(
        self,
        dsn: str,
        *,
        read_only: bool = False,
        settings: Mapping[str, str | int | bool] | None = None,
    ) -> None:
        settings = dict(settings or {})
        self.dsn = dsn
        self.read_only = read_only
        self.schema = str(settings.get("schema", "public"))
        if not _SCHEMA_RE.fullmatch(self.schema):
            raise WarehouseError(
                f"invalid schema name {self.schema!r}: expected lower-case letters, digits "
                "and _, not starting with a digit, at most 63 characters"
            )
        self.application_name = str(settings.get("application_name", "tagrelay"))
        self._con: psycopg.Connection[Any] | None = None
        self._running: set[psycopg.Connection[Any]] = set()
        self._stages: dict[str, dict[str, str]] = {}
        """Table -> the columns of its staging table in this session (``_typed_stage``)."""
        self._queries_done = threading.Condition()
        """Guards ``_running`` and ``_closed``; notified when a query ends."""
        self._closed = False

    def __repr__(self) -> str:
        # never the dsn: it may hold a password
        return f"PostgresDialect(schema={self.schema!r}, read_only={self.read_only})"

    # -- lifecycle -------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            con = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_SECS,
                application_name=self.application_name,
            )
        except psycopg.Error as e:
            raise WarehouseError(f"cannot connect to PostgreSQL: {_message(e)}") from e
        try:
            con.execute("SET TIME ZONE 'UTC'")
        except psycopg.Error as e:
            con.close()
            raise WarehouseError(f"cannot configure the connection: {_message(e)}") from e
        return con

    def open(self) -> None:
        con = self._connect()
        if not self.read_only:
            try:
                if self.schema != "public":
                    with con.transaction():
                        self._lock_table(con, "schema")
                        con.execute(
                            pg_sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                                pg_sql.Identifier(self.schema)
                            )
                        )
                con.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (doc JSON NOT NULL) "
                    "ON COMMIT DELETE ROWS"
                )
            except psycopg.Error as e:
                con.close()
                raise WarehouseError(f"cannot prepare schema {self.schema}: {_message(e)}") from e
        self._con = con
        self._closed = False
        self._stages = {}

    def close(self) -> None:
        """Cancel the queries still running, wait for them to stop, then disconnect."""
        deadline = time.monotonic() + CLOSE_WAIT_SECS
        with self._queries_done:
            self._closed = True
            # Again and again: a cancel is lost on a connection that has not sent its
            # statement yet.
            while self._running and time.monotonic() < deadline:
                for running in self._running:
                    with contextlib.suppress(psycopg.Error):
                        running.cancel_safe(timeout=1.0)
                self._queries_done.wait(0.05)
        con, self._con = self._con, None
        if con is not None:
            con.close()

    def _connection(self) -> psycopg.Connection[Any]:
        con = self._con
        if con is None or self._closed:
            raise WarehouseError(f"the warehouse in schema {self.schema} is not open")
        if con.closed:
            # The server closed it (a restart, an idle timeout): connect again. The batch
            # that found it closed failed and is retried by the forwarder's runtime.
            self._con = None
            self.open()
            assert self._con is not None
            con = self._con
        return con

    def _table(self, table: str) -> str:
        return f"{quote_identifier(self.schema)}.{quote_identifier(table)}"

    def _lock_table(self, con: psycopg.Connection[Any], table: str) -> None:
        """Serialize shape changes of ``table`` across replicas until the transaction ends."""
        con.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            [f"tagrelay:{self.schema}.{table}"],
        )

    @contextmanager
    def _ddl(self, table: str, what: str) -> Iterator[psycopg.Connection[Any]]:
        con = self._connection()
        try:
            with con.transaction():
                self._lock_table(con, table)
                yield con
        except psycopg.Error as e:
            raise WarehouseError(f"cannot {what}: {_message(e)}") from e

    # -- schema ----------------------------------------------------------------------

    def existing_columns(self, table: str) -> dict[str, str] | None:
        try:
            rows = (
                self._connection()
                .execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                    [self.schema, table],
                )
                .fetchall()
            )
        except psycopg.Error as e:
            raise WarehouseError(f"cannot read the columns of {table}: {_message(e)}") from e
        if not rows:
            return None
        return {name: _LOGICAL_TYPES.get(native, native) for name, native in rows}

    def create_table(self, table: str, columns: Mapping[str, str], primary_key: str) -> None:
        definitions = ", ".join(
            f"{quote_identifier(name)} {_NATIVE_TYPES[kind]}"
            + (" PRIMARY KEY" if name == primary_key else "")
            for name, kind in columns.items()
        )
        with self._ddl(table, f"create {table}") as con:
            con.execute(f"CREATE TABLE IF NOT EXISTS {self._table(table)} ({definitions})")

    def add_columns(self, table: str, columns: Mapping[str, str]) -> None:
        with self._ddl(table, f"add columns to {table}") as con:
            for name, kind in columns.items():
                con.execute(
                    f"ALTER TABLE {self._table(table)} ADD COLUMN IF NOT EXISTS "
                    f"{quote_identifier(name)} {_NATIVE_TYPES[kind]}"
                )

    def widen_column(self, table: str, column: str, from_type: str, to_type: str) -> bool:
        if (from_type, to_type) not in self.widenings:
            raise WarehouseError(f"cannot change a {from_type} column to {to_type}")
        quoted = quote_identifier(column)
        with self._ddl(table, f"change {table}.{column} to {to_type}") as con:
            current = con.execute(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s AND column_name = %s",
                [self.schema, table, column],
            ).fetchone()
            if current is not None and _LOGICAL_TYPES.get(current[0]) == to_type:
                return True  # another replica widened it meanwhile
            # ALTER ... TYPE rounds an int beyond 2**53 silently: first make sure none would
            # change.
            lossy = con.execute(
                f"SELECT EXISTS (SELECT 1 FROM {self._table(table)} WHERE {quoted} IS NOT NULL "
                f"AND ({quoted} > {_EXACT_IN_DOUBLE} OR {quoted} < -{_EXACT_IN_DOUBLE}) AND "
                f"({quoted} >= {_NEAR_INT64_LIMIT} OR {quoted} <= -{_NEAR_INT64_LIMIT} OR "
                f"CAST(CAST({quoted} AS DOUBLE PRECISION) AS BIGINT) <> {quoted}))"
            ).fetchone()
            if lossy is None or lossy[0]:
                return False
            con.execute(
                f"ALTER TABLE {self._table(table)} ALTER COLUMN {quoted} "
                f"TYPE {_NATIVE_TYPES[to_type]}"
            )
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
        con = self._connection()
        rows = list(zip(*(values[name] for name in columns), strict=True))
        try:
            try:
                return self._insert_typed(con, table, columns, rows)
            except (psycopg.DataError, UnicodeEncodeError):
                # A value PostgreSQL's text cannot hold (NUL, in text or in JSON) or UTF-8
                # cannot (a lone surrogate): the batch goes again as JSON documents, where
                # both are replaced (rare; see _insert_documents).
                return self._insert_documents(con, table, columns, rows)
        except psycopg.Error as e:
            raise WarehouseError(f"cannot insert {count} rows into {table}: {_message(e)}") from e

    def _insert_typed(
        self,
        con: psycopg.Connection[Any],
        table: str,
        columns: Mapping[str, str],
        rows: Iterable[tuple[Any, ...]],
    ) -> int:
        """The batch copied column by column into a typed staging table (PostgreSQL parses
        no JSON but the JSON columns'), then moved with one INSERT ... SELECT. ``rows``:
        one value per column of ``columns``, in their order."""
        stage = self._typed_stage(con, table, columns)
        names = ", ".join(quote_identifier(name) for name in columns)
        json_columns = [i for i, kind in enumerate(columns.values()) if kind == ColumnType.JSON]
        with con.transaction(), con.cursor() as cur:
            with cur.copy(f"COPY {stage} ({names}) FROM STDIN") as copy:
                for row in rows:
                    if json_columns:
                        values = list(row)
                        for i in json_columns:
                            if values[i] is not None:
                                values[i] = _json_text(values[i])
                        copy.write_row(values)
                    else:
                        copy.write_row(row)
            cur.execute(
                f"INSERT INTO {self._table(table)} ({names}) SELECT {names} FROM {stage} "
                f"ON CONFLICT ({quote_identifier('message_id')}) DO NOTHING"
            )
            return max(cur.rowcount, 0)

    def _typed_stage(
        self, con: psycopg.Connection[Any], table: str, columns: Mapping[str, str]
    ) -> str:
        """The session's staging table for ``table``, with at least ``columns`` at their
        types: made again (a temporary table, emptied at each commit) when the table has
        gained or widened a column since."""
        stage = quote_identifier(f"tagrelay_stage_{table}")
        known = self._stages.get(table)
        if known is not None and all(known.get(n) == k for n, k in columns.items()):
            return stage
        wanted = {**(known or {}), **columns}
        definitions = ", ".join(
            f"{quote_identifier(name)} {_NATIVE_TYPES[kind]}" for name, kind in wanted.items()
        )
        with con.transaction():
            con.execute(f"DROP TABLE IF EXISTS pg_temp.{stage}")
            con.execute(f"CREATE TEMP TABLE {stage} ({definitions}) ON COMMIT DELETE ROWS")
        self._stages[table] = dict(wanted)
        return stage

    def _insert_documents(
        self,
        con: psycopg.Connection[Any],
        table: str,
        columns: Mapping[str, str],
        rows: Iterable[tuple[Any, ...]],
    ) -> int:
        """The batch as one JSON document per row, unpacked by ``json_to_record``; NUL
        escapes replaced by U+FFFD on the way (``_copy_text``)."""
        documents = [dict(zip(columns, row, strict=True)) for row in rows]
        try:
            lines = [orjson.dumps(document) for document in documents]
        except (TypeError, orjson.JSONEncodeError):
            lines = [orjson.dumps(json_safe(document)) for document in documents]
        data = _copy_text(lines)
        names = ", ".join(quote_identifier(name) for name in columns)
        record = ", ".join(
            f"{quote_identifier(name)} {_NATIVE_TYPES[kind]}" for name, kind in columns.items()
        )
        with con.transaction(), con.cursor() as cur:
            with cur.copy(f"COPY {_STAGE} (doc) FROM STDIN") as copy:
                copy.write(data)
            cur.execute(
                f"INSERT INTO {self._table(table)} ({names}) SELECT {names} "
                f"FROM {_STAGE} s, json_to_record(s.doc) AS r({record}) "
                f"ON CONFLICT ({quote_identifier('message_id')}) DO NOTHING"
            )
            return max(cur.rowcount, 0)

    def delete_older_than(self, table: str, before: str) -> int:
        received, timestamp = quote_identifier("received_at"), quote_identifier("timestamp")
        con = self._connection()
        try:
            with con.transaction(), con.cursor() as cur:
                cur.execute(
                    f"DELETE FROM {self._table(table)} "
                    f"WHERE COALESCE({received}, {timestamp}) < %s::timestamptz",
                    [before],
                )
                deleted = cur.rowcount
        except psycopg.Error as e:
            raise WarehouseError(f"cannot delete old rows from {table}: {_message(e)}") from e
        return max(deleted, 0)

    def select_where(self, table: str, where: str, params: Sequence[Any]) -> QueryResult:
        con = self._connection()
        try:
            with con.transaction(), con.cursor() as cur:
                cur.execute(f"SELECT * FROM {self._table(table)} WHERE {where}", list(params))
                columns = tuple(d.name for d in cur.description or ())
                rows = cur.fetchall()
        except psycopg.Error as e:
            raise WarehouseError(f"cannot read rows of {table}: {_message(e)}") from e
        return QueryResult(columns, rows, False)

    def delete_where(self, table: str, where: str, params: Sequence[Any]) -> int:
        con = self._connection()
        try:
            with con.transaction(), con.cursor() as cur:
                cur.execute(f"DELETE FROM {self._table(table)} WHERE {where}", list(params))
                deleted = cur.rowcount
        except psycopg.Error as e:
            raise WarehouseError(f"cannot delete rows from {table}: {_message(e)}") from e
        return max(deleted, 0)

    def checkpoint(self) -> None:
        """PostgreSQL checkpoints on its own."""

    def compact(self) -> None:
        """Nothing: PostgreSQL reclaims deleted rows' space itself (autovacuum); the bytes
        of a deleted row stay in the table's pages until the space is reused, or until a
        ``VACUUM FULL`` rewrites the table (README, "Erasure and access")."""

    # -- reading ---------------------------------------------------------------------

    def query(self, sql: str, max_rows: int, timeout_secs: float | None) -> QueryResult:
        first = _FIRST_WORD_RE.match(sql)
        word = first.group(1).lower() if first else ""
        if word in _OTHER_COMMANDS:
            raise QueryRejected(
                f"only read-only queries may run here ({_ALLOWED_HINT}); "
                f"got a {word.upper()} statement"
            )
        with self._queries_done:
            if self._closed or self._con is None:
                raise WarehouseError(f"the warehouse in schema {self.schema} is not open")
        con = self._connect()
        # JSON columns come back as their text, as DuckDB's do.
        con.adapters.register_loader("jsonb", TextLoader)
        con.adapters.register_loader("json", TextLoader)
        with self._queries_done:
            if self._closed:
                con.close()
                raise WarehouseError("the query was stopped: the warehouse is closing")
            self._running.add(con)
        try:
            return self._run_read_only(con, sql, max_rows, timeout_secs)
        finally:
            with self._queries_done:
                self._running.discard(con)
                self._queries_done.notify_all()
            con.close()

    def _run_read_only(
        self,
        con: psycopg.Connection[Any],
        sql: str,
        max_rows: int,
        timeout_secs: float | None,
    ) -> QueryResult:
        timeout_ms = int(timeout_secs * 1000) if timeout_secs else 0
        try:
            con.autocommit = False
            con.execute("SET TRANSACTION READ ONLY")
            con.execute(
                "SELECT set_config('statement_timeout', %s, true), "
                "set_config('search_path', %s, true)",
                [str(timeout_ms), f"{quote_identifier(self.schema)}, public"],
            )
            with con.cursor() as cur:
                # Prepared: the extended protocol, which runs one statement only (without
                # parameters psycopg would use the simple one, which runs any number).
                cur.execute(sql.encode(), prepare=True)
                columns = tuple(d.name for d in cur.description or ())
                rows = cur.fetchmany(max_rows + 1) if columns else []
        except pg_errors.QueryCanceled as e:
            if self._closed:
                raise WarehouseError("the query was stopped: the warehouse is closing") from e
            raise QueryTimeout(
                f"the query ran longer than {timeout_secs:g} s and was stopped; narrow it "
                "(a WHERE on timestamp, a LIMIT)"
            ) from e
        except pg_errors.ReadOnlySqlTransaction as e:
            raise QueryRejected(
                f"only read-only queries may run here ({_ALLOWED_HINT}): {_message(e)}"
            ) from e
        except pg_errors.SyntaxError as e:
            if "multiple commands" in str(e):
                raise QueryRejected("expected exactly one statement; run them one at a time") from e
            raise WarehouseError(f"cannot parse the query: {_message(e)}") from e
        except psycopg.Error as e:
            raise WarehouseError(f"the query failed: {_message(e)}") from e
        finally:
            with contextlib.suppress(psycopg.Error):
                con.rollback()
        return QueryResult(
            columns=columns,
            rows=[tuple(r) for r in rows[:max_rows]],
            truncated=len(rows) > max_rows,
        )


def _json_text(value: Any) -> str:
    """A JSON column's value as the text COPY gives PostgreSQL."""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return orjson.dumps(json_safe(value)).decode()


def _copy_text(lines: Sequence[bytes]) -> bytes:
    """JSON documents as the rows of ``COPY ... FROM STDIN`` in text format: one per line,
    backslashes doubled (the format's escape character; orjson escapes every control
    character, so a document holds no raw tab or newline), NUL escapes replaced."""
    data = b"\n".join(lines) + b"\n"
    if b"\\u0000" in data:
        data = _NUL_ESCAPE_RE.sub(rb"\1\\ufffd", data)
    return data.replace(b"\\", b"\\\\")


def _message(error: psycopg.Error) -> str:
    """The server's message, one line, without the connection string."""
    diag = getattr(error, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = primary or str(error) or type(error).__name__
    return " ".join(text.split())
