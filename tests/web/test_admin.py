"""``tagrelay sql`` through the admin socket of a running relay: a slow query does not hold
up warehouse loading (nor other queries), and a query past its time limit is interrupted and
answered ``query_timeout``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tagrelay.app import admin_socket_path, create_app
from tagrelay.appkeys import CONFIG, warehouse_of
from tagrelay.cli.sql import _via_socket
from tests.support import SERVER_KEY, basic, make_config, wait_idle

ENDLESS = "select count(*) from range(1000000000000)"
"""A query that runs for hours: whatever the machine's load, it is still running when the
test's loads are done."""


@pytest.fixture
async def relay(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> AsyncIterator[TestClient]:
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
    client: TestClient = await aiohttp_client(create_app(config))
    yield client


async def sql(app: web.Application, query: str, timeout_secs: float = 60.0) -> dict[str, Any]:
    """What ``tagrelay sql`` gets from the relay's admin socket."""
    sock = admin_socket_path(app[CONFIG].data_dir)
    answer = await _via_socket(sock, query, 100, timeout_secs)
    assert answer is not None, "no relay answered on the admin socket"
    return answer


async def post_events(client: TestClient, first: int, count: int) -> None:
    batch = {
        "batch": [
            {"type": "track", "event": "Signed Up", "messageId": f"m{i}", "userId": "u1"}
            for i in range(first, first + count)
        ]
    }
    resp = await client.post("/v1/batch", json=batch, headers=basic(SERVER_KEY))
    assert resp.status == 200, await resp.text()


async def until_running(app: web.Application, queries: int) -> None:
    """Wait until the relay has handed ``queries`` queries to the warehouse process."""
    warehouse = warehouse_of(app)
    assert warehouse is not None
    for _ in range(500):
        channel = warehouse._queries
        if channel is not None and len(channel._pending) >= queries:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the query never reached the warehouse process")


async def test_a_slow_query_does_not_hold_up_loads_or_other_queries(relay: TestClient) -> None:
    app = relay.server.app
    assert app is not None
    await post_events(relay, 0, 10)
    await wait_idle(app)
    slow = asyncio.create_task(sql(app, ENDLESS, timeout_secs=3600))
    await until_running(app, 1)

    # events keep arriving and loading while the slow query runs
    for round_ in range(1, 4):
        await post_events(relay, round_ * 10, 10)
        await wait_idle(app)
    counted = await sql(app, "select count(*) from events")

    assert not slow.done(), "the slow query finished (or failed) before the loads"
    assert counted == {"columns": ["count_star()"], "rows": [[40]], "truncated": False}

    # a stopping relay does not wait for the query: it drops it, and says so
    await relay.close()
    answer = await asyncio.wait_for(slow, 60)
    assert answer["error"] == "relay_disconnected"


async def test_a_query_past_its_time_limit_is_stopped_with_a_clear_error(
    relay: TestClient,
) -> None:
    app = relay.server.app
    assert app is not None

    answer = await sql(app, ENDLESS, timeout_secs=0.2)

    assert answer["error"] == "query_timeout"
    assert "ran longer than 0.2 s and was stopped" in answer["message"]
    # the warehouse goes on answering and loading
    await post_events(relay, 0, 5)
    await wait_idle(app)
    assert (await sql(app, "select count(*) from events"))["rows"] == [[5]]


async def test_a_time_limit_out_of_range_is_a_bad_request(relay: TestClient) -> None:
    app = relay.server.app
    assert app is not None
    for bad in (0, -1, 1e9):
        answer = await sql(app, "select 1", timeout_secs=bad)
        assert answer["error"] == "bad_request"
