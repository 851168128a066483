"""The HTTP shell of ingest, shared by every event source::

    request -> content type check -> body (``web.bodies.read_body``: size, Content-Encoding)
    -> decode (the protocol's decoder in ``sources.SOURCES``) -> write key and origin (CORS)
    -> pipeline (``pipeline.run.Pipeline``: every step of an event, in order)
    -> spool commit -> answer

GA4's routes (``web.google``) check their own credentials and answer in Google's shapes,
and share the rest: ``SOURCES``, :meth:`IngestService.accept` (pipeline, spool, counting)
and :meth:`IngestService.refuse`.

Bad input gets a 4xx JSON body ``{"error": code, "message": text}`` and is counted by reason.
In a batch the valid events are stored and the invalid ones reported by index. The 2xx
goes out only after the spool commit; if the spool cannot commit, the answer is 503 with
``Retry-After`` and nothing of the request counts as accepted.

While the debug view captures (``tagrelay.capture``), each request (accepted or refused)
and its sampled events, normalized as stored, are recorded; otherwise that costs one check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from aiohttp import web

from tagrelay.capture import DebugHub
from tagrelay.config.models import Config, WriteKeyConfig
from tagrelay.errors import AuthError, IngestError, SpoolUnavailable
from tagrelay.metrics import Metrics
from tagrelay.pipeline.identity import Visit, VisitorState
from tagrelay.pipeline.normalize import count_brackets_up_to
from tagrelay.pipeline.run import Pipeline, Processed, Sender
from tagrelay.pipeline.suppression import Suppression
from tagrelay.sources import SOURCE_LABELS, SOURCES, Decoded
from tagrelay.sources.segment import SEGMENT, sdk_source
from tagrelay.spool.backend import Spool
from tagrelay.web.auth import NO_KEY, CorsPolicy, CorsRefusals, KeyRing, key_from_headers
from tagrelay.web.bodies import read_body

log = logging.getLogger(__name__)

ACCEPTED_CONTENT_TYPES = frozenset({"application/json", "text/plain", ""})
SPOOL_RETRY_AFTER_SECS = "5"


def json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return encoded_json_response(status, orjson.dumps(body), headers)


def encoded_json_response(
    status: int, body: bytes, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def error_response(exc: IngestError, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(exc.status, {"error": exc.code, "message": exc.message}, headers)


Answer = Callable[[int, list[dict[str, Any]], dict[str, str]], web.Response]
"""A protocol's answer, from the number of events stored (resends included), the rejected
ones (``Processed.rejected``: index, error, message) and the CORS headers."""


@dataclass(frozen=True)
class Route:
    """What a route means for the ingest handler."""

    source: str
    server_keys_only: bool = False
    host_keys: bool = False
    """A request that presents no key takes the browser key claiming its host
    (``keys[].hosts``), as Jitsu does for its browser ingest."""


SECRET_QUERY_NAMES = frozenset({"api_secret", "writekey", "write_key", "key", "token"})
"""Query parameters an ingest request may carry a credential in (the Measurement Protocol's
``api_secret``, RudderStack's beacon ``writeKey``): the debug view shows ``***``."""


def _shown_query(request: web.Request) -> str:
    if not request.query_string:
        return ""
    pairs = parse_qsl(request.query_string, keep_blank_values=True)
    return urlencode(
        [(n, "***" if n.lower() in SECRET_QUERY_NAMES else v) for n, v in pairs], safe="*"
    )


def _captured_event(payload: bytes) -> dict[str, Any]:
    """An accepted event as the debug view lists it: its ids, type, name and consent, and
    its normalized form (as stored)."""
    event = orjson.loads(payload)
    context = event.get("context")
    consent = context.get("consent") if isinstance(context, dict) else None
    return {
        "messageId": event.get("messageId"),
        "type": event.get("type"),
        "event": event.get("event") or event.get("name"),
        "anonymousId": event.get("anonymousId"),
        "userId": event.get("userId"),
        "consent": consent,
        "normalized": event,
    }


class IngestService:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        metrics: Metrics,
        capture: DebugHub | None = None,
        suppression: Suppression | None = None,
    ) -> None:
        self.cors_refusals = CorsRefusals(metrics)
        self.suppression = suppression
        """The ids forgotten with ``--suppress`` (``pipeline.suppression``): every pipeline
        made for this service drops their events."""
        self.spool = spool
        self.metrics = metrics
        self.capture = capture if capture is not None else DebugHub()
        """The debug view's capture (off unless a view is open or sampling is set)."""
        self.reconfigure(config, Pipeline(config))

    def reconfigure(self, config: Config, pipeline: Pipeline) -> None:
        """Take ``config``'s keys, origins and limits, and ``pipeline`` (made from it), for
        the requests from now on (a reload, ``tagrelay.reload``; a request already in a
        handler may finish with either)."""
        self.limits = config.limits
        self.keys = KeyRing.from_config(config.keys)
        self.cors = CorsPolicy(config.keys)
        self.pipeline = pipeline
        if self.suppression is not None:
            pipeline.suppression = self.suppression
        # The shell needs two of the pipeline's parts itself: HTTPS detection behind
        # trusted proxies (the cookies' Secure flag), and identity for ``GET /id``.
        self.resolver = pipeline.resolver
        self.identity = pipeline.identity

    # -- CORS --------------------------------------------------------------------------

    def cors_headers(self, request: web.Request, key: WriteKeyConfig | None) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if not origin:
            return {}
        host = request.headers.get("Host")
        allowed = (
            self.cors.origin_allowed_for(key, origin, host)
            if key is not None
            else self.cors.origin_allowed_anywhere(origin, host)
        )
        return CorsPolicy.response_headers(origin) if allowed else {}

    async def preflight(self, request: web.Request) -> web.Response:
        """A CORS preflight names no key: any origin a browser key allows is answered."""
        origin = request.headers.get("Origin")
        if not origin or not self.cors.origin_allowed_anywhere(origin, request.headers.get("Host")):
            self.cors_refusals.record(NO_KEY, origin, "origin_not_allowed")
            return json_response(
                403,
                {"error": "origin_not_allowed", "message": "this origin may not send events here"},
            )
        try:
            headers = CorsPolicy.preflight_headers(
                origin, request.headers.get("Access-Control-Request-Headers")
            )
        except IngestError as exc:
            self.cors_refusals.record(NO_KEY, origin, exc.code)
            return error_response(exc)
        return web.Response(status=204, headers=headers)

    async def identity_handler(self, request: web.Request) -> web.Response:
        """``GET <paths.identity>``: the visitor's server-set anonymous id, as
        ``{"anonymousId": "..."}``, with the cookie set or renewed. ``?new=1`` starts a new
        id (the script's ``reset()``). A cookie is a stored identifier: the caller asks only
        when the visitor's consent allows analytics storage."""
        origin = request.headers.get("Origin")
        headers = {"Cache-Control": "no-store"}
        if origin:
            if not self.cors.origin_allowed_anywhere(origin, request.headers.get("Host")):
                self.cors_refusals.record(NO_KEY, origin, "origin_not_allowed")
                return json_response(
                    403,
                    {"error": "origin_not_allowed", "message": "this origin may not ask here"},
                )
            headers.update(CorsPolicy.response_headers(origin))
        if self.identity is None:
            return json_response(
                404,
                {"error": "identity_disabled", "message": "identity cookies are turned off"},
                headers,
            )
        identity = self.identity
        visitor = (
            VisitorState() if request.query.get("new") == "1" else identity.read(request.cookies)
        )
        visit = Visit(domain=identity.cookie_domain(request.headers.get("Host")))
        event: dict[str, Any] = {"context": {}}
        identity.apply(event, visitor, visit, own_script=True, ads=False, now_ms=0)
        response = json_response(200, {"anonymousId": visit.anonymous_id}, headers)
        self._set_cookies(response, visit, request)
        return response

    # -- the handler -------------------------------------------------------------------

    async def handle(self, request: web.Request, route: Route, path_name: str) -> web.Response:
        """A request on a route of the write-key protocols (Segment, Jitsu, the relay's
        script): key, decode, key from the body if none came in the headers, accept."""
        source = route.source
        key: WriteKeyConfig | None = None
        try:
            key_text = key_from_headers(request.headers, request.query)
            if key_text is not None:
                key = self.keys.lookup(key_text)
                self.check_key(key, route, request)
            decoded = await self._decode(request, source, path_name)
            if source == SEGMENT:
                source = sdk_source(decoded)
            if key is None:
                key = self.find_key(decoded.write_key, route, request)
                self.check_key(key, route, request)
            return await self.accept(request, source, key, decoded, self.cors_headers(request, key))
        except IngestError as exc:
            # ``key`` is the key presented, when it is known: a refused request answers with
            # its CORS headers (none for a server key, or an origin the key does not allow).
            return self.refuse(
                source,
                exc,
                self.cors_headers(request, key),
                request=request,
                sender=key.id if key is not None else None,
            )

    def refuse(
        self,
        source: str,
        exc: IngestError,
        headers: dict[str, str],
        *,
        request: web.Request | None = None,
        sender: str | None = None,
    ) -> web.Response:
        """Answer a request refused as a whole, and count it once. ``request`` and
        ``sender`` (the key's id, when known) are for the debug view."""
        counters = self.metrics.source(source)
        counters.received.inc()
        counters.rejected(exc.code)
        log.debug("request rejected", extra={"source": source, "reason": exc.code})
        if self.capture.rate and request is not None and self.capture.sample_request(()):
            self.capture.record(
                "request",
                {
                    **self._captured_request(request, source, sender, exc.status),
                    "outcome": "refused",
                    "error": exc.code,
                    "message": exc.message,
                },
            )
        return error_response(exc, headers)

    @staticmethod
    def _captured_request(
        request: web.Request, source: str, sender: str | None, status: int
    ) -> dict[str, Any]:
        return {
            "at_ms": int(time.time() * 1000),
            "source": source,
            "key": sender,
            "method": request.method,
            "path": request.path,
            "query": _shown_query(request),
            "origin": request.headers.get("Origin"),
            "status": status,
        }

    def _capture_accepted(
        self,
        request: web.Request,
        source: str,
        sender: Sender,
        processed: Processed,
        stored: int,
        status: int,
    ) -> None:
        """Record an accepted request with its sampled events for the debug view."""
        rows, rejected = processed.rows, processed.rejected
        # A request whose every event was rejected has no messageId to sample by.
        positions = self.capture.sample_request(processed.message_ids)
        if not (positions if rows else self.capture.sample_request(())):
            return
        events = [_captured_event(rows[i][1]) for i in positions if i < len(rows)]
        outcome = "accepted" if not rejected else ("partial" if rows else "refused")
        first = rejected[0] if rejected and not rows else None
        self.capture.record(
            "request",
            {
                **self._captured_request(request, source, sender.id, status),
                "outcome": outcome,
                "error": first["error"] if first else None,
                "message": first["message"] if first else None,
                "events": events,
                "rejected": rejected,
                "duplicates": len(rows) - stored,
            },
            weight=len(events) + len(rejected),
        )

    def find_key(self, key_text: str | None, route: Route, request: web.Request) -> WriteKeyConfig:
        """The key presented; with none, on a route that takes host keys, the browser key
        that claims the request's host. Raises ``AuthError`` (401) when there is none."""
        if key_text is None and route.host_keys:
            key = self.keys.for_host(request.headers.get("Host"))
            if key is not None:
                return key
        return self.keys.lookup(key_text)

    def check_key(self, key: WriteKeyConfig, route: Route, request: web.Request) -> None:
        """Refuse ``key`` where ``route`` or the request's origin does not allow it."""
        if route.server_keys_only and key.kind != "server":
            raise AuthError("server_key_required", "this endpoint takes server keys only")
        origin = request.headers.get("Origin")
        if not origin:
            return
        if key.kind == "server":
            # Only browsers send Origin; a server key is a secret no page may hold.
            self.cors_refusals.record(key.id, origin, "server_key_from_browser")
            raise IngestError(
                "server_key_from_browser",
                "server keys are secrets for backends; a browser (this request carries "
                "Origin) must send a browser key",
                status=403,
            )
        if not self.cors.origin_allowed_for(key, origin, request.headers.get("Host")):
            self.cors_refusals.record(key.id, origin, "origin_not_allowed")
            raise IngestError(
                "origin_not_allowed", "this origin may not send events with this key", status=403
            )

    async def _decode(self, request: web.Request, source: str, path_name: str) -> Decoded:
        """Content type, body and the source's decoder, for the JSON protocols."""
        raw_ctype = request.headers.get("Content-Type")
        if not raw_ctype:
            ctype = ""
        elif raw_ctype in ACCEPTED_CONTENT_TYPES:
            # Exactly "application/json" or "text/plain": nothing to parse (aiohttp's
            # content_type parses the header and copies its parameters, ~3 us).
            ctype = raw_ctype
        else:
            ctype = request.content_type
        if ctype not in ACCEPTED_CONTENT_TYPES:
            raise IngestError(
                "unsupported_content_type",
                f"expected application/json or text/plain, got {ctype[:60]!r}",
                status=415,
            )
        body = await read_body(request, self.limits.max_request_bytes)
        decoded = SOURCES[source](body, path_name)
        # No event can nest deeper than the body has opening brackets (these protocols'
        # events are the body's own objects).
        decoded.depth_bound = count_brackets_up_to(body, self.limits.max_nesting_depth)
        if len(decoded.events) > self.limits.max_batch_events:
            raise IngestError(
                "too_many_events",
                f"{len(decoded.events)} events in one batch; "
                f"at most {self.limits.max_batch_events}",
                status=413,
            )
        return decoded

    async def accept(
        self,
        request: web.Request,
        source: str,
        sender: Sender,
        decoded: Decoded,
        cors: dict[str, str],
        answer: Answer | None = None,
    ) -> web.Response:
        """Take the request's events through the pipeline, store them, count them, and
        answer with ``answer`` (the protocol's own success and error shapes) or the
        Segment/Jitsu answers, with the CORS headers ``cors``. A 503 when the spool cannot
        store them is the same for every protocol."""
        processed = self.pipeline.run(request, decoded, source, sender)
        rows, rejected = processed.rows, processed.rejected
        counters = self.metrics.source(source)
        counters.received.inc(len(rows) + len(rejected) + processed.suppressed)
        if processed.suppressed:
            self.metrics.events_suppressed.labels(source).inc(processed.suppressed)
        for rejection in rejected:
            counters.rejected(rejection["error"])

        stored = 0
        if rows:
            try:
                stored = await self.spool.append(rows, processed.message_ids)
            except SpoolUnavailable:
                self.metrics.spool_errors.inc()
                counters.rejected("spool_unavailable", len(rows))
                if self.capture.rate:
                    self.capture.record(
                        "request",
                        {
                            **self._captured_request(request, source, sender.id, 503),
                            "outcome": "refused",
                            "error": "spool_unavailable",
                            "message": "the spool could not store the events",
                        },
                    )
                return json_response(
                    503,
                    {
                        "error": "spool_unavailable",
                        "message": "events could not be stored; nothing was accepted, retry later",
                    },
                    {**cors, "Retry-After": SPOOL_RETRY_AFTER_SECS},
                )
            counters.accepted.inc(stored)
            if stored < len(rows):
                counters.duplicates.inc(len(rows) - stored)

        if answer is not None:
            response = answer(len(rows), rejected, cors)
        else:
            response = self._answer(source, decoded, processed, cors)
        visit = processed.visit
        if visit is not None and rows:
            self._set_cookies(response, visit, request)
        if self.capture.rate:
            self._capture_accepted(request, source, sender, processed, stored, response.status)
        return response

    def _answer(
        self, source: str, decoded: Decoded, processed: Processed, cors: dict[str, str]
    ) -> web.Response:
        rows, rejected, visit = processed.rows, processed.rejected, processed.visit
        if not decoded.is_batch:
            if rejected:
                first = rejected[0]
                return json_response(
                    400, {"error": first["error"], "message": first["message"]}, cors
                )
            return encoded_json_response(200, _OK_BODIES[source], cors)
        if rejected and not rows:
            return json_response(
                400,
                {
                    "error": "no_valid_events",
                    "message": "no event in the batch was valid",
                    "rejected": rejected,
                },
                cors,
            )
        body = self._ok(source)
        body["accepted"] = len(rows)
        if rejected:
            body["rejected"] = rejected
        if source == "tagrelay" and visit is not None and visit.anonymous_id is not None:
            # The script adopts the relay's id: one id for the script and the cookie.
            body["anonymousId"] = visit.anonymous_id
        return json_response(200, body, cors)

    def _set_cookies(self, response: web.Response, visit: Visit, request: web.Request) -> None:
        secure = self.resolver.is_https(request.scheme, request.remote, request.headers)
        for cookie in visit.cookies.values():
            response.set_cookie(
                cookie.name,
                cookie.value,
                max_age=cookie.max_age,
                path=cookie.path,
                domain=cookie.domain,
                secure=secure,
                httponly=cookie.http_only,
                samesite="Lax",
            )

    @staticmethod
    def _ok(source: str) -> dict[str, Any]:
        return {"ok": True} if source in ("jitsu", "tagrelay") else {"success": True}


# The answer to an accepted single event is always the same: encoded once.
_OK_BODIES: dict[str, bytes] = {
    name: orjson.dumps(IngestService._ok(name)) for name in SOURCE_LABELS
}
