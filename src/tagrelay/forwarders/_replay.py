"""Replaying dead letters: each goes back to the forwarder it died in, and to no other.

``tagrelay dlq replay`` asks the running relay (the admin API, ``web.admin_dlq``), which
calls ``replay``: the dead letters chosen are read from the spool a page at a time, grouped
by forwarder and handed to that forwarder's ``deliver_payloads`` in batches of its
``batch.max_events``, on the delivery loop where the forwarders run (a forwarder of the
delivery process sends them from there, like its spans). Each batch's outcome decides:

- delivered: the dead letters are deleted;
- dropped (``Delivered.dropped``: the forwarder chose not to send them, e.g. too old for
  the destination now): deleted too, as in normal delivery, and counted apart;
- refused one by one (``Delivered.rejected``), ``Dead``, or ``Retry``: they stay dead
  letters, with the new reason and detail, one attempt more and now as the time they died.
  After a ``Retry`` (the destination is down or limiting), the rest of that forwarder's
  selection is not tried this time (``not_tried``): more attempts now would only fail too.

A replay is one attempt: no backoff, no waiting; run it again later. Dead letters the
forwarder's filter or consent rule leaves out now (``filtered``), and those of a forwarder
that is not running (``not_running``), are skipped and stay as they are. Every dead letter
replayed is counted in ``tagrelay_dead_letters_replayed_total{forwarder,outcome}``. One
replay runs at a time per relay, so that two operators replaying the same dead letters do
not send them twice.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from tagrelay.forwarders._loop import DeliveryLoop
from tagrelay.forwarders._worker import ForwarderWorker, accepts, consented
from tagrelay.metrics import Metrics
from tagrelay.model import Dead, Delivered, Outcome, Retry
from tagrelay.spool.backend import Spool
from tagrelay.spool.dead_letters import DeadLetterRow, Selection

log = logging.getLogger(__name__)

PAGE_ROWS = 1000
"""Dead letters read from the spool at a time."""

_locks: weakref.WeakKeyDictionary[Spool, asyncio.Lock] = weakref.WeakKeyDictionary()


@dataclass
class Failure:
    events: int = 0
    detail: str = ""
    """The last detail given for this reason (scrubbed by the forwarder)."""


@dataclass
class ReplayReport:
    """What a replay did with one forwarder's dead letters."""

    forwarder: str
    selected: int = 0
    delivered: int = 0
    dropped: int = 0
    failed: int = 0
    skipped: int = 0
    failures: dict[str, Failure] = field(default_factory=dict)
    """By reason: how many failed again, and the destination's last word."""
    skips: dict[str, int] = field(default_factory=dict)
    """By why: ``not_running``, ``filtered``, ``not_tried``."""
    stopped: bool = False
    """A batch answered ``Retry``: the rest is not tried."""

    def as_json(self) -> dict[str, Any]:
        return {
            "forwarder": self.forwarder,
            "selected": self.selected,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "failed": self.failed,
            "skipped": self.skipped,
            "failures": [
                {"reason": reason, "events": f.events, "detail": f.detail}
                for reason, f in self.failures.items()
            ],
            "skips": self.skips,
        }

    def skip(self, why: str, count: int) -> None:
        self.skipped += count
        self.skips[why] = self.skips.get(why, 0) + count


async def replay(
    spool: Spool,
    workers: Mapping[str, ForwarderWorker],
    delivery: DeliveryLoop,
    metrics: Metrics,
    selection: Selection,
) -> list[ReplayReport]:
    """Replay the dead letters of ``selection`` (see the module's docstring); a report per
    forwarder that had any."""
    lock = _locks.setdefault(spool, asyncio.Lock())
    async with lock:
        reports: dict[str, ReplayReport] = {}
        after_id = 0
        # By id, a page at a time, up to the last id now: rows that fail again keep their
        # id over SQLite, and come back under a new one over JetStream (its messages do
        # not change), which this bound keeps from being visited twice.
        upto = await spool.last_dead_letter_id()
        while True:
            page = await spool.dead_letters(selection=selection, after_id=after_id, limit=PAGE_ROWS)
            rows = [row for row in page if row.id <= upto]
            if not rows:
                break
            after_id = rows[-1].id
            by_forwarder: dict[str, list[DeadLetterRow]] = {}
            for row in rows:
                by_forwarder.setdefault(row.forwarder, []).append(row)
            for forwarder, group in by_forwarder.items():
                report = reports.get(forwarder)
                if report is None:
                    report = reports[forwarder] = ReplayReport(forwarder)
                report.selected += len(group)
                await _replay_group(spool, workers.get(forwarder), delivery, report, group)
            if len(page) < PAGE_ROWS or len(rows) < len(page):
                break
    for report in reports.values():
        _count(metrics, report)
        log.info(
            "dead letters replayed",
            extra={
                "forwarder": report.forwarder,
                "selected": report.selected,
                "delivered": report.delivered,
                "dropped": report.dropped,
                "failed": report.failed,
                "skipped": report.skipped,
            },
        )
    return list(reports.values())


def _count(metrics: Metrics, report: ReplayReport) -> None:
    for outcome in ("delivered", "dropped", "failed", "skipped"):
        n = getattr(report, outcome)
        if n:
            metrics.dead_letters_replayed.labels(report.forwarder, outcome).inc(n)


async def _replay_group(
    spool: Spool,
    worker: ForwarderWorker | None,
    delivery: DeliveryLoop,
    report: ReplayReport,
    rows: list[DeadLetterRow],
) -> None:
    if worker is None:
        report.skip("not_running", len(rows))
        return
    if report.stopped:
        report.skip("not_tried", len(rows))
        return
    config = worker.config
    required = tuple(config.requires_consent)
    kept: list[DeadLetterRow] = []
    for row in rows:
        try:
            event = orjson.loads(row.payload)
        except orjson.JSONDecodeError:
            event = None
        if (
            isinstance(event, dict)
            and accepts(config, event)
            and (not required or consented(required, event))
        ):
            kept.append(row)
    if len(kept) < len(rows):
        report.skip("filtered", len(rows) - len(kept))
    size = config.batch.max_events
    for start in range(0, len(kept), size):
        batch = kept[start : start + size]
        if report.stopped:
            report.skip("not_tried", len(kept) - start)
            return
        outcome = await _deliver(worker, delivery, batch)
        await _settle(spool, report, batch, outcome)


async def _deliver(
    worker: ForwarderWorker, delivery: DeliveryLoop, batch: Sequence[DeadLetterRow]
) -> Outcome:
    payloads = [row.payload for row in batch]
    try:
        return await delivery.call(worker.forwarder.deliver_payloads(payloads))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("forwarder raised on a replay", extra={"forwarder": worker.id})
        return Retry(reason="internal_error", detail=f"{type(exc).__name__}: {exc}")


async def _settle(
    spool: Spool, report: ReplayReport, batch: Sequence[DeadLetterRow], outcome: Outcome
) -> None:
    if isinstance(outcome, Delivered):
        refused = {i: text for i, text in outcome.rejected.items() if 0 <= i < len(batch)}
        for index, text in refused.items():
            await _failed(spool, report, [batch[index]], "rejected_by_destination", text)
        done = [row.id for i, row in enumerate(batch) if i not in refused]
        await spool.forget_dead_letters(done)
        dropped = min(sum(outcome.dropped.values()), len(done))
        report.dropped += dropped
        report.delivered += len(done) - dropped
        return
    if isinstance(outcome, Dead):
        await _failed(spool, report, batch, outcome.reason, outcome.detail)
        return
    taken = [row.id for i, row in enumerate(batch) if i in outcome.delivered]
    if taken:  # a batch sent as several requests, some of which went through
        await spool.forget_dead_letters(taken)
        report.delivered += len(taken)
    rest = [row for i, row in enumerate(batch) if i not in outcome.delivered]
    await _failed(spool, report, rest, outcome.reason, outcome.detail)
    report.stopped = True


async def _failed(
    spool: Spool,
    report: ReplayReport,
    rows: Sequence[DeadLetterRow],
    reason: str,
    detail: str,
) -> None:
    if not rows:
        return
    await spool.dead_letters_died_again([row.id for row in rows], reason, detail)
    report.failed += len(rows)
    failure = report.failures.setdefault(reason, Failure())
    failure.events += len(rows)
    failure.detail = detail
