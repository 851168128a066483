"""The admin socket: a Unix socket in the data directory through which ``tagrelay sql``
queries the warehouse of a running relay (and ``tagrelay dlq``, ``reload``, ``keys``,
``forget`` and ``export`` reach it: ``admin_dlq``, ``admin_reload``, ``admin_keys``,
``admin_identity``).

DuckDB holds an exclusive lock on its file while the relay writes to it, so a second process
cannot open the file at all. Instead the CLI sends its query here, and the relay runs it on
its own connection (a separate cursor, read-only statements only) in a worker thread,
alongside the loads, and interrupts it past its time limit (``query_timeout``). The
socket is created with mode 0600: only the relay's own user can talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tagrelay.appkeys import warehouse_of
from tagrelay.datadir import PRIVATE_FILE_MODE, private_dir
from tagrelay.errors import QueryRejected, QueryTimeout, WarehouseError
from tagrelay.web.admin_dlq import add_dlq_routes
from tagrelay.web.admin_identity import add_privacy_routes
from tagrelay.web.admin_keys import add_keys_routes
from tagrelay.web.admin_reload import add_reload_route
from tagrelay.web.ingest import encoded_json_response

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 10_000
DEFAULT_TIMEOUT_SECS = 60.0
"""How long a query may run before it is interrupted, unless the request says otherwise."""
MAX_TIMEOUT_SECS = 3600.0
SHUTDOWN_TIMEOUT_SECS = 1.0
"""How long a stopping relay lets queries in flight finish before it drops their
connections (``tagrelay sql`` then says so); the warehouse interrupts them as it closes."""


def _json(body: Any, status: int = 200) -> web.Response:
    # Query results hold datetimes, decimals and the like: str() them.
    encoded = orjson.dumps(body, default=str, option=orjson.OPT_NON_STR_KEYS)
    return encoded_json_response(status, encoded)


def build_admin_app(main_app: web.Application) -> web.Application:
    admin = web.Application()

    async def sql(request: web.Request) -> web.Response:
        try:
            payload = await request.json(loads=orjson.loads)
            query = payload["sql"]
            max_rows = int(payload.get("max_rows", DEFAULT_MAX_ROWS))
            timeout_secs = float(payload.get("timeout_secs", DEFAULT_TIMEOUT_SECS))
            if not isinstance(query, str) or not 0 < timeout_secs <= MAX_TIMEOUT_SECS:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return _json(
                {
                    "error": "bad_request",
                    "message": 'expected {"sql": text, "max_rows": n, "timeout_secs": s} with '
                    f"0 < timeout_secs <= {MAX_TIMEOUT_SECS}",
                },
                400,
            )
        warehouse = warehouse_of(main_app)
        if warehouse is None:
            return _json(
                {"error": "no_warehouse", "message": "no warehouse forwarder is running"}, 404
            )
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                None, warehouse.query, query, max_rows, timeout_secs
            )
        except QueryRejected as exc:
            return _json({"error": "query_rejected", "message": str(exc)}, 400)
        except QueryTimeout as exc:
            return _json({"error": "query_timeout", "message": str(exc)}, 400)
        except WarehouseError as exc:
            return _json({"error": "query_failed", "message": str(exc)}, 400)
        return _json(
            {"columns": result.columns, "rows": result.rows, "truncated": result.truncated}
        )

    admin.router.add_post("/sql", sql)
    add_dlq_routes(admin, main_app)
    add_reload_route(admin, main_app)
    add_privacy_routes(admin, main_app)
    add_keys_routes(admin, main_app)
    return admin


def admin_socket_ctx(path: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        private_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        runner = web.AppRunner(
            build_admin_app(app),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_SECS,
        )
        await runner.setup()
        site = web.UnixSite(runner, str(path))
        await site.start()
        # Connecting needs write permission on the socket; the default umask already denies
        # it to others (and the data directory is 0700), and this leaves it to the relay's
        # own user alone.
        os.chmod(path, PRIVATE_FILE_MODE)
        try:
            yield
        finally:
            await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    return ctx
