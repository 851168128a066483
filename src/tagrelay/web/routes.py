"""The public ingest routes and what each means.

=================================  ===========================================  ============
path                               protocol                                     keys
=================================  ===========================================  ============
``/v1/{type}``                     Segment HTTP API; ``type`` is track, page,   any
                                   screen, identify, group, alias, batch,
                                   import, or a one-letter code (t, p, s, i,
                                   g, a, b)
``/api/s/{type}``                  Jitsu browser ingest                         any
``/api/s/s2s/{type}``              Jitsu server-to-server ingest                server only
``paths.events`` (``/d``)          the relay's own script (tagrelay.js)         any
``paths.identity`` (``/id``)       GET: the visitor's server-set id             none
=================================  ===========================================  ============

Every route is mounted under ``server.base_path``. Every ingest route also answers CORS
preflights (``OPTIONS``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from tagrelay.config.models import PathsConfig
from tagrelay.sources.segment import BATCH_PATHS, PATH_TYPES
from tagrelay.web.ingest import IngestService, Route, json_response

SEGMENT_PATHS = "|".join(sorted({*PATH_TYPES, *BATCH_PATHS}, key=lambda p: (-len(p), p)))


def _handler(
    service: IngestService, route: Route
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        return await service.handle(request, route, request.match_info.get("kind", ""))

    return handle


def ingest_routes(
    router: web.UrlDispatcher, service: IngestService, prefix: str, paths: PathsConfig
) -> None:
    routes = [
        (f"/v1/{{kind:(?:{SEGMENT_PATHS})}}", Route("segment")),
        ("/api/s/s2s/{kind}", Route("jitsu", server_keys_only=True)),
        ("/api/s/{kind:(?!s2s$)[^/]+}", Route("jitsu")),
        (paths.events, Route("tagrelay")),
    ]
    for path, route in routes:
        resource = router.add_resource(prefix + path)
        resource.add_route("POST", _handler(service, route))
        resource.add_route("OPTIONS", service.preflight)
    identity = router.add_resource(prefix + paths.identity)
    identity.add_route("GET", service.identity_handler)
    identity.add_route("OPTIONS", service.preflight)

    async def unknown_segment_type(request: web.Request) -> web.Response:
        if request.match_info["kind"] in PATH_TYPES or request.match_info["kind"] in BATCH_PATHS:
            return json_response(
                405, {"error": "method_not_allowed", "message": "use POST (or OPTIONS)"}
            )
        return json_response(
            404,
            {
                "error": "unknown_endpoint",
                "message": "expected /v1/{track,page,screen,identify,group,alias,batch}",
            },
        )

    router.add_route("*", prefix + "/v1/{kind}", unknown_segment_type)
