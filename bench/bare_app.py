"""The baseline for ``bench/ingest_bench.py``: the least an aiohttp server can do per request.

It reads the whole request body and answers ``204 No Content`` on the relay's ingest paths,
without parsing, authenticating or storing anything. Its rate is the ceiling that aiohttp on
one event loop gives on this machine, against which the relay's rate is compared.

    .venv/bin/python bench/bare_app.py --host 127.0.0.1 --port 8099
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


async def ingest(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=204)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/v1/track", ingest)
    app.router.add_post("/v1/batch", ingest)
    app.router.add_post("/v1/page", ingest)
    app.router.add_route("GET", "/g/collect", ingest)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (default asyncio's own: a plain aiohttp app)",
    )
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    # No access log: it would cost a formatted log line per request, which is not what this
    # baseline is for.
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
