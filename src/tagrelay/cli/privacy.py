"""``tagrelay forget`` and ``tagrelay export``: an erasure or access request for one person.

``forget --user-id U | --anonymous-id A | --email E`` deletes the person those ids lead to
from the identity store, every linked id with them, and prints how many rows each store
deleted; ``export`` prints, as JSON, everything the identity store holds about them (their
ids, data, click and browser ids, and when each was seen). The spool, the dead letters and
the warehouse are not searched yet.

While ``tagrelay serve`` runs on the same data directory, the request goes through its admin
socket (``POST /privacy/forget``, ``/privacy/export``: ``web.admin_identity``), which writes
the audit line; when no relay answers, the store is opened here, with the configuration's
``encryption.keys``, and the audit line goes to stderr. Exit status: 0 done (also when
nothing was found), 1 the identity store is off or cannot be opened.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tagrelay.app import admin_socket_path, identity_settings
from tagrelay.cli.logs import setup_logging
from tagrelay.config.models import Config
from tagrelay.errors import IdentityStoreError

audit = logging.getLogger("tagrelay.audit")


class NoRelay(Exception):
    """No relay listens on the admin socket."""


async def _ask(sock: Path, action: str, ids: dict[str, str]) -> tuple[int, dict[str, Any]]:
    try:
        connector = aiohttp.UnixConnector(path=str(sock))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(
                f"http://relay/privacy/{action}",
                data=orjson.dumps(ids),
                timeout=aiohttp.ClientTimeout(total=300),
            ) as resp,
        ):
            answer: dict[str, Any] = await resp.json(loads=orjson.loads)
            return resp.status, answer
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError):
        raise NoRelay from None


async def _here(config: Config, data_dir: Path, action: str, ids: dict[str, str]) -> Any:
    settings = identity_settings(config)
    if settings is None:
        raise IdentityStoreError("identity_store.enabled is false")
    if not (data_dir / "identity.db").exists():
        return {"persons": 0, "ids": 0} if action == "forget" else {"persons": []}
    store = await settings.open(data_dir, writer=True)
    try:
        if action == "forget":
            counts = await store.forget(**ids)
            audit.info(
                "erasure request",
                extra={"by": ", ".join(sorted(ids)), "identity_store": counts.as_dict()},
            )
            return counts.as_dict()
        exported = await store.export(**ids)
        audit.info(
            "access request",
            extra={
                "by": ", ".join(sorted(ids)),
                "identity_store": {"persons": len(exported["persons"])},
            },
        )
        return exported
    finally:
        await store.close()


def run_privacy(config: Config, data_dir: Path | None, action: str, ids: dict[str, str]) -> int:
    """``tagrelay forget`` (``action`` forget) or ``export``; prints the result as JSON."""
    data_dir = data_dir or config.data_dir
    try:
        status, answer = asyncio.run(_ask(admin_socket_path(data_dir), action, ids))
    except NoRelay:
        setup_logging(config.logging.level, config.logging.format)
        try:
            result = asyncio.run(_here(config, data_dir, action, ids))
        except IdentityStoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        answer, status = {"stores": {"identity_store": result}}, 200
    if status != 200:
        print(f"error: {answer.get('error')}: {answer.get('message')}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
