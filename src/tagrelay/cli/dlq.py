"""``tagrelay dlq``: list, show, replay and purge the dead letters in the spool.

While ``tagrelay serve`` runs on the same data directory, every command goes through the
relay's admin socket (``<data_dir>/admin.sock``, ``web.admin_dlq``): the spool is the
relay's, and a replay is delivered by the relay's own forwarders. When no relay answers,
``list``, ``show`` and ``purge`` open the spool file here (on ``spool.type: jetstream``,
the dead letters' stream, through a connection of their own) (``purge`` holding the spool's
lock, so that no relay starts meanwhile); ``replay`` needs the relay.

Table output cuts long details to one short line (``show`` prints a dead letter in full);
details were scrubbed of secrets before they were stored. Dead letters sealed under
``encryption.keys`` are opened with the keys of the configuration given here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from tagrelay.app import admin_socket_path
from tagrelay.cli.relay_admin import Failed, NoRelay
from tagrelay.cli.relay_admin import ask as _ask
from tagrelay.cli.relay_admin import checked as _checked
from tagrelay.cli.relay_admin import open_spool as _open_spool
from tagrelay.cli.relay_admin import spool_for_writing as _spool_for_writing
from tagrelay.config.models import Config
from tagrelay.crypto import CryptoError
from tagrelay.errors import EncryptionKeyError
from tagrelay.spool import dead_letters
from tagrelay.spool.backend import jetstream_settings, spool_path
from tagrelay.spool.dead_letters import Selection, describe
from tagrelay.spool.encryption import PLAINTEXT, PayloadCipher

TABLE_DETAIL_CHARS = 60
"""A detail is cut to this in table output."""

LIST_PAGE = 10_000
"""Dead letters asked of the relay per request (the admin API's most)."""

LIST_COLUMNS = (
    "id",
    "forwarder",
    "dead_at",
    "reason",
    "attempts",
    "type",
    "event",
    "message_id",
    "detail",
)


def _selection(args: argparse.Namespace) -> Selection:
    ids = getattr(args, "ids", None)
    since = getattr(args, "since", None)
    return Selection(
        forwarder=getattr(args, "forwarder", None),
        reason=getattr(args, "reason", None),
        since_ms=None if since is None else int(since * 1000),
        ids=None if ids is None else tuple(i for group in ids for i in group),
    )


def _api_fields(selection: Selection) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "forwarder": selection.forwarder,
        "reason": selection.reason,
        "since_ms": selection.since_ms,
        "before_ms": selection.before_ms,
        "ids": None if selection.ids is None else list(selection.ids),
    }
    return {k: v for k, v in fields.items() if v is not None}


# -- list ------------------------------------------------------------------------------


async def _list_via_relay(sock: Path, selection: Selection, limit: int) -> tuple[list[Any], bool]:
    found: list[dict[str, Any]] = []
    after_id = 0
    while True:
        params = {k: str(v) for k, v in _api_fields(selection).items() if k != "ids"}
        if selection.ids is not None:
            params["ids"] = ",".join(map(str, selection.ids))
        params["after_id"] = str(after_id)
        params["limit"] = str(min(LIST_PAGE, limit - len(found)))
        answer = _checked(await _ask(sock, "GET", "/dead-letters", params=params))
        found.extend(answer["dead_letters"])
        if not answer["more"]:
            return found, False
        if len(found) >= limit:
            return found, True
        after_id = found[-1]["id"]


def _list_direct(
    path: Path, selection: Selection, limit: int, cipher: PayloadCipher = PLAINTEXT
) -> tuple[list[Any], bool]:
    with contextlib.closing(_open_spool(path)) as conn:
        rows = dead_letters.select(conn, selection, limit=limit + 1, cipher=cipher)
    return [describe(row) for row in rows[:limit]], len(rows) > limit


def _one_line(text: str, width: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def render_list(found: list[dict[str, Any]], fmt: str) -> str:
    from tagrelay.cli.sql import render

    if fmt == "json":
        return orjson.dumps(found, option=orjson.OPT_INDENT_2).decode()
    rows = [[item.get(column) for column in LIST_COLUMNS] for item in found]
    if fmt == "table":
        detail = LIST_COLUMNS.index("detail")
        for row in rows:
            row[detail] = _one_line(row[detail] or "", TABLE_DETAIL_CHARS)
    return render({"columns": list(LIST_COLUMNS), "rows": rows}, fmt)


# -- show ------------------------------------------------------------------------------


def render_show(item: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(item, option=orjson.OPT_INDENT_2).decode()
    lines = [
        f"id:         {item['id']}",
        f"forwarder:  {item['forwarder']}",
        f"seq:        {item['seq']}",
        f"dead at:    {item['dead_at']}",
        f"reason:     {item['reason']}",
        f"attempts:   {item['attempts']}",
        f"detail:     {item['detail']}",
        "event:",
        orjson.dumps(item["payload"], option=orjson.OPT_INDENT_2).decode(),
    ]
    return "\n".join(lines)


# -- replay ----------------------------------------------------------------------------


def render_replay(reports: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(reports, option=orjson.OPT_INDENT_2).decode()
    if not reports:
        return "no dead letters match"
    lines = []
    for r in reports:
        lines.append(
            f"{r['forwarder']}: {r['selected']} selected, {r['delivered']} delivered, "
            f"{r['dropped']} dropped, {r['failed']} failed again, {r['skipped']} skipped"
        )
        for failure in r["failures"]:
            lines.append(
                f"  failed again: {failure['reason']} ({failure['events']}): "
                + _one_line(failure["detail"], 200)
            )
        for why, count in r["skips"].items():
            lines.append(f"  skipped: {why} ({count}): {SKIP_REASONS.get(why, why)}")
    return "\n".join(lines)


SKIP_REASONS = {
    "not_running": "the forwarder is not running (not configured, or disabled)",
    "filtered": "the forwarder's filter or consent rule leaves them out now",
    "not_tried": "the destination asked to retry later; replay again then",
}


# -- the command -----------------------------------------------------------------------


def run_dlq(config: Config, args: argparse.Namespace) -> int:
    data_dir = args.data_dir or config.data_dir
    cipher = PayloadCipher(config.encryption.keyring())
    jetstream = jetstream_settings(config) if config.spool.type == "jetstream" else None
    try:
        return _run(args, admin_socket_path(data_dir), spool_path(data_dir), cipher, jetstream)
    except Failed as exc:
        print(f"error: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except (CryptoError, EncryptionKeyError) as exc:
        print(f"error: encryption: {exc}", file=sys.stderr)
        return 1


async def _on_stream(settings: Any, cipher: PayloadCipher, use: Any) -> Any:
    """``use(store)`` on the JetStream dead letters' stream, with a connection of its own
    (``tagrelay dlq`` without a relay, on ``spool.type: jetstream``)."""
    from tagrelay.spool.jetstream import JetStreamDeadLetters

    store = JetStreamDeadLetters.standalone(settings, cipher)
    try:
        return await use(store)
    finally:
        await store.close()


def _run(
    args: argparse.Namespace,
    sock: Path,
    spool: Path,
    cipher: PayloadCipher = PLAINTEXT,
    jetstream: Any = None,
) -> int:
    command = args.dlq_command
    if command == "list":
        if args.limit < 1:
            raise Failed("bad_request", "--limit must be at least 1")
        selection = _selection(args)
        try:
            found, more = asyncio.run(_list_via_relay(sock, selection, args.limit))
        except NoRelay:
            if jetstream is None:
                found, more = _list_direct(spool, selection, args.limit, cipher)
            else:
                rows = asyncio.run(
                    _on_stream(
                        jetstream, cipher, lambda s: s.select(selection, limit=args.limit + 1)
                    )
                )
                found, more = [describe(row) for row in rows[: args.limit]], len(rows) > args.limit
        print(render_list(found, args.format))
        if more:
            print(
                f"(the first {args.limit}; use --limit, or narrow the selection)",
                file=sys.stderr,
            )
        return 0
    if command == "show":
        try:
            answer = _checked(asyncio.run(_ask(sock, "GET", f"/dead-letters/{args.id}")))
            item = answer["dead_letter"]
        except NoRelay:
            if jetstream is None:
                with contextlib.closing(_open_spool(spool)) as conn:
                    row = dead_letters.get(conn, args.id, cipher=cipher)
            else:
                row = asyncio.run(_on_stream(jetstream, cipher, lambda s: s.get(args.id)))
            if row is None:
                raise Failed("not_found", f"no dead letter with id {args.id}") from None
            item = describe(row, with_event=True)
        print(render_show(item, args.format))
        return 0
    if command == "replay":
        selection = _selection(args)
        if selection == Selection():
            raise Failed(
                "bad_request", "say which dead letters: --forwarder, --reason, --since or --ids"
            )
        try:
            answer = _checked(
                asyncio.run(
                    _ask(
                        sock,
                        "POST",
                        "/dead-letters/replay",
                        body=_api_fields(selection),
                        timeout_secs=None,  # as long as the deliveries take
                    )
                )
            )
        except NoRelay:
            raise Failed(
                "no_relay",
                f"no relay answers on {sock}: a replay is delivered by the running relay "
                "(tagrelay serve)",
            ) from None
        reports = answer["replayed"]
        print(render_replay(reports, args.format))
        return 0 if all(r["failed"] == r["skipped"] == 0 for r in reports) else 1
    # purge
    before_ms = int((time.time() - args.older_than) * 1000)
    selection = Selection(forwarder=args.forwarder, before_ms=before_ms)
    try:
        answer = _checked(
            asyncio.run(_ask(sock, "POST", "/dead-letters/purge", body=_api_fields(selection)))
        )
        purged = int(answer["purged"])
    except NoRelay:
        if jetstream is None:
            with _spool_for_writing(spool) as conn:
                purged = dead_letters.purge(conn, selection)
        else:
            purged = asyncio.run(_on_stream(jetstream, cipher, lambda s: s.purge(selection)))
    print(f"purged {purged} dead letter{'s' if purged != 1 else ''}")
    return 0
