"""The admin API's erasure and access routes refuse a body without an id (a 400 that says
what is expected: an empty body must never match, let alone erase, anyone), and answer 404
while the identity store is off."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestClient

from tagrelay.web.admin import build_admin_app


async def admin_of(relay: Any, aiohttp_client: Callable[..., Any], **config: Any) -> TestClient:
    main = await relay(**config)
    client: TestClient = await aiohttp_client(build_admin_app(main.app))
    return client


BODIES_WITHOUT_AN_ID = [
    b"",
    b"[]",
    b"{}",
    b'{"user_id": ""}',
    b'{"user_id": 42}',
    b'{"user_id": "u", "name": "x"}',
]


async def test_a_body_without_an_id_is_refused(
    relay: Any, aiohttp_client: Callable[..., Any]
) -> None:
    admin = await admin_of(relay, aiohttp_client, identity_store={"enabled": True})
    for path in ("/privacy/forget", "/privacy/export"):
        for body in BODIES_WITHOUT_AN_ID:
            resp = await admin.post(path, data=body)
            assert resp.status == 400, (path, body)
            answer = await resp.json()
            assert answer["error"] == "bad_request"
            assert "user_id, anonymous_id, email" in answer["message"]


async def test_without_the_store_the_routes_say_so(
    relay: Any, aiohttp_client: Callable[..., Any]
) -> None:
    admin = await admin_of(relay, aiohttp_client)
    resp = await admin.post("/privacy/forget", json={"user_id": "u"})
    assert resp.status == 404
    assert (await resp.json())["error"] == "no_identity_store"


async def test_an_unknown_person_is_nothing_to_forget(
    relay: Any, aiohttp_client: Callable[..., Any]
) -> None:
    admin = await admin_of(relay, aiohttp_client, identity_store={"enabled": True})
    resp = await admin.post("/privacy/forget", json={"email": "nobody@example.com"})
    assert resp.status == 200
    assert await resp.json() == {"stores": {"identity_store": {"persons": 0, "ids": 0}}}
