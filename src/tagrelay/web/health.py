"""``/healthz``, ``/readyz`` and ``/metrics``, for the public listener and the admin listener
alike: each answers about the relay application ``main_app``, whichever application's
router the route is on.

- ``/healthz``: 200 while the process serves.
- ``/readyz``: 200 once the spool is open and writable and the forwarders run; 503 with the
  names of the problems otherwise. With Google tag gateway routes, the body also reports
  each route's start-up health check (``"gateway": {"/metrics": "ok"}``: pending, ok,
  failed or off), which never makes the relay unready: Google's outage is not the relay's,
  and taking it out of rotation would stop its own ingest too.
- ``/metrics``: the Prometheus exposition of the relay's registry (the forwarders' lag
  measured at that moment).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from tagrelay.appkeys import METRICS, READY, SPOOL
from tagrelay.web.gateway import GATEWAY
from tagrelay.web.ingest import json_response

__all__ = ["add_health_routes", "add_metrics_route", "readiness_problems"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def readiness_problems(main_app: web.Application) -> list[str]:
    """What keeps the relay from being ready; empty when it is."""
    problems = [name for name, ok in main_app[READY].items() if not ok]
    if not main_app[SPOOL].writable():
        problems.append("spool_not_writable")
    return problems


def add_health_routes(router: web.UrlDispatcher, main_app: web.Application, prefix: str) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problems = readiness_problems(main_app)
        body: dict[str, Any] = (
            {"status": "not_ready", "problems": problems} if problems else {"status": "ready"}
        )
        gateway = main_app.get(GATEWAY)
        if gateway is not None:
            body["gateway"] = gateway.health_report()
        return json_response(503 if problems else 200, body)

    router.add_get(prefix + "/healthz", healthz)
    router.add_get(prefix + "/readyz", readyz)


def add_metrics_route(router: web.UrlDispatcher, main_app: web.Application, prefix: str) -> None:
    metrics = main_app[METRICS]

    async def metrics_handler(request: web.Request) -> web.Response:
        body = await metrics.scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    router.add_get(prefix + "/metrics", metrics_handler)
