"""The serving process freezes its start-up objects out of the garbage collector's walk."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tagrelay.app import create_app, freeze_after_startup
from tests.support import SERVER_KEY, basic, make_config


async def test_objects_alive_at_startup_are_frozen_and_the_relay_still_serves(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    gc.unfreeze()
    app = create_app(make_config(tmp_path), admin_socket=False)
    freeze_after_startup(app)
    try:
        client = await aiohttp_client(app)
        # The app, its routes and its services are in the permanent generation: a full
        # collection no longer walks them.
        frozen = gc.get_freeze_count()
        assert frozen > 10_000
        assert not any(obj is app for obj in gc.get_objects())
        resp = await client.post(
            "/v1/track", json={"event": "Signed Up", "userId": "u1"}, headers=basic(SERVER_KEY)
        )
        assert resp.status == 200
        assert await resp.json() == {"success": True}
    finally:
        gc.unfreeze()
