"""Random garbage in every field of every ingest endpoint: the answer is always 200 or a
4xx with a JSON reason, never a 500 (a seeded generator, so a failure reproduces)."""

from __future__ import annotations

import json
import random
from typing import Any

from tests.support import BROWSER_KEY, SERVER_KEY, basic

FIELDS = [
    "type",
    "event",
    "messageId",
    "anonymousId",
    "userId",
    "groupId",
    "previousId",
    "properties",
    "traits",
    "context",
    "integrations",
    "timestamp",
    "sentAt",
    "originalTimestamp",
    "writeKey",
    "name",
]
PATHS = [
    "/v1/track",
    "/v1/page",
    "/v1/identify",
    "/v1/batch",
    "/v1/t",
    "/v1/b",
    "/api/s/track",
    "/api/s/p",
    "/api/s/s2s/identify",
    "/api/s/nope",
]


def garbage(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12 if depth < 4 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 2**63 - 1, -(2**63), 1.5, -0.0, 1e308])
    if choice == 3:
        return rng.choice(
            [
                "",
                "x",
                "track",
                "page",
                "2026-11-29T10:00:00Z",
                "0001-01-01T00:00:00Z",
                "9999-12-31T23:59:59+14:00",
                "\u0000",
                "é" * 50,
                "utm_source=a&x",
                "https://a.test/?utm_source=%ZZ&utm_medium=%E2%82%AC",
            ]
        )
    if choice in (4, 5):
        return rng.choice([1_795_000_000, 1_795_000_000_000, 10**20, -5])
    if choice in (6, 7):
        return "".join(rng.choice("abc/?&=%:{}[] ") for _ in range(rng.randrange(20)))
    if choice in (8, 9):
        return [garbage(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice([*FIELDS, "page", "url", "search", "campaign", "ip", "userAgent"]): garbage(
            rng, depth + 1
        )
        for _ in range(rng.randrange(5))
    }


def random_event(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return garbage(rng)
    event = {f: garbage(rng) for f in rng.sample(FIELDS, rng.randrange(len(FIELDS)))}
    if rng.random() < 0.5:
        event.update(
            {"type": rng.choice(["track", "page", "identify"]), "event": "E", "anonymousId": "a"}
        )
    return event


async def test_random_input_never_gets_a_500(relay: Any) -> None:
    client = await relay(server={"trusted_proxies": ["127.0.0.1/32"]})
    rng = random.Random(20261129)
    for _ in range(400):
        path = rng.choice(PATHS)
        if path.endswith(("/batch", "/b")):
            body: Any = {
                "batch": [random_event(rng) for _ in range(rng.randrange(5))],
                "sentAt": garbage(rng),
                "context": garbage(rng),
            }
        else:
            body = random_event(rng)
        headers = {
            **basic(rng.choice([SERVER_KEY, BROWSER_KEY])),
            "Content-Type": rng.choice(["application/json", "text/plain"]),
        }
        if rng.random() < 0.3:
            headers["Origin"] = rng.choice(["https://www.shop.test", "https://evil.test", "null"])
        if rng.random() < 0.2:
            headers["X-Forwarded-For"] = rng.choice(["1.2.3.4", "garbage, 5.6.7.8", "::1", ""])
        resp = await client.post(path, data=json.dumps(body), headers=headers)
        assert resp.status < 500, (path, body, await resp.text())
        payload = await resp.json()
        assert resp.status == 200 or set(payload) >= {"error", "message"}
