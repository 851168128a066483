"""The warehouse forwarder on a real DuckDB file in a temporary data directory: it loads
batches off the event loop, logs schema changes once, turns database failures into
retries, and exposes its warehouse for the admin socket."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tagrelay.app import create_app
from tagrelay.appkeys import warehouse_of
from tagrelay.errors import WarehouseError
from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders._base import ForwarderContext, SpanDelivery, SpoolSpan
from tagrelay.forwarders._worker import ForwarderWorker
from tagrelay.forwarders.warehouse import (
    WarehouseConfig,
    WarehouseForwarder,
    database_path,
    open_warehouse_readonly,
)
from tagrelay.metrics import Metrics
from tagrelay.model import Delivered, Retry
from tagrelay.spool.sqlite import SqliteSpool
from tests.support import SERVER_KEY, basic, make_config, metric_value, wait_idle


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


async def test_misfits_are_delivered_and_counted_by_table_and_reason(
    forwarder: WarehouseForwarder,
) -> None:
    await forwarder.deliver([event("m1", seats=3)])
    assert await forwarder.deliver([event("m2", seats="many")]) == Delivered()
    value = forwarder.context.metrics.registry.get_sample_value(
        "tagrelay_warehouse_unmapped_total",
        {"forwarder": "warehouse", "table": "events", "reason": "type_mismatch"},
    )
    assert value == 1


async def test_through_the_relay_revenue_keeps_its_decimals_and_a_string_is_counted(
    tmp_path: Path, aiohttp_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's case, events in over HTTP and loaded by the warehouse forwarder: a first
    ``revenue: 20`` must not cost the later ``19.99``; a string then is kept aside, counted
    for its table and logged once however many arrive."""
    config = make_config(
        tmp_path,
        forwarders=[
            {
                "id": "warehouse",
                "type": "warehouse",
                "batch": {"max_events": 50, "max_wait_secs": 0},
            }
        ],
    )
    app = create_app(config, admin_socket=False)
    client = await aiohttp_client(app)
    caplog.set_level(logging.INFO, logger="tagrelay.forwarders.warehouse")

    async def send(*revenues: Any) -> None:
        batch = [
            {
                "type": "track",
                "event": "Order Completed",
                "userId": "u1",
                "properties": {"revenue": revenue},
            }
            for revenue in revenues
        ]
        resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
        assert resp.status == 200, await resp.text()
        await wait_idle(app)  # each call is its own batch

    for revenue in (20, 19.99, 5):
        await send(revenue)
    warehouse = warehouse_of(app)
    assert warehouse is not None

    def query(sql: str) -> list[tuple[Any, ...]]:
        assert warehouse is not None
        return warehouse.query(sql).rows

    assert warehouse.columns["properties_revenue"] == "DOUBLE"
    assert [
        (round(total, 6), n)
        for total, n in query("select sum(properties_revenue), count(_unmapped_data) from events")
    ] == [(44.99, 0)]

    await send(*(["abc"] * 5))
    await send("xyz", 7.5)

    unmapped = metric_value(
        app,
        "tagrelay_warehouse_unmapped_total",
        {"forwarder": "warehouse", "table": "events", "reason": "type_mismatch"},
    )
    assert unmapped == 6
    assert query(
        "select count(*) from events where _unmapped_data->>'properties_revenue' is not null"
    ) == [(6,)]
    assert [
        round(total, 6) for (total,) in query("select sum(properties_revenue) from events")
    ] == [52.49]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "properties_revenue" in warnings[0] and "abc" not in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("widened" in m and "properties_revenue DOUBLE" in m for m in infos)


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


async def test_a_query_after_the_warehouse_process_died_starts_it_again(
    forwarder: WarehouseForwarder,
) -> None:
    warehouse = forwarder.warehouse
    assert warehouse is not None and warehouse._proc is not None
    await forwarder.deliver([event("m1")])
    warehouse._proc.kill()
    warehouse._proc.wait()

    result = await asyncio.to_thread(warehouse.query, "select count(*) from events")

    assert result.rows == [(1,)]


async def test_queries_run_beside_each_other_and_beside_loads(
    forwarder: WarehouseForwarder,
) -> None:
    warehouse = forwarder.warehouse
    assert warehouse is not None
    endless = [
        asyncio.create_task(
            asyncio.to_thread(
                warehouse.query, "select count(*) from range(1000000000000)", 10, 3600
            )
        )
        for _ in range(2)
    ]
    for n in range(3):
        assert await forwarder.deliver([event(f"m{n}")]) == Delivered()
    counted = await asyncio.to_thread(warehouse.query, "select count(*) from events")

    assert counted.rows == [(3,)]
    assert not any(task.done() for task in endless)
    await forwarder.close()  # interrupts them
    for outcome in await asyncio.gather(*endless, return_exceptions=True):
        assert isinstance(outcome, WarehouseError)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    await spool.open()
    yield spool
    await spool.close()


async def test_a_span_of_the_spool_is_read_and_loaded_by_the_warehouse_process(
    forwarder: WarehouseForwarder, spool: SqliteSpool
) -> None:
    await spool.append([(1_000, orjson.dumps(event("m1"))), (1_000, orjson.dumps(event("m2")))])
    await spool.append([(2_000, orjson.dumps(event("m3", plan="pro")))])

    delivery = await forwarder.deliver_span(SpoolSpan(spool.path, 1, 3))

    assert delivery == SpanDelivery(Delivered(), [(1, 1_000), (1, 2_000)])
    assert forwarder.warehouse is not None
    rows = forwarder.warehouse.query("select message_id, properties_plan from events order by 1")
    assert rows.rows == [("m2", None), ("m3", "pro")]
    assert forwarder.warehouse.columns["properties_plan"] == "VARCHAR"


async def test_a_span_the_spool_does_not_hold_is_a_retry(
    forwarder: WarehouseForwarder, spool: SqliteSpool
) -> None:
    await spool.append([(1_000, orjson.dumps(event("m1")))])

    delivery = await forwarder.deliver_span(SpoolSpan(spool.path, 1, 3))

    assert isinstance(delivery.outcome, Retry)
    assert delivery.outcome.reason == "warehouse_error"
    assert "holds 0 of the 2 events after 1" in delivery.outcome.detail
    await spool.append([(2_000, orjson.dumps(event("m2"))), (2_000, orjson.dumps(event("m3")))])
    assert (await forwarder.deliver_span(SpoolSpan(spool.path, 1, 3))).outcome == Delivered()
    assert forwarder.warehouse is not None
    assert forwarder.warehouse.query("select count(*) from events").rows == [(2,)]


async def test_a_new_warehouse_process_reads_spans_too(
    forwarder: WarehouseForwarder, spool: SqliteSpool
) -> None:
    """The child that replaces a killed one opens the spool file again."""
    await spool.append([(1_000, orjson.dumps(event("m1"))), (1_000, orjson.dumps(event("m2")))])
    assert (await forwarder.deliver_span(SpoolSpan(spool.path, 0, 1))).outcome == Delivered()
    warehouse = forwarder.warehouse
    assert warehouse is not None and warehouse._proc is not None
    warehouse._proc.kill()
    warehouse._proc.wait()

    delivery = await forwarder.deliver_span(SpoolSpan(spool.path, 1, 2))

    assert delivery == SpanDelivery(Delivered(), [(1, 1_000)])
    assert warehouse.query("select message_id from events order by 1").rows == [("m1",), ("m2",)]


async def test_the_worker_hands_spans_and_the_relay_never_reads_the_events(
    context: ForwarderContext, spool: SqliteSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no filter, the worker gives the warehouse spans of the spool: the events are
    read in the warehouse process, not in the relay's. Batches still end mid-segment at
    ``max_events``, and every event is counted and timed."""
    config = WarehouseConfig.model_validate(
        {"id": "warehouse", "type": "warehouse", "batch": {"max_events": 4, "max_wait_secs": 0}}
    )
    forwarder = WarehouseForwarder(config, context)
    metrics = context.metrics

    async def no_reads(after: int, limit: int) -> Any:
        raise AssertionError("the relay read the events of a span")

    monkeypatch.setattr(spool, "read", no_reads)
    worker = ForwarderWorker(forwarder, spool, metrics)
    await worker.start()
    for n in range(3):  # segments of 3 events: batches of 4 end inside them
        await spool.append([(5, orjson.dumps(event(f"m{n}-{i}"))) for i in range(3)])
    for _ in range(200):
        if spool.depth(forwarder.id) == 0:
            break
        await asyncio.sleep(0.02)
    assert forwarder.warehouse is not None
    rows = forwarder.warehouse.query("select count(*) from events").rows
    await worker.stop(10)

    assert spool.depth(forwarder.id) == 0
    assert rows == [(9,)]
    registry = metrics.registry
    labels = {"forwarder": "warehouse"}
    assert registry.get_sample_value("tagrelay_forwarder_batch_size_sum", labels) == 9
    assert (
        registry.get_sample_value(
            "tagrelay_forwarder_events_total", {**labels, "outcome": "delivered"}
        )
        == 9
    )
    assert registry.get_sample_value("tagrelay_delivery_latency_seconds_count", labels) == 9


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
