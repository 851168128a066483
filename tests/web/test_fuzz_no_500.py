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
    "/d",
    "/beacon/v1/batch",
]
BATCH_PATHS = ("/batch", "/b", "/d")


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
        rng.choice(
            [
                *FIELDS,
                "page",
                "url",
                "search",
                "campaign",
                "ip",
                "userAgent",
                "consent",
                "analytics",
                "ads",
                "categoryPreferences",
                "clickIds",
                "clientIds",
                "gpc",
                "cookieless",
                "ga4",
                "request",
            ]
        ): garbage(rng, depth + 1)
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
    client = await relay(
        server={"trusted_proxies": ["127.0.0.1/32"]},
        identity={"cookie_keeper": ["_ga", "_ga_*"]},
        google={"server_client_id": "FPID"},
        privacy={"truncate_ip": True},
    )
    rng = random.Random(20261129)
    for _ in range(400):
        path = rng.choice(PATHS)
        if path.endswith(BATCH_PATHS):
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
        if rng.random() < 0.3:
            headers["Cookie"] = rng.choice(COOKIES)
        if rng.random() < 0.1:
            body = {**body, "reset": True} if isinstance(body, dict) else body
        resp = await client.post(path, data=json.dumps(body), headers=headers)
        assert resp.status < 500, (path, body, await resp.text())
        payload = await resp.json()
        assert resp.status == 200 or set(payload) >= {"error", "message"}


COOKIES = [
    "tr_aid=abc; tr_clk=gclid%3DG; _fbc=fb.1.1.F; _fbp=fb.1.1.2",
    "tr_aid=; tr_clk=%%%; _ga=GA1; _ga_X=GS2.1.s$o$",
    "_ga=GA1.1.1.2; _ga_ABC=GS1.1.x.y; FPID=1.2",
    "FPID=garbage; tr_aid=" + "x" * 300,
    'weird="quoted"; ;;; =novalue',
]
HIT_PARTS = [
    "v=2",
    "v=1",
    "tid=G-FUZZ1",
    "tid=G-OTHER",
    "cid=1.2",
    "cid=",
    "en=page_view",
    "en=",
    "dl=https%3A%2F%2Fa.test%2F%3Fgclid%3DG",
    "dl=%ZZ",
    "gcs=G1",
    "gcs=G1xx",
    "gcd=13r3",
    "gcd=zzz",
    "sr=1x",
    "sr=axb",
    "pr1=idA~prX~qtY",
    "pr1=~~~",
    "epn.value=abc",
    "epn.value=1e999",
    "up.x=1",
    "uafvl=a%3B1%7Cb",
    "_et=-1",
    "npa=1",
    "sid=x",
    "sct=y",
]


async def test_random_ga4_hits_never_get_a_500(relay: Any) -> None:
    secret = "fuzz-secret"
    client = await relay(
        google={
            "collect": {"measurement_ids": ["G-FUZZ1"]},
            "measurement_protocol": [{"measurement_id": "G-FUZZ1", "api_secret": secret}],
            "server_client_id": "FPID",
        }
    )
    rng = random.Random(1129)
    statuses: list[int] = []
    for _ in range(300):
        query = "&".join(rng.sample(HIT_PARTS, rng.randrange(len(HIT_PARTS))))
        lines = "\n".join(
            "&".join(rng.sample(HIT_PARTS, rng.randrange(6))) for _ in range(rng.randrange(4))
        )
        headers = {"Cookie": rng.choice(COOKIES)} if rng.random() < 0.3 else {}
        if rng.random() < 0.5:
            resp = await client.get("/g/collect?" + query, headers=headers)
        else:
            resp = await client.post("/g/collect?" + query, data=lines, headers=headers)
        assert resp.status < 500, (query, lines, await resp.text())
        statuses.append(resp.status)
        if resp.status != 204:
            assert set(await resp.json()) >= {"error", "message"}

        body: Any = {
            "client_id": garbage(rng),
            "events": [
                {"name": garbage(rng), "params": garbage(rng)} for _ in range(rng.randrange(4))
            ],
        }
        if rng.random() < 0.5:
            body.update(
                {
                    k: garbage(rng)
                    for k in (
                        "user_id",
                        "timestamp_micros",
                        "consent",
                        "user_properties",
                        "user_data",
                    )
                }
            )
        mp = rng.choice(["/mp/collect", "/debug/mp/collect"])
        resp = await client.post(
            f"{mp}?measurement_id=G-FUZZ1&api_secret={secret}", data=json.dumps(body)
        )
        assert resp.status < 500, (mp, body, await resp.text())
        if resp.status != 204:
            payload = await resp.json()
            assert "validationMessages" in payload or set(payload) >= {"error", "message"}
    # the generator reaches both the accepting and the refusing paths
    assert 204 in statuses and 400 in statuses and 403 in statuses
