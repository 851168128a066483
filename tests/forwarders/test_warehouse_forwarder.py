"""The warehouse forwarder on a real DuckDB file in a temporary data directory: it loads
batches off the event loop, logs schema changes once, turns database failures into
retries, and exposes its warehouse for the admin socket."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders.warehouse import (
    WarehouseConfig,
    WarehouseForwarder,
    database_path,
    open_warehouse_readonly,
)
from tagrelay.metrics import Metrics
from tagrelay.model import Delivered, Retry


def event(message_id: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Signed Up",
        "messageId": message_id,
        "anonymousId": "anon-1",
        "timestamp": "2024-05-01T10:00:00.000Z",
        "context": {"page": {"path": "/signup"}},
        "properties": properties,
    }


@pytest.fixture
async def context(tmp_path: Path) -> AsyncIterator[ForwarderContext]:
    async with aiohttp.ClientSession() as http:
        yield ForwarderContext(data_dir=tmp_path / "data", http=http, metrics=Metrics())


@pytest.fixture
async def forwarder(context: ForwarderContext) -> AsyncIterator[WarehouseForwarder]:
    fwd = WarehouseForwarder(WarehouseConfig(id="warehouse", type="warehouse"), context)
    await fwd.start()
    yield fwd
    await fwd.close()


def test_the_registry_names_the_warehouse_forwarder() -> None:
    assert FORWARDERS["warehouse"] is WarehouseForwarder


def test_a_relative_path_is_inside_the_data_dir_and_an_absolute_one_is_kept(
    tmp_path: Path,
) -> None:
    relative = WarehouseConfig(id="w", type="warehouse", path="wh/events.duckdb")
    absolute = WarehouseConfig(id="w", type="warehouse", path=str(tmp_path / "abs.duckdb"))
    assert database_path(relative, tmp_path / "d") == tmp_path / "d" / "wh" / "events.duckdb"
    assert database_path(absolute, tmp_path / "d") == tmp_path / "abs.duckdb"


async def test_start_creates_the_file_in_the_data_dir(
    forwarder: WarehouseForwarder, context: ForwarderContext
) -> None:
    assert (context.data_dir / "warehouse.duckdb").exists()
    assert forwarder.warehouse is not None
    assert "message_id" in forwarder.warehouse.columns


async def test_a_batch_is_delivered_and_queryable(forwarder: WarehouseForwarder) -> None:
    outcome = await forwarder.deliver([event("m1", plan="pro"), event("m2", plan="team")])

    assert outcome == Delivered()
    assert forwarder.warehouse is not None
    result = await asyncio.to_thread(
        forwarder.warehouse.query,
        "select message_id, properties_plan from events where context_page_path = '/signup' "
        "order by 1",
    )
    assert result.rows == [("m1", "pro"), ("m2", "team")]


def counted(forwarder: WarehouseForwarder, name: str) -> float:
    value = forwarder.context.metrics.registry.get_sample_value(name, {"forwarder": forwarder.id})
    return value or 0.0


async def test_a_redelivered_batch_makes_no_second_row(forwarder: WarehouseForwarder) -> None:
    batch = [event("m1"), event("m2")]
    await forwarder.deliver(batch)
    assert await forwarder.deliver(batch) == Delivered()
    assert forwarder.warehouse is not None
    assert forwarder.warehouse.query("select count(*) from events").rows == [(2,)]
    assert counted(forwarder, "tagrelay_warehouse_duplicates_total") == 2


async def test_misfits_are_delivered_and_counted(forwarder: WarehouseForwarder) -> None:
    await forwarder.deliver([event("m1", seats=3)])
    assert await forwarder.deliver([event("m2", seats="many")]) == Delivered()
    assert counted(forwarder, "tagrelay_warehouse_unmapped_values_total") == 1


async def test_the_database_runs_in_a_child_process_fed_from_one_thread(
    forwarder: WarehouseForwarder,
) -> None:
    warehouse = forwarder.warehouse
    assert warehouse is not None and warehouse._proc is not None
    assert warehouse._proc.pid != os.getpid()
    threads: set[str] = set()
    insert_lines = warehouse.insert_lines

    def recording(payload: bytes) -> Any:
        threads.add(threading.current_thread().name)
        return insert_lines(payload)

    warehouse.insert_lines = recording  # type: ignore[method-assign]
    await asyncio.gather(*(forwarder.deliver([event(f"m{i}")]) for i in range(5)))
    assert len(threads) == 1
    assert threads.pop().startswith("tagrelay-warehouse-warehouse")
    assert warehouse.query("select count(*) from events").rows == [(5,)]


async def test_new_columns_are_logged_once_at_info(
    forwarder: WarehouseForwarder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tagrelay.forwarders.warehouse")
    caplog.clear()
    await forwarder.deliver([event("m1", plan="pro")])
    await forwarder.deliver([event("m2", plan="team")])
    await forwarder.deliver([event("m3", plan="team", seats=2)])

    infos = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert infos == [
        "warehouse warehouse: added columns to events: properties_plan VARCHAR",
        "warehouse warehouse: added columns to events: properties_seats BIGINT",
    ]


async def test_a_lost_warehouse_process_is_a_retry_and_is_restarted(
    forwarder: WarehouseForwarder,
) -> None:
    warehouse = forwarder.warehouse
    assert warehouse is not None and warehouse._conn is not None
    assert await forwarder.deliver([event("m1")]) == Delivered()
    warehouse._conn.close()  # the pipe to the child breaks under the forwarder

    outcome = await forwarder.deliver([event("m2")])

    assert isinstance(outcome, Retry)
    assert outcome.reason == "warehouse_error"
    assert "died" in outcome.detail
    # the next attempt starts a new child, which finds the rows loaded before
    assert await forwarder.deliver([event("m2")]) == Delivered()
    assert warehouse.query("select message_id from events order by 1").rows == [("m1",), ("m2",)]


async def test_a_killed_warehouse_process_is_restarted(forwarder: WarehouseForwarder) -> None:
    warehouse = forwarder.warehouse
    assert warehouse is not None and warehouse._proc is not None
    await forwarder.deliver([event("m1")])
    warehouse._proc.kill()
    warehouse._proc.wait()
    assert await forwarder.deliver([event("m2")]) == Delivered()
    assert warehouse.query("select count(*) from events").rows == [(2,)]


async def test_deliver_before_start_is_an_error(context: ForwarderContext) -> None:
    fwd = WarehouseForwarder(WarehouseConfig(id="warehouse", type="warehouse"), context)
    with pytest.raises(RuntimeError, match="before start"):
        await fwd.deliver([event("m1")])


async def test_after_close_the_cli_can_open_the_file_read_only(
    context: ForwarderContext,
) -> None:
    config = WarehouseConfig(id="warehouse", type="warehouse", table="hits")
    fwd = WarehouseForwarder(config, context)
    await fwd.start()
    await fwd.deliver([event("m1")])
    await fwd.close()
    await fwd.close()  # idempotent
    assert fwd.warehouse is None

    with open_warehouse_readonly(config, context.data_dir) as wh:
        assert wh.query("select message_id from hits").rows == [("m1",)]
