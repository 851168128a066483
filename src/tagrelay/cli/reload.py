"""``tagrelay reload``: have the running relay read its configuration file again, as SIGHUP
does, and print what it did (``tagrelay.reload``).

The request goes through the relay's admin socket (``<data_dir>/admin.sock``, ``POST
/reload``); the relay reads the file it was started with, not one named here (``--config``
only says where the data directory is). Exit status: 0 when the configuration was applied
or nothing had changed, 1 when the relay refused it (invalid) or could not apply all of it,
or when no relay answers.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from tagrelay.app import admin_socket_path
from tagrelay.config.loader import format_config_error
from tagrelay.config.models import Config
from tagrelay.errors import ConfigError

RELOAD_TIMEOUT_SECS = 300.0
"""A reload waits for the batches in flight of the forwarders it stops: this long at most
(``server.shutdown_timeout_secs`` each, in parallel, is what the relay gives them)."""


async def _ask(sock: Path) -> dict[str, Any] | None:
    """The relay's answer, or None when no relay listens on ``sock``."""
    try:
        connector = aiohttp.UnixConnector(path=str(sock))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(
                "http://relay/reload", timeout=aiohttp.ClientTimeout(total=RELOAD_TIMEOUT_SECS)
            ) as resp,
        ):
            answer: dict[str, Any] = await resp.json(loads=orjson.loads)
            return answer
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError):
        return None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        return {
            "outcome": "failed",
            "problems": ["the relay closed the connection before it answered (is it stopping?)"],
        }


def render(answer: dict[str, Any]) -> str:
    """The relay's answer for a terminal."""
    source = answer.get("config_file") or "the configuration"
    outcome = answer.get("outcome", "failed")
    lines: list[str] = []
    if outcome == "invalid":
        lines.append(f"{source}: not reloaded; the relay runs on as it was:")
    elif outcome == "unchanged":
        lines.append(f"{source}: reloaded; nothing to apply")
    elif outcome == "applied":
        lines.append(f"{source}: reloaded and applied")
    else:
        lines.append(f"{source}: reloaded, but not all of it could be applied:")
    lines += [f"  {problem}" for problem in answer.get("problems", [])]
    if answer.get("changed"):
        lines.append("  changed: " + ", ".join(answer["changed"]))
    for what in ("forwarders", "keys"):
        for kind, ids in (answer.get(what) or {}).items():
            if ids:
                lines.append(f"  {what} {kind}: " + ", ".join(ids))
    if answer.get("needs_restart"):
        lines.append(
            "  changed, but take effect only after a restart: " + ", ".join(answer["needs_restart"])
        )
    return "\n".join(lines)


def data_dir_of(config_file: Path) -> Path | None:
    """The data directory a configuration file names, read leniently (the file may be
    invalid otherwise); None when it cannot be told (a ``${VAR}`` in it, say)."""
    try:
        raw = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    value = raw.get("data_dir", str(Config.model_fields["data_dir"].default))
    if not isinstance(value, str) or "${" in value:
        return None
    return Path(value)


def reload_invalid(config_file: Path, data_dir: Path | None, fmt: str, error: ConfigError) -> int:
    """``tagrelay reload`` with a file that does not load here: the relay is asked all the
    same (it logs and counts the refusal, and answers with the problems), if its data
    directory can be told; else the problems are printed."""
    data_dir = data_dir or data_dir_of(config_file)
    if data_dir is not None:
        return run_reload(data_dir, fmt)
    print(format_config_error(error), file=sys.stderr)
    print(
        "the relay was not asked to reload: its data directory could not be read from the "
        "file (--data-dir names it)",
        file=sys.stderr,
    )
    return 1


def run_reload(data_dir: Path, fmt: str = "text") -> int:
    sock = admin_socket_path(data_dir)
    answer = asyncio.run(_ask(sock))
    if answer is None:
        print(
            f"error: no_relay: no relay answers on {sock} (is tagrelay serve running with "
            "this data directory?)",
            file=sys.stderr,
        )
        return 1
    if fmt == "json":
        print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(answer))
    return 0 if answer.get("outcome") in ("applied", "unchanged") else 1
