"""GA4's inbound protocols: gtag's hits (``/g/collect``) and the Measurement Protocol
(``/mp/collect``, ``/debug/mp/collect``).

``/g/collect`` is where gtag.js sends its hits once a page sets ``server_container_url`` (or
``transport_url``) to the relay. A hit names its GA4 property (``tid``); only the measurement
ids in ``google.collect.measurement_ids`` are accepted, so the relay cannot be used to feed
somebody else's property. Each event of the hit becomes an event of the internal model
(``sources.ga4.parse_collect``) and goes through the same pipeline as every other event:
consent (from gcs/gcd), identity cookies, IP truncation, the spool. The answer is Google's:
``204 No Content``, once the events are stored; a hit that is wrong as a whole gets a 4xx
JSON error. The raw query and body lines are kept with each event
(``context.ga4.request`` / ``.event``) so that the ``ga4`` forwarder re-sends them as
received.

``/mp/collect?measurement_id=G-..&api_secret=..`` takes Measurement Protocol requests from
backends, authenticated by a secret from ``google.measurement_protocol``.
``/debug/mp/collect`` validates the same body and answers Google's
``{"validationMessages": [...]}`` without storing anything.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from pydantic import SecretStr

from tagrelay.config.models import Config, WriteKeyConfig
from tagrelay.errors import IngestError
from tagrelay.metrics import Metrics
from tagrelay.sources import Decoded, parse_json_body
from tagrelay.sources.ga4 import Hits, parse_collect, parse_measurement_protocol
from tagrelay.web.bodies import read_body
from tagrelay.web.ingest import IngestService, error_response, json_response

COLLECT_SOURCE = "ga4"
MP_SOURCE = "ga4_mp"

# The ingest pipeline speaks of write keys; these two stand for the GA4 protocols, which
# have none (their ids are never looked up: they only say browser or server, and name the
# origin of the events in context.writeKeyId).
_COLLECT_KEY = WriteKeyConfig(id="ga4-collect", kind="browser", key=SecretStr("-"))
_MP_KEY = WriteKeyConfig(id="ga4-mp", kind="server", key=SecretStr("-"))


def raw_query(request: web.Request) -> str:
    """The query string exactly as the client sent it: aiohttp's ``query_string`` is
    already percent-decoded (an encoded ``&`` inside a value would split it), and the
    re-send to Google must be byte for byte what gtag sent."""
    return request.raw_path.partition("?")[2].partition("#")[0]


class GoogleEndpoints:
    def __init__(self, config: Config, service: IngestService, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics
        self.max_request_bytes = config.limits.max_request_bytes
        self.collect_ids = frozenset(config.google.collect.measurement_ids)
        self.mp_secrets: dict[str, list[bytes]] = {}
        for secret in config.google.measurement_protocol:
            self.mp_secrets.setdefault(secret.measurement_id, []).append(
                secret.api_secret.get_secret_value().encode()
            )

    def _accept_hits(
        self,
        request: web.Request,
        source: str,
        key: WriteKeyConfig,
        hits: Hits,
        cors: dict[str, str] | None,
        summarize: bool,
    ) -> Awaitable[web.Response]:
        """Store the hits' valid events, counting the ones the parser refused; answer
        Google's ``204`` when any event was stored (or none was refused), else a 400 with
        the first reason, or with every one (``summarize``). ``cors``: headers to answer
        with instead of those of the pseudo key."""
        counters = self.metrics.source(source)
        if hits.rejected:
            counters.received.inc(len(hits.rejected))
            for _, exc in hits.rejected:
                counters.rejected(exc.code)
        parsed = [{"index": i, "error": e.code, "message": e.message} for i, e in hits.rejected]

        def answer(
            stored: int, rejected: list[dict[str, Any]], headers: dict[str, str]
        ) -> web.Response:
            headers = headers if cors is None else cors
            if stored or not (rejected or parsed):
                return web.Response(status=204, headers=headers)
            errors = parsed + rejected
            if summarize:
                body = {
                    "error": "no_valid_events",
                    "message": "no event in the request was valid",
                    "rejected": errors,
                }
            else:
                body = {"error": errors[0]["error"], "message": errors[0]["message"]}
            return json_response(400, body, headers)

        decoded = Decoded(events=hits.events, is_batch=True)
        return self.service.accept(request, source, key, decoded, answer)

    # -- /g/collect --------------------------------------------------------------------

    async def collect(self, request: web.Request) -> web.Response:
        cors = self.service.cors_headers(request, None)
        query = raw_query(request)
        tid = next((v for k, v in parse_qsl(query) if k == "tid"), None)
        if tid is not None and tid not in self.collect_ids:
            return self.service.refuse(
                COLLECT_SOURCE,
                IngestError(
                    "measurement_id_not_allowed",
                    "this relay does not accept hits for this measurement id",
                    status=403,
                ),
                cors,
            )
        try:
            text = ""
            if request.method == "POST":
                text = (await read_body(request, self.max_request_bytes)).decode("utf-8")
            hits = parse_collect(query, text)
        except UnicodeDecodeError:
            return self.service.refuse(
                COLLECT_SOURCE,
                IngestError("invalid_utf8", "the request body is not valid UTF-8"),
                cors,
            )
        except IngestError as exc:
            return self.service.refuse(COLLECT_SOURCE, exc, cors)
        # CORS: any origin a browser key allows (a hit carries no key to narrow it).
        return await self._accept_hits(
            request, COLLECT_SOURCE, _COLLECT_KEY, hits, cors, summarize=False
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
            self.service.cors_refusals.record(_MP_KEY.id, origin, "server_key_from_browser")
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
            hits = parse_measurement_protocol(parse_json_body(body), measurement_id)
        except IngestError as exc:
            return self.service.refuse(MP_SOURCE, exc, {})
        return await self._accept_hits(request, MP_SOURCE, _MP_KEY, hits, None, summarize=True)

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
            hits = parse_measurement_protocol(parse_json_body(body), measurement_id)
        except IngestError as exc:
            messages.append(_validation_message("", exc))
        else:
            messages.extend(_validation_message(f"events[{i}]", e) for i, e in hits.rejected)
        return json_response(200, {"validationMessages": messages})


def _validation_message(path: str, exc: IngestError) -> dict[str, str]:
    code = "VALUE_REQUIRED" if exc.code.startswith("missing_") else "VALUE_INVALID"
    if exc.code == "too_many_events":
        code = "EXCEEDED_MAX_ENTITIES"
    return {"fieldPath": path, "description": exc.message, "validationCode": code}


def add_google_routes(
    router: web.UrlDispatcher,
    config: Config,
    service: IngestService,
    metrics: Metrics,
    prefix: str,
) -> None:
    google = GoogleEndpoints(config, service, metrics)
    if google.collect_ids:
        collect = router.add_resource(prefix + "/g/collect")
        collect.add_route("GET", google.collect)
        collect.add_route("POST", google.collect)
        collect.add_route("OPTIONS", service.preflight)
    if google.mp_secrets:
        router.add_post(prefix + "/mp/collect", google.measurement_protocol)
        router.add_post(prefix + "/debug/mp/collect", google.debug_measurement_protocol)
