"""The path of an event through the pipeline, in order, in one place.

Every inbound protocol ends here: its source (``tagrelay.sources``) has decoded the
request into raw events, the HTTP shell (``tagrelay.web.ingest``) has authenticated the
sender, and :meth:`Pipeline.run` turns the raw events into spool rows, one step at a time::

    anonymousId from RudderStack's header        pipeline.client.fill_anonymous_id
    normalize (shape, ids, times, nesting)       pipeline.normalize.normalize_event
    batch context under the event's own
    client IP and user agent                     pipeline.client.apply_client
    campaign (utm_*)                             pipeline.campaign.apply_campaign
    consent (stated, defaults, GPC)              pipeline.consent.ConsentPolicy.apply
      analytics denied: anonymize                pipeline.consent.anonymize
      else identity cookies, click/client ids    pipeline.identity.IdentityService.apply
    IP truncation                                pipeline.privacy.apply_ip_truncation
    ids forgotten with --suppress: dropped       pipeline.suppression.Suppression
    source and sender                            context.source, context.writeKeyId
    serialize, size check                        one JSON row for the spool

Local and cheap only: no network, no storage. An event that cannot be accepted is
rejected on its own, with a bounded reason; the others go on.

The ingest path is measured in requests per second (``bench/ingest_bench.py``), and most
requests carry one event: whatever depends only on the request (the time, the client's
address, the headers, the identity cookies) is computed once per request, not per event,
and the per-event loop makes no call or allocation that is not a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson

from tagrelay.config.models import Config
from tagrelay.errors import IngestError
from tagrelay.model import iso
from tagrelay.pipeline.campaign import apply_campaign
from tagrelay.pipeline.client import (
    ClientResolver,
    anonymous_id_header,
    apply_client,
    fill_anonymous_id,
)
from tagrelay.pipeline.consent import DENIED, GRANTED, ConsentPolicy, anonymize
from tagrelay.pipeline.identity import IdentityService, Visit, VisitorState
from tagrelay.pipeline.normalize import BatchSentAt, normalize_event
from tagrelay.pipeline.privacy import apply_ip_truncation
from tagrelay.pipeline.suppression import Suppression
from tagrelay.sources import Decoded

__all__ = ["Pipeline", "Processed", "RequestFacts", "Sender"]


class Sender(Protocol):
    """Who sent the request, as far as the pipeline cares: a write key
    (``config.models.WriteKeyConfig``), or the credential of a protocol that has no write
    keys (GA4's measurement ids and api secrets, ``web.google``)."""

    @property
    def id(self) -> str:
        """Stored with each event as ``context.writeKeyId`` (never a secret)."""
        ...

    @property
    def kind(self) -> Literal["browser", "server"]:
        """``server``: a backend, trusted to set ``context.ip`` and ``context.userAgent``
        itself, and without a visitor (no identity cookies). ``browser``: a page."""
        ...


class RequestFacts(Protocol):
    """What the pipeline reads of the HTTP request (aiohttp's ``web.Request`` is one): the
    peer's address, the headers (``User-Agent``, ``X-Forwarded-For``, ``Sec-GPC``,
    ``Host``, ``AnonymousId``) and the cookies, read only when an event needs them."""

    @property
    def remote(self) -> str | None: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def cookies(self) -> Mapping[str, str]: ...


@dataclass(slots=True)
class Processed:
    """What the pipeline made of a request's events."""

    rows: list[tuple[int, bytes]]
    """``(received_ms, event JSON)`` for the spool, in request order."""
    message_ids: list[str]
    """The ``messageId`` of each row (the spool's dedup key)."""
    rejected: list[dict[str, Any]]
    """``{"index", "error", "message"}`` for each event rejected: those the source rejected
    while decoding (``Decoded.rejected``) first, then those the pipeline rejected (their
    index counts ``Decoded.events``). Every event of the request is a row or a rejection."""
    visit: Visit | None
    """The visitor's cookies to set and its anonymous id, when identity cookies applied."""
    suppressed: int = 0
    """Events dropped because their ids were forgotten with ``--suppress``: neither rows
    nor rejected (the request is answered as if they were stored: the drop is the
    relay's choice, not the sender's error)."""


class Pipeline:
    """The pipeline's steps, configured once; :meth:`run` takes a request's events through
    them."""

    def __init__(self, config: Config) -> None:
        self.resolver = ClientResolver(config.server.trusted_proxies)
        self.consent = ConsentPolicy(config.consent)
        self.identity = (
            IdentityService(
                config.identity, config.server.base_path, config.google.server_client_id
            )
            if config.identity.enabled
            else None
        )
        self.truncate_ip = config.privacy.truncate_ip
        self.max_nesting_depth = config.limits.max_nesting_depth
        self.max_event_bytes = config.limits.max_event_bytes
        self.suppression = Suppression.empty()
        """The ids forgotten with ``--suppress`` (set by ``web.ingest.IngestService``)."""

    def run(
        self, request: RequestFacts, decoded: Decoded, source: str, sender: Sender
    ) -> Processed:
        """Take the decoded events of ``request`` through every step, in order; an event
        that fails a step is rejected, the others go on. ``source`` is the protocol's label
        (``context.source``). ``decoded.events`` is emptied once they are serialized."""
        # -- once per request -------------------------------------------------------------
        now = datetime.now(UTC)
        received_ms = int(now.timestamp() * 1000)
        received_iso = iso(now)
        headers = request.headers
        trusted = sender.kind == "server"
        ip = self.resolver.client_ip(request.remote, headers)
        user_agent = headers.get("User-Agent")
        gpc = headers.get("Sec-GPC") == "1"
        header_anonymous_id = anonymous_id_header(headers.get("AnonymousId"))
        # A body with no more brackets than the limit cannot nest too deep: skip the walk.
        max_depth = None if decoded.depth_bound is not None else self.max_nesting_depth
        batch_sent_at = (
            BatchSentAt(decoded.batch_sent_at) if decoded.batch_sent_at is not None else None
        )
        default_type = decoded.default_type
        shared_fields = tuple(decoded.shared.items())
        consent_policy = self.consent
        anonymize_denied = consent_policy.anonymize_denied
        # Identity cookies: browser requests only (a backend's request has no visitor).
        # The cookies are read when the first event needs them.
        identity = self.identity if sender.kind == "browser" else None
        visitor: VisitorState | None = None
        visit: Visit | None = None
        own_script = source == "tagrelay"
        truncate_ip = self.truncate_ip
        max_event_bytes = self.max_event_bytes
        sender_id = sender.id
        rows: list[tuple[int, bytes]] = []
        message_ids: list[str] = []
        rejected: list[dict[str, Any]] = (
            [{"index": i, "error": e.code, "message": e.message} for i, e in decoded.rejected]
            if decoded.rejected
            else []
        )
        events = decoded.events
        suppression = self.suppression if self.suppression.hashes else None
        suppressed = 0

        # -- per event, step by step --------------------------------------------------------
        for index, raw in enumerate(events):
            try:
                if header_anonymous_id is not None:
                    fill_anonymous_id(raw, header_anonymous_id)
                event = normalize_event(
                    raw,
                    received_at=now,
                    received_iso=received_iso,
                    batch_sent_at=batch_sent_at,
                    default_type=default_type,
                    max_depth=max_depth,
                )
                for shared_key, shared in shared_fields:
                    event[shared_key] = {**shared, **event.get(shared_key, {})}
                apply_client(event, ip=ip, user_agent=user_agent, trusted_sender=trusted)
                apply_campaign(event)
                context = event["context"]
                consent = consent_policy.apply(event, gpc_header=gpc)
                if consent["analytics"] == DENIED:
                    if anonymize_denied:
                        anonymize(event)
                elif identity is not None and context.get("cookieless") is not True:
                    if visitor is None or visit is None:
                        visitor = identity.read(request.cookies)
                        visit = Visit(domain=identity.cookie_domain(headers.get("Host")))
                    identity.apply(
                        event,
                        visitor,
                        visit,
                        own_script=own_script,
                        ads=consent["ads"] == GRANTED,
                        now_ms=received_ms,
                        reset=decoded.reset,
                    )
                if suppression is not None and suppression.suppressed(event):
                    suppressed += 1
                    continue
                if truncate_ip:
                    apply_ip_truncation(event)
                context["source"] = source
                context["writeKeyId"] = sender_id
                payload = orjson.dumps(event)
                if len(payload) > max_event_bytes:
                    raise IngestError(
                        "event_too_large",
                        f"the event is {len(payload)} bytes; at most {max_event_bytes}",
                    )
                rows.append((received_ms, payload))
                message_ids.append(event["messageId"])
            except IngestError as exc:
                rejected.append({"index": index, "error": exc.code, "message": exc.message})

        # -- once per request -------------------------------------------------------------
        # The events are in ``rows`` now, serialized: free them at once. Freed only when
        # the request ends, after the commit it waits for (other requests run meanwhile),
        # a 100-event batch took ~15% more of the event loop's time, most likely because
        # their memory is no longer in the CPU's caches by then (bench/README.md).
        events.clear()
        if identity is not None and visitor is not None and visit is not None:
            identity.keep(visitor, visit)
        return Processed(rows, message_ids, rejected, visit, suppressed)
