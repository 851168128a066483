"""Reloads under load: several clients send events continuously through real HTTP while the
relay reloads its configuration 20 times, each time with another set of forwarders (some
removed, some back, some changed) and other keys and origins. No request may fail, and
every acknowledged event must reach every destination that was configured while it was
sent and acknowledged (local recording fakes; a destination may get an event twice, after
a restart mid-batch, never zero times). Run with the HTTP forwarders in the delivery process
(reconfigured by each reload) and in the relay's own process."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tagrelay.app import create_app
from tagrelay.appkeys import WORKERS
from tagrelay.config.loader import load_config
from tagrelay.reload import RELOADER
from tests.support import SERVER_KEY, Recorder, basic, metric_value, recording_server

RELOADS = 20
CLIENTS = 6
DESTINATIONS = ("a", "b", "c")

STATES: list[dict[str, dict[str, Any]]] = [
    {"a": {}, "b": {}},
    {"a": {"headers": {"X-Settings": "changed"}}, "c": {}},
    {"b": {}, "c": {}},
    {"a": {}, "b": {"batch": {"max_events": 7, "max_wait_secs": 0.01}}, "c": {}},
]
"""The forwarders of each state (cycled through), with the settings that differ from the
defaults of ``forwarder``: from one to the next, forwarders are removed, come back, and
change."""


def forwarder(rec: Recorder, fid: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": fid,
        "type": "webhook",
        "endpoint": rec.url,
        "batch": {"max_events": 20, "max_wait_secs": 0.02},
        "retry": {"initial_backoff_secs": 0.05, "max_backoff_secs": 0.2},
        **extra,
    }


def config(
    tmp_path: Path,
    recorders: dict[str, Recorder],
    state: dict[str, dict[str, Any]],
    n: int,
    process: bool,
) -> dict[str, Any]:
    keys: list[dict[str, Any]] = [
        {
            "id": "website",
            "kind": "browser",
            "key": "browser-key",
            "allowed_origins": [f"https://shop-{n % 3}.test"],
        },
        {"id": "backend", "kind": "server", "key": SERVER_KEY},
    ]
    if n % 2:
        keys.append({"id": "partner", "kind": "server", "key": f"partner-key-{n}"})
    return {
        "data_dir": str(tmp_path / "data"),
        "keys": keys,
        "delivery": {"process": process},
        "forwarders": [forwarder(recorders[fid], fid, **extra) for fid, extra in state.items()],
    }


@dataclass
class Sent:
    started: float
    acked: float
    ids: list[str]


@dataclass
class Load:
    """What the clients did."""

    sent: list[Sent] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def client_loop(url: str, number: int, stop: asyncio.Event, load: Load) -> None:
    counter = itertools.count()
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            i = next(counter)
            ids = [f"c{number}-{i}-{j}" for j in range(1 + i % 4)]
            batch = [
                {"type": "track", "event": "Load", "userId": f"u{number}", "messageId": m}
                for m in ids
            ]
            started = time.monotonic()
            try:
                async with session.post(
                    url + "/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY)
                ) as response:
                    body = await response.read()
                    if response.status != 200:
                        load.failures.append(f"{response.status}: {body[:200]!r}")
                        continue
            except aiohttp.ClientError as exc:
                load.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            load.sent.append(Sent(started, time.monotonic(), ids))
            await asyncio.sleep(0.003)


def configured_intervals(
    initial: set[str], reloads: list[tuple[float, float, set[str]]], start: float, end: float
) -> dict[str, list[tuple[float, float]]]:
    """For each destination, the times it was surely configured: between reloads that left
    it in, and through a reload that kept it (changed or not)."""
    intervals: dict[str, list[tuple[float, float]]] = {d: [] for d in DESTINATIONS}
    current, since = set(initial), {d: start for d in initial}
    for began, ended, after in reloads:
        for d in current - after:  # removed: configured until the reload began
            intervals[d].append((since.pop(d), began))
        for d in after - current:  # added: configured once the reload answered
            since[d] = ended
        current = after
    for d in current:
        intervals[d].append((since[d], end))
    return intervals


@pytest.fixture
async def recorders() -> AsyncIterator[dict[str, Recorder]]:
    async with (
        recording_server("destination a", ["/a"], "/a") as a,
        recording_server("destination b", ["/b"], "/b") as b,
        recording_server("destination c", ["/c"], "/c") as c,
    ):
        yield {"a": a, "b": b, "c": c}


@pytest.mark.parametrize("process", [True, False], ids=["delivery-process", "in-relay"])
async def test_no_request_fails_and_no_event_is_lost_across_20_reloads(
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
    recorders: dict[str, Recorder],
    process: bool,
) -> None:
    file = tmp_path / "tagrelay.yaml"
    file.write_text(yaml.safe_dump(config(tmp_path, recorders, STATES[0], 0, process)))
    app = create_app(load_config(file), admin_socket=False)
    app[RELOADER].config_file = file
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")

    load, stop = Load(), asyncio.Event()
    start = time.monotonic()
    clients = [asyncio.create_task(client_loop(url, n, stop, load)) for n in range(CLIENTS)]
    reloads: list[tuple[float, float, set[str]]] = []
    try:
        await asyncio.sleep(0.2)
        for n in range(1, RELOADS + 1):
            # The last one configures every destination, so that all of them can catch up.
            state = STATES[n % len(STATES)] if n < RELOADS else {d: {} for d in DESTINATIONS}
            file.write_text(yaml.safe_dump(config(tmp_path, recorders, state, n, process)))
            began = time.monotonic()
            report = await app[RELOADER].reload("test")
            reloads.append((began, time.monotonic(), set(state)))
            assert report.outcome == "applied", report.as_json()
            assert sorted(app[WORKERS]) == sorted(state)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    end = time.monotonic()

    assert load.failures == []
    assert len(load.sent) > 100, "the clients kept sending"
    assert metric_value(app, "tagrelay_config_reload_total", {"outcome": "applied"}) == RELOADS
    intervals = configured_intervals(set(STATES[0]), reloads, start, end)
    expected = {
        d: {
            m
            for sent in load.sent
            if any(a <= sent.started and sent.acked <= b for a, b in intervals[d])
            for m in sent.ids
        }
        for d in DESTINATIONS
    }
    assert all(expected.values())

    def received(d: str) -> set[str]:
        rec = recorders[d]
        return {e["messageId"] for r in rec.requests for e in orjson.loads(r["body"])["batch"]}

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while any(expected[d] - received(d) for d in DESTINATIONS) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    missing = {d: sorted(expected[d] - received(d))[:5] for d in DESTINATIONS}
    assert missing == {d: [] for d in DESTINATIONS}, missing
    for d in DESTINATIONS:
        labels = {"forwarder": d, "outcome": "dead_letter"}
        assert metric_value(app, "tagrelay_forwarder_events_total", labels) == 0
