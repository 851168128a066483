"""keys[].hosts: a keyless request on a Jitsu browser route (or the relay's own events path)
takes the browser key that claims its host, as Jitsu maps a domain to its stream."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tagrelay.appkeys import SPOOL
from tests.support import BROWSER_KEY, SERVER_KEY, metric_value

KEYS = [
    {
        "id": "website",
        "kind": "browser",
        "key": BROWSER_KEY,
        "allowed_origins": ["https://www.shop.test"],
        "hosts": ["data.shop.test"],
    },
    {"id": "blog", "kind": "browser", "key": "blog-key", "hosts": ["data.blog.test"]},
    {"id": "backend", "kind": "server", "key": SERVER_KEY},
]
JSON = {"Content-Type": "application/json"}


async def spooled(client: Any) -> list[dict[str, Any]]:
    return [orjson.loads(r.payload) for r in await client.app[SPOOL].read(0, 100)]


@pytest.mark.parametrize(
    ("host", "key_id"),
    [
        ("data.shop.test", "website"),
        ("DATA.shop.test:8443", "website"),
        ("data.shop.test.", "website"),
        ("data.blog.test", "blog"),
    ],
)
async def test_a_keyless_jitsu_request_takes_the_key_of_its_host(
    relay: Any, host: str, key_id: str
) -> None:
    client = await relay(keys=KEYS)
    resp = await client.post(
        "/api/s/track",
        data=orjson.dumps({"event": "Purchase", "anonymousId": "a-1"}),
        headers={**JSON, "Host": host},
    )
    assert resp.status == 200, await resp.text()
    [event] = await spooled(client)
    assert event["context"]["writeKeyId"] == key_id
    assert event["context"]["source"] == "jitsu"


async def test_the_relay_script_path_takes_host_keys_too(relay: Any) -> None:
    client = await relay(keys=KEYS)
    body = {"batch": [{"type": "page", "anonymousId": "a-1", "messageId": "m-1"}]}
    resp = await client.post(
        "/d",
        data=orjson.dumps(body),
        headers={"Content-Type": "text/plain", "Host": "data.shop.test"},
    )
    assert resp.status == 200
    [event] = await spooled(client)
    assert event["context"]["writeKeyId"] == "website"


@pytest.mark.parametrize(
    "host",
    ["www.shop.test", "shop.test", "data.shop.test; x", "127.0.0.1", "evil.data.shop.test", ""],
)
async def test_a_keyless_request_to_another_host_is_still_401(relay: Any, host: str) -> None:
    client = await relay(keys=KEYS)
    resp = await client.post(
        "/api/s/track",
        data=orjson.dumps({"event": "Purchase", "anonymousId": "a-1"}),
        headers={**JSON, "Host": host},
    )
    assert resp.status == 401
    assert (await resp.json())["error"] == "missing_key"
    assert await spooled(client) == []


async def test_host_keys_apply_only_to_jitsu_browser_routes_and_the_script_path(
    relay: Any,
) -> None:
    client = await relay(keys=KEYS)
    track = orjson.dumps({"event": "E", "anonymousId": "a-1"})
    headers = {**JSON, "Host": "data.shop.test"}
    for path in ("/v1/track", "/api/s/s2s/track"):
        resp = await client.post(path, data=track, headers=headers)
        assert resp.status == 401, path
    assert await spooled(client) == []


async def test_a_presented_key_wins_over_the_host_and_an_unknown_one_is_not_replaced(
    relay: Any,
) -> None:
    client = await relay(keys=KEYS)
    track = orjson.dumps({"event": "E", "anonymousId": "a-1"})
    host = {**JSON, "Host": "data.shop.test"}
    blog = await client.post(
        "/api/s/track", data=track, headers={**host, "X-Write-Key": "blog-key"}
    )
    assert blog.status == 200
    unknown = await client.post("/api/s/track", data=track, headers={**host, "X-Write-Key": "nope"})
    assert unknown.status == 401
    assert [e["context"]["writeKeyId"] for e in await spooled(client)] == ["blog"]


async def test_the_host_key_keeps_its_allowed_origins(relay: Any) -> None:
    client = await relay(keys=KEYS)
    track = orjson.dumps({"event": "E", "anonymousId": "a-1"})
    allowed = await client.post(
        "/api/s/track",
        data=track,
        headers={**JSON, "Host": "data.shop.test", "Origin": "https://www.shop.test"},
    )
    assert allowed.status == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://www.shop.test"
    refused = await client.post(
        "/api/s/track",
        data=track,
        headers={**JSON, "Host": "data.shop.test", "Origin": "https://evil.test"},
    )
    assert refused.status == 403
    labels = {"key": "website"}
    assert metric_value(client.app, "tagrelay_cors_refused_total", labels) == 1
