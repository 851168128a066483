"""The forwarder runtime: one worker per configured forwarder, written once.

A worker owns a cursor on the spool. It reads the next batch after its cursor (up to
``batch.max_events``, waiting up to ``batch.max_wait_secs`` for a partial batch to fill),
applies the forwarder's filter, calls ``deliver`` and acts on the outcome:

- ``Delivered``: the cursor moves past the batch; events refused one by one become dead
  letters.
- ``Retry``: the same batch is tried again after a capped exponential backoff with full
  jitter (or the destination's ``Retry-After``). The attempt count and the time of the first
  failure are stored with the cursor, so a restart neither forgets nor resets them. After
  ``retry.max_attempts`` attempts or ``retry.max_age_secs``, the batch becomes dead letters.
- ``Dead``: the batch becomes dead letters at once, with the reason and detail.

A forwarder that reads the spool file itself (``reads_spool``, the warehouse) and has no
filter or consent rule gets its batches as spans, ``after < seq <= last``, chosen from the
in-memory head: the worker never reads those events, unless an outcome needs them one by
one (dead letters).

Ordering is kept per forwarder: a failing batch holds back the ones after it (they wait on
disk, not in memory), and never holds back ingestion or another forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence

import orjson

from tagrelay.config.common import ForwarderConfigBase, RetryConfig
from tagrelay.forwarders._base import Forwarder, SpanDelivery, SpoolSpan
from tagrelay.metrics import Metrics
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry
from tagrelay.spool.sqlite import CursorState, SpooledEvent, SqliteSpool

log = logging.getLogger(__name__)

IDLE_POLL_SECS = 5.0
"""Upper bound on waiting for the spool's wake-up signal (a safety net, not the mechanism)."""


def backoff_secs(
    attempt: int, retry: RetryConfig, rand: Callable[[], float] = random.random
) -> float:
    """Full jitter: uniform in [0, min(max_backoff, initial * 2**(attempt-1))]."""
    growth: float = retry.initial_backoff_secs * 2.0 ** max(0, attempt - 1)
    return min(retry.max_backoff_secs, growth) * rand()


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


class ForwarderWorker:
    def __init__(
        self,
        forwarder: Forwarder,  # type: ignore[type-arg]
        spool: SqliteSpool,
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
        self._wake = spool.subscribe()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._state = CursorState(0)
        f = self.config.filter
        self._filters = bool(
            f.include_types or f.exclude_types or f.include_events or f.exclude_events
        )
        self._required_consent = tuple(self.config.requires_consent)
        self._spans = forwarder.reads_spool and not self._filters and not self._required_consent
        """Batches go to the forwarder as spans of the spool (``deliver_span``): nothing
        here needs their events."""

    @property
    def id(self) -> str:
        return self.config.id

    async def start(self) -> None:
        self._state = await self.spool.register(self.id)
        await self.forwarder.start()
        self._task = asyncio.create_task(self._run(), name=f"forwarder-{self.id}")

    async def stop(self, timeout_secs: float) -> None:
        """Let the batch in flight finish (up to ``timeout_secs``), then stop."""
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
        await self._flush_on_stop()

    async def _flush_on_stop(self) -> None:
        """Deliver what was committed before the stop and not sent yet (the stop may come
        while the worker waits for a batch to fill, or before it saw the last commit):
        batches go out as they are until the spool is empty or one fails (a failure is
        retried after the restart). ``stop`` bounds the time this may take."""
        try:
            while True:
                before = self._state.position
                if self._spans:
                    if self.spool.head <= before:
                        return
                    await self._process_span(
                        min(self.spool.head, before + self.config.batch.max_events)
                    )
                else:
                    batch = await self.spool.read(before, self.config.batch.max_events)
                    if not batch:
                        return
                    await self._process(batch)
                if self._state.position == before or self._state.attempts:
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
        batch = await self.spool.read(self._state.position, batch_cfg.max_events)
        if not batch:
            await self._wait_for_wake(IDLE_POLL_SECS)
            return
        if len(batch) < batch_cfg.max_events and self._state.attempts == 0:
            deadline = batch[0].received_ms / 1000 + batch_cfg.max_wait_secs
            if await self._wait_until_full(deadline):
                batch = await self.spool.read(self._state.position, batch_cfg.max_events)
        await self._process(batch)

    async def _step_span(self) -> None:
        """``_step`` for a forwarder that reads the spool itself: the batch is decided from
        the in-memory head, and only its first arrival time is read here."""
        batch_cfg = self.config.batch
        position = self._state.position
        self._wake.arm(position + 1)  # any commit past the cursor
        if self.spool.head <= position:
            await self._wait_for_wake(IDLE_POLL_SECS)
            return
        full_at = position + batch_cfg.max_events
        if self.spool.head < full_at and self._state.attempts == 0:
            first_ms = await self.spool.first_received_ms(position)
            oldest = self._clock() if first_ms is None else first_ms / 1000
            await self._wait_until_full(oldest + batch_cfg.max_wait_secs)
        await self._process_span(min(self.spool.head, full_at))

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
            if self._stopping.is_set() or self.spool.head >= full_at or remaining <= 0:
                return waited
            await self._wait_for_wake(remaining)
            waited = True

    async def _process(self, batch: list[SpooledEvent]) -> None:
        last = batch[-1].seq
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
            if filtered:
                self.metrics.forwarder_events.labels(self.id, "filtered").inc(filtered)
            if denied:
                self.metrics.forwarder_events.labels(self.id, "dropped").inc(denied)
                self.metrics.forwarder_dropped.labels(self.id, "consent_denied").inc(denied)
            if not events:
                await self.spool.advance(self.id, last)
                self._state = CursorState(last)
                return
            delivery = self.forwarder.deliver(events)
        else:
            # No filter: the forwarder gets the stored JSON and decodes only if it must.
            kept = batch
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
        try:
            delivery = await self.forwarder.deliver_span(SpoolSpan(self.spool.path, after, last))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delivery = SpanDelivery(self._raised(exc))
        outcome = delivery.outcome
        if isinstance(outcome, Delivered) and not outcome.rejected and not outcome.dropped:
            await self.spool.advance(self.id, last)
            self._state = CursorState(last)
            self._count_delivered(count, delivery.arrivals)
            return
        await self._settle(await self.spool.read(after, count), outcome, last)

    def _raised(self, exc: Exception) -> Retry:
        log.exception("forwarder raised", extra={"forwarder": self.id})
        return Retry(reason="internal_error", detail=f"{type(exc).__name__}: {exc}")

    async def _settle(self, kept: list[SpooledEvent], outcome: Outcome, last: int) -> None:
        """Act on the outcome of delivering ``kept``, the batch's events up to ``last``."""
        if isinstance(outcome, Delivered):
            await self._delivered(kept, outcome, last)
        elif isinstance(outcome, Dead):
            await self._dead(kept, outcome.reason, outcome.detail, last)
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
        await self.spool.advance(self.id, last)
        self._state = CursorState(last)
        if refused:
            self.metrics.dead_letters.labels(self.id, "rejected_by_destination").inc(len(refused))
            self.metrics.forwarder_events.labels(self.id, "dead_letter").inc(len(refused))
        delivered = [item for i, item in enumerate(kept) if i not in refused]
        dropped = sum(outcome.dropped.values())
        if dropped:
            self.metrics.forwarder_events.labels(self.id, "dropped").inc(dropped)
            for reason, n in outcome.dropped.items():
                self.metrics.forwarder_dropped.labels(self.id, reason).inc(n)
        if len(delivered) > dropped:
            self._count_delivered(
                len(delivered) - dropped, ((1, item.received_ms) for item in delivered)
            )

    def _count_delivered(self, count: int, arrivals: Iterable[tuple[int, int]]) -> None:
        """Count ``count`` events as delivered and time every event of ``arrivals``, runs
        of ``(events, received_ms)``, from its arrival to now."""
        self.metrics.forwarder_events.labels(self.id, "delivered").inc(count)
        now = self._clock()
        hist = self.metrics.delivery_latency.labels(self.id)
        for n, received_ms in arrivals:
            latency = max(0.0, now - received_ms / 1000)
            for _ in range(n):
                hist.observe(latency)

    async def _dead(self, kept: list[SpooledEvent], reason: str, detail: str, last: int) -> None:
        attempts = self._state.attempts + 1
        await self.spool.dead_letter(self.id, kept, reason, detail, attempts, advance_to=last)
        self._state = CursorState(last)
        self.metrics.dead_letters.labels(self.id, reason).inc(len(kept))
        self.metrics.forwarder_events.labels(self.id, "dead_letter").inc(len(kept))
        log.error(
            "events dead-lettered",
            extra={
                "forwarder": self.id,
                "events": len(kept),
                "reason": reason,
                "attempts": attempts,
            },
        )

    async def _give_up(
        self, kept: list[SpooledEvent], outcome: Retry, reason: str, detail: str, last: int
    ) -> None:
        """Retries ran out: dead letters for the events the destination does not have yet;
        those it already took (``outcome.delivered``) count as delivered."""
        done = [item for i, item in enumerate(kept) if i in outcome.delivered]
        if done:
            self.metrics.forwarder_events.labels(self.id, "delivered").inc(len(done))
        rest = [item for i, item in enumerate(kept) if i not in outcome.delivered]
        if rest:
            await self._dead(rest, reason, detail, last)
        else:
            await self.spool.advance(self.id, last)
            self._state = CursorState(last)

    async def _retry(self, kept: list[SpooledEvent], outcome: Retry, last: int) -> None:
        retry_cfg = self.config.retry
        now_ms = int(self._clock() * 1000)
        attempts = self._state.attempts + 1
        first = self._state.first_failure_ms or now_ms
        age_secs = (now_ms - first) / 1000
        if attempts >= retry_cfg.max_attempts:
            await self._give_up(
                kept, outcome, "max_attempts", f"{attempts} attempts; last: {outcome.detail}", last
            )
            return
        if age_secs >= retry_cfg.max_age_secs:
            await self._give_up(
                kept,
                outcome,
                "max_age",
                f"failing for {age_secs:.0f}s; last: {outcome.detail}",
                last,
            )
            return
        self.metrics.forwarder_retries.labels(self.id, outcome.reason).inc()
        self._state = CursorState(self._state.position, attempts, first)
        await self.spool.record_failure(self.id, self._state)
        delay = backoff_secs(attempts, retry_cfg, self._rand)
        if outcome.after_secs is not None:
            delay = outcome.after_secs
        delay = min(delay, max(0.0, retry_cfg.max_age_secs - age_secs))
        log.warning(
            "delivery failed; will retry",
            extra={
                "forwarder": self.id,
                "reason": outcome.reason,
                "attempt": attempts,
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
