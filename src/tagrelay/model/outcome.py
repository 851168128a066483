"""What a forwarder says about one batch. Retry is a value, not an exception.

- ``Delivered``: the destination took the batch. ``rejected`` names events (by index in
  the batch) that the destination refused individually; they become dead letters.
  ``dropped`` counts, by a bounded reason, events the forwarder chose not to send (no
  consent, too old for the destination, a type it has no use for): they are done, not
  delivered, and counted in ``tagrelay_forwarder_dropped_total``.
- ``Retry``: a transient failure (408, 429, 5xx, timeout, connection error). ``after_secs``
  is the destination's Retry-After when it gave one; ``delivered`` names events of the batch
  the destination already has.
- ``Dead``: a permanent failure (other 4xx, a payload the destination will never take). The
  batch becomes dead letters with ``reason`` and ``detail`` (e.g. the response body).

``reason`` is a bounded code used as a metric label (``status_429``, ``status_5xx``,
``timeout``, ``connection_error``, ``status_4xx``, ...). ``detail`` is free text for humans and
the dead-letter table; it must never contain a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Delivered:
    rejected: Mapping[int, str] = field(default_factory=dict)
    """index in the batch -> reason, for events refused one by one."""
    dropped: Mapping[str, int] = field(default_factory=dict)
    """reason -> number of events of the batch the forwarder did not send."""


@dataclass(frozen=True, slots=True)
class Retry:
    reason: str
    detail: str = ""
    after_secs: float | None = None
    delivered: frozenset[int] = frozenset()
    """Indexes in the batch of events the destination has already taken (a batch sent as
    several requests, some of which went through): if the retries run out, these are
    counted as delivered, not dead-lettered."""


@dataclass(frozen=True, slots=True)
class Dead:
    reason: str
    detail: str = ""


Outcome = Delivered | Retry | Dead
