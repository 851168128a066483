"""The shared shell of an HTTP forwarder that sends a batch as one or more requests.

A destination writes two things:

- a pure **plan** (``BatchedHttpForwarder.plan``): the batch's events -> the requests to
  send (``PlannedRequest``, each with the indices of the events it carries) and what was
  left out, counted by a bounded reason (``Plan.drops``); golden-tested without a network;
- a **classification** of each response (``BatchedHttpForwarder.classify``), by default
  the shared table of ``_http.classify_status``; a platform overrides it for its quirks:
  a 200 whose body carries an error code, per-event errors (``Delivered.rejected`` keyed
  by the event's position in *that request*), error codes that say "retry" or "give up",
  a whole request refused for some of its events (``Refused``, below).

The base owns the rest, the same for every destination:

- **Sending** the plan's requests concurrently, at most ``max_concurrent_requests`` at a
  time, each with ``timeout_secs`` (both read from the forwarder's config, which declares
  them with its platform's defaults).
- **No request twice.** A batch that is retried comes back with the same events (same
  ``messageId`` list); requests of it that the destination already accepted are not sent
  again, their remembered outcome stands. Most platforms have no deduplication across
  requests (GA4 none at all), so this is what keeps a retry from counting twice.
- **Credentials** (``authorize``, ``unauthorized``): each attempt passes the planned
  request through ``authorize``, which adds credentials (a bearer header fetched from a
  token endpoint and cached, say). When ``unauthorized(response)`` says the destination
  refused them (say, a 401), the base calls ``authorize(request, refresh=True)`` once (only
  for the first of the concurrent requests that saw the refusal; the others wait and reuse
  the refreshed credentials) and sends the request once more; a second refusal is
  classified like any other response. ``authorize`` returns ``Retry``/``Dead`` when it
  cannot get credentials (token endpoint down: ``Retry``; refresh token revoked: ``Dead``).
- **A request refused for some of its events** (LinkedIn's 422 naming the bad elements,
  Reddit's 400 ``invalid_events``: the destination took none of the request's events):
  ``classify`` returns ``Refused`` with the events it named (position -> the destination's
  words). They become dead letters, and the request is sent again at once without them,
  as ``without`` rebuilds it (the conversions layer does; the default cannot, and the
  whole request is then ``Dead`` with the refusal's reason and detail), until the
  destination takes it or nothing is left. Each round drops at least one event, so it
  ends; a ``Retry`` on the way retries the batch as any retry does (the first request is
  refused again and the same events are left out).
- **Secrets** (``secrets``): every value it returns is replaced by ``***`` in every
  ``Retry``/``Dead`` detail and rejection reason, also in its percent-encoded forms (a
  secret sent as a query value shows up encoded in a connection error's URL).
- **One outcome per batch**, from the requests' outcomes:

  ===========================================  ===========================================
  the requests                                 the batch
  ===========================================  ===========================================
  any ``Retry``                                ``Retry``: the first one's reason and detail,
                                               the longest ``Retry-After``, ``delivered`` =
                                               the events of accepted requests (not those
                                               they rejected one by one)
  all ``Dead``                                 ``Dead``: the first one's reason and detail
                                               (what the plan left out goes with the dead
                                               letters and is not counted as dropped)
  otherwise                                    ``Delivered``: ``rejected`` = the events of
                                               dead requests and those the destination
                                               refused one by one; ``dropped`` = the plan's
                                               drops that are whole events
  ===========================================  ===========================================

- **Settled**: once a batch is done, ``settled(plan, outcome)`` is called once (counts
  that must not repeat on retries: the conversions layer counts match keys there).
- **Drops**: once a batch is done (not on attempts that will be retried), every count of
  ``Plan.drops`` goes through ``dropped``: reasons in ``event_drop_reasons`` are whole
  events (the runtime counts them from ``Delivered.dropped``), those in
  ``field_drop_reasons`` parts of events that were sent
  (``tagrelay_forwarder_field_drops_total``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar, Protocol, TypeVar, cast

import orjson

from tagrelay.config.common import ForwarderConfigBase
from tagrelay.forwarders._base import Forwarder, ForwarderContext
from tagrelay.forwarders._http import (
    HttpRequest,
    HttpResponse,
    classify_status,
    scrub_secrets,
    send,
)
from tagrelay.logthrottle import LogThrottle
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry

__all__ = ["BatchedHttpForwarder", "Plan", "PlannedRequest", "Refused"]

log = logging.getLogger(__name__)

C = TypeVar("C", bound=ForwarderConfigBase)


@dataclass(frozen=True)
class PlannedRequest:
    request: HttpRequest
    indices: tuple[int, ...]
    """The events (by index in the batch) this request carries, in the order the request
    lists them (a per-event rejection names a position in this tuple)."""


@dataclass
class Plan:
    requests: list[PlannedRequest] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)
    """What the plan left out, by a bounded reason: whole events and parts of events."""


@dataclass(frozen=True)
class Refused:
    """What ``classify`` returns when the destination refused a whole request because of
    some of its events and took none of them (see the module docstring)."""

    reason: str
    """A bounded code: the request's outcome (``Dead(reason, detail)``) when it cannot be
    sent again without the refused events."""
    detail: str
    rejected: Mapping[int, str]
    """Position in the request -> the destination's words about that event (positions
    outside the request are ignored)."""


class _HttpLimits(Protocol):
    timeout_secs: float
    max_concurrent_requests: int


class BatchedHttpForwarder(Forwarder[C]):
    """Base of a forwarder that delivers a batch as the requests of a plan (see the module
    docstring). Subclasses implement ``plan`` and may override ``classify``, ``secrets``,
    ``authorize`` and ``unauthorized``. Their config declares ``timeout_secs`` and
    ``max_concurrent_requests``."""

    event_drop_reasons: ClassVar[frozenset[str]] = frozenset()
    """Reasons in ``Plan.drops`` for which a whole event is not sent."""
    field_drop_reasons: ClassVar[frozenset[str]] = frozenset()
    """Reasons in ``Plan.drops`` for which part of a sent event was cut or left out."""
    max_response_bytes: ClassVar[int] = 1024 * 1024
    """How much of an answer is read: enough for the per-event errors and statuses of a
    full request (a platform whose answer can list more sets a larger value). An answer cut
    at it is classified on its beginning, and logged."""

    def __init__(self, config: C, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self._cut_answers = LogThrottle(log)
        missing = [
            name
            for name in ("timeout_secs", "max_concurrent_requests")
            if not hasattr(config, name)
        ]
        if missing:
            raise TypeError(f"{type(config).__name__} must declare {', '.join(missing)}")
        self.drops: dict[str, int] = {}
        """Counts by reason of what this forwarder did not send."""
        self._batch_key = b""
        self._sent: dict[bytes, Delivered] = {}
        """Requests of the batch in flight that the destination already accepted (a retry
        skips them), with what it said about them."""
        self._auth_lock = asyncio.Lock()
        self._auth_generation = 0

    # -- what a destination writes -----------------------------------------------------

    @abstractmethod
    def plan(self, events: list[Event], now: datetime) -> Plan:
        """The requests for one batch and what was left out (pure: a function of the
        config, the events and ``now``)."""

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome | Refused:
        """The outcome of one request. ``Delivered.rejected`` names events refused one by
        one by their position in ``planned.indices`` (the base maps them to the batch);
        ``Delivered.dropped`` is not used; ``Refused``: the whole request was refused for
        the events it names. Details may carry secrets: the base scrubs them."""
        return classify_status(response)

    def without(
        self, plan: Plan, planned: PlannedRequest, positions: frozenset[int]
    ) -> PlannedRequest | None:
        """``planned`` rebuilt without its events at ``positions`` (refused, see
        ``Refused``), from ``plan``; never asked to leave none. None (the default): it
        cannot be, and the refused request is ``Dead``."""
        return None

    def secrets(self) -> Iterable[str]:
        """Values never to show in a detail (API secrets, tokens); asked on every scrub, so
        a token fetched later is covered."""
        return ()

    async def authorize(
        self, request: HttpRequest, *, refresh: bool = False
    ) -> HttpRequest | Retry | Dead:
        """The request as it is sent, with credentials added. ``refresh``: the destination
        refused the credentials last used; drop them (so a failed refresh leaves none
        cached) and get new ones. ``Retry``/``Dead`` when credentials cannot be had."""
        return request

    def unauthorized(self, response: HttpResponse) -> bool:
        """Whether ``response`` refuses the credentials, so that ``authorize`` refreshes them
        and the request is sent once more. Default: never (static credentials)."""
        return False

    def settled(self, plan: Plan, outcome: Delivered | Dead) -> None:
        """Called once when a batch is done (``Delivered`` or ``Dead``; never for an attempt
        that will be retried), with the plan of its last attempt and the batch's outcome:
        for counts that must not repeat on retries (which events went out with what).
        ``Delivered.rejected`` names the batch's events that were not taken. Default: none."""

    # -- what the base does ------------------------------------------------------------

    def dropped(self, reason: str, n: int = 1) -> None:
        """Count ``n`` events or fields not sent, by a bounded ``reason``."""
        self.drops[reason] = self.drops.get(reason, 0) + n
        if reason in self.field_drop_reasons:
            # Whole events are counted by the runtime from Delivered.dropped.
            self.context.metrics.forwarder_field_drops.labels(self.id, reason).inc(n)
        log.debug("forwarder dropped", extra={"forwarder": self.id, "reason": reason, "count": n})

    def scrub(self, text: str) -> str:
        """``text`` without any of ``secrets()``, raw or percent-encoded."""
        return scrub_secrets(text, self.secrets())

    async def deliver(self, events: list[Event]) -> Outcome:
        plan = self.plan(events, datetime.now(UTC))
        batch_key = hashlib.sha256(orjson.dumps([e.get("messageId") for e in events])).digest()
        if batch_key != self._batch_key:
            self._batch_key, self._sent = batch_key, {}
        limit = asyncio.Semaphore(cast(_HttpLimits, self.config).max_concurrent_requests)
        outcomes = await asyncio.gather(*(self._deliver_one(plan, p, limit) for p in plan.requests))
        return self._combine(plan, outcomes)

    async def _deliver_one(
        self, plan: Plan, planned: PlannedRequest, limit: asyncio.Semaphore
    ) -> Outcome:
        request = planned.request
        # Credentials are added per attempt, so they are not part of the key.
        key = hashlib.sha256(request.url.encode() + b"\0" + request.body).digest()
        accepted = self._sent.get(key)
        if accepted is not None:
            return accepted
        async with limit:
            outcome = await self._send_refusing(plan, planned)
        if isinstance(outcome, Delivered):
            self._sent[key] = outcome
        return outcome

    async def _send_refusing(self, plan: Plan, planned: PlannedRequest) -> Outcome:
        """Send ``planned``; while the destination refuses it for some of its events
        (``Refused``), send it again without them. Positions in the outcome are
        ``planned``'s."""
        position = {index: at for at, index in enumerate(planned.indices)}
        refused: dict[int, str] = {}  # batch index -> the destination's words, so far
        current = planned
        while True:
            outcome = await self._attempt(current)
            if not isinstance(outcome, Refused):
                break
            named = {
                current.indices[at]: text
                for at, text in outcome.rejected.items()
                if 0 <= at < len(current.indices)
            }
            if len(named) == len(current.indices):
                refused.update(named)
                return Delivered(rejected={position[i]: text for i, text in refused.items()})
            rebuilt = None
            if named:
                at_positions = frozenset(
                    at for at, index in enumerate(current.indices) if index in named
                )
                rebuilt = self.without(plan, current, at_positions)
            if rebuilt is None:
                return Dead(outcome.reason, outcome.detail)
            refused.update(named)
            current = rebuilt
        if not refused or not isinstance(outcome, Delivered):
            return outcome
        rejected = {position[i]: text for i, text in refused.items()}
        for at, text in outcome.rejected.items():
            if 0 <= at < len(current.indices):
                rejected[position[current.indices[at]]] = text
        return Delivered(rejected=rejected)

    async def _attempt(self, planned: PlannedRequest) -> Outcome | Refused:
        timeout = cast(_HttpLimits, self.config).timeout_secs
        authorized = await self.authorize(planned.request)
        if not isinstance(authorized, HttpRequest):
            return authorized
        # Taken once the credentials are in hand (no await between): a refusal of them
        # after a refresh by another request refreshes again.
        generation = self._auth_generation
        limit = self.max_response_bytes
        response = await send(self.context.http, authorized, timeout, limit)
        if isinstance(response, HttpResponse) and self.unauthorized(response):
            async with self._auth_lock:
                refresh = generation == self._auth_generation
                if refresh:
                    self._auth_generation += 1
                authorized = await self.authorize(planned.request, refresh=refresh)
            if not isinstance(authorized, HttpRequest):
                return authorized
            response = await send(self.context.http, authorized, timeout, limit)
        if isinstance(response, Retry):
            return response
        if response.truncated:
            self._cut_answers.log(
                logging.WARNING,
                (self.id, "answer_cut"),
                "the destination's answer is longer than the forwarder reads; per-event "
                "errors past the cut are not seen",
                {"forwarder": self.id, "status": response.status, "read_bytes": limit},
            )
        return self.classify(planned, response)

    def _combine(self, plan: Plan, outcomes: Sequence[Outcome]) -> Outcome:
        pairs = list(zip(plan.requests, outcomes, strict=True))
        retries = [o for o in outcomes if isinstance(o, Retry)]
        if retries:
            waits = [r.after_secs for r in retries if r.after_secs is not None]
            first = retries[0]
            accepted = frozenset(
                index
                for planned, outcome in pairs
                if isinstance(outcome, Delivered)
                for position, index in enumerate(planned.indices)
                if position not in outcome.rejected
            )
            return Retry(
                first.reason,
                self.scrub(first.detail),
                max(waits) if waits else None,
                delivered=accepted,
            )
        self._batch_key, self._sent = b"", {}
        dead = [(p, o) for p, o in pairs if isinstance(o, Dead)]
        if dead and len(dead) == len(plan.requests):
            # Nothing went through: the whole batch becomes dead letters with the
            # destination's reason (what the plan left out goes with it, not dropped).
            first_dead = dead[0][1]
            whole_dead = Dead(first_dead.reason, self.scrub(first_dead.detail))
            self.settled(plan, whole_dead)
            return whole_dead
        for reason, n in sorted(plan.drops.items()):
            self.dropped(reason, n)
        rejected = {
            index: self.scrub(f"{outcome.reason}: {outcome.detail}")
            for planned, outcome in dead
            for index in planned.indices
        }
        for planned, outcome in pairs:
            if isinstance(outcome, Delivered):
                for position, text in outcome.rejected.items():
                    if 0 <= position < len(planned.indices):
                        rejected[planned.indices[position]] = self.scrub(text)
        whole = {r: n for r, n in plan.drops.items() if r in self.event_drop_reasons}
        delivered = Delivered(rejected=rejected, dropped=whole)
        self.settled(plan, delivered)
        return delivered
