"""Google tag gateway: the relay as the first-party route of Google's tags, keeping a copy
of each hit that passes.

For each route of ``google.gateway.routes`` (``{path: /metrics, tag_id: GTM-ABCD1234}``),
everything below ``{server.base_path}{path}/``, any method, goes to
``{upstream}`` (``https://gtm-abcd1234.fps.goog``) with the path and query exactly as the
browser sent them (Google reads the measurement path from them: stripping the prefix makes
it answer "Measurement path is empty")::

    request -> kind (gateway.hits.classify) -> body (within limits.max_request_bytes)
      -> headers (gateway.headers: Google's cookies only, X-Forwarded-For the visitor's IP
         through trusted proxies, X-Forwarded-CountryRegion from gateway.geo)
      -> Google  ||  a copy of a GA4 or Ads hit: decode -> pipeline -> spool commit
      -> Google's answer passed back as it is, once the copy is committed (or refused)

``{path}`` without its slash redirects to ``{path}/`` (301; 308 for methods with a body),
as Google's origin expects. Redirects from Google are passed back, never followed; bodies
are streamed both ways and never decoded or rewritten (``gateway.headers``).

**Failures.** A body larger than ``limits.max_request_bytes`` is a 413 JSON error before
anything reaches Google (or, for a body streamed without a length, as soon as it passes the
limit). Google unreachable: ``502 {"error": "upstream_unavailable"}``; no answer within
``timeout_secs`` (``connect_timeout_secs`` to connect): ``504 {"error":
"upstream_timeout"}``. A failure after Google's answer started is logged (throttled) and the
visitor's connection closed, so that a cut body never looks whole.

**Copies.** A GA4 hit (``/ga/g/c``, ``/ag/g/c``, ``/g/collect``) is decoded by the GA4
source (``sources.ga4``) into its events, marked ``context.ga4.gateway: true`` (the ``ga4``
forwarder does not send them again: Google has them), and taken through the pipeline to
the spool like a ``/g/collect`` hit, while the request is with Google; the answer waits
for the commit. An Ads hit with an event name and a click id is stored the same way
(``sources.google_ads_tag``). The copy never changes what passes: a hit whose copy cannot
be stored (the spool full, a hit that does not decode) still goes to Google, and the
outcome is counted (``tagrelay_gateway_copies``). The relay's own cookies are not set on
Google's answer. Hits are copied whatever their measurement id: the route is what admits
them (``google.collect.measurement_ids`` is for ``/g/collect``).

**Health.** ``{path}/healthy`` and ``{path}/?validate_geo=healthy`` go to Google like
everything else, so that Tag Assistant's checks test the whole route. At start-up each
route's upstream ``/healthy`` is asked once (``health_check``); ``/readyz`` reports the
answers (``pending``, ``ok``, ``failed``) without failing on them: a Google outage must not
take the relay's own ingest out of its load balancer's rotation.

Routes are registered once: changing ``google.gateway`` takes a restart (``reload``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from tagrelay.config.google_gateway import GatewayRoute, GoogleGatewayConfig
from tagrelay.config.models import Config
from tagrelay.errors import IngestError
from tagrelay.gateway.geo import GeoLookup
from tagrelay.gateway.headers import response_headers, upstream_headers
from tagrelay.gateway.hits import Kind, classify
from tagrelay.logthrottle import LogThrottle
from tagrelay.metrics import Metrics
from tagrelay.pipeline.identity import parse_ga_client_id
from tagrelay.sources import SOURCES, Decoded
from tagrelay.sources.ga4 import COLLECT_SOURCE
from tagrelay.sources.google_ads_tag import ADS_TAG_SOURCE
from tagrelay.web.bodies import read_body
from tagrelay.web.google import ProtocolCredential
from tagrelay.web.ingest import IngestService, error_response, json_response

__all__ = ["GATEWAY", "GATEWAY_CREDENTIAL", "Gateway", "add_gateway_routes"]

log = logging.getLogger(__name__)

GATEWAY_CREDENTIAL: Final = ProtocolCredential("google-gateway", "browser")
"""What admitted a copied hit (``context.writeKeyId``): a gateway route. A browser's:
the pipeline reads the visitor's cookies (click ids, GA's ids) as for ``/g/collect``."""

Health = Literal["pending", "ok", "failed", "off"]
CopyOutcome = Literal["stored", "not_stored", "invalid", "skipped"]

_BODYLESS_METHODS: Final = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
_REFUSED_READS: Final = frozenset({"body_too_large", "incomplete_body", "client_disconnected"})
_STREAM_CHUNK: Final = 64 * 1024


class _BodyTooLarge(Exception):
    """A streamed request body passed the limit."""


@dataclass
class _Body:
    """A request's body on its way to Google."""

    data: bytes | AsyncIterator[bytes] | None = None
    """As sent: bytes (a hit), a stream (anything else), None (no body)."""
    decoded: bytes = b""
    """A hit's body decoded from its Content-Encoding, for its copy."""
    undecodable: bool = False
    """A hit's body that could not be decoded: passed on, not copied."""
    too_large: bool = False
    """The stream passed the limit while it went to Google."""


@dataclass
class RouteState:
    """One configured route as served: where it goes and what its health check said."""

    config: GatewayRoute
    full_path: str
    """The path below which requests are forwarded, with ``server.base_path``."""
    origin: str
    health: Health = "pending"

    def __post_init__(self) -> None:
        self._origin = URL(self.origin)

    def target(self, raw_path: str, query: str, *, empty_query: bool) -> URL:
        """The upstream URL of a request for ``raw_path`` and ``query`` as sent. An empty
        query (``/metrics/?``) is kept in the path: a URL drops it, and the request line
        must be the browser's byte for byte."""
        origin = self._origin
        return URL.build(
            scheme=origin.scheme,
            host=origin.raw_host or "",
            port=origin.explicit_port,
            path=raw_path + ("?" if empty_query and not query else ""),
            query_string=query,
            encoded=True,
        )

    @property
    def label(self) -> str:
        """The ``route`` label of the metrics: the configured path."""
        return self.config.path


def default_connector() -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=200, ttl_dns_cache=300)


class Gateway:
    """The gateway routes' handlers, their upstream client and their health (see the
    module docstring). ``connector_factory`` makes the client's connector at start-up
    (tests point it at a fake Google)."""

    def __init__(
        self, config: Config, service: IngestService, metrics: Metrics, prefix: str
    ) -> None:
        gateway: GoogleGatewayConfig = config.google.gateway
        self.settings = gateway
        self.service = service
        self.metrics = metrics
        self.limit = config.limits.max_request_bytes
        self.routes = [
            RouteState(route, prefix + route.path, gateway.upstream_origin(route.tag_id))
            for route in gateway.routes
        ]
        if not gateway.health_check:
            for state in self.routes:
                state.health = "off"
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=gateway.connect_timeout_secs,
            sock_connect=gateway.connect_timeout_secs,
            sock_read=gateway.timeout_secs,
        )
        self.geo = GeoLookup(gateway.geo)
        self.connector_factory: Callable[[], aiohttp.BaseConnector] = default_connector
        self._session: aiohttp.ClientSession | None = None
        self._throttle = LogThrottle(log)
        self._copies: set[asyncio.Task[CopyOutcome]] = set()
        """Copies being stored (held here, so that none is collected while it runs)."""
        self._geo_counters = {
            source: metrics.gateway_geo.labels(source) for source in ("header", "database", "none")
        }

    # -- lifecycle ---------------------------------------------------------------------

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """A ``cleanup_ctx`` item: the upstream client for as long as the application
        runs, the start-up health checks in the background, the geo database closed at
        the end."""
        if not self.geo.configured:
            log.warning(
                "google.gateway has no geo source (geo.country_region_header, "
                "geo.country_header or geo.database): Google will place every visitor where "
                "the relay is, for regional reports and consent defaults",
                extra={"routes": ", ".join(state.label for state in self.routes)},
            )
        self._session = aiohttp.ClientSession(
            connector=self.connector_factory(),
            # Google's answers reach the visitor as they came (never decompressed), and no
            # visitor's cookie is ever kept for another.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self.timeout,
        )
        checks = None
        if self.settings.health_check:
            checks = asyncio.create_task(self._check_health())
        try:
            yield
        finally:
            if checks is not None:
                checks.cancel()
                await asyncio.gather(checks, return_exceptions=True)
            await self._session.close()
            self._session = None
            self.geo.close()

    async def _check_health(self) -> None:
        await asyncio.gather(*(self._check_route(state) for state in self.routes))

    async def _check_route(self, state: RouteState) -> None:
        assert self._session is not None
        url = URL(state.origin + state.full_path + "/healthy", encoded=True)
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                body = await resp.content.read(64)
                ok = resp.status == 200 and body.strip() == b"ok"
                detail = f"status {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ok, detail = False, type(exc).__name__
        state.health = "ok" if ok else "failed"
        self.metrics.gateway_upstream_healthy.labels(state.label).set(1 if ok else 0)
        if not ok:
            log.warning(
                "the Google tag gateway's health check failed: Google did not answer ok at "
                "the route's /healthy; requests are forwarded anyway",
                extra={"route": state.label, "upstream": state.origin, "detail": detail},
            )

    def health_report(self) -> dict[str, str]:
        """Each route's start-up health check: pending, ok, failed or off (``/readyz``)."""
        return {state.label: state.health for state in self.routes}

    # -- requests ----------------------------------------------------------------------

    def redirect_handler(self, state: RouteState) -> Callable[[web.Request], Any]:
        async def redirect(request: web.Request) -> web.Response:
            path, sep, query = request.raw_path.partition("?")
            status = 301 if request.method in (hdrs.METH_GET, hdrs.METH_HEAD) else 308
            self._count(state, "script", f"{status // 100}xx")
            return web.Response(status=status, headers={"Location": path + "/" + sep + query})

        return redirect

    def handler(self, state: RouteState) -> Callable[[web.Request], Any]:
        async def forward(request: web.Request) -> web.StreamResponse:
            return await self.forward(request, state)

        return forward

    async def forward(self, request: web.Request, state: RouteState) -> web.StreamResponse:
        """One request below a route: to Google and back, with a copy of a hit."""
        raw_target = request.raw_path
        raw_path, _, query = raw_target.partition("?")
        path = request.path
        rest = (path[len(state.full_path) :] if path.startswith(state.full_path) else path) or "/"
        kind = classify(rest, query)
        copy_hits = self.settings.copy_hits and kind in ("ga4_hit", "ads_hit")

        body = await self._body(request, copy_hits)
        if isinstance(body, IngestError):
            return self._refuse(state, kind, body)
        headers = self._upstream_headers(request)
        copy: asyncio.Task[CopyOutcome] | None = None
        if copy_hits:
            # In parallel with Google's exchange; awaited before the answer goes back.
            copy = asyncio.create_task(self._copy(request, kind, rest, query, body))
            self._copies.add(copy)
            copy.add_done_callback(self._copies.discard)
        assert self._session is not None
        start = time.perf_counter()
        try:
            upstream = await self._session.request(
                request.method,
                state.target(raw_path, query, empty_query="?" in raw_target),
                headers=headers,
                data=body.data,
                allow_redirects=False,
                # Nothing of the client library's own: no Accept-Encoding the browser did
                # not send (its answer would come back compressed), no User-Agent.
                skip_auto_headers=(hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.ACCEPT),
                compress=None,
            )
        except Exception as exc:
            await self._finish_copy(state, kind, copy)
            if body.too_large or isinstance(exc, _BodyTooLarge):
                return self._refuse(state, kind, _too_large(self.limit))
            if not isinstance(exc, aiohttp.ClientError | OSError | TimeoutError):
                raise
            return self._failed(state, kind, exc)
        self.metrics.gateway_upstream_duration.labels(state.label, kind).observe(
            time.perf_counter() - start
        )
        try:
            await self._finish_copy(state, kind, copy)
            self._count(state, kind, f"{upstream.status // 100}xx")
            return await self._pass_back(request, upstream, state, kind)
        finally:
            upstream.release()

    async def _body(self, request: web.Request, whole: bool) -> _Body | IngestError:
        """The request's body for Google, within ``limits.max_request_bytes``: read whole
        (``whole``: a hit, whose copy needs it, decoded too), streamed otherwise; the error
        when it is refused (too large, cut short)."""
        length = request.content_length
        if length is not None and length > self.limit:
            return _too_large(self.limit)
        body = _Body()
        if not request.body_exists:
            return body
        if whole:
            try:
                body.decoded = await read_body(request, self.limit)
            except IngestError as exc:
                if exc.code in _REFUSED_READS:
                    return exc
                body.undecodable = True  # passed on as it came; its copy is invalid
            body.data = await request.read()  # as sent (read_body read it: no second read)
        elif request.method not in _BODYLESS_METHODS or length:
            body.data = self._stream(request, body)
        return body

    async def _stream(self, request: web.Request, body: _Body) -> AsyncIterator[bytes]:
        """The body as it arrives, until it passes the limit (``body.too_large``)."""
        received = 0
        async for chunk in request.content.iter_chunked(_STREAM_CHUNK):
            received += len(chunk)
            if received > self.limit:
                body.too_large = True
                raise _BodyTooLarge
            yield chunk

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        """The headers for Google (``gateway.headers``): the visitor's IP through trusted
        proxies and where the visitor is (``gateway.geo``, counted by source)."""
        resolver = self.service.resolver
        ip = resolver.client_ip(request.remote, request.headers)
        geo = self.geo.lookup(ip, request.headers, resolver.peer_is_trusted(request.remote))
        self._geo_counters[geo.source].inc()
        added = geo.headers()
        if ip is not None:
            added["X-Forwarded-For"] = ip
        return upstream_headers(request.headers, own=self.geo.own_headers, added=added)

    def _failed(self, state: RouteState, kind: Kind, exc: BaseException) -> web.Response:
        """The answer when Google gave none: 504 past the time limit, else 502."""
        timeout = isinstance(exc, TimeoutError)
        self._count(state, kind, "timeout" if timeout else "error")
        self._throttle.log(
            logging.WARNING,
            ("timeout" if timeout else "unavailable", state.label),
            "Google did not answer a gateway request in time"
            if timeout
            else "Google's tag gateway could not be reached",
            {"route": state.label, "kind": kind, "error": type(exc).__name__},
        )
        if timeout:
            status, code, message = (
                504,
                "upstream_timeout",
                "Google's tag gateway did not answer in time",
            )
        else:
            status, code, message = (
                502,
                "upstream_unavailable",
                "Google's tag gateway could not be reached",
            )
        return json_response(
            status, {"error": code, "message": message}, {"Cache-Control": "no-store"}
        )

    async def _pass_back(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        state: RouteState,
        kind: Kind,
    ) -> web.StreamResponse:
        """Google's answer, streamed to the visitor as it came."""
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(response_headers(upstream.headers))
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # The answer has begun: no error can be sent now, and ending it normally would
            # pass a cut body off as whole. The visitor's connection is closed instead.
            self._throttle.log(
                logging.WARNING,
                ("cut", state.label),
                "Google's answer to a gateway request broke off; the visitor's connection "
                "was closed",
                {"route": state.label, "kind": kind, "error": type(exc).__name__},
            )
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    def _count(self, state: RouteState, kind: Kind, status_class: str) -> None:
        self.metrics.gateway_requests.labels(state.label, kind, status_class).inc()

    def _refuse(self, state: RouteState, kind: Kind, exc: IngestError) -> web.Response:
        self._count(state, kind, "refused")
        return error_response(exc, {"Cache-Control": "no-store"})

    # -- copies ------------------------------------------------------------------------

    async def _finish_copy(
        self, state: RouteState, kind: Kind, copy: asyncio.Task[CopyOutcome] | None
    ) -> None:
        """Wait for the copy's commit and count its outcome; a copy that failed is
        ``not_stored`` (logged, throttled), never the visitor's error."""
        if copy is None:
            return
        try:
            outcome = await copy
        except Exception:
            self._throttle.log(
                logging.ERROR,
                ("copy", state.label),
                "a gateway hit's copy failed; the hit was passed to Google",
                {"route": state.label, "kind": kind},
                exc_info=True,
            )
            outcome = "not_stored"
        self.metrics.gateway_copies.labels(state.label, kind, outcome).inc()

    async def _copy(
        self, request: web.Request, kind: Kind, rest: str, query: str, body: _Body
    ) -> CopyOutcome:
        """Decode the hit, take its events through the pipeline and commit them."""
        service = self.service
        source = COLLECT_SOURCE if kind == "ga4_hit" else ADS_TAG_SOURCE
        try:
            if kind == "ga4_hit":
                if body.undecodable:
                    return "invalid"
                decoded = SOURCES[COLLECT_SOURCE](body.decoded, query)
                for event in decoded.events:
                    event["context"]["ga4"]["gateway"] = True
            else:  # an Ads hit's body (form data) is not read
                decoded = SOURCES[ADS_TAG_SOURCE](b"", rest + "?" + query)
                if not decoded.events:
                    return "skipped"
                _ga_client_id(decoded, request)
        except IngestError as exc:
            service.refuse(source, exc, {}, request=request, sender=GATEWAY_CREDENTIAL.id)
            return "invalid"
        answer = await service.accept(
            request, source, GATEWAY_CREDENTIAL, decoded, {}, _copy_answer
        )
        if answer.status == 503:
            return "not_stored"
        return "stored" if answer.status < 300 else "invalid"


def _copy_answer(stored: int, rejected: list[dict[str, Any]], cors: dict[str, str]) -> web.Response:
    """What ``IngestService.accept`` gives back for a copy (it is never sent): 204 when
    any event was stored, 400 when none was valid."""
    return web.Response(status=204 if stored else 400)


def _ga_client_id(decoded: Decoded, request: web.Request) -> None:
    """An Ads hit's events take GA's client id (the ``_ga`` cookie) as their anonymous id,
    when the hit came with it: the visitor's other events carry the same."""
    cookie = request.cookies.get("_ga")
    client_id = parse_ga_client_id(cookie) if cookie else None
    if client_id is not None:
        for event in decoded.events:
            event["anonymousId"] = client_id


def _too_large(limit: int) -> IngestError:
    return IngestError(
        "body_too_large", f"the request body is larger than {limit} bytes", status=413
    )


GATEWAY = web.AppKey("gateway", Gateway)
"""The relay's gateway (``create_app``), when ``google.gateway.routes`` is set."""


def add_gateway_routes(
    app: web.Application, config: Config, service: IngestService, metrics: Metrics, prefix: str
) -> Gateway:
    """Serve ``google.gateway.routes`` below ``prefix`` (any method), and run the
    gateway's client with the application (``Gateway.lifecycle`` in ``cleanup_ctx``)."""
    gateway = app[GATEWAY] = Gateway(config, service, metrics, prefix)
    app.cleanup_ctx.append(gateway.lifecycle)
    for state in gateway.routes:
        app.router.add_route("*", state.full_path, gateway.redirect_handler(state))
        app.router.add_route("*", state.full_path + "/{tail:.*}", gateway.handler(state))
    return gateway
