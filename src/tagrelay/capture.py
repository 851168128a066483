"""What the live debug view sees: the relay's traffic, captured while somebody watches.

The debug view (``/debug`` on the admin listener, ``tagrelay.web.debug``) shows each request
that came in with its events, and for each event and forwarder what became of it, with the
exact request sent to the destination and the destination's answer. Three places report:

- **ingest** (``web.ingest.IngestService``): a request, accepted or refused, with its
  events in their normalized form (``DebugHub.record``, kind ``request``);
- **the forwarders** (``forwarders._batched``, ``forwarders.webhook``): each HTTP exchange
  with a destination, redacted with the forwarder's secrets where it happens
  (``forwarders._http.captured_exchange``), through ``ForwarderContext.capture``, a
  ``DeliveryCapture``. In the delivery process that is a stand-in that ships the record to
  the relay as a ``capture`` frame (``forwarders._process``);
- **the workers** (``forwarders._worker``): each batch's outcome per event (sent, dropped,
  left out by the filter or consent, retrying with the attempt and the next try,
  dead-lettered), through the same ``DeliveryCapture``.

Capture costs nothing when nobody looks: each of those places first reads ``rate`` (0 when
off) and does nothing more when it is 0. It is 1 while a view is connected, else
``debug.sample_rate``. Sampling goes by ``messageId`` (``sampled``): the same decision in
every process, so an event sampled at ingest has its deliveries sampled too.

Records go into two bounded rings (``RingBuffer``: requests, weighed by their events, and
delivery records), serialized once, with every secret of the configuration scrubbed out as
a last guard (the ``scrub`` the hub is given), and to each connected view
(``Subscription``). This module imports nothing of the relay, so that the forwarders, the
delivery process and the web layer can all use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "MAX_BUFFER_BYTES",
    "NO_CAPTURE",
    "Captured",
    "DebugHub",
    "DeliveryCapture",
    "RingBuffer",
    "Subscription",
    "sampled",
]

log = logging.getLogger(__name__)

MAX_BUFFER_BYTES = 16 * 1024 * 1024
"""The most each ring holds, serialized, whatever its count (``debug.buffer_events``)."""

SUBSCRIPTION_LIMIT = 2000
"""Records waiting for one view before the oldest are skipped (a view that cannot keep
up is told how many it missed)."""

_SAMPLE_SPACE = 2**32


def sampled(message_id: object, rate: float) -> bool:
    """Whether the event with ``message_id`` is captured at ``rate`` (0..1). Decided by a
    hash of the id, so that ingest, the workers and the delivery process agree."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return zlib.crc32(str(message_id).encode()) < rate * _SAMPLE_SPACE


class DeliveryCapture:
    """Where forwarders and their workers report to the debug view. This base is the null
    object: ``rate`` 0, records ignored. A reporter checks ``rate`` before building a
    record, and keeps only the events ``sampled`` at it."""

    _rate: float = 0.0

    @property
    def rate(self) -> float:
        """0: capture is off; else the fraction of events captured."""
        return self._rate

    def exchange(self, record: dict[str, Any]) -> None:
        """An HTTP exchange with a destination (``forwarders._http.captured_exchange``),
        already redacted."""

    def outcome(self, record: dict[str, Any]) -> None:
        """What became of events of a batch, for one forwarder (``forwarders._worker``)."""


NO_CAPTURE = DeliveryCapture()


@dataclass(frozen=True, slots=True)
class Captured:
    """One record as it is kept and streamed: its sequence number, its kind (``request``,
    ``exchange``, ``outcome``) and its JSON."""

    seq: int
    kind: str
    data: bytes
    weight: int = 1
    """What it counts against the ring's capacity (a request: its events)."""


class RingBuffer:
    """The last records: at most ``capacity`` by weight and ``max_bytes`` of JSON; the
    oldest go first. The newest record is always kept, even alone over the bounds."""

    def __init__(self, capacity: int, max_bytes: int = MAX_BUFFER_BYTES) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: deque[Captured] = deque()
        self.weight = 0
        self.size = 0
        self.evicted = 0

    def append(self, item: Captured) -> None:
        self._items.append(item)
        self.weight += item.weight
        self.size += len(item.data)
        self._evict()

    def resize(self, capacity: int) -> None:
        """Hold at most ``capacity`` from now on (the oldest go when it shrinks)."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._evict()

    def _evict(self) -> None:
        while len(self._items) > 1 and (self.weight > self.capacity or self.size > self.max_bytes):
            old = self._items.popleft()
            self.weight -= old.weight
            self.size -= len(old.data)
            self.evicted += 1

    def __iter__(self) -> Iterator[Captured]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.weight = self.size = 0


class Subscription:
    """One connected view's queue of records (``DebugHub.attach``)."""

    def __init__(self, limit: int = SUBSCRIPTION_LIMIT) -> None:
        self.limit = limit
        self._items: deque[Captured] = deque()
        self._ready = asyncio.Event()
        self.missed = 0
        """Records skipped because the view fell more than ``limit`` behind."""
        self.closed = False

    def push(self, item: Captured) -> None:
        if len(self._items) >= self.limit:
            self._items.popleft()
            self.missed += 1
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self, wait_secs: float) -> list[Captured]:
        """The records that arrived since the last call, waiting up to ``wait_secs`` for
        one (``[]`` when none came, or once closed)."""
        if not self._items and not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait_secs)
        self._ready.clear()
        items = list(self._items)
        self._items.clear()
        return items


RateListener = Callable[[float], Awaitable[None]]


class _HubDelivery(DeliveryCapture):
    """The hub as the forwarders of the relay's own process see it (any thread)."""

    def __init__(self, hub: DebugHub) -> None:
        self._hub = hub

    @property
    def rate(self) -> float:
        return self._hub.rate

    def exchange(self, record: dict[str, Any]) -> None:
        self._hub.post("exchange", record)

    def outcome(self, record: dict[str, Any]) -> None:
        self._hub.post("outcome", record)


class DebugHub:
    """The relay's capture: the rings, the views connected, and the rate (see the module
    docstring). Lives on the relay's event loop (``bind``); ``post`` may be called from
    any thread (the delivery loop's, where the workers run)."""

    def __init__(
        self,
        *,
        sample_rate: float = 0.0,
        buffer_events: int = 500,
        scrub: Callable[[str], str] | None = None,
        max_bytes: int = MAX_BUFFER_BYTES,
    ) -> None:
        self.sample_rate = sample_rate
        self.requests = RingBuffer(buffer_events, max_bytes)
        self.deliveries = RingBuffer(buffer_events, max_bytes)
        self._scrub = scrub
        self._viewers = 0
        self._subscriptions: set[Subscription] = set()
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self.rate_listeners: list[RateListener] = []
        """Called with the new rate whenever it changes (a view connects or the last one
        leaves): the delivery process is told this way."""
        self.delivery: DeliveryCapture = _HubDelivery(self)
        """What the forwarders running in the relay's own process report to."""
        self._random = random.random

    # -- the rate ----------------------------------------------------------------------

    @property
    def rate(self) -> float:
        """1 while a view is connected, else ``debug.sample_rate``; 0: capture is off."""
        return 1.0 if self._viewers else self.sample_rate

    @property
    def viewers(self) -> int:
        return self._viewers

    def sample_request(self, message_ids: Iterable[object]) -> list[int]:
        """The positions in ``message_ids`` of the events to capture at the current rate;
        for a request with no event (refused), ``[0]`` when it is captured, else ``[]``."""
        rate = self.rate
        ids = list(message_ids)
        if not ids:
            return [0] if rate >= 1.0 or self._random() < rate else []
        return [i for i, mid in enumerate(ids) if sampled(mid, rate)]

    # -- views -------------------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop records are kept on (the relay's); ``post`` hands records to it."""
        self._loop = loop
        self._thread = threading.get_ident()

    async def attach(self) -> Subscription:
        """A view connects: capture everything from now on. The caller sends ``backlog()``
        first, then what the subscription gives, and calls ``detach`` at the end."""
        subscription = Subscription()
        before = self.rate
        self._viewers += 1
        self._subscriptions.add(subscription)
        await self._rate_changed(before)
        return subscription

    async def detach(self, subscription: Subscription) -> None:
        if subscription not in self._subscriptions:
            return
        self._subscriptions.discard(subscription)
        subscription.close()
        before = self.rate
        self._viewers -= 1
        await self._rate_changed(before)

    async def _rate_changed(self, before: float) -> None:
        rate = self.rate
        if rate == before:
            return
        for listener in list(self.rate_listeners):
            try:
                await listener(rate)
            except Exception:
                log.warning("could not change the capture rate", exc_info=True)

    async def configure(
        self, *, sample_rate: float, buffer_events: int, scrub: Callable[[str], str] | None
    ) -> None:
        """New settings (a reload): the sample rate (the delivery process is told when the
        rate changes), the rings' capacity, the secrets to scrub (from the records kept
        from now on)."""
        before = self.rate
        self.sample_rate = sample_rate
        self.requests.resize(buffer_events)
        self.deliveries.resize(buffer_events)
        self._scrub = scrub
        await self._rate_changed(before)

    def close(self) -> None:
        """End every view (the relay stops)."""
        for subscription in list(self._subscriptions):
            subscription.close()

    def backlog(self) -> list[Captured]:
        """What the rings hold, oldest first."""
        return sorted([*self.requests, *self.deliveries], key=lambda c: c.seq)

    # -- records -----------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """``text`` without any secret of the configuration."""
        return self._scrub(text) if self._scrub is not None else text

    def post(self, kind: str, record: dict[str, Any]) -> None:
        """``record`` from any thread: kept on the hub's loop."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._thread:
            self.record(kind, record)
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the relay stops
            loop.call_soon_threadsafe(self.record, kind, record)

    def record(self, kind: str, record: dict[str, Any], weight: int = 1) -> Captured | None:
        """Keep ``record`` (on the hub's loop) and hand it to every view; None when it
        cannot be serialized (a bug, logged)."""
        seq = self._seq + 1
        try:
            data = orjson.dumps(
                {"kind": kind, "seq": seq, **record},
                default=str,
                option=orjson.OPT_NON_STR_KEYS,
            )
        except TypeError:
            log.warning("a debug view record could not be serialized", exc_info=True)
            return None
        self._seq = seq
        if self._scrub is not None:
            text = data.decode()
            scrubbed = self._scrub(text)
            if scrubbed != text:
                data = scrubbed.encode()
        item = Captured(seq, kind, data, max(1, weight))
        (self.requests if kind == "request" else self.deliveries).append(item)
        for subscription in self._subscriptions:
            subscription.push(item)
        return item
