"""The warehouse forwarder on a real DuckDB file in a temporary data directory: it loads
batches off the event loop, logs schema changes once, turns database failures into
retries, and exposes its warehouse for the admin socket."""

from __future__ import annotations

import asyncio
import logging
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


async def test_inserts_run_off_the_event_loop_on_one_thread(
    forwarder: WarehouseForwarder,
) -> None:
    assert forwarder.warehouse is not None
    threads: set[str] = set()
    insert = forwarder.warehouse.insert

    def recording_insert(events: list[dict[str, Any]]) -> Any:
        threads.add(threading.current_thread().name)
        return insert(events)

    forwarder.warehouse.insert = recording_insert  # type: ignore[method-assign]
    await asyncio.gather(*(forwarder.deliver([event(f"m{i}")]) for i in range(5)))
    assert len(threads) == 1
    assert threads.pop().startswith("tagrelay-warehouse-warehouse")


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


async def test_a_database_failure_is_a_retry_and_the_retry_loads(
    forwarder: WarehouseForwarder,
) -> None:
    warehouse = forwarder.warehouse
    assert warehouse is not None
    warehouse.dialect.close()  # the database goes away under the forwarder

    outcome = await forwarder.deliver([event("m1")])

    assert isinstance(outcome, Retry)
    assert outcome.reason == "warehouse_error"
    assert "not open" in outcome.detail

    warehouse.dialect.open()
    assert await forwarder.deliver([event("m1")]) == Delivered()
    assert warehouse.query("select count(*) from events").rows == [(1,)]


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
