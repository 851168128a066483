"""The admin API's erasure and access requests on the identity store, for ``tagrelay
forget`` and ``tagrelay export`` (``cli.privacy``)::

    POST /privacy/forget  {"user_id": U} | {"anonymous_id": A} | {"email": E}  (one or more)
        -> {"stores": {"identity_store": {"persons": n, "ids": m}}}
    POST /privacy/export  the same body
        -> {"stores": {"identity_store": {"persons": [person, ...]}}}

Each request writes one audit line (logger ``tagrelay.audit``): what was asked (which kinds
of id, never their values) and how many rows each store gave or deleted. 400 for a body
without an id, 404 when the identity store is off. The other stores (spool, dead letters,
warehouse) are not searched yet.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from tagrelay.appkeys import FLEET
from tagrelay.identity_store import IdentityStore
from tagrelay.web.ingest import encoded_json_response

audit = logging.getLogger("tagrelay.audit")

ID_FIELDS = ("user_id", "anonymous_id", "email")


def _json(body: Any, status: int = 200) -> web.Response:
    return encoded_json_response(status, orjson.dumps(body))


async def _ids(request: web.Request) -> dict[str, str] | None:
    try:
        body = await request.json(loads=orjson.loads)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    ids = {k: v for k in ID_FIELDS if isinstance(v := body.get(k), str) and v.strip()}
    if not ids or set(body) - set(ID_FIELDS):
        return None
    return ids


def add_privacy_routes(admin: web.Application, main_app: web.Application) -> None:
    async def store_or_error(
        request: web.Request,
    ) -> tuple[IdentityStore, dict[str, str]] | web.Response:
        ids = await _ids(request)
        if ids is None:
            return _json(
                {
                    "error": "bad_request",
                    "message": "expected a JSON object with one or more of "
                    + ", ".join(ID_FIELDS)
                    + " (non-empty text) and nothing else",
                },
                400,
            )
        fleet = main_app[FLEET]
        if fleet.identity is None:
            return _json(
                {"error": "no_identity_store", "message": "identity_store.enabled is false"}, 404
            )
        store = await fleet.identity.open(fleet.data_dir, writer=True)
        return store, ids

    async def forget(request: web.Request) -> web.Response:
        found = await store_or_error(request)
        if isinstance(found, web.Response):
            return found
        store, ids = found
        try:
            counts = await store.forget(**ids)
        finally:
            await store.close()
        audit.info(
            "erasure request",
            extra={"by": ", ".join(sorted(ids)), "identity_store": counts.as_dict()},
        )
        return _json({"stores": {"identity_store": counts.as_dict()}})

    async def export(request: web.Request) -> web.Response:
        found = await store_or_error(request)
        if isinstance(found, web.Response):
            return found
        store, ids = found
        try:
            exported = await store.export(**ids)
        finally:
            await store.close()
        audit.info(
            "access request",
            extra={
                "by": ", ".join(sorted(ids)),
                "identity_store": {"persons": len(exported["persons"])},
            },
        )
        return _json({"stores": {"identity_store": exported}})

    admin.router.add_post("/privacy/forget", forget)
    admin.router.add_post("/privacy/export", export)
