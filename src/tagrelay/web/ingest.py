"""The ingest handler shared by every event source.

request -> content type check -> body (``web.bodies.read_body``: size, Content-Encoding)
-> JSON -> source.decode -> write key and origin -> per event: normalize, client IP and user
agent, campaign, size check -> spool commit -> answer.

Bad input gets a 4xx JSON body ``{"error": code, "message": text}`` and is counted by reason.
In a batch the valid events are stored and the invalid ones reported by index. The 2xx
goes out only after the spool commit; if the spool cannot commit, the answer is 503 with
``Retry-After`` and nothing of the request counts as accepted.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from tagrelay.config.models import Config, WriteKeyConfig
from tagrelay.errors import AuthError, IngestError, SpoolUnavailable
from tagrelay.metrics import Metrics
from tagrelay.model import Event, iso
from tagrelay.pipeline.campaign import apply_campaign
from tagrelay.pipeline.client import ClientResolver, apply_client
from tagrelay.pipeline.consent import DENIED, GRANTED, ConsentPolicy, anonymize
from tagrelay.pipeline.identity import IdentityService, Visit, VisitorState
from tagrelay.pipeline.normalize import BatchSentAt, normalize_event
from tagrelay.pipeline.privacy import apply_ip_truncation
from tagrelay.sources import SOURCE_LABELS, SOURCES, Decoded, parse_json_body
from tagrelay.sources.segment import SEGMENT, sdk_source
from tagrelay.spool.sqlite import SqliteSpool
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


_BRACKET_PEEK_BYTES = 2048


def count_brackets_up_to(body: bytes, limit: int) -> int | None:
    """The number of opening brackets (``{`` and ``[``) in ``body``, or None when there are
    more than ``limit``. A batch has more than the limit within its first event, so the
    start of the body is looked at first: counting every bracket of a 50 KB batch costs
    ~40 us."""
    if body.count(b"{", 0, _BRACKET_PEEK_BYTES) > limit:
        return None
    count = body.count(b"{") + body.count(b"[")
    return count if count <= limit else None


def _anonymous_id_header(value: str | None) -> str | None:
    """RudderStack's browser SDK sends ``AnonymousId: base64(anonymousId)`` (the body has it
    too; the header fills in when the body has none)."""
    if not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8").strip()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded or None


Answer = Callable[[int, list[dict[str, Any]], dict[str, str]], web.Response]
"""A protocol's answer, from the number of events stored (resends included), the rejected
ones (index, error, message) and the CORS headers."""


@dataclass(frozen=True)
class Route:
    """What a route means for the ingest handler."""

    source: str
    server_keys_only: bool = False
    host_keys: bool = False
    """A request that presents no key takes the browser key claiming its host
    (``keys[].hosts``), as Jitsu does for its browser ingest."""


class IngestService:
    def __init__(self, config: Config, spool: SqliteSpool, metrics: Metrics) -> None:
        self.limits = config.limits
        self.keys = KeyRing.from_config(config.keys)
        self.cors = CorsPolicy(config.keys)
        self.cors_refusals = CorsRefusals(metrics)
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
        self.spool = spool
        self.metrics = metrics

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
            return await self.accept(request, source, key, decoded)
        except IngestError as exc:
            # ``key`` is the key presented, when it is known: a refused request answers with
            # its CORS headers (none for a server key, or an origin the key does not allow).
            return self.refuse(source, exc, self.cors_headers(request, key))

    def refuse(self, source: str, exc: IngestError, headers: dict[str, str]) -> web.Response:
        """Answer a request refused as a whole, and count it once."""
        counters = self.metrics.source(source)
        counters.received.inc()
        counters.rejected(exc.code)
        log.debug("request rejected", extra={"source": source, "reason": exc.code})
        return error_response(exc, headers)

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
        decoded = SOURCES[source](parse_json_body(body), path_name)
        # No event can nest deeper than the body has opening brackets.
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
        key: WriteKeyConfig,
        decoded: Decoded,
        answer: Answer | None = None,
    ) -> web.Response:
        """Normalize, enrich and store the request's events; answer with ``answer`` (the
        protocol's own success and error shapes) or the Segment/Jitsu answers. A 503 when
        the spool cannot store them is the same for every protocol. ``decoded.events`` is
        emptied once they are serialized."""
        now = datetime.now(UTC)
        received_ms = int(now.timestamp() * 1000)
        received_iso = iso(now)
        trusted = key.kind == "server"
        ip = self.resolver.client_ip(request.remote, request.headers)
        user_agent = request.headers.get("User-Agent")
        limits = self.limits
        # A body with no more brackets than the limit cannot nest too deep: skip the walk.
        max_depth = None if decoded.depth_bound is not None else limits.max_nesting_depth
        batch_sent_at = (
            BatchSentAt(decoded.batch_sent_at) if decoded.batch_sent_at is not None else None
        )
        counters = self.metrics.source(source)
        shared_fields = tuple(decoded.shared.items())
        gpc = request.headers.get("Sec-GPC") == "1"
        # Identity cookies: browser-key requests only (a backend's request has no visitor).
        identity = self.identity if key.kind == "browser" else None
        visitor: VisitorState | None = None
        visit: Visit | None = None
        own_script = source == "tagrelay"
        rows: list[tuple[int, bytes]] = []
        message_ids: list[str] = []
        rejected: list[dict[str, Any]] = []
        header_anonymous_id = _anonymous_id_header(request.headers.get("AnonymousId"))
        events = decoded.events
        received = len(events)
        raw: Any = None
        event: Event | None = None
        for index, raw in enumerate(events):
            try:
                if (
                    header_anonymous_id is not None
                    and type(raw) is dict
                    and not raw.get("anonymousId")
                ):
                    raw["anonymousId"] = header_anonymous_id
                event = normalize_event(
                    raw,
                    received_at=now,
                    received_iso=received_iso,
                    batch_sent_at=batch_sent_at,
                    default_type=decoded.default_type,
                    max_depth=max_depth,
                )
                for shared_key, shared in shared_fields:
                    event[shared_key] = {**shared, **event.get(shared_key, {})}
                apply_client(event, ip=ip, user_agent=user_agent, trusted_sender=trusted)
                apply_campaign(event)
                context = event["context"]
                consent = self.consent.apply(event, gpc_header=gpc)
                if consent["analytics"] == DENIED:
                    if self.consent.anonymize_denied:
                        anonymize(event)
                elif identity is not None and context.get("cookieless") is not True:
                    if visitor is None or visit is None:
                        visitor = identity.read(request.cookies)
                        visit = Visit(domain=identity.cookie_domain(request.headers.get("Host")))
                    identity.apply(
                        event,
                        visitor,
                        visit,
                        own_script=own_script,
                        ads=consent["ads"] == GRANTED,
                        now_ms=received_ms,
                        reset=decoded.reset,
                    )
                if self.truncate_ip:
                    apply_ip_truncation(event)
                context["source"] = source
                context["writeKeyId"] = key.id
                payload = orjson.dumps(event)
                if len(payload) > limits.max_event_bytes:
                    raise IngestError(
                        "event_too_large",
                        f"the event is {len(payload)} bytes; at most {limits.max_event_bytes}",
                    )
                rows.append((received_ms, payload))
                message_ids.append(event["messageId"])
            except IngestError as exc:
                rejected.append({"index": index, "error": exc.code, "message": exc.message})
                counters.rejected(exc.code)
        counters.received.inc(received)
        # The events are in ``rows`` now, serialized: free them at once. Freed only when
        # the request ends, after the commit it waits for (other requests run meanwhile),
        # a 100-event batch took ~15% more of the event loop's time, most likely because
        # their memory is no longer in the CPU's caches by then (bench/README.md).
        events.clear()
        raw = event = None
        cors = self.cors_headers(request, key)
        if identity is not None and visitor is not None and visit is not None:
            identity.keep(visitor, visit)

        if rows:
            try:
                stored = await self.spool.append(rows, message_ids)
            except SpoolUnavailable:
                self.metrics.spool_errors.inc()
                counters.rejected("spool_unavailable", len(rows))
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
            response = self._answer(source, decoded, rows, rejected, cors, visit)
        if visit is not None and rows:
            self._set_cookies(response, visit, request)
        return response

    def _answer(
        self,
        source: str,
        decoded: Decoded,
        rows: list[tuple[int, bytes]],
        rejected: list[dict[str, Any]],
        cors: dict[str, str],
        visit: Visit | None,
    ) -> web.Response:
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
