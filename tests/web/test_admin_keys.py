"""``POST /keys/rotate`` on the admin socket (``tagrelay keys rotate`` while the relay runs):
409 without keys, otherwise the rotation's counts, and never a key in the answer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tagrelay.app import admin_socket_path, create_app
from tagrelay.cli.relay_admin import ask
from tagrelay.crypto import generate_key
from tests.support import SERVER_KEY, basic, make_config


async def test_rotate_without_keys_is_a_409(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    await aiohttp_client(create_app(make_config(tmp_path)))
    answer = await ask(admin_socket_path(tmp_path), "POST", "/keys/rotate")
    assert answer["error"] == "no_keys"


async def test_rotate_answers_counts_only(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    key = generate_key()
    client = await aiohttp_client(create_app(make_config(tmp_path, encryption={"keys": [key]})))
    resp = await client.post(
        "/v1/track", json={"event": "x", "userId": "u"}, headers=basic(SERVER_KEY)
    )
    assert resp.status == 200
    answer = await ask(admin_socket_path(tmp_path), "POST", "/keys/rotate")
    assert answer == {"reencrypted": {"spool": 0, "dead_letters": 0}, "left": {}}
