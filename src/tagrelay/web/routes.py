"""The public ingest routes and what each means.

=================================  ===========================================  ============
path                               protocol                                     keys
=================================  ===========================================  ============
``/v1/{type}``                     Segment HTTP API; ``type`` is track, page,   any
                                   screen, identify, group, alias, batch,
                                   import, or a one-letter code (t, p, s, i,
                                   g, a, b)
``/api/s/{type}``                  Jitsu browser ingest                         any, or the
                                                                                host's
``/api/s/s2s/{type}``              Jitsu server-to-server ingest                server only
``paths.events`` (``/d``)          the relay's own script (tagrelay.js)         any, or the
                                                                                host's
``paths.identity`` (``/id``)       GET: the visitor's server-set id             none
=================================  ===========================================  ============

The configured paths (``paths.*``, with the script at ``paths.script``) are served by
``web.paths.ConfiguredPaths``, so that a reload can rename them; the others are routes here.

"The host's": a request that presents no write key takes the browser key whose ``hosts``
names the request's host (Jitsu's domain-to-stream mapping); without one it is a 401.

Every route is mounted under ``server.base_path``. Every ingest route also answers CORS
preflights (``OPTIONS``).

Each known type has a plain route of its own (``/v1/track``, ``/api/s/s2s/t``, ...): the
router finds a plain path with one dict lookup, where a route with a pattern costs a regular
expression match and a ``match_info`` dict on every request (~2.5% of single-event ingest).
The patterns stay, after them, for the unknown types, which get their JSON errors.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from tagrelay.sources.segment import BATCH_PATHS, PATH_TYPES
from tagrelay.web.ingest import IngestService, Route, json_response


def _handler(
    service: IngestService, route: Route, kind: str | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of a route; ``kind`` is the path's type, or None to take it from the
    pattern's ``{kind}``."""
    if kind is not None:
        # A partial, not a closure: one coroutine less between the server and the handler
        # on every request.
        return functools.partial(service.handle, route=route, path_name=kind)

    async def handle(request: web.Request) -> web.Response:
        return await service.handle(request, route, request.match_info.get("kind", ""))

    return handle


def ingest_routes(router: web.UrlDispatcher, service: IngestService, prefix: str) -> None:
    def add(path: str, route: Route, kind: str | None) -> None:
        resource = router.add_resource(prefix + path)
        resource.add_route("POST", _handler(service, route, kind))
        resource.add_route("OPTIONS", service.preflight)

    # Keyless requests on Jitsu's browser routes (and the relay's own events path,
    # web.paths) take the browser key claiming their host (keys[].hosts); Segment's SDKs
    # always send a key, and s2s takes server keys only.
    segment, jitsu = Route("segment"), Route("jitsu", host_keys=True)
    jitsu_s2s = Route("jitsu", server_keys_only=True)
    for kind in sorted({*PATH_TYPES, *BATCH_PATHS}):
        add(f"/v1/{kind}", segment, kind)
    for kind in sorted(PATH_TYPES):
        add(f"/api/s/s2s/{kind}", jitsu_s2s, kind)
        add(f"/api/s/{kind}", jitsu, kind)
    add("/api/s/s2s/{kind}", jitsu_s2s, None)
    add("/api/s/{kind:(?!s2s$)[^/]+}", jitsu, None)

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
