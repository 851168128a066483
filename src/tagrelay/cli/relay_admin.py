"""What the commands that act on a relay's data share: asking the running relay through its
admin socket (``<data_dir>/admin.sock``), and, when none answers, opening the spool here
(``spool_for_writing`` holding its lock, so that no relay starts meanwhile)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tagrelay.datadir import open_private
from tagrelay.spool.segments import open_read_only
from tagrelay.spool.sqlite import lock_path


class NoRelay(Exception):
    """No relay listens on the admin socket."""


async def ask(
    sock: Path,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    timeout_secs: float | None = 120.0,
) -> dict[str, Any]:
    """The relay's answer to one admin request; raises ``NoRelay`` when none listens."""
    try:
        connector = aiohttp.UnixConnector(path=str(sock))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(
                method,
                "http://relay" + path,
                params=params,
                json=body,
                timeout=aiohttp.ClientTimeout(total=timeout_secs),
            ) as resp,
        ):
            answer: dict[str, Any] = await resp.json(loads=orjson.loads)
            return answer
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError):
        raise NoRelay from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        return {
            "error": "relay_disconnected",
            "message": "the relay closed the connection before it answered (is it stopping?)",
        }


class Failed(Exception):
    """An error to print (``error: <code>: <message>``), exit code 1."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def checked(answer: dict[str, Any]) -> dict[str, Any]:
    if "error" in answer:
        raise Failed(answer["error"], answer.get("message", ""))
    return answer


def open_spool(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise Failed("no_spool", f"no spool at {path} (has a relay run with this data directory?)")
    return open_read_only(path)


@contextlib.contextmanager
def spool_for_writing(path: Path) -> Iterator[sqlite3.Connection]:
    """The spool opened for writing, holding its lock: no relay starts meanwhile."""
    if not path.exists():
        raise Failed("no_spool", f"no spool at {path} (has a relay run with this data directory?)")
    with os.fdopen(open_private(lock_path(path), os.O_RDWR | os.O_APPEND), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise Failed(
                "spool_busy",
                "another process holds the spool, but no relay answers on its admin socket; "
                "try again once it has stopped",
            ) from None
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            yield conn
        finally:
            conn.close()
