"""The demo page (``paths.demo``, only with ``demo.enabled``): it loads the tracking script
with the demo's browser key, shows the snippet to paste, fires events from buttons and
lists the latest rows of the warehouse, so a new user sees events flow within a minute.

``<demo>/rows`` answers the latest warehouse rows as JSON (through the running warehouse
process, read-only). Everything in the page is public: the browser key is public by design.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from tagrelay.appkeys import warehouse_of
from tagrelay.config.models import Config
from tagrelay.errors import WarehouseError
from tagrelay.pipeline.host import parse_host
from tagrelay.web.admin_listener import ADMIN_LISTENER
from tagrelay.web.ingest import json_response
from tagrelay.web.script import render_snippet
from tagrelay.web.templates import templates_dir

RECENT_ROWS_SQL = (
    "select received_at, type, event, anonymous_id, user_id, context_page_path "
    "from events order by received_at desc limit 20"
)


def metrics_url(app: web.Application, config: Config, prefix: str) -> str:
    """Where the page's reader finds /metrics: on this listener with ``metrics.public``,
    else on the admin listener (when it runs); empty when neither serves it."""
    if config.metrics.public:
        return prefix + "/metrics"
    listener = app.get(ADMIN_LISTENER)
    if listener is None or listener.port is None:
        return ""
    return listener.url + "/metrics"


def add_demo_routes(app: web.Application, config: Config, prefix: str) -> None:
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=jinja2.select_autoescape(["html"]),
    )
    key = config.demo_key()
    assert key is not None  # the config validator makes sure
    demo_path = prefix + config.paths.demo

    @aiohttp_jinja2.template("demo.html")
    async def page(request: web.Request) -> dict[str, Any]:
        # The snippet to copy names the relay's host; a Host header that names no valid host
        # is not copied into the page (the script is then loaded by its path alone).
        host = parse_host(request.headers.get("Host"))
        origin = f"{request.scheme}://{request.headers['Host'].lower()}" if host else ""
        script_url = origin + prefix + config.paths.script
        return {
            "snippet": render_snippet(config, script_url, key.key.get_secret_value()),
            "global_name": config.script.global_name,
            "demo_path": demo_path,
            "metrics_url": metrics_url(request.app, config, prefix),
            "metrics_admin": not config.metrics.public,
            "rows_url": demo_path + "/rows",
            "sql": "tagrelay sql \"select * from events where context_page_path = '"
            + demo_path
            + "/signup' and timestamp > now() - interval '1 day'\"",
        }

    async def rows(request: web.Request) -> web.Response:
        process = warehouse_of(request.app)
        if process is None:
            return json_response(
                404, {"error": "no_warehouse", "message": "no warehouse forwarder is running"}
            )
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                None, process.query, RECENT_ROWS_SQL, 20
            )
        except WarehouseError as exc:
            # A fresh warehouse has no events table until the first batch lands.
            return json_response(200, {"columns": [], "rows": [], "note": str(exc)[:200]})
        return json_response(
            200,
            {
                "columns": list(result.columns),
                "rows": [[_plain(v) for v in row] for row in result.rows],
            },
            {"Cache-Control": "no-store"},
        )

    app.router.add_get(demo_path, page)
    app.router.add_get(demo_path + "/rows", rows)
    # Single-page-app navigation in the demo pushes these URLs; a reload must still work.
    app.router.add_get(demo_path + "/{page:(signup|pricing)}", page)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
