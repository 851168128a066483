"""``warehouse``: load events into a SQL table whose columns evolve with the data.

The heavy lifting (flattening, schema planning, dialects) is in ``tagrelay.warehouse``. The
database lives in a child process (``tagrelay.warehouse.process``), so that planning a batch,
which is CPU work in Python, runs on another core instead of holding the GIL against the
event loop. This module talks to it from one dedicated thread. Without a filter or consent
rule (``reads_spool``) it hands it spans of the spool, which the child reads from the file
itself; otherwise it sends the events the runtime kept, as JSON lines.

``hash_pii`` stores emails and phones as keyed hashes (``tagrelay.warehouse.pii``);
``retention_days`` has the warehouse process delete older rows every
``RETENTION_INTERVAL_SECS`` (first soon after start), counted in
``tagrelay_warehouse_expired_rows_total``.

Outcomes: a loaded batch is ``Delivered`` (duplicates are skipped, misfit values kept in
``_unmapped_data``: nothing is rejected per event); a database failure (disk full, lock,
I/O error, the child dying) is ``Retry(reason="warehouse_error")``, and the retried batch
cannot load twice since rows are keyed on ``message_id``.

``WarehouseForwarder.warehouse`` is the ``WarehouseProcess``: the relay's admin socket
answers ``tagrelay sql`` with its ``query`` (from another thread); when the relay is not
running the CLI opens the same file with ``open_warehouse_readonly(config, data_dir)``.
Duplicates and values sent to ``_unmapped_data`` are counted in Prometheus (the latter by
table and reason); a column whose values do not fit its type is logged once, a widened or
new column at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
from pydantic import Field, SecretStr, model_validator

from tagrelay.config.common import BatchConfig, ForwarderConfigBase
from tagrelay.datadir import private_dir
from tagrelay.errors import WarehouseError
from tagrelay.forwarders._base import Forwarder, ForwarderContext, SpanDelivery, SpoolSpan
from tagrelay.model import Delivered, Event, Outcome, Retry
from tagrelay.warehouse import InsertResult, Warehouse
from tagrelay.warehouse.pii import HASHED_KEYS
from tagrelay.warehouse.process import WarehouseProcess, WarehouseSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

RETENTION_INTERVAL_SECS = 3600.0
"""How often a warehouse with ``retention_days`` deletes its older rows."""
RETENTION_FIRST_DELAY_SECS = 60.0
"""How long after start the first deletion runs (not in the rush of a start-up)."""

WRITER_THREADS = 1
"""DuckDB threads of the relay's database (loading and admin-socket queries share them). One
keeps the warehouse from competing with ingestion for the CPU on small machines; loading a
batch gains little from more (``bench/warehouse_bench.py --threads``)."""


WAREHOUSE_BATCH_EVENTS = 5000
"""The warehouse's default ``batch.max_events``. An INSERT costs DuckDB a few milliseconds
whatever its size: per row of the bench's events, 9.1 us in batches of 1000 and 5.4 us in
batches of 5000 (``bench/warehouse_bench.py``), so a relay that has fallen behind catches
up faster with larger batches. Full batches happen only under load; the memory a batch
holds in the warehouse process is measured in ``bench/memory_bench.py``."""


CHECKPOINT_THRESHOLD = "256MB"
"""How much write-ahead log DuckDB gathers before it checkpoints (its default is 16MB). A
checkpoint costs more the larger the table: loading the bench's events in batches of 5,000
into a table past 300,000 rows cost 15-18 us per row with 16MB, 9 with 64MB and 6 with
256MB. The cost is a log of up to 256 MB on disk, replayed when the relay starts after a
crash (a clean stop checkpoints): 1.8 s for a log of 240 MB, 485,000 of those rows, after
a kill."""

WAREHOUSE_MEMORY_LIMIT_MB = 128
"""The default ``memory_limit_mb``. DuckDB's buffer pool fills up to its limit while a
backlog loads, mostly at checkpoints: under ``bench/memory_bench.py --scenario batch`` the
warehouse process peaked at 324 MB with 256, 239 MB with 128 and 180 MB with 64, and took
the backlog in 14.5, 16.3 and 18.1 s. 128 gives back about a tenth of the load rate for a
third of the peak; a relay with memory to spare loads faster with more."""


class WarehouseConfig(ForwarderConfigBase):
    """Load events into a SQL warehouse table (embedded DuckDB by default)."""

    type: Literal["warehouse"] = Field(description="Forwarder type.", examples=["warehouse"])
    batch: BatchConfig = Field(
        default_factory=lambda: BatchConfig(max_events=WAREHOUSE_BATCH_EVENTS),
        description="Batching. Each insert has a fixed cost, so the warehouse loads up to "
        f"{WAREHOUSE_BATCH_EVENTS} events at once by default; with little traffic a batch "
        "goes after max_wait_secs, however small.",
        examples=[{"max_events": WAREHOUSE_BATCH_EVENTS, "max_wait_secs": 1.0}],
    )
    dialect: Literal["duckdb", "postgres"] = Field(
        "duckdb",
        description="Database engine: duckdb, a file in data_dir (one relay); postgres, a "
        "PostgreSQL database that several replicas load into and analysts share.",
        examples=["duckdb", "postgres"],
    )
    path: str = Field(
        "warehouse.duckdb",
        description="DuckDB file; relative paths are inside data_dir (duckdb only).",
        examples=["warehouse.duckdb"],
    )
    dsn: SecretStr | None = Field(
        None,
        description="PostgreSQL connection string (libpq keywords or a postgresql:// URL), "
        "normally from the environment; required with dialect postgres. Its role needs "
        "CREATE on the schema (or the table made beforehand) and should not be a superuser: "
        "tagrelay sql runs read-only transactions with it.",
        examples=["${DATABASE_URL}", "host=db.internal dbname=analytics user=tagrelay"],
    )
    db_schema: str = Field(
        "public",
        alias="schema",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema of the table; created when missing (postgres only).",
        examples=["public", "tagrelay"],
    )
    table: str = Field(
        "events",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Table the events are loaded into.",
        examples=["events"],
    )
    max_columns: int = Field(
        1000,
        ge=32,
        le=10_000,
        description="Keys that would add a column past this many go to _unmapped_data instead.",
        examples=[1000],
    )
    memory_limit_mb: int = Field(
        WAREHOUSE_MEMORY_LIMIT_MB,
        ge=64,
        description="Memory the embedded database may use (DuckDB's memory_limit, which "
        "bounds its cache and the message_id index too); larger queries spill to disk "
        "(duckdb only).",
        examples=[WAREHOUSE_MEMORY_LIMIT_MB],
    )
    hash_pii: bool = Field(
        False,
        description="Store emails and phone numbers as keyed hashes, HMAC-SHA256 with "
        "hash_pii_salt of the normalized value (email trimmed and lower-cased, phone its "
        "digits), in hex: in the columns traits_email, context_traits_email, properties_email "
        "and the same for phone. The same value always gives the same hash, so analysts can "
        "still count and join on them. Rows stored before stay as they are.",
        examples=[True],
    )
    hash_pii_salt: SecretStr | None = Field(
        None,
        description="The secret key of hash_pii's HMAC, at least 16 characters, normally "
        "from the environment; required with hash_pii. Deliberately not derived from "
        "encryption.keys: rotating those must not change the hashes analysts join on. "
        "Changing it changes every hash from then on.",
        examples=["${TAGRELAY_PII_SALT}"],
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Delete rows received (received_at, else timestamp) more than this many "
        "days ago, checked every hour, counted in tagrelay_warehouse_expired_rows_total. "
        "Unset: rows are kept until deleted by hand.",
        examples=[395],
    )

    @model_validator(mode="after")
    def _salt_with_hash_pii(self) -> WarehouseConfig:
        salt = self.hash_pii_salt.get_secret_value() if self.hash_pii_salt else ""
        if self.hash_pii and len(salt.strip()) < 16:
            raise ValueError(
                "hash_pii needs hash_pii_salt: a secret of at least 16 characters "
                "(e.g. ${TAGRELAY_PII_SALT}, made with `tagrelay keys generate`)"
            )
        return self

    @model_validator(mode="after")
    def _dsn_with_postgres(self) -> WarehouseConfig:
        if self.dialect == "postgres" and not (self.dsn and self.dsn.get_secret_value()):
            raise ValueError("dialect postgres needs a dsn (the PostgreSQL connection string)")
        if self.dialect == "duckdb" and self.dsn is not None:
            raise ValueError("dsn is for dialect postgres; duckdb uses path")
        return self

    def target(self, data_dir: Path) -> str:
        """What the dialect opens: the DuckDB file, or the PostgreSQL connection string."""
        if self.dialect == "postgres":
            assert self.dsn is not None
            return self.dsn.get_secret_value()
        return str(database_path(self, data_dir))

    def describe(self, data_dir: Path) -> str:
        """Where the table is, for logs: never the connection string (it may hold a
        password)."""
        if self.dialect == "postgres":
            return f"PostgreSQL schema {self.db_schema}"
        return str(database_path(self, data_dir))

    def engine_settings(self, *, read_only: bool) -> dict[str, str | int | bool]:
        """The dialect's settings for the relay's writer (or a read-only CLI)."""
        if self.dialect == "postgres":
            return {"schema": self.db_schema, "application_name": f"tagrelay-{self.id}"}
        if read_only:
            return {}
        return {
            "threads": WRITER_THREADS,
            "memory_limit": f"{self.memory_limit_mb}MB",
            "checkpoint_threshold": CHECKPOINT_THRESHOLD,
        }


def database_path(config: WarehouseConfig, data_dir: Path) -> Path:
    """The database file of ``config``: ``path``, relative to ``data_dir`` unless absolute."""
    path = Path(config.path).expanduser()
    return path if path.is_absolute() else data_dir / path


def open_warehouse(
    config: WarehouseConfig, data_dir: Path, *, read_only: bool = False
) -> Warehouse:
    """Open the warehouse ``config`` describes (blocking). The relay opens it for writing;
    ``tagrelay sql`` opens it ``read_only`` when no relay holds it."""
    if config.dialect == "duckdb" and not read_only:
        private_dir(database_path(config, data_dir).parent)
    return Warehouse.open(
        config.dialect,
        config.target(data_dir),
        table=config.table,
        max_columns=config.max_columns,
        read_only=read_only,
        settings=config.engine_settings(read_only=read_only),
    )


def open_warehouse_readonly(config: ForwarderConfigBase, data_dir: Path) -> Warehouse:
    """``open_warehouse(..., read_only=True)``: for ``tagrelay sql`` when no relay runs.
    Takes any forwarder's config (the CLI picks it from the list) and refuses one that is
    not a warehouse."""
    if not isinstance(config, WarehouseConfig):
        raise WarehouseError(f"forwarder {config.id} is not a warehouse")
    return open_warehouse(config, data_dir, read_only=True)


class WarehouseForwarder(Forwarder[WarehouseConfig]):
    config_model = WarehouseConfig
    reads_spool = True
    in_delivery_process = False  # it has a process of its own

    @classmethod
    def personal_data(cls, config: WarehouseConfig) -> dict[str, str]:
        """Every field, as columns; with ``hash_pii``, the emails and phones of
        ``warehouse.pii.HASHED_KEYS`` as keyed hashes."""
        fields = {"every field of the event": "plain"}
        if config.hash_pii:
            for path in HASHED_KEYS:
                fields[".".join(path)] = "hashed (HMAC-SHA256, hash_pii_salt)"
        return fields

    def __init__(self, config: WarehouseConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self.warehouse: WarehouseProcess | None = None
        """The warehouse process between ``start`` and ``close``; its ``query`` may be called
        from any thread (not from the event loop: it blocks)."""
        self._executor: ThreadPoolExecutor | None = None
        self._misfit_columns: set[str] = set()
        """Columns whose misfits were logged (bounded by max_columns)."""
        self._retention: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"tagrelay-warehouse-{self.id}"
        )
        data_dir = self.context.data_dir
        if self.config.dialect == "duckdb":
            private_dir(database_path(self.config, data_dir).parent)
        process = WarehouseProcess(
            WarehouseSpec(
                dialect=self.config.dialect,
                target=self.config.target(data_dir),
                table=self.config.table,
                max_columns=self.config.max_columns,
                settings=self.config.engine_settings(read_only=False),
                encryption_keys=self.context.encryption_keys,
                hash_pii_salt=self.config.hash_pii_salt.get_secret_value()
                if self.config.hash_pii and self.config.hash_pii_salt is not None
                else None,
            )
        )
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, process.start)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self.warehouse = process
        if self.config.retention_days is not None:
            self._retention = asyncio.create_task(
                self._expire_loop(), name=f"warehouse-retention-{self.id}"
            )
        log.info(
            "warehouse %s: %s table %s open with %d columns",
            self.id,
            self.config.describe(data_dir),
            self.config.table,
            len(process.columns),
        )

    async def deliver(self, events: list[Event]) -> Outcome:
        return await self._load(b"\n".join(map(orjson.dumps, events)))

    async def deliver_payloads(self, payloads: list[bytes]) -> Outcome:
        # The stored JSON goes to the warehouse process as is: no decode here.
        return await self._load(b"\n".join(payloads))

    async def deliver_span(self, span: SpoolSpan) -> SpanDelivery:
        # The warehouse process reads the span from the spool file itself: the events do
        # not pass through the relay process at all.
        warehouse = self._started()
        try:
            result, arrivals = await self._on_thread(
                warehouse.insert_span, str(span.path), span.after, span.last
            )
        except WarehouseError as e:
            return SpanDelivery(_retry(e))
        return SpanDelivery(self._loaded(result), arrivals)

    async def _load(self, payload: bytes) -> Outcome:
        warehouse = self._started()
        try:
            result = await self._on_thread(warehouse.insert_lines, payload)
        except WarehouseError as e:
            return _retry(e)
        return self._loaded(result)

    def _started(self) -> WarehouseProcess:
        if self.warehouse is None or self._executor is None:
            raise RuntimeError(f"warehouse forwarder {self.id} used before start()")
        return self.warehouse

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _loaded(self, result: InsertResult) -> Outcome:
        """Count and log what a load did."""
        metrics = self.context.metrics
        table = self.config.table
        if result.duplicates:
            metrics.warehouse_duplicates.labels(self.id).inc(result.duplicates)
        for reason, count in result.unmapped_reasons.items():
            metrics.warehouse_unmapped.labels(self.id, table, reason).inc(count)
        if result.new_columns:
            added = ", ".join(f"{name} {kind}" for name, kind in result.new_columns.items())
            log.info("warehouse %s: added columns to %s: %s", self.id, table, added)
        if result.widened_columns:
            widened = ", ".join(f"{name} {kind}" for name, kind in result.widened_columns.items())
            log.info(
                "warehouse %s: widened columns of %s for values that did not fit: %s",
                self.id,
                table,
                widened,
            )
        for name, kind in result.misfit_columns.items():
            self._warn_misfits(name, kind)
        log.debug(
            "warehouse %s: %d inserted, %d duplicates, %d values to _unmapped_data",
            self.id,
            result.inserted,
            result.duplicates,
            result.unmapped_values,
        )
        return Delivered()

    def _warn_misfits(self, column: str, kind: str) -> None:
        """Once per column while the relay runs: its values of another kind are kept in
        _unmapped_data, not in the column, and queries on the column miss them."""
        if column in self._misfit_columns:
            return
        self._misfit_columns.add(column)
        column_type = self.warehouse.columns.get(column, "?") if self.warehouse else "?"
        log.warning(
            "warehouse %s: column %s of %s is %s: a %s value for it went to _unmapped_data, "
            "as will every value that does not fit it (logged once per column; counted in "
            "tagrelay_warehouse_unmapped_total)",
            self.id,
            column,
            self.config.table,
            column_type,
            kind,
        )

    async def expire(self, now: float | None = None) -> int:
        """Delete the rows older than ``retention_days`` (on the forwarder's thread, after
        the load in flight), count and log them; how many there were."""
        days = self.config.retention_days
        if days is None:
            return 0
        cutoff = (time.time() if now is None else now) - days * 86_400
        before = datetime.fromtimestamp(cutoff, UTC).isoformat()
        deleted = await self._on_thread(self._started().expire, before)
        if deleted:
            self.context.metrics.warehouse_expired.labels(self.id).inc(deleted)
            log.info(
                "warehouse %s: deleted %d rows of %s received before %s (retention_days %s)",
                self.id,
                deleted,
                self.config.table,
                before,
                days,
            )
        return deleted

    async def _expire_loop(self) -> None:
        await asyncio.sleep(RETENTION_FIRST_DELAY_SECS)
        while True:
            try:
                await self.expire()
            except (WarehouseError, RuntimeError) as exc:
                log.warning("warehouse %s: could not delete old rows: %s", self.id, exc)
            await asyncio.sleep(RETENTION_INTERVAL_SECS)

    async def close(self) -> None:
        retention, self._retention = self._retention, None
        if retention is not None:
            retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention
        warehouse, self.warehouse = self.warehouse, None
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            if warehouse is not None:
                # On the same thread, so after any insert still running there.
                await asyncio.get_running_loop().run_in_executor(executor, warehouse.close)
        finally:
            executor.shutdown(wait=True)


def _retry(error: WarehouseError) -> Retry:
    return Retry(reason="warehouse_error", detail=str(error))
