"""``tagrelay keys``: ``generate`` prints a new key for ``encryption.keys``; ``rotate``
re-encrypts the spool and the dead letters under the first configured key.

Rotating keys, step by step (README, "Encryption at rest"): generate a key, put it first in
``encryption.keys`` and keep the old one after it, restart the relay (new events are then
sealed under the new key, old ones stay readable), run ``tagrelay keys rotate``, and once
it reports nothing left (``tagrelay_encryption_backlog_events`` at 0), remove the old key
and restart again.

While ``tagrelay serve`` runs on the same data directory, ``rotate`` goes through the
relay's admin socket (``web.admin_keys``): the relay re-encrypts in the background, one
small transaction at a time, while it goes on ingesting. When no relay answers, the command
does it itself, holding the spool's lock (``spool.rotation.rotate_offline``). It prints
counts only, never a key or data.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from tagrelay.app import admin_socket_path
from tagrelay.cli.relay_admin import Failed, NoRelay, ask, checked, spool_for_writing
from tagrelay.config.models import Config
from tagrelay.crypto import CryptoError, generate_key
from tagrelay.errors import EncryptionKeyError
from tagrelay.spool.backend import spool_path
from tagrelay.spool.encryption import PayloadCipher, check_keys, stored_key_ids
from tagrelay.spool.rotation import rotate_offline


def render(answer: dict[str, Any], fmt: str, via: str) -> str:
    if fmt == "json":
        return orjson.dumps({**answer, "via": via}, option=orjson.OPT_INDENT_2).decode()
    done = answer["reencrypted"]
    lines = [
        f"re-encrypted under the first key ({via}): {done['spool']} spooled events, "
        f"{done['dead_letters']} dead letters"
    ]
    left = answer["left"]
    if left:
        lines.append(
            "left (unreadable?): " + ", ".join(f"{name} {n}" for name, n in sorted(left.items()))
        )
    else:
        lines.append("nothing is left under an older key or in plaintext")
    return "\n".join(lines)


def run_keys(config: Config | None, args: argparse.Namespace) -> int:
    if args.keys_command == "generate":
        print(generate_key())
        return 0
    assert config is not None
    data_dir = args.data_dir or config.data_dir
    try:
        answer, via = rotate(config, admin_socket_path(data_dir), spool_path(data_dir))
    except Failed as exc:
        print(f"error: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except (CryptoError, EncryptionKeyError) as exc:
        print(f"error: encryption: {exc}", file=sys.stderr)
        return 1
    print(render(answer, args.format, via))
    return 0 if not answer["left"] else 1


def rotate(config: Config, sock: Path, spool: Path) -> tuple[dict[str, Any], str]:
    """Have the running relay rotate, or rotate here: the report, and which did it."""
    try:
        answer = checked(asyncio.run(ask(sock, "POST", "/keys/rotate", timeout_secs=None)))
        return answer, "the running relay"
    except NoRelay:
        pass
    cipher = PayloadCipher(config.encryption.keyring())
    if not cipher.enabled:
        raise Failed("no_keys", "encryption.keys is empty: there is no key to rotate to")
    with spool_for_writing(spool) as conn:
        check_keys(stored_key_ids(conn), cipher, str(spool))
        report = rotate_offline(conn, cipher)
    return report.as_json(), "this command, no relay running"
