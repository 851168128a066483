"""The admin API's dead-letter routes refuse what they cannot act on with a 400 that says
why, instead of replaying or purging more than was asked (``tagrelay dlq`` checks its
arguments too, but the API is also for other clients)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tagrelay.web.admin import build_admin_app


@pytest.fixture
async def admin(relay: Any, aiohttp_client: Callable[..., Any]) -> TestClient:
    main = await relay()
    client: TestClient = await aiohttp_client(build_admin_app(main.app))
    return client


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("GET", "/dead-letters?ids=1,x", None, "ids must be an integer, got 'x'"),
        ("GET", "/dead-letters?limit=0", None, "limit must be between 1 and 10000"),
        ("GET", "/dead-letters?since_ms=soon", None, "since_ms must be an integer"),
        ("GET", "/dead-letters/abc", None, "id must be an integer"),
        ("POST", "/dead-letters/replay", {}, "say which dead letters"),
        ("POST", "/dead-letters/replay", {"ids": {"id": 1}}, "ids must be a list"),
        ("POST", "/dead-letters/replay", {"before_ms": 1}, "before_ms is for purge"),
        ("POST", "/dead-letters/replay", [1], "expected a JSON object"),
        ("POST", "/dead-letters/purge", {"forwarder": "hook"}, "before_ms is required"),
        ("POST", "/dead-letters/purge", {"before_ms": 1, "reason": 4}, "reason must be a str"),
    ],
)
async def test_a_request_it_cannot_act_on_is_refused(
    admin: TestClient, method: str, path: str, body: Any, message: str
) -> None:
    resp = await admin.request(method, path, json=body)
    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"] == "bad_request" and message in answer["message"]


async def test_an_empty_spool_lists_nothing_and_purges_nothing(admin: TestClient) -> None:
    resp = await admin.get("/dead-letters")
    assert await resp.json() == {"dead_letters": [], "more": False}
    resp = await admin.post("/dead-letters/purge", json={"before_ms": 2**40})
    assert await resp.json() == {"purged": 0}
    resp = await admin.get("/dead-letters/1")
    assert resp.status == 404
    resp = await admin.post("/dead-letters/replay", json={"forwarder": "hook"})
    assert await resp.json() == {"replayed": []}
