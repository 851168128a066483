"""The forwarder runtime: one worker per configured forwarder, written once.

A worker owns a cursor on the spool. It reads the next batch after its cursor (up to
``batch.max_events``, waiting up to ``batch.max_wait_secs`` for a partial batch to fill),
applies the forwarder's filter, calls ``deliver`` and acts on the outcome:

- ``Delivered``: the cursor moves past the batch; events refused one by one become dead
  letters.
- ``Retry``: the same batch is tried again after a capped exponential backoff with full
  jitter, or the destination's ``Retry-After`` (capped too). "The same" means the same
  events: the attempt count, the time of the first failure and the batch's last sequence
  number are stored with the cursor, so a restart neither forgets nor resets them, and
  events committed after the batch was first tried are not charged its attempts. An outage
  only delays events: once the batch has used ``retry.max_attempts``, those of its events
  older than the max age (``retry.max_age_secs``, cut to the forwarder's
  ``max_event_age_secs``; the age since the relay received the event) become dead letters,
  and the rest of the batch is tried again. A failing destination logs one WARNING per
  reason and interval, not one per attempt.
- ``Dead``: the batch becomes dead letters at once, with the reason and detail.

Once a batch that had failed goes through (or is dead-lettered), the next batch starts with
no attempts, and the backlog behind it goes out at full speed: no backoff, and no waiting
for a partial batch to fill until the worker has caught up with the spool.

A forwarder that reads the spool file itself (``reads_spool``, the warehouse) and has no
filter or consent rule gets its batches as spans, ``after < seq <= last``, chosen from the
in-memory head: the worker never reads those events, unless an outcome needs them one by
one (dead letters).

Ordering is kept per forwarder: a failing batch holds back the ones after it (they wait on
disk, not in memory), and never holds back ingestion or another forwarder.

While the debug view captures (``ForwarderContext.capture``, ``tagrelay.capture``), the
worker reports what became of each sampled event: sent, left out by the filter or for want
of consent, retrying (with the attempt and the time of the next try), dead-lettered. Only
then does it read a span's events (by ``messageId``); otherwise the check is one number.
The last failure (``last_error``) is kept for the debug view's forwarder panel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tagrelay.capture import NO_CAPTURE, DeliveryCapture, sampled
from tagrelay.config.common import ForwarderConfigBase, RetryConfig
from tagrelay.forwarders._base import Forwarder, SpanDelivery, SpoolSpan
from tagrelay.logthrottle import LogThrottle
from tagrelay.metrics import Metrics
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry
from tagrelay.spool.backend import Spool
from tagrelay.spool.erasure import ERASED
from tagrelay.spool.sqlite import CursorState, SpooledEvent, SqliteSpool

log = logging.getLogger(__name__)

IDLE_POLL_SECS = 5.0
"""Upper bound on waiting for the spool's wake-up signal (a safety net, not the mechanism)."""


RETRY_LOG_INTERVAL_SECS = 60.0
"""A failing destination logs one line per forwarder and reason per interval, with the count
of failures since the previous line (``LogThrottle``), instead of one per attempt."""

LOG_DETAIL_CHARS = 200
"""An outcome's detail (a response body, an exception's text) is cut to this in log lines;
dead letters keep the longer detail."""

MAX_BACKOFF_EXPONENT = 62
"""``2.0 ** attempt`` overflows a float past 1023: the growth stops long before (a long
outage counts thousands of attempts; ``max_backoff_secs`` is reached after a few)."""

_URL_TAIL = re.compile(r"(\w+://[^\s?#'\"<>]*)[?#][^\s'\"<>]*")


def backoff_secs(
    attempt: int, retry: RetryConfig, rand: Callable[[], float] = random.random
) -> float:
    """Full jitter: uniform in [0, min(max_backoff, initial * 2**(attempt-1))]."""
    exponent = min(max(0, attempt - 1), MAX_BACKOFF_EXPONENT)
    growth: float = retry.initial_backoff_secs * 2.0**exponent
    return min(retry.max_backoff_secs, growth) * rand()


def retry_delay_secs(
    attempt: int, outcome: Retry, retry: RetryConfig, rand: Callable[[], float] = random.random
) -> float:
    """The wait before the next attempt: the destination's ``Retry-After`` when it gave one,
    cut to ``max_retry_after_secs``; else the backoff."""
    if outcome.after_secs is not None:
        return min(max(0.0, outcome.after_secs), retry.max_retry_after_secs)
    return backoff_secs(attempt, retry, rand)


def log_detail(detail: str) -> str:
    """An outcome's detail fit for a log line: the query and fragment of any URL in it cut
    off (they may carry a token), whitespace folded, at most ``LOG_DETAIL_CHARS``."""
    text = " ".join(_URL_TAIL.sub(r"\1?...", detail).split())
    if len(text) > LOG_DETAIL_CHARS:
        text = text[: LOG_DETAIL_CHARS - 3] + "..."
    return text


_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")


def detail_status(detail: str) -> int | None:
    """The HTTP status a destination answered, as an outcome's detail states it (``HTTP
    503: ...``, the form every forwarder uses); None for a failure without an answer."""
    found = _HTTP_STATUS.search(detail)
    return int(found.group(1)) if found else None


def accepts(config: ForwarderConfigBase, event: Event) -> bool:
    """The forwarder's filter (include/exclude by type and by track event name)."""
    f = config.filter
    etype = event.get("type")
    if f.include_types and etype not in f.include_types:
        return False
    if etype in f.exclude_types:
        return False
    if etype == "track":
        name = event.get("event")
        if f.include_events and name not in f.include_events:
            return False
        if name in f.exclude_events:
            return False
    return True


def consented(required: Sequence[str], event: Event) -> bool:
    """Whether the event grants every consent category in ``required``. An event that
    states nothing about a category (``context.consent``) does not grant it."""
    context = event.get("context")
    consent = context.get("consent") if isinstance(context, dict) else None
    if not isinstance(consent, dict):
        return False
    return all(consent.get(category) == "granted" for category in required)


def _first(arrivals: Iterable[tuple[int, int]], count: int) -> Iterator[tuple[int, int]]:
    """The ``(events, received_ms)`` runs of the first ``count`` events of ``arrivals``."""
    left = count
    for n, received_ms in arrivals:
        if left <= 0:
            return
        yield min(n, left), received_ms
        left -= n


@dataclass(frozen=True, slots=True)
class LastError:
    """A forwarder's last failure, for the debug view: when (``time.time()``), the reason
    code and the detail (the destination's answer, secrets scrubbed by the forwarder)."""

    at: float
    reason: str
    detail: str


def _message_id(payload: bytes) -> object:
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return event.get("messageId") if isinstance(event, dict) else None


class ForwarderWorker:
    def __init__(
        self,
        forwarder: Forwarder,  # type: ignore[type-arg]
        spool: Spool,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.forwarder = forwarder
        self.config: ForwarderConfigBase = forwarder.config
        self.spool = spool
        self.metrics = metrics
        self._clock = clock
        self._rand = rand
        self._wake = spool.subscribe(forwarder.config.id)
        self._stopping = asyncio.Event()
        self._flush = True
        self._task: asyncio.Task[None] | None = None
        self._state = CursorState(0)
        f = self.config.filter
        self._filters = bool(
            f.include_types or f.exclude_types or f.include_events or f.exclude_events
        )
        self._required_consent = tuple(self.config.requires_consent)
        self._spans = (
            spool.spans
            and forwarder.reads_spool
            and (forwarder.filters_spans or not (self._filters or self._required_consent))
        )
        """Batches go to the forwarder as spans of the spool (``deliver_span``): nothing
        here needs their events."""
        retry_age = self.config.retry.max_age_secs
        window = forwarder.max_event_age_secs
        if window is not None and window < retry_age:
            self.max_age_secs = window
            self._max_age_text = f"{window:g}s (the oldest the destination accepts)"
        else:
            self.max_age_secs = retry_age
            self._max_age_text = f"{retry_age:g}s (retry.max_age_secs)"
        self._backlog = False
        """A batch that had failed was settled: until a partial batch shows that the worker
        has caught up, batches go out without waiting to fill."""
        self._throttle = LogThrottle(log, RETRY_LOG_INTERVAL_SECS)
        self._endpoint: str | None = getattr(forwarder, "endpoint_host", None)
        context = getattr(forwarder, "context", None)  # a stand-in in tests may have none
        self._capture: DeliveryCapture = getattr(context, "capture", NO_CAPTURE)
        self.last_error: LastError | None = None
        """The last failure (a retry or dead letters), for the debug view's panel."""
        self.gate: Callable[[int], Awaitable[None]] | None = None
        """Awaited with a batch's last sequence number before it is delivered (an enriching
        forwarder waits for the identity store's writer to pass it; ``_fleet``)."""
        self.on_moved: Callable[[int], None] | None = None
        """Called with the cursor's new position each time it moves past a batch (the
        identity store's writer tells the enriching forwarders' gate)."""

    @property
    def id(self) -> str:
        return self.config.id

    def _file(self) -> SqliteSpool:
        """The SQLite spool, for spans (only ever made over one: ``spool.spans``)."""
        assert isinstance(self.spool, SqliteSpool)
        return self.spool

    def status(self) -> dict[str, Any]:
        """Where the worker is, for the debug view's forwarder panel (read from any
        thread): running, its cursor, and the attempts spent on a failing batch."""
        state = self._state
        task = self._task
        return {
            "running": task is not None and not task.done() and not self._stopping.is_set(),
            "position": state.position,
            "attempts": state.attempts,
            "failing_since_ms": state.first_failure_ms if state.attempts else None,
        }

    async def start(self) -> None:
        self._state = await self.spool.register(self.id, self.config.start)
        await self.forwarder.start()
        self._task = asyncio.create_task(self._run(), name=f"forwarder-{self.id}")

    async def stop(self, timeout_secs: float, *, flush: bool = True) -> None:
        """Let the batch in flight finish (up to ``timeout_secs``), then stop. ``flush``:
        first deliver what was committed and not sent yet (a relay stopping); without it
        (a reload removing or changing the forwarder) the rest waits on disk for the next
        worker on this cursor."""
        self._flush = flush
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_secs)
            except TimeoutError:
                log.warning(
                    "forwarder did not stop in time; its batch will be sent again",
                    extra={"forwarder": self.id},
                )
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self.spool.unsubscribe(self._wake)
        await self.forwarder.close()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug or a spool failure: never let the worker die; back off and try again.
                log.exception("forwarder step failed", extra={"forwarder": self.id})
                await self._sleep(1.0)
        if self._flush:
            await self._flush_on_stop()

    async def _flush_on_stop(self) -> None:
        """Deliver what was committed before the stop and not sent yet (the stop may come
        while the worker waits for a batch to fill, or before it saw the last commit):
        batches go out as they are until the spool is empty or one fails (a failure is
        retried after the restart). ``stop`` bounds the time this may take."""
        try:
            while not self._state.attempts:  # a failing batch is retried after the restart
                before = self._state.position
                if self._spans:
                    if self._file().head <= before:
                        return
                    await self._process_span(self._span_end())
                else:
                    batch = await self._read_batch()
                    if not batch:
                        return
                    await self._process(batch)
                if self._state.position == before:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("forwarder flush on stop failed", extra={"forwarder": self.id})

    async def _step(self) -> None:
        if self._spans:
            await self._step_span()
            return
        batch_cfg = self.config.batch
        self._wake.arm(self._state.position + 1)  # any commit past the cursor
        batch = await self._read_batch()
        if not batch:
            await self._wait_for_wake(IDLE_POLL_SECS)
            return
        if len(batch) < batch_cfg.max_events and self._state.attempts == 0:
            if self._backlog:
                self._backlog = False  # the last of the backlog: it goes out now
            else:
                deadline = batch[0].received_ms / 1000 + batch_cfg.max_wait_secs
                if await self._wait_until_full(deadline):
                    batch = await self._read_batch()
        await self._process(batch)

    async def _read_batch(self) -> list[SpooledEvent]:
        """The events of the next batch: up to ``max_events`` after the cursor; for a batch
        that has failed, no event committed after its first try."""
        batch = await self.spool.read(
            self._state.position, self.config.batch.max_events, forwarder=self.id
        )
        end = self._state.batch_last
        if self._state.attempts and end is not None and batch and batch[-1].seq > end:
            batch = [item for item in batch if item.seq <= end]
        return batch

    def _span_end(self) -> int:
        """``_read_batch`` for spans: the last sequence number of the next batch."""
        last = min(self._file().head, self._state.position + self.config.batch.max_events)
        end = self._state.batch_last
        if self._state.attempts and end is not None:
            last = min(last, max(end, self._state.position + 1))
        return last

    async def _step_span(self) -> None:
        """``_step`` for a forwarder that reads the spool itself: the batch is decided from
        the in-memory head, and only its first arrival time is read here."""
        batch_cfg = self.config.batch
        position = self._state.position
        self._wake.arm(position + 1)  # any commit past the cursor
        if self._file().head <= position:
            await self._wait_for_wake(IDLE_POLL_SECS)
            return
        full_at = position + batch_cfg.max_events
        if self._file().head < full_at and self._state.attempts == 0:
            if self._backlog:
                self._backlog = False  # the last of the backlog: it goes out now
            else:
                first_ms = await self._file().first_received_ms(position)
                oldest = self._clock() if first_ms is None else first_ms / 1000
                await self._wait_until_full(oldest + batch_cfg.max_wait_secs)
        await self._process_span(self._span_end())

    async def _wait_until_full(self, deadline: float) -> bool:
        """A partial batch: wait until enough events are committed for a full one, or until
        ``deadline`` (when the oldest has waited ``max_wait_secs``), watching the in-memory
        head (not re-reading the spool). Woken once the batch is full, not at every commit
        (see HeadWatch). Returns whether it waited at all."""
        full_at = self._state.position + self.config.batch.max_events
        waited = False
        while True:
            self._wake.arm(full_at)  # before the checks, so no commit goes unnoticed
            remaining = deadline - self._clock()
            head = self.spool.head_of(self.id)
            if self._stopping.is_set() or head >= full_at or remaining <= 0:
                return waited
            await self._wait_for_wake(remaining)
            waited = True

    async def _process(self, batch: list[SpooledEvent]) -> None:
        last = batch[-1].seq
        if any(item.payload == ERASED for item in batch):
            # Erased events (``spool.erasure``): nobody's any more; the cursor moves past.
            batch = [item for item in batch if item.payload != ERASED]
            if not batch:
                await self.spool.advance(self.id, last)
                self._moved(last)
                return
        if self._filters or self._required_consent:
            kept: list[SpooledEvent] = []
            events: list[Event] = []
            denied = 0
            for item in batch:
                event = orjson.loads(item.payload)
                if not accepts(self.config, event):
                    continue
                if self._required_consent and not consented(self._required_consent, event):
                    denied += 1
                    continue
                kept.append(item)
                events.append(event)
            filtered = len(batch) - len(kept) - denied
            first_try = not self._state.attempts  # a retry does not count them again
            if self._capture.rate and first_try and len(kept) < len(batch):
                self._report_left_out(batch, kept)
            if filtered and first_try:
                self.metrics.forwarder_events.labels(self.id, "filtered").inc(filtered)
            if denied and first_try:
                self.metrics.forwarder_events.labels(self.id, "dropped").inc(denied)
                self.metrics.forwarder_dropped.labels(self.id, "consent_denied").inc(denied)
            if not events:
                await self.spool.advance(self.id, last)
                self._moved(last)
                return
            if self.gate is not None:
                await self.gate(last)
            delivery = self.forwarder.deliver(events)
        else:
            # No filter: the forwarder gets the stored JSON and decodes only if it must.
            kept = batch
            if self.gate is not None:
                await self.gate(last)
            delivery = self.forwarder.deliver_payloads([item.payload for item in batch])

        self.metrics.batch_size.labels(self.id).observe(len(kept))
        try:
            outcome: Outcome = await delivery
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = self._raised(exc)
        await self._settle(kept, outcome, last)

    async def _process_span(self, last: int) -> None:
        """Deliver the events after the cursor up to ``last`` as a span of the spool. The
        events are read here only when the outcome needs them one by one (dead letters,
        refusals, drops), which a forwarder that reads the spool itself rarely returns."""
        after = self._state.position
        count = last - after
        self.metrics.batch_size.labels(self.id).observe(count)
        if self.gate is not None:
            await self.gate(last)
        try:
            delivery = await self.forwarder.deliver_span(SpoolSpan(self._file().path, after, last))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delivery = SpanDelivery(self._raised(exc))
        outcome = delivery.outcome
        if self._capture.rate:
            await self._capture_span(after, count, delivery)
        if not self._state.attempts:  # a retry does not count them again
            if delivery.filtered:
                self.metrics.forwarder_events.labels(self.id, "filtered").inc(delivery.filtered)
            if delivery.denied:
                self.metrics.forwarder_events.labels(self.id, "dropped").inc(delivery.denied)
                self.metrics.forwarder_dropped.labels(self.id, "consent_denied").inc(
                    delivery.denied
                )
        given = count if delivery.kept is None else len(delivery.kept)
        if isinstance(outcome, Delivered) and not outcome.rejected:
            await self.spool.advance(self.id, last)
            self._moved(last, resumed=True)
            self._count_dropped(outcome)
            delivered = given - sum(outcome.dropped.values())
            if delivered > 0:
                self._count_delivered(delivered, _first(delivery.arrivals, delivered))
            return
        items = await self._file().read(after, count)
        if delivery.kept is not None:
            items = [items[i] for i in delivery.kept if 0 <= i < len(items)]
        if not items and isinstance(outcome, Retry | Dead):
            # Nothing of the span was for the destination: nothing to retry or keep.
            await self.spool.advance(self.id, last)
            self._moved(last)
            return
        await self._settle(items, outcome, last)

    # -- the debug view ------------------------------------------------------------------

    def _report(self, items: Sequence[SpooledEvent], result: dict[str, Any]) -> None:
        """Tell the debug view what became of ``items`` (those it samples)."""
        rate = self._capture.rate
        if not rate or not items:
            return
        ids = [mid for mid in map(_message_id, (i.payload for i in items)) if sampled(mid, rate)]
        self._report_ids(ids, result)

    def _report_ids(self, ids: Sequence[object], result: dict[str, Any]) -> None:
        if ids:
            self._capture.outcome(
                {
                    "at_ms": int(self._clock() * 1000),
                    "forwarder": self.id,
                    "message_ids": list(ids),
                    **result,
                }
            )

    def _report_left_out(self, batch: Sequence[SpooledEvent], kept: Sequence[SpooledEvent]) -> None:
        """The events of ``batch`` not in ``kept``: left out by the filter, or for want of
        the consent the forwarder requires."""
        given = {item.seq for item in kept}
        filtered: list[SpooledEvent] = []
        denied: list[SpooledEvent] = []
        for item in batch:
            if item.seq in given:
                continue
            try:
                event = orjson.loads(item.payload)
            except orjson.JSONDecodeError:
                continue
            (denied if accepts(self.config, event) else filtered).append(item)
        self._report(filtered, {"status": "left_out", "reason": "filtered"})
        self._report(denied, {"status": "left_out", "reason": "consent_denied"})

    async def _capture_span(self, after: int, count: int, delivery: SpanDelivery) -> None:
        """A span's events for the debug view, only while it captures: those left out (on
        the first try), and those sent when the span went through as a whole (any other
        outcome is reported as it is settled). From the forwarder's sample when it gives
        one (``SpanDelivery.captured``), else read from the spool."""
        outcome = delivery.outcome
        clean = isinstance(outcome, Delivered) and not outcome.rejected
        left_out = delivery.kept is not None and not self._state.attempts
        if not (clean or left_out):
            return
        if delivery.captured is not None:
            for reason in ("filtered", "consent_denied"):
                if left_out:
                    ids = [mid for _, mid, why in delivery.captured if why == reason]
                    self._report_ids(ids, {"status": "left_out", "reason": reason})
            if clean and isinstance(outcome, Delivered):
                ids = [mid for _, mid, why in delivery.captured if why is None]
                self._report_ids(ids, {"status": "sent", "dropped": dict(outcome.dropped)})
            return
        items = await self._file().read(after, count)
        kept = (
            items
            if delivery.kept is None
            else [items[i] for i in delivery.kept if 0 <= i < len(items)]
        )
        if left_out:
            self._report_left_out(items, kept)
        if clean and isinstance(outcome, Delivered):
            self._report(kept, {"status": "sent", "dropped": dict(outcome.dropped)})

    def _raised(self, exc: Exception) -> Retry:
        log.exception("forwarder raised", extra={"forwarder": self.id})
        return Retry(reason="internal_error", detail=f"{type(exc).__name__}: {exc}")

    async def _settle(self, kept: list[SpooledEvent], outcome: Outcome, last: int) -> None:
        """Act on the outcome of delivering ``kept``, the batch's events up to ``last``."""
        if isinstance(outcome, Delivered):
            await self._delivered(kept, outcome, last)
        elif isinstance(outcome, Dead):
            await self._dead(kept, outcome.reason, outcome.detail, self._state.attempts + 1, last)
        else:
            await self._retry(kept, outcome, last)

    async def _delivered(self, kept: list[SpooledEvent], outcome: Delivered, last: int) -> None:
        # Events the destination refused one by one: dead letters with its words as detail
        # (free text, so the metric's reason is the fixed "rejected_by_destination").
        refused = {i: text for i, text in outcome.rejected.items() if 0 <= i < len(kept)}
        for index, text in sorted(refused.items()):
            await self.spool.dead_letter(
                self.id, [kept[index]], "rejected_by_destination", text, self._state.attempts + 1
            )
            self.last_error = LastError(self._clock(), "rejected_by_destination", text)
            self._report(
                [kept[index]],
                {
                    "status": "dead_letter",
                    "reason": "rejected_by_destination",
                    "detail": text,
                    "attempt": self._state.attempts + 1,
                },
            )
        await self.spool.advance(self.id, last)
        self._moved(last, resumed=True)
        if refused:
            self.metrics.dead_letters.labels(self.id, "rejected_by_destination").inc(len(refused))
            self.metrics.forwarder_events.labels(self.id, "dead_letter").inc(len(refused))
        delivered = [item for i, item in enumerate(kept) if i not in refused]
        if self._capture.rate:
            self._report(delivered, {"status": "sent", "dropped": dict(outcome.dropped)})
        dropped = self._count_dropped(outcome)
        if len(delivered) > dropped:
            self._count_delivered(
                len(delivered) - dropped, ((1, item.received_ms) for item in delivered)
            )

    def _count_dropped(self, outcome: Delivered) -> int:
        """Count the events the forwarder chose not to send; returns how many."""
        dropped = sum(outcome.dropped.values())
        if dropped:
            self.metrics.forwarder_events.labels(self.id, "dropped").inc(dropped)
            for reason, n in outcome.dropped.items():
                self.metrics.forwarder_dropped.labels(self.id, reason).inc(n)
        return dropped

    def _count_delivered(self, count: int, arrivals: Iterable[tuple[int, int]]) -> None:
        """Count ``count`` events as delivered and time every event of ``arrivals``, runs
        of ``(events, received_ms)``, from its arrival to now."""
        self.metrics.forwarder_events.labels(self.id, "delivered").inc(count)
        now = self._clock()
        self.metrics.forwarder_last_success.labels(self.id).set(now)
        hist = self.metrics.delivery_latency.labels(self.id)
        for n, received_ms in arrivals:
            latency = max(0.0, now - received_ms / 1000)
            for _ in range(n):
                hist.observe(latency)

    def _moved(self, position: int, *, resumed: bool = False) -> None:
        """The cursor is past a batch (now at ``position``): the next batch starts with no
        attempts. If this one had failed, the backlog behind it goes out at once (``_step``);
        ``resumed``: the destination took it."""
        if self.on_moved is not None:
            self.on_moved(position)
        state = self._state
        if state.attempts:
            self._backlog = True
            if resumed:
                failing_ms = int(self._clock() * 1000) - (state.first_failure_ms or 0)
                log.info(
                    "destination answers again; sending the backlog",
                    extra={
                        "forwarder": self.id,
                        "failed_attempts": state.attempts,
                        "failing_secs": round(max(0, failing_ms) / 1000, 1),
                        "backlog": self.spool.depth(self.id),
                    },
                )
        self._state = CursorState(position)

    async def _dead(
        self,
        items: list[SpooledEvent],
        reason: str,
        detail: str,
        attempts: int,
        advance_to: int | CursorState,
    ) -> None:
        """Store ``items`` as dead letters and move the cursor to ``advance_to``: a position
        past the batch, or the state of what remains of it (``spool.dead_letter``)."""
        await self.spool.dead_letter(self.id, items, reason, detail, attempts, advance_to)
        if isinstance(advance_to, CursorState):
            self._state = advance_to
        else:
            self._moved(advance_to)
        self.last_error = LastError(self._clock(), reason, detail)
        if self._capture.rate:
            self._report(
                items,
                {"status": "dead_letter", "reason": reason, "detail": detail, "attempt": attempts},
            )
        self.metrics.dead_letters.labels(self.id, reason).inc(len(items))
        self.metrics.forwarder_events.labels(self.id, "dead_letter").inc(len(items))
        self._throttle.log(
            logging.ERROR,
            (self.id, "dead_letter", reason),
            "events dead-lettered",
            {
                **self._failure_fields(detail),
                "events": len(items),
                "reason": reason,
                "attempt": attempts,
            },
        )

    def _failure_fields(self, detail: str) -> dict[str, object]:
        """What a failed delivery's log line says of it: the forwarder, the host it sends
        to, the status the destination answered (None: no answer) and the detail (its
        answer's body, secrets scrubbed by the forwarder) cut for a log line."""
        return {
            "forwarder": self.id,
            "endpoint": self._endpoint,
            "status": detail_status(detail),
            "detail": log_detail(detail),
        }

    def _expired(self, kept: list[SpooledEvent], now: float) -> int:
        """How many events at the head of ``kept`` are older than the max age. Only a head:
        the cursor cannot skip an event (arrival times follow sequence numbers, up to
        clock steps, after which an older event waits for the younger before it)."""
        cutoff_ms = (now - self.max_age_secs) * 1000
        count = 0
        for item in kept:
            if item.received_ms > cutoff_ms:
                break
            count += 1
        return count

    async def _expire(
        self,
        items: list[SpooledEvent],
        outcome: Retry,
        attempts: int,
        failing_secs: float,
        advance_to: int | CursorState,
    ) -> None:
        """Retries ran out for ``items`` (the head of the batch, older than the max age):
        dead letters for the events the destination does not have yet; those it already
        took (``outcome.delivered``) count as delivered."""
        done = sum(1 for i in range(len(items)) if i in outcome.delivered)
        if done:
            self.metrics.forwarder_events.labels(self.id, "delivered").inc(done)
            if self._capture.rate:
                taken = [item for i, item in enumerate(items) if i in outcome.delivered]
                self._report(taken, {"status": "sent", "dropped": {}})
        rest = [item for i, item in enumerate(items) if i not in outcome.delivered]
        if rest:
            detail = (
                f"older than {self._max_age_text} after {attempts} attempts in "
                f"{failing_secs:.0f}s; last: {outcome.reason}: {outcome.detail}"
            )
            await self._dead(rest, "max_age", detail, attempts, advance_to)
        elif isinstance(advance_to, CursorState):
            await self.spool.record_failure(self.id, advance_to)
            self._state = advance_to
        else:
            await self.spool.advance(self.id, advance_to)
            self._moved(advance_to)

    async def _retry(self, kept: list[SpooledEvent], outcome: Retry, last: int) -> None:
        """A transient failure of the batch ``kept`` (its events up to ``last``): retry it,
        unless it has used its attempts and events at its head are older than the max age:
        those become dead letters, and the rest of the batch is retried."""
        retry_cfg = self.config.retry
        now = self._clock()
        attempts = self._state.attempts + 1
        first_ms = self._state.first_failure_ms or int(now * 1000)
        failing_secs = max(0.0, now - first_ms / 1000)
        position = self._state.position
        exhausted = attempts >= retry_cfg.max_attempts
        if exhausted:
            expired = self._expired(kept, now)
            if expired == len(kept):
                await self._expire(kept, outcome, attempts, failing_secs, last)
                return
            if expired:
                position = kept[expired].seq - 1
                remains = CursorState(position, attempts, first_ms, last)
                await self._expire(kept[:expired], outcome, attempts, failing_secs, remains)
                kept = kept[expired:]
        self.metrics.forwarder_retries.labels(self.id, outcome.reason).inc()
        self._state = CursorState(position, attempts, first_ms, last)
        await self.spool.record_failure(self.id, self._state)
        delay = retry_delay_secs(attempts, outcome, retry_cfg, self._rand)
        if exhausted:
            # The next failure dead-letters the head of the batch if it is too old by then:
            # not later than that (never past the destination's window).
            delay = min(delay, max(0.0, kept[0].received_ms / 1000 + self.max_age_secs - now))
        self.last_error = LastError(now, outcome.reason, outcome.detail)
        if self._capture.rate:
            self._report(
                kept,
                {
                    "status": "retrying",
                    "reason": outcome.reason,
                    "detail": outcome.detail,
                    "attempt": attempts,
                    "next_try_ms": int((now + delay) * 1000),
                },
            )
        self._throttle.log(
            logging.WARNING,
            (self.id, outcome.reason),
            "delivery failed; will retry",
            {
                **self._failure_fields(outcome.detail),
                "reason": outcome.reason,
                "attempt": attempts,
                "failing_secs": round(failing_secs, 1),
                "retry_in_secs": round(delay, 3),
            },
        )
        await self._sleep(delay)

    async def _wait_for_wake(self, secs: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), secs)

    async def _sleep(self, secs: float) -> None:
        """Sleep, but wake up at once when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), secs)
