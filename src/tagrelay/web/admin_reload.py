"""The admin API's reload, for ``tagrelay reload`` (and anyone holding the admin token, on
the admin listener): ``POST /reload`` reads the configuration file again and applies it
(``tagrelay.reload``), as SIGHUP does, and answers what happened::

    {"outcome": "applied" | "unchanged" | "invalid" | "failed", "config_file": path,
     "problems": [text, ...], "needs_restart": [setting, ...], "changed": [setting, ...],
     "keys": {"added": [id, ...], "removed": [...], "changed": [...]},
     "forwarders": {"added": [...], "removed": [...], "changed": [...]}}

200 when applied or unchanged, 422 when the file is invalid (the relay runs on as it was),
500 when part of it could not be applied. Settings are named, never their values.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from tagrelay.reload import RELOADER
from tagrelay.web.ingest import encoded_json_response

STATUS = {"applied": 200, "unchanged": 200, "invalid": 422, "failed": 500}


def add_reload_route(admin: web.Application, main_app: web.Application) -> None:
    async def reload(request: web.Request) -> web.Response:
        report = await main_app[RELOADER].reload("api")
        return encoded_json_response(STATUS[report.outcome], orjson.dumps(report.as_json()))

    admin.router.add_post("/reload", reload)
