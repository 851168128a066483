"""The forwarder contract.

A forwarder turns a batch of events into deliveries to one destination and says how it
went (``tagrelay.model.outcome``). Everything around that is shared and lives elsewhere:
reading from the spool, batching, filtering, retries with backoff, dead letters and metrics
(``tagrelay.forwarders._worker``); HTTP sending and response classification
(``tagrelay.forwarders._http``); a batch sent as the requests of a plan, with retries that
skip what was accepted, credentials and secret scrubbing (``tagrelay.forwarders._batched``);
Segment's e-commerce fields (``tagrelay.forwarders._ecommerce``).

A new destination is one module defining a config model (a ``ForwarderConfigBase``
subclass with a ``type`` literal) and a ``Forwarder`` subclass, one line in
``tagrelay.forwarders.FORWARDERS``, and one test file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson

from tagrelay.capture import NO_CAPTURE, DeliveryCapture
from tagrelay.config.common import ForwarderConfigBase
from tagrelay.metrics import Metrics
from tagrelay.model import Event, Outcome
from tagrelay.spool.encryption import PayloadCipher, cipher_for

if TYPE_CHECKING:
    from tagrelay.identity_store import StoreSettings

C = TypeVar("C", bound=ForwarderConfigBase)


@dataclass(frozen=True)
class ForwarderContext:
    """What the runtime lends a forwarder."""

    data_dir: Path
    http: aiohttp.ClientSession
    """The shared HTTP client session (connection pooling across forwarders)."""
    metrics: Metrics
    """For counts only the forwarder knows (the runtime counts deliveries and retries)."""
    capture: DeliveryCapture = field(default=NO_CAPTURE)
    """Where the requests sent and the batches' outcomes go while the debug view captures
    (``tagrelay.capture``); its ``rate`` is 0 otherwise, and nothing is to be built."""
    encryption_keys: tuple[str, ...] = field(default=(), repr=False)
    """``encryption.keys`` (base64), for a forwarder that reads the spool file itself
    (``reads_spool``) from a process of its own: it opens the sealed segments with them
    (``tagrelay.spool.encryption``). Handed on to such a process through its socket, never
    on a command line; empty when encryption is off."""

    def spool_cipher(self) -> PayloadCipher:
        """What opens the spool's segments (the null cipher without keys)."""
        return cipher_for(self.encryption_keys)

    identity: StoreSettings | None = None
    """How to open the identity store (``identity_store.enabled``), for the forwarders that
    read it (``enrich: true``); None when it is off."""


@dataclass(frozen=True, slots=True)
class SpoolSpan:
    """A batch given by where it lies in the spool: the events with ``after < seq <=
    last`` of the SQLite file at ``path`` (read them with ``tagrelay.spool.segments``)."""

    path: Path
    after: int
    last: int


@dataclass(frozen=True, slots=True)
class SpanDelivery:
    """What ``deliver_span`` did: the outcome, and ``arrivals``, ``(count, received_ms)``
    for the events of the span in order (``read_span`` gives them; only those in ``kept``
    when it is set), from which the runtime measures delivery latency."""

    outcome: Outcome
    arrivals: Sequence[tuple[int, int]] = ()
    kept: Sequence[int] | None = None
    """For a forwarder that applies the filter and consent rule itself (``filters_spans``):
    the indexes in the span of the events it delivered, when it left some out; the
    outcome's indexes refer to these. None: every event of the span."""
    filtered: int = 0
    """Events of the span left out by the forwarder's filter (``filters_spans``)."""
    denied: int = 0
    """Events of the span left out for want of consent (``filters_spans``)."""
    captured: Sequence[tuple[int, object, str | None]] | None = None
    """While the debug view captures, from a forwarder that decodes the span anyway (the
    delivery process's stand-in): the events of the span it samples, as ``(index in the
    span, messageId, why it was left out or None)``, so that the runtime need not read
    the span to report them. None: not given."""


class Forwarder(ABC, Generic[C]):
    """Base class of every forwarder. Subclasses set ``config_model`` and implement
    ``deliver``."""

    config_model: ClassVar[type[ForwarderConfigBase]]

    reads_spool: ClassVar[bool] = False
    """True when the forwarder implements ``deliver_span``: the runtime then hands it
    batches as spans of the spool, which it reads itself (from another process), whenever
    no filter or consent rule needs the events in the relay."""

    in_delivery_process: ClassVar[bool] = True
    """Whether the forwarder runs in the delivery process when ``delivery.process`` is on
    (``tagrelay.forwarders._process``). False for one with a process of its own (the
    warehouse)."""

    delivery_group: ClassVar[str] = "forwarders"
    """Which delivery process the forwarder runs in: the HTTP forwarders share one, except
    those whose time goes to many small requests rather than to Python (GA4, one request
    per visitor), which get one of their own, so that their requests do not wait behind the
    others' batches on one event loop."""

    filters_spans: ClassVar[bool] = False
    """True when the forwarder applies its filter and consent rule to the spans it reads
    (the delivery process's stand-in): it then gets spans whatever its rules, and says in
    ``SpanDelivery`` what it left out."""

    max_event_age_secs: ClassVar[float | None] = None
    """The age (since the relay received it) past which the destination no longer accepts
    an event, or None when it takes events of any age. Retries never keep an event longer
    (``RetryConfig.max_age_secs`` is cut to it)."""

    def __init__(self, config: C, context: ForwarderContext) -> None:
        self.config = config
        self.context = context

    @property
    def id(self) -> str:
        return self.config.id

    endpoint_fields: ClassVar[tuple[str, ...]] = ("endpoint", "base_url", "mp_url", "collect_url")
    """The config's URL options whose hosts ``endpoint_host`` names."""

    @property
    def endpoint_host(self) -> str | None:
        """The host (``host`` or ``host:port``) the forwarder sends to, from its configured
        URLs (``endpoint_fields``; several, comma-separated), for log lines: never a path,
        a query or credentials. None for a forwarder that sends nowhere over HTTP."""
        hosts: list[str] = []
        for name in self.endpoint_fields:
            value = getattr(self.config, name, None)
            if not isinstance(value, str):
                continue
            try:
                parts = urlsplit(value)
                host, port = parts.hostname, parts.port
            except ValueError:
                continue
            if host:
                hosts.append(f"[{host}]" if ":" in host else host)
                if port is not None:
                    hosts[-1] += f":{port}"
        return ", ".join(dict.fromkeys(hosts)) or None

    def secrets(self) -> Iterable[str]:
        """Values never to show in a detail, a log line or the debug view (API secrets,
        tokens); asked each time, so a token fetched later is covered."""
        return ()

    async def start(self) -> None:
        """Open resources (connections, files). Called once before the first ``deliver``."""

    async def close(self) -> None:
        """Release resources. Called once after the last ``deliver``."""

    async def deliver_payloads(self, payloads: list[bytes]) -> Outcome:
        """Deliver a batch given as the events' stored JSON (compact, one event each). The
        runtime calls this when the forwarder has no filter; the default decodes and calls
        ``deliver``. A forwarder that ships JSON on unchanged overrides it to skip the
        decode."""
        return await self.deliver([orjson.loads(p) for p in payloads])

    async def deliver_span(self, span: SpoolSpan) -> SpanDelivery:
        """Deliver the batch ``span`` (never empty), read from the spool file by the
        forwarder itself; only called when ``reads_spool`` is True. The outcome follows
        ``deliver``'s rules."""
        raise NotImplementedError(f"{type(self).__name__} does not read the spool itself")

    @abstractmethod
    async def deliver(self, events: list[Event]) -> Outcome:
        """Deliver one batch (never empty) and classify the result. Must not raise for a
        destination's failure: return ``Retry`` or ``Dead`` instead. An exception is treated
        as a retryable ``internal_error``."""
