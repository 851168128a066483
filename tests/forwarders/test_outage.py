"""Delivery after an outage: the backoff is capped, the backlog goes out at once after the
destination recovers, a short outage makes no dead letters, and an event is dead-lettered
only when it is older than the max age (cut to the destination's window) and its batch has
used its attempts, which are counted per batch, across a restart.

The destination is a small recording aiohttp app that can be switched down (answering 503,
or refusing connections) and up. Workers run outside an app, with an injected clock and
rand, and with their sleeps recorded (and not slept): what the worker would have waited is
asserted, not wall time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tagrelay.appkeys import SPOOL
from tagrelay.config.common import RetryConfig
from tagrelay.forwarders import ForwarderContext
from tagrelay.forwarders._worker import ForwarderWorker, backoff_secs
from tagrelay.forwarders.ga4 import GA4Forwarder
from tagrelay.forwarders.webhook import WebhookConfig, WebhookForwarder
from tagrelay.metrics import Metrics
from tagrelay.spool.sqlite import SqliteSpool
from tests.support import SERVER_KEY, basic, metric_value, wait_idle

T0 = 1_800_000_000.0
"""The injected clock's start (seconds); the tests' events arrive at or after it."""


class Destination:
    """A fake webhook destination. ``up``: it takes batches (``taken``: their messageIds,
    in order). Down as ``"503"``: it answers 503 with ``body``; down as ``"refused"``:
    nothing listens on its port (its server is stopped, its connections closed).
    ``sizes``: the events of every request it saw, failed or not."""

    def __init__(self) -> None:
        self.taken: list[str] = []
        self.sizes: list[int] = []
        self.state = "up"
        self.body = b"busy"
        self.headers: dict[str, str] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        batch = orjson.loads(await request.read())["batch"]
        self.sizes.append(len(batch))
        if self.state != "up":
            return web.Response(status=503, headers=self.headers, body=self.body)
        self.taken.extend(event["messageId"] for event in batch)
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def down(self, how: str) -> None:
        self.state = how
        if how == "refused":
            await self.stop()

    async def up(self) -> None:
        if self._runner is None:
            await self.start()
        self.state = "up"


@pytest.fixture
async def destination() -> AsyncIterator[Destination]:
    dest = Destination()
    await dest.start()
    try:
        yield dest
    finally:
        await dest.stop()


class Clock:
    """The worker's injected clock: stands still unless a test moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(i: int) -> bytes:
    return b'{"type":"track","event":"E","anonymousId":"a","messageId":"m-%d"}' % i


async def append(spool: SqliteSpool, ids: range, received: float = T0) -> None:
    await spool.append([(int(received * 1000), event(i)) for i in ids])


def webhook(dest: Destination, **extra: Any) -> WebhookConfig:
    raw: dict[str, Any] = {
        "id": "hook",
        "type": "webhook",
        "endpoint": dest.url,
        "batch": {"max_events": 10, "max_wait_secs": 30},
    }
    raw.update(extra)
    return WebhookConfig.model_validate(raw)


class Rig:
    """A worker of the webhook forwarder on a spool of its own, with its sleeps recorded:
    ``sleeps`` (the backoff waits, each as ``(secs, events taken so far)``) return at once
    after ``on_sleep(n)`` (n counts from 1); ``waits`` (waits for commits: a partial batch
    filling, or idle) are recorded the same way and cut to 50 ms."""

    def __init__(self, tmp_path: Path, dest: Destination, config: WebhookConfig) -> None:
        self.tmp_path = tmp_path
        self.dest = dest
        self.config = config
        self.clock = Clock()
        self.metrics = Metrics()
        self.sleeps: list[tuple[float, int]] = []
        self.waits: list[tuple[float, int]] = []
        self.on_sleep: Callable[[int], Awaitable[None]] | None = None
        self.forwarder_class: type[WebhookForwarder] = WebhookForwarder
        self.spool = SqliteSpool(tmp_path / "spool.sqlite3")
        self.worker: ForwarderWorker | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> ForwarderWorker:
        if self._http is None:
            await self.spool.open()
            self._http = aiohttp.ClientSession()
        context = ForwarderContext(data_dir=self.tmp_path, http=self._http, metrics=self.metrics)
        worker = ForwarderWorker(
            self.forwarder_class(self.config, context),
            self.spool,
            self.metrics,
            clock=self.clock,
            rand=lambda: 1.0,  # every backoff at its ceiling
        )
        real_wait = worker._wait_for_wake

        async def sleep(secs: float) -> None:
            self.sleeps.append((secs, len(self.dest.taken)))
            if self.on_sleep is not None:
                await self.on_sleep(len(self.sleeps))
            await asyncio.sleep(0)

        async def wait_for_wake(secs: float) -> None:
            self.waits.append((secs, len(self.dest.taken)))
            await real_wait(min(secs, 0.05))

        worker._sleep = sleep  # type: ignore[method-assign]
        worker._wait_for_wake = wait_for_wake  # type: ignore[method-assign]
        await worker.start()
        self.worker = worker
        return worker

    async def stop_worker(self) -> None:
        assert self.worker is not None
        await self.worker.stop(5)
        self.worker = None

    async def close(self) -> None:
        if self.worker is not None:
            await self.stop_worker()
        if self._http is not None:
            await self._http.close()
        await self.spool.close()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}: taken={self.dest.taken}")

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"forwarder": "hook", **labels})
        return 0.0 if value is None else value


@pytest.fixture
async def rig_factory(
    tmp_path: Path, destination: Destination
) -> AsyncIterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**config: Any) -> Rig:
        rig = Rig(tmp_path, destination, webhook(destination, **config))
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.close()


def ids(numbers: range) -> list[str]:
    return [f"m-{i}" for i in numbers]


# -- the backoff cap ---------------------------------------------------------------------


def test_backoff_never_exceeds_its_cap_even_after_thousands_of_attempts() -> None:
    retry = RetryConfig()
    assert retry.max_backoff_secs == 60
    ceilings = [backoff_secs(a, retry, lambda: 1.0) for a in (1, 2, 7, 8, 100, 5000, 10**9)]
    assert ceilings == [1, 2, 60, 60, 60, 60, 60]


def test_a_destinations_retry_after_is_capped() -> None:
    from tagrelay.forwarders._worker import retry_delay_secs
    from tagrelay.model import Retry

    retry = RetryConfig()
    assert retry.max_retry_after_secs == 3600

    def delay(after: float | None) -> float:
        return retry_delay_secs(3, Retry("status_429", after_secs=after), retry, lambda: 1.0)

    assert [delay(a) for a in (0.0, 7.0, 3600.0, 86_400.0, 1e12, float("inf"))] == [
        0,
        7,
        3600,
        3600,
        3600,
        3600,
    ]
    assert delay(None) == 4.0  # no Retry-After: the backoff
    capped = RetryConfig(max_retry_after_secs=120)
    assert retry_delay_secs(1, Retry("status_503", after_secs=1e6), capped) == 120


async def test_a_huge_retry_after_is_waited_only_up_to_the_cap(
    rig_factory: Callable[..., Rig], destination: Destination
) -> None:
    rig = rig_factory(batch={"max_events": 10, "max_wait_secs": 0})
    destination.headers = {"Retry-After": "999999999"}

    async def recover(n: int) -> None:
        await destination.up()

    rig.on_sleep = recover
    await destination.down("503")
    await rig.start()
    await append(rig.spool, range(3))
    await rig.until(lambda: len(destination.taken) == 3, "delivery")
    assert [secs for secs, _ in rig.sleeps] == [3600.0]


# -- recovery --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["503", "refused"])
async def test_after_recovery_the_backlog_goes_out_at_once(
    rig_factory: Callable[..., Rig], destination: Destination, how: str
) -> None:
    """Down for 12 attempts, with every backoff at its ceiling: no wait exceeds the cap.
    Once the retried batch goes through, the three batches behind it (the last one
    partial) go out with no backoff and no wait for the partial batch to fill, although
    the clock says its events have waited far less than max_wait_secs (30 s)."""
    rig = rig_factory()  # retry: the defaults

    async def outage(n: int) -> None:
        if n == 12:
            await destination.up()

    rig.on_sleep = outage
    await destination.down(how)
    await rig.start()
    await append(rig.spool, range(35))
    # The destination has the events before the worker has read its answer: wait for both.
    await rig.until(
        lambda: (
            len(destination.taken) == 35
            and rig.count("tagrelay_forwarder_events_total", outcome="delivered") == 35
        ),
        "the backlog",
    )

    assert destination.taken == ids(range(35)), "in order, exactly once"
    backoffs = [secs for secs, _ in rig.sleeps]
    assert backoffs == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60]
    assert all(taken == 0 for _, taken in rig.sleeps), "no backoff after the recovery"
    assert [w for w in rig.waits if 0 < w[1] < 35] == [], "no wait while a backlog exists"
    if how == "503":
        assert destination.sizes == [10] * 12 + [10, 10, 10, 5]
    else:
        assert destination.sizes == [10, 10, 10, 5]
    reason = "status_5xx" if how == "503" else "connection_error"
    assert rig.count("tagrelay_forwarder_retries_total", reason=reason) == 12
    assert rig.count("tagrelay_forwarder_events_total", outcome="delivered") == 35
    assert await rig.spool.dead_letters("hook") == []
    assert rig.worker is not None and rig.worker._state.attempts == 0


# -- dead letters ----------------------------------------------------------------------


async def test_a_short_outage_makes_no_dead_letters(
    relay: Any, destination: Destination, caplog: pytest.LogCaptureFixture
) -> None:
    """max_attempts: 3, and the destination fails 30 times while events keep arriving: all
    are delivered after it recovers, in order, once each; the log has one WARNING for the
    outage (with a short detail that leaks no token from the response), not one per
    attempt."""
    retry = {"max_attempts": 3, "initial_backoff_secs": 0.005, "max_backoff_secs": 0.01}
    hook = {
        "id": "hook",
        "type": "webhook",
        "endpoint": destination.url,
        "batch": {"max_events": 10, "max_wait_secs": 0.01},
        "retry": retry,
    }
    destination.body = b"upstream https://auth.example/cb?token=s3cret failed: " + b"x" * 5000
    await destination.down("503")
    client = await relay(forwarders=[hook])
    caplog.set_level(logging.INFO, logger="tagrelay.forwarders")
    for start in range(0, 42, 7):
        batch = [
            {"type": "track", "event": "E", "anonymousId": "a", "messageId": f"m-{i}"}
            for i in range(start, start + 7)
        ]
        resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
        assert resp.status == 200
    for _ in range(1000):
        if len(destination.sizes) >= 30:
            break
        await asyncio.sleep(0.01)
    await destination.up()
    await wait_idle(client.app)

    assert destination.taken == ids(range(42)), "in order, exactly once"
    assert await client.app[SPOOL].dead_letters("hook") == []
    labels = {"forwarder": "hook", "reason": "status_5xx"}
    assert metric_value(client.app, "tagrelay_forwarder_retries_total", labels) >= 30
    assert metric_value(client.app, "tagrelay_dead_letters_total", labels) == 0
    delivered = {"forwarder": "hook", "outcome": "delivered"}
    assert metric_value(client.app, "tagrelay_forwarder_events_total", delivered) == 42
    warnings = [r for r in caplog.records if r.getMessage() == "delivery failed; will retry"]
    assert len(warnings) == 1
    [line] = warnings
    assert line.levelno == logging.WARNING
    assert (line.forwarder, line.reason) == ("hook", "status_5xx")  # type: ignore[attr-defined]
    detail: str = line.detail  # type: ignore[attr-defined]
    assert detail.startswith("HTTP 503: upstream https://auth.example/cb?... failed")
    assert len(detail) <= 200
    assert not [r for r in caplog.records if "s3cret" in str(r.__dict__)]


async def test_an_event_is_dead_lettered_once_older_than_max_age_and_its_batch_used_its_attempts(
    rig_factory: Callable[..., Rig], destination: Destination
) -> None:
    """Batch A (2 events) fails; meanwhile 3 events arrive (batch B) and the clock moves on
    until A's events are older than max_age: A is still retried until it has used its 3
    attempts, and only its own events become dead letters. B, never tried with A, starts
    with no attempts; young, it is retried past its attempts and delivered once the
    destination recovers."""
    rig = rig_factory(
        batch={"max_events": 10, "max_wait_secs": 0},
        retry={"max_attempts": 3, "max_age_secs": 100},
    )

    async def script(n: int) -> None:
        if n == 1:
            await append(rig.spool, range(2, 5), received=T0 + 60)
            rig.clock.now = T0 + 150
        if n == 7:
            await destination.up()

    rig.on_sleep = script
    await destination.down("503")
    await rig.start()
    await append(rig.spool, range(2))
    await rig.until(
        lambda: (
            len(destination.taken) == 3
            and rig.count("tagrelay_forwarder_events_total", outcome="delivered") == 3
        ),
        "batch B",
    )

    assert destination.sizes == [2, 2, 2] + [3] * 6
    dead = await rig.spool.dead_letters("hook")
    assert [(d.seq, d.reason, d.attempts) for d in dead] == [(1, "max_age", 3), (2, "max_age", 3)]
    assert dead[0].detail.startswith("older than 100s (retry.max_age_secs) after 3 attempts")
    assert "HTTP 503: busy" in dead[0].detail
    assert destination.taken == ids(range(2, 5))
    # B used its attempts at its 3rd failure, 90 s old: the next try comes no later than
    # when it turns 100 s old (then it would be dead-lettered if it failed again)
    assert [secs for secs, _ in rig.sleeps] == [1, 2, 1, 2, 4, 8, 10]
    assert rig.count("tagrelay_dead_letters_total", reason="max_age") == 2
    assert rig.count("tagrelay_forwarder_events_total", outcome="dead_letter") == 2
    assert rig.count("tagrelay_forwarder_events_total", outcome="delivered") == 3
    assert rig.count("tagrelay_forwarder_retries_total", reason="status_5xx") == 7


async def test_the_destinations_window_caps_max_age(
    rig_factory: Callable[..., Rig], destination: Destination
) -> None:
    """A destination that takes events up to 100 s old: retry.max_age_secs (a day) is cut
    to that; the retry after the attempts are used comes before the events pass it, and
    the failure after it dead-letters them."""

    class Recent(WebhookForwarder):
        max_event_age_secs = 100.0

    rig = rig_factory(
        batch={"max_events": 10, "max_wait_secs": 0},
        retry={"max_attempts": 2, "initial_backoff_secs": 1000, "max_backoff_secs": 3600},
    )
    rig.forwarder_class = Recent
    rig.clock.now = T0 + 50

    async def script(n: int) -> None:
        if n == 2:
            rig.clock.now = T0 + 120

    rig.on_sleep = script
    await destination.down("503")
    await rig.start()
    await append(rig.spool, range(3))
    await rig.until(lambda: rig.spool.depth("hook") == 0, "the dead letters")

    assert [secs for secs, _ in rig.sleeps] == [1000, 50]
    dead = await rig.spool.dead_letters("hook")
    assert [(d.seq, d.reason, d.attempts) for d in dead] == [
        (1, "max_age", 3),
        (2, "max_age", 3),
        (3, "max_age", 3),
    ]
    assert dead[0].detail.startswith("older than 100s (the oldest the destination accepts)")
    assert GA4Forwarder.max_event_age_secs == 72 * 3600
    assert WebhookForwarder.max_event_age_secs is None


async def test_a_restart_keeps_the_attempt_count_for_that_batch_only(
    rig_factory: Callable[..., Rig], destination: Destination
) -> None:
    """Batch A (2 old events) fails twice; 3 events arrive; the relay restarts (worker and
    spool). The third failure of A dead-letters A's events only: the 3 new ones are a new
    batch with no attempts, delivered when the destination recovers."""
    rig = rig_factory(
        batch={"max_events": 10, "max_wait_secs": 0},
        retry={"max_attempts": 3, "max_age_secs": 100},
    )
    rig.clock.now = T0 + 1000
    stopped = asyncio.Event()

    async def first_run(n: int) -> None:
        if n == 2:
            await stopped.wait()  # stays in its backoff until stopped

    rig.on_sleep = first_run
    await destination.down("503")
    await rig.start()
    await append(rig.spool, range(2))
    await rig.until(lambda: len(rig.sleeps) == 2, "two failures")
    await append(rig.spool, range(2, 5), received=T0 + 990)
    stopped.set()
    await rig.stop_worker()
    await rig.close()
    assert destination.sizes == [2, 2]

    again = rig_factory(
        batch={"max_events": 10, "max_wait_secs": 0},
        retry={"max_attempts": 3, "max_age_secs": 100},
    )
    again.clock.now = T0 + 1000

    async def second_run(n: int) -> None:
        await destination.up()

    again.on_sleep = second_run
    await again.start()
    await again.until(lambda: len(destination.taken) == 3, "the new batch")

    assert destination.sizes == [2, 2, 2, 3, 3]
    dead = await again.spool.dead_letters("hook")
    assert [(d.seq, d.attempts) for d in dead] == [(1, 3), (2, 3)]
    assert destination.taken == ids(range(2, 5))


async def test_a_retried_batch_does_not_count_its_filtered_events_again(
    rig_factory: Callable[..., Rig], destination: Destination
) -> None:
    rig = rig_factory(
        batch={"max_events": 10, "max_wait_secs": 0},
        filter={"exclude_events": ["Skip"]},
    )

    async def script(n: int) -> None:
        if n == 5:
            await destination.up()

    rig.on_sleep = script
    await destination.down("503")
    await rig.start()
    await rig.spool.append(
        [
            (int(T0 * 1000), b'{"type":"track","event":"Skip","messageId":"s-1"}'),
            (int(T0 * 1000), event(0)),
        ]
    )
    await rig.until(lambda: destination.taken == ["m-0"], "delivery")
    assert rig.count("tagrelay_forwarder_events_total", outcome="filtered") == 1


async def test_a_span_forwarder_retries_the_same_span_and_drains_its_backlog_at_once(
    tmp_path: Path,
) -> None:
    """The same rules for a forwarder that reads its batches from the spool itself (the
    warehouse): the retried span keeps its extent, and once it goes through the spans
    behind it, the last one partial, go out without waiting."""
    from tagrelay.config.common import ForwarderConfigBase
    from tagrelay.forwarders._base import SpanDelivery, SpoolSpan
    from tagrelay.model import Delivered, Retry

    spans: list[tuple[int, int]] = []
    failures = 3

    class Spans:
        max_event_age_secs = None
        reads_spool = True
        filters_spans = False
        config = ForwarderConfigBase.model_validate(
            {"id": "spans", "batch": {"max_events": 10, "max_wait_secs": 30}}
        )

        async def start(self) -> None: ...
        async def close(self) -> None: ...

        async def deliver_span(self, span: SpoolSpan) -> SpanDelivery:
            nonlocal failures
            spans.append((span.after, span.last))
            if failures:
                failures -= 1
                return SpanDelivery(Retry("status_5xx", "HTTP 503"))
            return SpanDelivery(Delivered(), [(span.last - span.after, int(T0 * 1000))])

    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    await spool.open()
    # The first span's events waited 31 s (> max_wait_secs); the backlog's, by the clock,
    # none: an old worker would wait 30 s for its partial last span to fill.
    clock = Clock(T0 + 31)
    worker = ForwarderWorker(Spans(), spool, Metrics(), clock=clock)  # type: ignore[arg-type]
    sleeps: list[float] = []
    waits: list[tuple[float, int]] = []

    async def sleep(secs: float) -> None:
        sleeps.append(secs)
        if len(sleeps) == 1:
            await append(spool, range(4, 27), received=T0 + 31)  # while the span is retried
        await asyncio.sleep(0)

    real_wait = worker._wait_for_wake

    async def wait_for_wake(secs: float) -> None:
        waits.append((secs, len(spans)))
        await real_wait(min(secs, 0.05))

    worker._sleep = sleep  # type: ignore[method-assign]
    worker._wait_for_wake = wait_for_wake  # type: ignore[method-assign]
    try:
        await worker.start()
        await append(spool, range(4))
        for _ in range(500):
            if spool.depth("spans") == 0:
                break
            await asyncio.sleep(0.01)
        await worker.stop(5)
    finally:
        await spool.close()
    assert spans == [(0, 4)] * 4 + [(4, 14), (14, 24), (24, 27)]
    assert [w for w in waits if 4 <= w[1] < 7] == []


def test_detail_in_log_lines_is_short_and_has_no_url_query() -> None:
    from tagrelay.forwarders._worker import log_detail

    assert (
        log_detail("HTTP 502: <html>\n  bad\tgateway </html>")
        == "HTTP 502: <html> bad gateway </html>"
    )
    text = log_detail("ClientError: https://api.example/v1?api_secret=abc&x=1 failed " + "y" * 500)
    assert text.startswith("ClientError: https://api.example/v1?... failed yyy")
    assert len(text) == 200 and text.endswith("...")
    assert "abc" not in text


async def test_a_ga4_batch_retried_after_more_events_arrived_resends_nothing_google_took(
    tmp_path: Path,
) -> None:
    """GA4 skips, on a retry, the requests of the batch that Google already took, as long as
    the batch is the same: the retried batch keeps its events although more arrived, so
    Google does not get the first request twice (its Measurement Protocol has no dedup)."""
    from datetime import UTC, datetime

    from tagrelay.forwarders.ga4 import GA4Config
    from tests.support import recording_server

    def track(message_id: str, anonymous_id: str) -> bytes:
        now = datetime.now(UTC).isoformat()
        return orjson.dumps(
            {
                "type": "track",
                "event": "Clicked",
                "messageId": message_id,
                "anonymousId": anonymous_id,
                "timestamp": now,
                "context": {"consent": {"analytics": "granted"}},
            }
        )

    async with recording_server("Google", ["/mp/collect"]) as google:
        config = GA4Config.model_validate(
            {
                "id": "ga4",
                "type": "ga4",
                "measurement_id": "G-TEST1234",
                "api_secret": "s3cret-api",
                "mp_url": google.url + "mp/collect",
                "max_concurrent_requests": 1,
                "batch": {"max_events": 10, "max_wait_secs": 0},
            }
        )
        google.script = [(204, {}, b""), (503, {}, b"busy")]  # then 200s
        spool = SqliteSpool(tmp_path / "spool.sqlite3")
        await spool.open()
        async with aiohttp.ClientSession() as http:
            metrics = Metrics()
            context = ForwarderContext(data_dir=tmp_path, http=http, metrics=metrics)
            worker = ForwarderWorker(GA4Forwarder(config, context), spool, metrics)

            async def sleep(secs: float) -> None:  # more events arrive during the backoff
                await spool.append([(int(time.time() * 1000), track("m-3", "anon-c"))])

            worker._sleep = sleep  # type: ignore[method-assign]
            await worker.start()
            now_ms = int(time.time() * 1000)
            await spool.append([(now_ms, track("m-1", "anon-a")), (now_ms, track("m-2", "anon-b"))])
            for _ in range(500):
                if spool.head == 3 and spool.depth("ga4") == 0:
                    break
                await asyncio.sleep(0.01)
            await worker.stop(5)
        await spool.close()
    bodies = [r["body"] for r in google.requests]
    assert len(bodies) == 4, "a, b (503), b again, then c"
    assert bodies[2] == bodies[1]
    assert bodies.count(bodies[0]) == 1, "what Google took is not sent again"
