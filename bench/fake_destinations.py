"""Fast local fakes of the destinations ``bench/fanout_bench.py`` forwards to, in one process.

Each answers at once what the real API answers to a good request and counts the requests
and events it received, per destination:

  ga4_mp      POST /mp/collect                                   204 (events: ``events``)
  ga4_collect GET|POST /g/collect                                204 (events: body lines, or 1)
  meta        POST /{version}/{pixel_id}/events                  {"events_received": n, ...}
  tiktok      POST /open_api/{version}/event/track/              {"code": 0, "message": "OK"}
  google_ads  POST /{version}/customers/{id}:uploadClickConversions  {"results": [...]}
  google_token POST /token                                       an access token for an hour

``GET /counts`` returns the counts as JSON, ``GET /healthz`` answers 200, anything else is
counted under ``unexpected`` and answered 404.

    python bench/fake_destinations.py --port 8090

Only for 127.0.0.1: it is a benchmark's stand-in, with no checks of credentials.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

COUNTS: web.AppKey[dict[str, Counter[str]]] = web.AppKey("counts", dict)


def _count(request: web.Request, destination: str, events: int, size: int) -> None:
    c = request.app[COUNTS].setdefault(destination, Counter())
    c["requests"] += 1
    c["events"] += events
    c["bytes"] += size


async def _json(request: web.Request) -> tuple[Any, int]:
    body = await request.read()
    return orjson.loads(body) if body else {}, len(body)


async def ga4_mp(request: web.Request) -> web.Response:
    body, size = await _json(request)
    _count(request, "ga4_mp", len(body.get("events") or ()), size)
    return web.Response(status=204)


async def ga4_collect(request: web.Request) -> web.Response:
    body = await request.read()
    lines = body.count(b"\n") + 1 if body.strip() else 1
    _count(request, "ga4_collect", lines, len(body))
    return web.Response(status=204)


async def meta(request: web.Request) -> web.Response:
    body, size = await _json(request)
    n = len(body.get("data") or ())
    _count(request, "meta", n, size)
    return web.json_response({"events_received": n, "messages": [], "fbtrace_id": "bench"})


async def tiktok(request: web.Request) -> web.Response:
    body, size = await _json(request)
    _count(request, "tiktok", len(body.get("data") or ()), size)
    return web.json_response(
        {"code": 0, "message": "OK", "request_id": "bench", "data": {}},
    )


async def google_ads(request: web.Request) -> web.Response:
    body, size = await _json(request)
    rows = body.get("conversions") or ()
    _count(request, "google_ads", len(rows), size)
    results = [
        {"gclid": row.get("gclid", ""), "conversionAction": row.get("conversionAction", "")}
        for row in rows
    ]
    return web.json_response({"results": results, "jobId": "1"})


async def google_token(request: web.Request) -> web.Response:
    body = await request.read()
    _count(request, "google_token", 0, len(body))
    return web.json_response(
        {"access_token": "bench-access-token", "expires_in": 3599, "token_type": "Bearer"}
    )


async def counts(request: web.Request) -> web.Response:
    return web.json_response({k: dict(v) for k, v in request.app[COUNTS].items()})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def unexpected(request: web.Request) -> web.Response:
    body = await request.read()
    _count(request, "unexpected", 0, len(body))
    return web.json_response({"error": "not_found", "message": request.path}, status=404)


def create_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[COUNTS] = {}
    r = app.router
    r.add_post("/mp/collect", ga4_mp)
    r.add_route("GET", "/g/collect", ga4_collect)
    r.add_post("/g/collect", ga4_collect)
    r.add_post("/open_api/{version}/event/track/", tiktok)
    r.add_post("/{version}/customers/{customer}:uploadClickConversions", google_ads)
    r.add_post("/{version}/{pixel}/events", meta)
    r.add_post("/token", google_token)
    r.add_get("/counts", counts)
    r.add_get("/healthz", healthz)
    r.add_route("*", "/{tail:.*}", unexpected)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(args.host, args.port))


async def _serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
