"""The admin API's dead letters, for ``tagrelay dlq`` while the relay runs (the spool is the
relay's: it writes dead letters and hands out the replays).

- ``GET /dead-letters?forwarder=&reason=&since_ms=&ids=1,2&after_id=&limit=``:
  ``{"dead_letters": [...], "more": bool}``, by id, without the events (``limit`` at most
  ``MAX_LIST_ROWS``; page on with ``after_id``, the last id given);
- ``GET /dead-letters/{id}``: ``{"dead_letter": {..., "payload": event}}``, or 404;
- ``POST /dead-letters/replay`` ``{"forwarder", "reason", "since_ms", "ids"}`` (at least
  one): ``{"replayed": [report per forwarder]}`` (``forwarders._replay``);
- ``POST /dead-letters/purge`` ``{"before_ms", "forwarder"}``: ``{"purged": n}``.

Details were scrubbed of secrets before they were stored; events carry personal data, which
is why the admin API is for the relay's own user (the socket) or behind its token.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tagrelay.appkeys import DELIVERY_LOOP, METRICS, SPOOL, WORKERS
from tagrelay.forwarders._replay import replay
from tagrelay.forwarders._worker import ForwarderWorker
from tagrelay.spool.dead_letters import Selection, describe
from tagrelay.web.ingest import encoded_json_response

MAX_LIST_ROWS = 10_000


def _json(body: Any, status: int = 200) -> web.Response:
    return encoded_json_response(status, orjson.dumps(body))


def _bad(message: str) -> web.Response:
    return _json({"error": "bad_request", "message": message}, 400)


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _selection(source: dict[str, Any]) -> Selection:
    """A selection from query parameters or a JSON body (``ids`` a list or "1,2,3")."""
    ids: tuple[int, ...] | None = None
    raw_ids = source.get("ids")
    if raw_ids is not None:
        items = raw_ids.split(",") if isinstance(raw_ids, str) else raw_ids
        if not isinstance(items, list):
            raise ValueError("ids must be a list of integers")
        ids = tuple(_int(i, "ids") for i in items if not (isinstance(i, str) and not i.strip()))
    for name in ("forwarder", "reason"):
        if source.get(name) is not None and not isinstance(source[name], str):
            raise ValueError(f"{name} must be a string")
    since = source.get("since_ms")
    before = source.get("before_ms")
    return Selection(
        forwarder=source.get("forwarder"),
        reason=source.get("reason"),
        since_ms=None if since is None else _int(since, "since_ms"),
        before_ms=None if before is None else _int(before, "before_ms"),
        ids=ids,
    )


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=orjson.loads)
    except ValueError:
        raise ValueError("expected a JSON object") from None
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body


def add_dlq_routes(admin: web.Application, main_app: web.Application) -> None:
    """The dead-letter routes of ``main_app`` on its admin application ``admin``."""

    async def list_dead_letters(request: web.Request) -> web.Response:
        query = dict(request.query)
        try:
            selection = _selection(query)
            after_id = _int(query.get("after_id", 0), "after_id")
            limit = _int(query.get("limit", 1000), "limit")
            if not 0 < limit <= MAX_LIST_ROWS:
                raise ValueError(f"limit must be between 1 and {MAX_LIST_ROWS}")
        except ValueError as exc:
            return _bad(str(exc))
        rows = await main_app[SPOOL].dead_letters(
            selection=selection, after_id=after_id, limit=limit + 1
        )
        return _json(
            {"dead_letters": [describe(row) for row in rows[:limit]], "more": len(rows) > limit}
        )

    async def show_dead_letter(request: web.Request) -> web.Response:
        try:
            dead_letter_id = _int(request.match_info["id"], "id")
        except ValueError as exc:
            return _bad(str(exc))
        row = await main_app[SPOOL].dead_letter_by_id(dead_letter_id)
        if row is None:
            return _json(
                {"error": "not_found", "message": f"no dead letter with id {dead_letter_id}"},
                404,
            )
        return _json({"dead_letter": describe(row, with_event=True)})

    async def replay_dead_letters(request: web.Request) -> web.Response:
        try:
            body = await _body(request)
            selection = _selection(body)
            if selection.before_ms is not None:
                raise ValueError("before_ms is for purge")
            if selection == Selection():
                raise ValueError("say which dead letters: forwarder, reason, since_ms or ids")
        except ValueError as exc:
            return _bad(str(exc))
        workers: dict[str, ForwarderWorker] = main_app[WORKERS]
        reports = await replay(
            main_app[SPOOL],
            workers,
            main_app[DELIVERY_LOOP],
            main_app[METRICS],
            selection,
        )
        return _json({"replayed": [report.as_json() for report in reports]})

    async def purge_dead_letters(request: web.Request) -> web.Response:
        try:
            body = await _body(request)
            selection = _selection(body)
            if selection.before_ms is None:
                raise ValueError("before_ms is required: dead letters older than it are purged")
        except ValueError as exc:
            return _bad(str(exc))
        purged = await main_app[SPOOL].purge_dead_letters(selection)
        return _json({"purged": purged})

    admin.router.add_get("/dead-letters", list_dead_letters)
    admin.router.add_post("/dead-letters/replay", replay_dead_letters)
    admin.router.add_post("/dead-letters/purge", purge_dead_letters)
    admin.router.add_get("/dead-letters/{id}", show_dead_letter)
