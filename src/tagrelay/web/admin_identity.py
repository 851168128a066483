"""The admin API's erasure and access requests, for ``tagrelay forget`` and ``tagrelay
export`` (``cli.privacy``), across every store of the running relay
(``privacy.requests``)::

    POST /privacy/forget  {"user_id": U} | {"anonymous_id": A} | {"email": E}  (one or more;
                          "suppress": true to drop their future events at ingest)
        -> {"stores": {"identity_store": {"persons": n, "ids": m}, "warehouse": {"rows": r},
                       "spool": {"events": s}, "dead_letters": {"events": d}}}
    GET /privacy/report   -> the data map of the configuration in effect (``privacy.report``)
    POST /privacy/export  the same ids
        -> {"stores": {"identity_store": {"persons": [...]}, "warehouse": {"rows": [...]},
                       "spool": {"events": [...]}, "dead_letters": {"events": [...]}}}

A store that is not configured is not in the answer. Each request writes one audit line
(logger ``tagrelay.audit``): which kinds of id were given (never their values), a salted
reference to them (``pipeline.suppression.salted_ref``), who asked (the uid of the process
at the other end of the socket, from ``SO_PEERCRED``), and how many rows each store gave or
deleted. 400 for a body without an id; 503 when a store could not be read or written
(what was done stays done: ask again).
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

import orjson
from aiohttp import web

from tagrelay.appkeys import CONFIG, DELIVERY_LOOP, FLEET, SPOOL, SUPPRESSION, warehouses_of
from tagrelay.crypto import CryptoError
from tagrelay.errors import IdentityStoreError, SpoolUnavailable, WarehouseError
from tagrelay.identity_store import IdentityStore
from tagrelay.model.subject import ID_KINDS
from tagrelay.pipeline.suppression import privacy_salt, salted_ref
from tagrelay.privacy.report import build_report
from tagrelay.privacy.requests import Stores, audit_fields, count_of, export, forget
from tagrelay.reload import RELOADER
from tagrelay.spool.sqlite import SqliteSpool
from tagrelay.web.ingest import encoded_json_response

audit = logging.getLogger("tagrelay.audit")

ID_FIELDS = ID_KINDS
_PEERCRED = struct.Struct("3i")


def _json(body: Any, status: int = 200) -> web.Response:
    return encoded_json_response(status, orjson.dumps(body, default=str))


async def _request(request: web.Request) -> tuple[dict[str, str], bool] | None:
    try:
        body = await request.json(loads=orjson.loads)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    ids = {k: v for k in ID_FIELDS if isinstance(v := body.get(k), str) and v.strip()}
    suppress = body.get("suppress", False)
    if not ids or set(body) - {*ID_FIELDS, "suppress"} or not isinstance(suppress, bool):
        return None
    return ids, suppress


def peer(request: web.Request) -> dict[str, int]:
    """Who is at the other end of the admin socket: ``{"uid", "pid"}`` (``SO_PEERCRED``);
    empty where the platform does not tell."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None or sock.family != socket.AF_UNIX:
        return {}
    try:
        pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size)
        )
    except OSError:
        return {}
    return {"uid": uid, "pid": pid}


def add_privacy_routes(admin: web.Application, main_app: web.Application) -> None:
    async def stores() -> tuple[Stores, IdentityStore | None]:
        fleet = main_app[FLEET]
        identity = None
        if fleet.identity is not None:
            identity = await fleet.identity.open(fleet.data_dir, writer=True)
        delivery = main_app[DELIVERY_LOOP]

        async def forget_cached() -> None:
            await delivery.call(fleet.forget_cached_events())

        return (
            Stores(
                identity=identity,
                warehouses=warehouses_of(main_app),
                spool=spool if isinstance(spool := main_app[SPOOL], SqliteSpool) else None,
                after_spool_erasure=forget_cached,
            ),
            identity,
        )

    async def handle(request: web.Request, action: str) -> web.Response:
        parsed = await _request(request)
        if parsed is None:
            return _json(
                {
                    "error": "bad_request",
                    "message": "expected a JSON object with one or more of "
                    + ", ".join(ID_FIELDS)
                    + ' (non-empty text), and "suppress" (true or false) for forget, and '
                    "nothing else",
                },
                400,
            )
        ids, suppress = parsed
        if not isinstance(main_app[SPOOL], SqliteSpool):
            # Refused whole rather than done in part: a person asked to be erased must not
            # be told so while their events still wait in the stream.
            return _json(
                {
                    "error": "not_supported",
                    "message": "erasure and access do not reach the jetstream spool yet; its "
                    "events leave the stream after spool.max_age_secs",
                },
                409,
            )
        fleet = main_app[FLEET]
        ref = salted_ref(privacy_salt(fleet.data_dir), ids)
        who = peer(request)
        found, identity = await stores()
        try:
            if action == "forget":
                subject, result = await forget(ids, found)
                if suppress:
                    result["suppression"] = {"added": main_app[SUPPRESSION].add(subject)}
                audit.info("erasure request", extra=audit_fields(ids, ref, who, result))
            else:
                result = await export(ids, found)
                sizes = {store: count_of(store, held) for store, held in result.items()}
                audit.info("access request", extra=audit_fields(ids, ref, who, sizes))
        except (
            IdentityStoreError,
            WarehouseError,
            SpoolUnavailable,
            CryptoError,
            OSError,
        ) as exc:
            audit.warning(
                "erasure request failed" if action == "forget" else "access request failed",
                extra=audit_fields(ids, ref, who, {"error": type(exc).__name__}),
            )
            return _json({"error": "store_failed", "message": str(exc)}, 503)
        finally:
            if identity is not None:
                await identity.close()
        return _json({"stores": result})

    async def forget_route(request: web.Request) -> web.Response:
        return await handle(request, "forget")

    async def export_route(request: web.Request) -> web.Response:
        return await handle(request, "export")

    async def report_route(request: web.Request) -> web.Response:
        # The configuration in effect: the one the relay started with, then each reload's.
        config = main_app[RELOADER].config if RELOADER in main_app else main_app[CONFIG]
        return _json(build_report(config, main_app[FLEET].data_dir))

    admin.router.add_get("/privacy/report", report_route)
    admin.router.add_post("/privacy/forget", forget_route)
    admin.router.add_post("/privacy/export", export_route)
