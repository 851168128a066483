"""The forwarder contract.

A forwarder turns a batch of events into deliveries to one destination and says how it
went (``tagrelay.model.outcome``). Everything around that is shared and lives elsewhere:
reading from the spool, batching, filtering, retries with backoff, dead letters and metrics
(``tagrelay.forwarders._worker``); HTTP sending and response classification
(``tagrelay.forwarders._http``).

A new destination is one module defining a config model (a ``ForwarderConfigBase``
subclass with a ``type`` literal) and a ``Forwarder`` subclass, one line in
``tagrelay.forwarders.FORWARDERS``, and one test file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

import aiohttp
import orjson

from tagrelay.config.common import ForwarderConfigBase
from tagrelay.metrics import Metrics
from tagrelay.model import Event, Outcome

C = TypeVar("C", bound=ForwarderConfigBase)


@dataclass(frozen=True)
class ForwarderContext:
    """What the runtime lends a forwarder."""

    data_dir: Path
    http: aiohttp.ClientSession
    """The shared HTTP client session (connection pooling across forwarders)."""
    metrics: Metrics
    """For counts only the forwarder knows (the runtime counts deliveries and retries)."""


class Forwarder(ABC, Generic[C]):
    """Base class of every forwarder. Subclasses set ``config_model`` and implement
    ``deliver``."""

    config_model: ClassVar[type[ForwarderConfigBase]]

    def __init__(self, config: C, context: ForwarderContext) -> None:
        self.config = config
        self.context = context

    @property
    def id(self) -> str:
        return self.config.id

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

    @abstractmethod
    async def deliver(self, events: list[Event]) -> Outcome:
        """Deliver one batch (never empty) and classify the result. Must not raise for a
        destination's failure: return ``Retry`` or ``Dead`` instead. An exception is treated
        as a retryable ``internal_error``."""
