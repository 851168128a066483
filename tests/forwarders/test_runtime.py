"""The forwarder runtime against a recording fake destination (the webhook forwarder):
batching, filters, retry classification, backoff, Retry-After and dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tagrelay.appkeys import SPOOL
from tagrelay.config.common import RetryConfig
from tagrelay.forwarders import ForwarderContext
from tagrelay.forwarders._worker import ForwarderWorker, backoff_secs
from tagrelay.forwarders.webhook import WebhookConfig, WebhookForwarder
from tagrelay.metrics import Metrics
from tagrelay.spool.sqlite import SqliteSpool
from tests.support import SERVER_KEY, Recorder, basic, metric_value, wait_idle

AUTH = basic(SERVER_KEY)
FAST_RETRY = {"max_attempts": 4, "initial_backoff_secs": 0.01, "max_backoff_secs": 0.05}


def hook(rec: Recorder, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "id": "hook",
        "type": "webhook",
        "endpoint": rec.url,
        "headers": {"Authorization": "Bearer s3cret"},
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
        "retry": FAST_RETRY,
    }
    cfg.update(extra)
    return cfg


async def send(client: Any, n: int, name: str = "Clicked", start: int = 0) -> None:
    batch = [
        {"type": "track", "event": name, "anonymousId": "a", "messageId": f"m-{start + i}"}
        for i in range(n)
    ]
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=AUTH)
    assert resp.status == 200


def delivered_ids(rec: Recorder) -> list[str]:
    return [e["messageId"] for r in rec.requests for e in orjson.loads(r["body"])["batch"]]


async def test_events_are_delivered_in_batches_with_configured_headers(
    relay: Any, recorder: Recorder
) -> None:
    client = await relay(forwarders=[hook(recorder)])
    await send(client, 25)
    await wait_idle(client.app)
    assert delivered_ids(recorder) == [f"m-{i}" for i in range(25)]
    assert [len(orjson.loads(r["body"])["batch"]) for r in recorder.requests] == [10, 10, 5]
    first = recorder.requests[0]
    assert first["headers"]["Authorization"] == "Bearer s3cret"
    assert first["headers"]["Content-Type"] == "application/json"
    assert (
        metric_value(
            client.app,
            "tagrelay_forwarder_events_total",
            {"forwarder": "hook", "outcome": "delivered"},
        )
        == 25
    )
    assert (
        metric_value(client.app, "tagrelay_forwarder_batch_size_count", {"forwarder": "hook"}) == 3
    )


async def test_filters_drop_events_and_count_them(relay: Any, recorder: Recorder) -> None:
    client = await relay(forwarders=[hook(recorder, filter={"exclude_events": ["Internal"]})])
    await send(client, 3, "Internal")
    await send(client, 2, "Purchase", start=3)
    await wait_idle(client.app)
    assert delivered_ids(recorder) == ["m-3", "m-4"]
    assert (
        metric_value(
            client.app,
            "tagrelay_forwarder_events_total",
            {"forwarder": "hook", "outcome": "filtered"},
        )
        == 3
    )


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_transient_statuses_are_retried_until_delivered(
    relay: Any, recorder: Recorder, status: int
) -> None:
    recorder.script = [(status, {}, b"busy"), (status, {}, b"busy")]
    client = await relay(forwarders=[hook(recorder)])
    await send(client, 3)
    await wait_idle(client.app)
    assert len(recorder.requests) == 3
    assert delivered_ids(recorder)[-3:] == ["m-0", "m-1", "m-2"]
    reason = f"status_{status}" if status in (408, 429) else "status_5xx"
    assert (
        metric_value(
            client.app, "tagrelay_forwarder_retries_total", {"forwarder": "hook", "reason": reason}
        )
        == 2
    )
    assert await client.app[SPOOL].dead_letters("hook") == []


async def test_other_4xx_go_to_dead_letters_with_the_response(
    relay: Any, recorder: Recorder
) -> None:
    recorder.script = [(400, {}, b'{"error":"bad field"}')]
    client = await relay(forwarders=[hook(recorder)])
    await send(client, 2)
    await wait_idle(client.app)
    await send(client, 1, start=2)
    await wait_idle(client.app)
    dead = await client.app[SPOOL].dead_letters("hook")
    assert sorted(d.seq for d in dead) == [1, 2]
    assert {d.reason for d in dead} == {"status_4xx"}
    assert "bad field" in dead[0].detail
    # the destination refused the first batch only: the next one went through
    assert delivered_ids(recorder)[-1] == "m-2"
    assert (
        metric_value(
            client.app, "tagrelay_dead_letters_total", {"forwarder": "hook", "reason": "status_4xx"}
        )
        == 2
    )


async def test_dead_letter_after_max_attempts_of_events_older_than_max_age(
    relay: Any, recorder: Recorder
) -> None:
    recorder.script = [(503, {}, b"down")] * 10
    client = await relay(forwarders=[hook(recorder, retry={**FAST_RETRY, "max_age_secs": 0.001})])
    await send(client, 2)
    await wait_idle(client.app)
    assert len(recorder.requests) == FAST_RETRY["max_attempts"]
    dead = await client.app[SPOOL].dead_letters("hook")
    assert [d.reason for d in dead] == ["max_age", "max_age"]
    assert dead[0].attempts == FAST_RETRY["max_attempts"]
    assert "HTTP 503" in dead[0].detail
    assert "s3cret" not in dead[0].detail


async def test_retry_after_is_honoured(relay: Any, recorder: Recorder) -> None:
    recorder.script = [(429, {"Retry-After": "1"}, b"slow down")]
    client = await relay(forwarders=[hook(recorder)])
    await send(client, 1)
    await wait_idle(client.app)
    stamps = [r["at"] for r in recorder.requests]
    assert len(stamps) == 2
    assert stamps[1] - stamps[0] >= 0.95


async def test_connection_errors_are_retried(relay: Any) -> None:
    # nothing listens on this port: every attempt is a connection error
    cfg = {
        "id": "hook",
        "type": "webhook",
        "endpoint": "http://127.0.0.1:9/hook",
        "batch": {"max_events": 10, "max_wait_secs": 0},
        "retry": {**FAST_RETRY, "max_attempts": 3, "max_age_secs": 0.001},
    }
    client = await relay(forwarders=[cfg])
    await send(client, 1)
    await wait_idle(client.app)
    assert (
        metric_value(
            client.app,
            "tagrelay_forwarder_retries_total",
            {"forwarder": "hook", "reason": "connection_error"},
        )
        == 2
    )
    [dead] = await client.app[SPOOL].dead_letters("hook")
    assert dead.reason == "max_age"


async def test_a_failing_forwarder_does_not_hold_back_another(
    relay: Any, recorder: Recorder
) -> None:
    broken = {
        "id": "broken",
        "type": "webhook",
        "endpoint": "http://127.0.0.1:9/hook",
        "retry": {"max_attempts": 100, "initial_backoff_secs": 5, "max_backoff_secs": 5},
    }
    client = await relay(forwarders=[broken, hook(recorder)])
    await send(client, 5)
    spool = client.app[SPOOL]
    for _ in range(200):
        if spool.depth("hook") == 0:
            break
        await asyncio.sleep(0.02)
    assert delivered_ids(recorder) == [f"m-{i}" for i in range(5)]
    assert spool.depth("broken") == 5
    # ingestion still works while one destination is down
    await send(client, 1, start=5)


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    retry = RetryConfig(initial_backoff_secs=1, max_backoff_secs=10)
    assert [backoff_secs(a, retry, lambda: 1.0) for a in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]
    assert backoff_secs(3, retry, lambda: 0.5) == 2.0
    assert backoff_secs(3, retry, lambda: 0.0) == 0.0


async def test_events_refused_one_by_one_become_dead_letters(tmp_path: Any) -> None:
    """A destination that takes a batch but refuses some of its events (per-event errors)."""
    from tagrelay.app import create_app
    from tagrelay.forwarders import FORWARDERS
    from tagrelay.model import Delivered, Event, Outcome
    from tests.support import make_config

    class Picky(WebhookForwarder):
        async def deliver(self, events: list[Event]) -> Outcome:
            return Delivered(
                rejected={
                    i: f"bad email in {e['messageId']}"
                    for i, e in enumerate(events)
                    if e["event"] == "Bad"
                }
            )

    FORWARDERS["webhook"], original = Picky, FORWARDERS["webhook"]
    try:
        app = create_app(
            make_config(
                tmp_path,
                # Picky is this test's class: it runs in the relay, not the delivery process.
                delivery={"process": False},
                forwarders=[
                    {
                        "id": "picky",
                        "type": "webhook",
                        "endpoint": "http://127.0.0.1:9/x",
                        "batch": {"max_events": 10, "max_wait_secs": 0},
                    }
                ],
            ),
            admin_socket=False,
        )
        from aiohttp.test_utils import TestClient, TestServer

        async with TestClient(TestServer(app)) as client:
            batch = [
                {"type": "track", "event": name, "anonymousId": "a", "messageId": f"p-{i}"}
                for i, name in enumerate(["Good", "Bad", "Good"])
            ]
            resp = await client.post("/v1/batch", json={"batch": batch}, headers=AUTH)
            assert resp.status == 200
            await wait_idle(app)
            [dead] = await app[SPOOL].dead_letters("picky")
            assert (dead.reason, dead.detail) == ("rejected_by_destination", "bad email in p-1")
            assert (
                metric_value(
                    app,
                    "tagrelay_forwarder_events_total",
                    {"forwarder": "picky", "outcome": "delivered"},
                )
                == 2
            )
            assert (
                metric_value(app, "tagrelay_delivery_latency_seconds_count", {"forwarder": "picky"})
                == 2
            )
    finally:
        FORWARDERS["webhook"] = original


async def test_dead_letter_only_once_older_than_max_age(relay: Any, recorder: Recorder) -> None:
    """Its attempts used up, the batch is retried until its event is older than max_age."""
    recorder.script = [(503, {}, b"down")] * 1000
    retry = {
        "max_attempts": 2,
        "initial_backoff_secs": 0.02,
        "max_backoff_secs": 0.05,
        "max_age_secs": 0.3,
    }
    client = await relay(forwarders=[hook(recorder, retry=retry)])
    sent_ms, sent_at = time.time() * 1000, time.monotonic()
    await send(client, 1)
    await wait_idle(client.app)
    [dead] = await client.app[SPOOL].dead_letters("hook")
    assert dead.reason == "max_age"
    assert dead.dead_at_ms - sent_ms >= 300
    ages = [request["at"] - sent_at for request in recorder.requests]
    assert dead.attempts == len(ages) >= retry["max_attempts"]
    # Its attempts used up while the event was still clearly younger than max_age, the
    # batch was tried again. (On a busy machine the last allowed attempt may come only once
    # the event is that old: then it is dead at once, which is right too.)
    if ages[retry["max_attempts"] - 1] < retry["max_age_secs"] - 0.1:
        assert len(ages) > retry["max_attempts"]
    assert "older than 0.3s (retry.max_age_secs)" in dead.detail
    assert (
        metric_value(
            client.app, "tagrelay_dead_letters_total", {"forwarder": "hook", "reason": "max_age"}
        )
        == 1
    )


async def test_health_ready_and_metrics_endpoints(relay: Any) -> None:
    client = await relay(metrics={"public": True})
    health = await client.get("/healthz")
    assert (health.status, await health.json()) == (200, {"status": "ok"})
    ready = await client.get("/readyz")
    assert (ready.status, await ready.json()) == (200, {"status": "ready"})
    metrics = await client.get("/metrics")
    assert metrics.status == 200
    text = await metrics.text()
    assert "tagrelay_up 1.0" in text
    assert 'tagrelay_http_request_duration_seconds_count{method="GET",route="/readyz"' in text


@contextlib.asynccontextmanager
async def webhook_worker(
    tmp_path: Any, recorder: Recorder
) -> AsyncIterator[tuple[SqliteSpool, ForwarderWorker]]:
    """A started worker of the webhook forwarder on a spool of its own, batching 10 events
    or 30 s (longer than any test), outside an app; the spool closes on the way out."""
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    await spool.open()
    metrics = Metrics()
    config = WebhookConfig.model_validate(
        hook(recorder, batch={"max_events": 10, "max_wait_secs": 30})
    )
    try:
        async with aiohttp.ClientSession() as http:
            context = ForwarderContext(data_dir=tmp_path, http=http, metrics=metrics)
            worker = ForwarderWorker(WebhookForwarder(config, context), spool, metrics)
            await worker.start()
            yield spool, worker
    finally:
        await spool.close()


async def test_a_stop_right_after_a_commit_still_delivers_it(
    tmp_path: Any, recorder: Recorder
) -> None:
    """The stop arrives before the worker has seen the commit that woke it: what is in the
    spool is delivered before the worker ends, not left for the next start."""
    async with webhook_worker(tmp_path, recorder) as (spool, worker):
        await asyncio.sleep(0.05)  # the worker is idle, waiting for a commit
        event = b'{"type":"track","event":"E","anonymousId":"a","messageId":"m-last"}'
        await spool.append([(1, event)])
        await worker.stop(10)  # before the worker task has run again
    assert delivered_ids(recorder) == ["m-last"]


async def test_a_worker_filling_a_batch_is_woken_once_it_is_full_not_at_every_commit(
    tmp_path: Any, recorder: Recorder
) -> None:
    """A partial batch waits for ``max_events``: the commits in between do not wake the
    worker (each wake-up of the delivery thread costs the event loop the GIL); the one that
    fills the batch does, long before ``max_wait_secs``."""

    def event(i: int) -> list[tuple[int, bytes]]:
        payload = b'{"type":"track","event":"E","anonymousId":"a","messageId":"m-%d"}' % i
        return [(int(time.time() * 1000), payload)]

    async with webhook_worker(tmp_path, recorder) as (spool, worker):
        await asyncio.sleep(0.05)  # idle, waiting for a commit
        await spool.append(event(0))
        # Woken, the worker reads a partial batch of 1 and waits to be woken at 10.
        wake = worker._wake
        for _ in range(500):
            if wake.level == 10 and not wake.event.is_set():
                break
            await asyncio.sleep(0.01)
        assert (wake.level, wake.event.is_set()) == (10, False)
        for i in range(1, 9):
            await spool.append(event(i))
            assert not wake.event.is_set(), f"woken by commit {i + 1} of 10"
        await spool.append(event(9))
        assert wake.event.is_set()
        for _ in range(200):
            if recorder.requests:
                break
            await asyncio.sleep(0.01)
        await worker.stop(10)
    assert [len(orjson.loads(r["body"])["batch"]) for r in recorder.requests] == [10]


@pytest.mark.parametrize("reads_spool", [False, True], ids=["events", "span"])
async def test_events_a_destination_already_took_are_not_dead_lettered(
    tmp_path: Any, reads_spool: bool
) -> None:
    """A batch sent as several requests, of which one went through, runs out of retries:
    only the events the destination does not have become dead letters. The same when the
    forwarder reads its batches from the spool itself: the runtime reads the events for
    the dead letters then."""
    from tagrelay.config.common import ForwarderConfigBase
    from tagrelay.forwarders._base import SpanDelivery, SpoolSpan
    from tagrelay.model import Retry

    spans: list[SpoolSpan] = []

    class HalfTaken:
        max_event_age_secs = None
        config = ForwarderConfigBase.model_validate(
            {
                "id": "half",
                "batch": {"max_events": 10, "max_wait_secs": 0},
                "retry": {"max_attempts": 1},
            }
        )

        async def start(self) -> None: ...
        async def close(self) -> None: ...

        async def deliver_payloads(self, payloads: list[bytes]) -> Retry:
            return Retry("status_5xx", "HTTP 503", delivered=frozenset({0}))

        async def deliver_span(self, span: SpoolSpan) -> SpanDelivery:
            spans.append(span)
            return SpanDelivery(await self.deliver_payloads([]))

    HalfTaken.reads_spool = reads_spool  # type: ignore[attr-defined]
    HalfTaken.filters_spans = False  # type: ignore[attr-defined]
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    await spool.open()
    metrics = Metrics()
    worker = ForwarderWorker(HalfTaken(), spool, metrics)  # type: ignore[arg-type]
    await worker.start()  # a new forwarder starts at the head: start it first
    await spool.append([(1, b'{"messageId":"taken"}'), (1, b'{"messageId":"refused"}')])
    for _ in range(100):
        if spool.depth("half") == 0:
            break
        await asyncio.sleep(0.02)
    await worker.stop(5)
    dead = await spool.dead_letters("half")
    await spool.close()
    assert [orjson.loads(d.payload)["messageId"] for d in dead] == ["refused"]
    assert [(s.after, s.last) for s in spans] == ([(0, 2)] if reads_spool else [])
    registry = metrics.registry
    labels = {"forwarder": "half", "outcome": "delivered"}
    assert registry.get_sample_value("tagrelay_forwarder_events_total", labels) == 1
    labels["outcome"] = "dead_letter"
    assert registry.get_sample_value("tagrelay_forwarder_events_total", labels) == 1
