"""What the vendors' browser SDKs fetch from their own servers, answered by the relay, so
that a site switches to the relay by changing a host name.

=================================================  ==========================================
path                                               for
=================================================  ==========================================
``GET /v1/projects/{writeKey}/settings``           Segment analytics-next: its settings
                                                   (``cdnURL`` pointed at the relay); events go
                                                   to this relay's ``/v1``
``GET /analytics.js/v1/{writeKey}/analytics.min.js``  Segment's snippet: the library itself,
``GET /analytics-next/bundles/{file}``             and its lazily loaded chunks, from
                                                   ``sdks.segment.library_dir``
``POST /v1/m``                                     analytics-next's own usage metrics: counted
                                                   (``tagrelay_sdk_metrics_total``), not stored
``GET /sourceConfig/``                             RudderStack's source configuration
``POST /beacon/v1/batch?writeKey=``                RudderStack's beacon mode (a batch)
=================================================  ==========================================

Settings are served for browser keys only (server keys are secrets), with CORS for the key's
allowed origins. The settings name no destination: events come to the relay, and the
relay's forwarders do the rest.

The library files are regular files inside ``library_dir``, after symlinks are resolved: a
link that leads out of the directory (or to a directory) is not served.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tagrelay.config.models import Config, WriteKeyConfig
from tagrelay.errors import AuthError, IngestError
from tagrelay.metrics import Metrics
from tagrelay.pipeline.host import parse_host
from tagrelay.web.auth import key_from_headers
from tagrelay.web.bodies import read_body
from tagrelay.web.ingest import IngestService, Route, error_response, json_response

_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.js")
LIBRARY_MAX_AGE_SECS = 3600
_SETTINGS_ROUTE = Route("segment")
SETTINGS_MAX_AGE_SECS = 60


class SdkEndpoints:
    def __init__(
        self, config: Config, service: IngestService, metrics: Metrics, prefix: str
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.prefix = prefix
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take ``config``'s SDK settings (a reload)."""
        self.config = config
        library_dir = config.sdks.segment.library_dir
        self.library_dir = library_dir.resolve() if library_dir is not None else None

    # -- helpers -----------------------------------------------------------------------

    def _browser_key(
        self, presented: str | None, request: web.Request
    ) -> tuple[WriteKeyConfig | None, IngestError | None]:
        """The browser key presented, with the request's origin allowed for it; or the key
        as far as it is known (for the answer's CORS headers) and the error."""
        key: WriteKeyConfig | None = None
        try:
            key = self.service.keys.lookup(presented)
            if key.kind != "browser":
                # A server key is a secret: no document for pages is made with it.
                raise AuthError("browser_key_required", "settings are served for browser keys only")
            self.service.check_key(key, _SETTINGS_ROUTE, request)
        except IngestError as exc:
            return key, exc
        return key, None

    def _cors(self, request: web.Request, key: WriteKeyConfig | None = None) -> dict[str, str]:
        """CORS headers for an allowed origin: the key's, or with no key any browser
        key's. None for a server key."""
        return self.service.cors_headers(request, key)

    def _api_host(self, request: web.Request) -> tuple[str, str] | None:
        """Where this request reached the relay, as Segment's settings spell it: a host
        with the path prefix and no scheme (``data.example.com/v1``), and the protocol.
        None when the ``Host`` header names no valid host (it is never copied as is)."""
        host = parse_host(request.headers.get("Host"))
        if host is None:
            return None
        secure = self.service.resolver.is_https(request.scheme, request.remote, request.headers)
        name = f"[{host.name}]" if ":" in host.name else host.name
        if host.port is not None:
            name += f":{host.port}"
        return f"{name}{self.prefix}/v1", "https" if secure else "http"

    # -- Segment -----------------------------------------------------------------------

    async def segment_settings(self, request: web.Request) -> web.Response:
        key, error = self._browser_key(request.match_info["write_key"], request)
        if error is not None or key is None:
            assert error is not None
            return error_response(error, self._cors(request, key))
        where = self._api_host(request)
        if where is None:
            return json_response(
                400,
                {"error": "invalid_host", "message": "the Host header names no valid host"},
                self._cors(request, key),
            )
        api_host, protocol = where
        value = key.key.get_secret_value()
        settings: dict[str, Any] = {
            "integrations": {
                "Segment.io": {"apiKey": value, "apiHost": api_host, "protocol": protocol}
            },
            "plan": {"track": {"__default": {"enabled": True}}},
            "edgeFunction": {},
            "analyticsNextEnabled": True,
            "middlewareSettings": {},
            "enabledMiddleware": {},
            "metrics": {"sampleRate": self.config.sdks.segment.metrics_sample_rate},
            "legacyVideoPluginsEnabled": False,
            "remotePlugins": [],
        }
        headers = {
            **self._cors(request, key),
            "Cache-Control": f"public, max-age={SETTINGS_MAX_AGE_SECS}",
        }
        return json_response(200, settings, headers)

    async def segment_library(self, request: web.Request) -> web.StreamResponse:
        """The snippet's ``analytics.min.js``: analytics-next's standalone build."""
        _, error = self._browser_key(request.match_info["write_key"], request)
        if error is not None:
            return error_response(error)
        return self._library_file("standalone.js")

    async def segment_chunk(self, request: web.Request) -> web.StreamResponse:
        return self._library_file(request.match_info["file"])

    def _library_file(self, name: str) -> web.StreamResponse:
        if self.library_dir is None:
            return json_response(
                404,
                {
                    "error": "library_not_configured",
                    "message": "set sdks.segment.library_dir to serve analytics-next",
                },
            )
        path = self._inside_library(name)
        if path is None:
            return json_response(404, {"error": "not_found", "message": "no such file"})
        return web.FileResponse(
            path,
            headers={
                "Content-Type": "text/javascript; charset=utf-8",
                "Cache-Control": f"public, max-age={LIBRARY_MAX_AGE_SECS}",
                "Access-Control-Allow-Origin": "*",
                "X-Content-Type-Options": "nosniff",
            },
        )

    def _inside_library(self, name: str) -> Path | None:
        """The regular file ``name`` names inside the library directory, symlinks resolved;
        None for any other name (``..``, a path, NUL, a link that leads out)."""
        assert self.library_dir is not None
        if not _FILE_NAME.fullmatch(name):
            return None
        try:
            path = (self.library_dir / name).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a loop
            return None
        if not path.is_relative_to(self.library_dir) or not path.is_file():
            return None
        return path

    async def segment_metrics(self, request: web.Request) -> web.Response:
        """analytics-next's usage metrics (no write key): counted, then dropped."""
        cors = self._cors(request)
        try:
            raw = await read_body(request, self.config.limits.max_request_bytes)
        except IngestError as exc:
            self.metrics.sdk_metrics.labels("segment", "invalid").inc()
            return error_response(exc, cors)
        try:
            body = orjson.loads(raw)
            series = body["series"]
            if not isinstance(series, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self.metrics.sdk_metrics.labels("segment", "invalid").inc()
            return json_response(
                400, {"error": "invalid_body", "message": 'expected {"series": [...]}'}, cors
            )
        self.metrics.sdk_metrics.labels("segment", "accepted").inc(len(series))
        return json_response(200, {"success": True}, cors)

    # -- RudderStack -------------------------------------------------------------------

    async def rudderstack_source_config(self, request: web.Request) -> web.Response:
        try:
            presented = key_from_headers(request.headers, request.query)
        except IngestError as exc:
            return error_response(exc, self._cors(request))
        key, error = self._browser_key(presented, request)
        if error is not None or key is None:
            assert error is not None
            return error_response(error, self._cors(request, key))
        value = key.key.get_secret_value()
        document = {
            "isHosted": True,
            "source": {
                "id": f"tagrelay-{key.id}",
                "name": key.id,
                "writeKey": value,
                "enabled": True,
                "workspaceId": "tagrelay",
                "config": {
                    "statsCollection": {
                        "errors": {"enabled": False},
                        "metrics": {"enabled": False},
                    }
                },
                "destinations": [],
            },
        }
        headers = {
            **self._cors(request, key),
            "Cache-Control": f"public, max-age={SETTINGS_MAX_AGE_SECS}",
        }
        return json_response(200, document, headers)


def add_sdk_routes(
    router: web.UrlDispatcher,
    config: Config,
    service: IngestService,
    metrics: Metrics,
    prefix: str,
) -> SdkEndpoints:
    """Register before the ingest routes (``/v1/m`` must win over ``/v1/{kind}``). Returns
    the handlers' owner (a reload reconfigures it)."""
    sdks = SdkEndpoints(config, service, metrics, prefix)
    settings = router.add_resource(prefix + "/v1/projects/{write_key}/settings")
    settings.add_route("GET", sdks.segment_settings)
    settings.add_route("OPTIONS", service.preflight)
    router.add_get(prefix + "/analytics.js/v1/{write_key}/analytics.min.js", sdks.segment_library)
    router.add_get(prefix + "/analytics-next/bundles/{file}", sdks.segment_chunk)
    m = router.add_resource(prefix + "/v1/m")
    m.add_route("POST", sdks.segment_metrics)
    m.add_route("OPTIONS", service.preflight)
    for path in ("/sourceConfig", "/sourceConfig/"):
        source_config = router.add_resource(prefix + path)
        source_config.add_route("GET", sdks.rudderstack_source_config)
        source_config.add_route("OPTIONS", service.preflight)

    beacon_route = Route("segment")

    async def beacon(request: web.Request) -> web.Response:
        return await service.handle(request, beacon_route, "batch")

    resource = router.add_resource(prefix + "/beacon/v1/batch")
    resource.add_route("POST", beacon)
    resource.add_route("OPTIONS", service.preflight)
    return sdks
