"""GA4's inbound protocols: gtag's hits (``/g/collect``) and the Measurement Protocol
(``/mp/collect``, ``/debug/mp/collect``).

``/g/collect`` is where gtag.js sends its hits once a page sets ``server_container_url`` (or
``transport_url``) to the relay. A hit names its GA4 property (``tid``); only the measurement
ids in ``google.collect.measurement_ids`` are accepted, so the relay cannot be used to feed
somebody else's property. The hit is decoded like every other request, by its source in
``sources.SOURCES`` (``sources.ga4``), and its events go through the same pipeline as every
other event: consent (from gcs/gcd), identity cookies, IP truncation, the spool. The
answer is Google's: ``204 No Content``, once the events are stored; a hit that is wrong as a
whole gets a 4xx JSON error. The raw query and body lines are kept with each event
(``context.ga4.request`` / ``.event``) so that the ``ga4`` forwarder re-sends them as
received.

``/mp/collect?measurement_id=G-..&api_secret=..`` takes Measurement Protocol requests from
backends, authenticated by a secret from ``google.measurement_protocol``.
``/debug/mp/collect`` validates the same body and answers Google's
``{"validationMessages": [...]}`` without storing anything.

What this module adds to the shared ingest path (``web.ingest``) is GA4's own: the
credentials (measurement ids, api secrets) in the place of write keys, and Google's answers.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

from aiohttp import web

from tagrelay.config.models import Config
from tagrelay.errors import IngestError
from tagrelay.sources import SOURCES
from tagrelay.sources.ga4 import COLLECT_SOURCE, MP_SOURCE
from tagrelay.web.bodies import read_body
from tagrelay.web.ingest import IngestService, error_response, json_response

__all__ = ["COLLECT_SOURCE", "MP_SOURCE", "GoogleEndpoints", "add_google_routes", "raw_query"]


@dataclass(frozen=True)
class ProtocolCredential:
    """What admitted a GA4 request, in the place a write key takes for the other protocols
    (``pipeline.run.Sender``): GA4's protocols have no write keys but a credential of their
    own, checked here. ``id`` names it in ``context.writeKeyId`` and in the CORS refusal
    metrics; ``kind`` says whether it comes from pages or from backends."""

    id: str
    kind: Literal["browser", "server"]


COLLECT_CREDENTIAL = ProtocolCredential("ga4-collect", "browser")
"""A measurement id of ``google.collect.measurement_ids``: public, sent by gtag in pages."""
MP_CREDENTIAL = ProtocolCredential("ga4-mp", "server")
"""An api secret of ``google.measurement_protocol``: a backend's secret."""


def raw_query(request: web.Request) -> str:
    """The query string exactly as the client sent it: aiohttp's ``query_string`` is
    already percent-decoded (an encoded ``&`` inside a value would split it), and the
    re-send to Google must be byte for byte what gtag sent."""
    return request.raw_path.partition("?")[2].partition("#")[0]


def _collect_answer(
    stored: int, rejected: list[dict[str, Any]], cors: dict[str, str]
) -> web.Response:
    """gtag's answer: ``204`` once any event is stored (or none was refused), else a 400 with
    the first reason."""
    if stored or not rejected:
        return web.Response(status=204, headers=cors)
    first = rejected[0]
    return json_response(400, {"error": first["error"], "message": first["message"]}, cors)


def _mp_answer(stored: int, rejected: list[dict[str, Any]], cors: dict[str, str]) -> web.Response:
    """The Measurement Protocol's answer: ``204`` once any event is stored (or none was
    refused), else a 400 with every reason."""
    if stored or not rejected:
        return web.Response(status=204, headers=cors)
    body = {
        "error": "no_valid_events",
        "message": "no event in the request was valid",
        "rejected": rejected,
    }
    return json_response(400, body, cors)


class GoogleEndpoints:
    def __init__(self, config: Config, service: IngestService) -> None:
        self.service = service
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take ``config``'s measurement ids and api secrets (a reload; the routes stay as
        they were registered: turning an endpoint on or off takes a restart)."""
        self.max_request_bytes = config.limits.max_request_bytes
        self.collect_ids = frozenset(config.google.collect.measurement_ids)
        self.mp_secrets: dict[str, list[bytes]] = {}
        for secret in config.google.measurement_protocol:
            self.mp_secrets.setdefault(secret.measurement_id, []).append(
                secret.api_secret.get_secret_value().encode()
            )

    # -- /g/collect --------------------------------------------------------------------

    async def collect(self, request: web.Request) -> web.Response:
        # CORS: any origin a browser key allows (a hit carries no key to narrow it).
        cors = self.service.cors_headers(request, None)
        query = raw_query(request)
        try:
            self._authorize_collect(query)
            body = b""
            if request.method == "POST":
                body = await read_body(request, self.max_request_bytes)
            decoded = SOURCES[COLLECT_SOURCE](body, query)
        except IngestError as exc:
            return self.service.refuse(
                COLLECT_SOURCE, exc, cors, request=request, sender=COLLECT_CREDENTIAL.id
            )
        return await self.service.accept(
            request, COLLECT_SOURCE, COLLECT_CREDENTIAL, decoded, cors, _collect_answer
        )

    def _authorize_collect(self, query: str) -> None:
        """Refuse a hit for a measurement id the relay does not accept, so that it cannot
        feed somebody else's property (a hit without one is the decoder's 400)."""
        tid = next((v for k, v in parse_qsl(query) if k == "tid"), None)
        if tid is not None and tid not in self.collect_ids:
            raise IngestError(
                "measurement_id_not_allowed",
                "this relay does not accept hits for this measurement id",
                status=403,
            )

    # -- /mp/collect -------------------------------------------------------------------

    def _authorize_mp(self, request: web.Request) -> str:
        """The measurement id of a request whose api_secret matches one of it. An
        api_secret is a server credential: a browser request (it carries ``Origin``) is
        refused, and no answer has CORS headers."""
        measurement_id = request.query.get("measurement_id", "")
        presented = request.query.get("api_secret", "").encode()
        secrets = self.mp_secrets.get(measurement_id)
        if (
            not presented
            or not secrets
            or not any(hmac.compare_digest(secret, presented) for secret in secrets)
        ):
            raise IngestError(
                "unknown_key",
                "measurement_id and api_secret must match google.measurement_protocol",
                status=401,
            )
        origin = request.headers.get("Origin")
        if origin:
            self.service.cors_refusals.record(MP_CREDENTIAL.id, origin, "server_key_from_browser")
            raise IngestError(
                "server_key_from_browser",
                "an api_secret is a server credential; browsers send GA4 hits to /g/collect",
                status=403,
            )
        return measurement_id

    async def measurement_protocol(self, request: web.Request) -> web.Response:
        try:
            measurement_id = self._authorize_mp(request)
            body = await read_body(request, self.max_request_bytes)
            decoded = SOURCES[MP_SOURCE](body, measurement_id)
        except IngestError as exc:
            return self.service.refuse(MP_SOURCE, exc, {}, request=request)
        return await self.service.accept(request, MP_SOURCE, MP_CREDENTIAL, decoded, {}, _mp_answer)

    async def debug_measurement_protocol(self, request: web.Request) -> web.Response:
        """Validate like Google's ``/debug/mp/collect``; store nothing."""
        messages: list[dict[str, str]] = []
        try:
            measurement_id = self._authorize_mp(request)
            # A body that cannot be read as sent is an error of the request, not a
            # validation message about its content.
            body = await read_body(request, self.max_request_bytes)
        except IngestError as exc:
            return error_response(exc)
        try:
            decoded = SOURCES[MP_SOURCE](body, measurement_id)
        except IngestError as exc:
            messages.append(_validation_message("", exc))
        else:
            messages.extend(_validation_message(f"events[{i}]", e) for i, e in decoded.rejected)
        return json_response(200, {"validationMessages": messages})


def _validation_message(path: str, exc: IngestError) -> dict[str, str]:
    code = "VALUE_REQUIRED" if exc.code.startswith("missing_") else "VALUE_INVALID"
    if exc.code == "too_many_events":
        code = "EXCEEDED_MAX_ENTITIES"
    return {"fieldPath": path, "description": exc.message, "validationCode": code}


def add_google_routes(
    router: web.UrlDispatcher, config: Config, service: IngestService, prefix: str
) -> GoogleEndpoints:
    """Register ``/g/collect`` and ``/mp/collect`` when the configuration turns them on;
    returns their handlers' owner (a reload reconfigures it)."""
    google = GoogleEndpoints(config, service)
    if google.collect_ids:
        collect = router.add_resource(prefix + "/g/collect")
        collect.add_route("GET", google.collect)
        collect.add_route("POST", google.collect)
        collect.add_route("OPTIONS", service.preflight)
    if google.mp_secrets:
        router.add_post(prefix + "/mp/collect", google.measurement_protocol)
        router.add_post(prefix + "/debug/mp/collect", google.debug_measurement_protocol)
    return google
