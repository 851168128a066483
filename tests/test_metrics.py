"""The metrics an operator watches, scraped over HTTP from the admin listener of a relay with
a webhook forwarder (in the delivery process) and a fake destination that goes down and
comes back: the forwarder's lag and last success, the spool's size, the build and the
process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tagrelay import __version__
from tagrelay.app import create_app
from tagrelay.web.admin_listener import ADMIN_LISTENER
from tests.support import SERVER_KEY, basic, fake_server, make_config, wait_idle

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(admin_url: str) -> Samples:
    async with (
        aiohttp.ClientSession() as http,
        http.get(admin_url + "/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_lag_rises_while_the_destination_is_down_and_falls_to_zero_after(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    state = {"down": True, "refused": 0, "delivered": 0}

    async def destination(request: web.Request) -> web.Response:
        await request.read()
        if state["down"]:
            state["refused"] += 1
            return web.Response(status=503, text="down for maintenance")
        state["delivered"] += 1
        return web.Response(status=200, text="ok")

    async with fake_server("destination", {"/hook": destination}) as server:
        config = make_config(
            tmp_path,
            admin={"listen": "127.0.0.1:0"},
            forwarders=[
                {
                    "id": "hook",
                    "type": "webhook",
                    "endpoint": str(server.make_url("/hook")),
                    "batch": {"max_events": 10, "max_wait_secs": 0},
                    "retry": {"initial_backoff_secs": 0.05, "max_backoff_secs": 0.1},
                }
            ],
        )
        app = create_app(config, admin_socket=False, admin_listener=True)
        client: TestClient = await aiohttp_client(app)
        admin = app[ADMIN_LISTENER].url

        before = await scrape(admin)
        assert value(before, "tagrelay_forwarder_lag_seconds", forwarder="hook") == 0
        assert (
            value(before, "tagrelay_forwarder_last_success_timestamp_seconds", forwarder="hook")
            is None
        )

        event = {"type": "track", "event": "Signed Up", "anonymousId": "a", "messageId": "m1"}
        resp = await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
        assert resp.status == 200
        await until(lambda: state["refused"] >= 2)
        first = value(await scrape(admin), "tagrelay_forwarder_lag_seconds", forwarder="hook")
        await asyncio.sleep(0.3)
        down = await scrape(admin)
        second = value(down, "tagrelay_forwarder_lag_seconds", forwarder="hook")
        assert first is not None and second is not None
        assert 0 < first < second, "the undelivered event ages"
        assert value(down, "tagrelay_spool_depth", forwarder="hook") == 1
        assert (
            value(down, "tagrelay_forwarder_last_success_timestamp_seconds", forwarder="hook")
            is None
        )

        state["down"] = False
        await wait_idle(app)
        up = await scrape(admin)
        assert value(up, "tagrelay_forwarder_lag_seconds", forwarder="hook") == 0
        assert value(up, "tagrelay_spool_depth", forwarder="hook") == 0
        last = value(up, "tagrelay_forwarder_last_success_timestamp_seconds", forwarder="hook")
        assert last is not None and abs(last - time.time()) < 60

        event["messageId"] = "m2"
        resp = await client.post("/v1/track", json=event, headers=basic(SERVER_KEY))
        assert resp.status == 200
        await wait_idle(app)
        later = value(
            await scrape(admin),
            "tagrelay_forwarder_last_success_timestamp_seconds",
            forwarder="hook",
        )
        assert later is not None and later > last
        assert state["delivered"] == 2


async def test_spool_size_build_and_process_metrics_are_exported(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    config = make_config(tmp_path, admin={"listen": "127.0.0.1:0"})
    app = create_app(config, admin_socket=False, admin_listener=True)
    client: TestClient = await aiohttp_client(app)
    resp = await client.post(
        "/v1/track", json={"event": "x", "anonymousId": "a"}, headers=basic(SERVER_KEY)
    )
    assert resp.status == 200
    samples = await scrape(app[ADMIN_LISTENER].url)
    size = value(samples, "tagrelay_spool_size_bytes")
    assert size is not None and size > 0
    assert value(samples, "tagrelay_build_info", version=__version__) == 1
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        found = value(samples, name)
        assert found is not None and found > 0, name
