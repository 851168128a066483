"""Ingest over real HTTP into the real spool: the Segment and Jitsu endpoints."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import orjson
import pytest

from tagrelay.appkeys import INGEST, SPOOL
from tests.support import BROWSER_KEY, SERVER_KEY, basic, metric_value


async def spooled(client: Any) -> list[dict[str, Any]]:
    rows = await client.app[SPOOL].read(0, 10_000)
    return [orjson.loads(r.payload) for r in rows]


def track(**extra: Any) -> dict[str, Any]:
    event = {"event": "Signed Up", "anonymousId": "anon-1", "properties": {"plan": "pro"}}
    event.update(extra)
    return event


async def test_track_is_acknowledged_only_after_it_is_in_the_spool(relay: Any) -> None:
    client = await relay()
    resp = await client.post("/v1/track", json=track(messageId="m-1"), headers=basic(SERVER_KEY))
    assert resp.status == 200
    assert await resp.json() == {"success": True}
    [event] = await spooled(client)
    assert event["type"] == "track"
    assert event["event"] == "Signed Up"
    assert event["messageId"] == "m-1"
    assert event["context"]["source"] == "segment"
    assert event["context"]["writeKeyId"] == "backend"
    assert event["receivedAt"].endswith("Z")


async def test_each_group_commit_is_timed(relay: Any) -> None:
    client = await relay()
    for i in range(3):
        resp = await client.post(
            "/v1/track", json=track(messageId=f"m-{i}"), headers=basic(SERVER_KEY)
        )
        assert resp.status == 200
    commits = metric_value(client.app, "tagrelay_spool_commits_total", {})
    timed = metric_value(client.app, "tagrelay_spool_commit_duration_seconds_count", {})
    assert commits >= 1 and timed == commits
    assert metric_value(client.app, "tagrelay_spool_commit_duration_seconds_sum", {}) > 0


async def test_the_events_are_freed_before_the_commit_is_awaited(
    relay: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once serialized, a request's decoded events are released before it waits for its
    commit, while their memory is still hot (bench/README.md: ~15% of a batch's time)."""
    client = await relay()
    service = client.app[INGEST]
    spool = client.app[SPOOL]
    decoded: list[Any] = []
    alive_at_commit: list[int] = []
    decode, append = service._decode, spool.append

    async def recording_decode(*args: Any) -> Any:
        decoded.append(await decode(*args))
        return decoded[-1]

    async def checking_append(*args: Any) -> int:
        alive_at_commit.append(len(decoded[-1].events))
        return await append(*args)

    monkeypatch.setattr(service, "_decode", recording_decode)
    monkeypatch.setattr(spool, "append", checking_append)
    batch = {"batch": [track(type="track", messageId=f"m-{i}") for i in range(5)]}
    resp = await client.post("/v1/batch", json=batch, headers=basic(SERVER_KEY))
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 5
    assert alive_at_commit == [0]


async def test_one_letter_paths_set_the_type(relay: Any) -> None:
    client = await relay()
    for path, expected in [
        ("p", "page"),
        ("i", "identify"),
        ("t", "track"),
        ("s", "screen"),
        ("g", "group"),
        ("a", "alias"),
    ]:
        body = track() if expected == "track" else {"anonymousId": "a", "type": "whatever"}
        resp = await client.post(
            f"/v1/{path}",
            data=orjson.dumps(body),
            headers={**basic(SERVER_KEY), "Content-Type": "text/plain"},
        )
        assert resp.status == 200, await resp.text()
    types = [e["type"] for e in await spooled(client)]
    assert types == ["page", "identify", "track", "screen", "group", "alias"]


async def test_known_types_have_plain_routes_and_unknown_ones_still_get_json_errors(
    relay: Any,
) -> None:
    """Each known type is a route of its own (no pattern to match per request); its path
    is the metrics' route label. Unknown types and wrong methods answer as before."""
    client = await relay()
    auth = basic(SERVER_KEY)
    for path in ("/v1/track", "/v1/b", "/api/s/s2s/t", "/api/s/page"):
        body = {"batch": [track(type="track")]} if path == "/v1/b" else track()
        resp = await client.post(path, json=body, headers=auth)
        assert resp.status == 200, (path, await resp.text())
        labels = {"route": path, "method": "POST", "status_class": "2xx"}
        assert metric_value(client.app, "tagrelay_http_request_duration_seconds_count", labels)

    resp = await client.post("/v1/bogus", json=track(), headers=auth)
    assert (resp.status, (await resp.json())["error"]) == (404, "unknown_endpoint")
    resp = await client.get("/v1/track")
    assert (resp.status, (await resp.json())["error"]) == (405, "method_not_allowed")
    resp = await client.post("/api/s/s2s/bogus", json=track(), headers=auth)
    assert (resp.status, (await resp.json())["error"]) == (400, "unknown_type")
    resp = await client.post("/api/s/bogus", json=track(), headers=auth)
    assert (resp.status, (await resp.json())["error"]) == (400, "unknown_type")


async def test_write_key_in_body_or_header(relay: Any) -> None:
    client = await relay()
    r1 = await client.post("/v1/track", json={**track(), "writeKey": SERVER_KEY})
    r2 = await client.post("/v1/track", json=track(), headers={"X-Write-Key": SERVER_KEY})
    assert (r1.status, r2.status) == (200, 200)
    events = await spooled(client)
    assert len(events) == 2
    assert all("writeKey" not in e for e in events), "the key must never be stored"


async def test_missing_and_unknown_keys_are_401_json(relay: Any) -> None:
    client = await relay()
    r1 = await client.post("/v1/track", json=track())
    assert r1.status == 401
    assert (await r1.json())["error"] == "missing_key"
    r2 = await client.post("/v1/track", json=track(), headers=basic("nope"))
    assert r2.status == 401
    body = await r2.json()
    assert body["error"] == "unknown_key"
    assert "nope" not in body["message"]
    assert await spooled(client) == []
    assert (
        metric_value(
            client.app,
            "tagrelay_events_rejected_total",
            {"source": "segment", "reason": "unknown_key"},
        )
        == 1
    )


async def test_batch_keeps_valid_events_and_reports_invalid_ones_by_index(relay: Any) -> None:
    client = await relay()
    batch = [
        {"type": "track", "event": "A", "anonymousId": "x", "messageId": "b-0"},
        {"type": "track", "anonymousId": "x"},
        {"type": "nope", "anonymousId": "x"},
        {"type": "page", "anonymousId": "x", "properties": [1]},
        {"type": "identify", "userId": "u1", "traits": {"email": "a@b.c"}, "messageId": "b-4"},
    ]
    resp = await client.post(
        "/v1/batch",
        json={"batch": batch, "context": {"locale": "de-DE"}},
        headers=basic(SERVER_KEY),
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["accepted"] == 2
    assert [(r["index"], r["error"]) for r in body["rejected"]] == [
        (1, "missing_event"),
        (2, "unknown_type"),
        (3, "invalid_field"),
    ]
    events = await spooled(client)
    assert [e["messageId"] for e in events] == ["b-0", "b-4"]
    assert all(e["context"]["locale"] == "de-DE" for e in events)
    app = client.app
    assert metric_value(app, "tagrelay_events_received_total", {"source": "segment"}) == 5
    assert metric_value(app, "tagrelay_events_accepted_total", {"source": "segment"}) == 2
    assert (
        metric_value(
            app, "tagrelay_events_rejected_total", {"source": "segment", "reason": "unknown_type"}
        )
        == 1
    )


async def test_gzip_body_is_inflated_once(relay: Any) -> None:
    client = await relay()
    body = gzip.compress(orjson.dumps({"batch": [track(type="track", messageId="gz-1")]}))
    resp = await client.post(
        "/v1/batch",
        data=body,
        headers={
            **basic(SERVER_KEY),
            "Content-Encoding": "gzip",
            "Content-Type": "application/json",
        },
    )
    assert resp.status == 200, await resp.text()
    assert [e["messageId"] for e in await spooled(client)] == ["gz-1"]


@pytest.mark.parametrize("encoding", ["deflate", "br", "zstd"])
async def test_other_content_encodings_are_decoded(relay: Any, encoding: str) -> None:
    client = await relay()
    raw = orjson.dumps({"batch": [track(type="track", messageId=f"enc-{encoding}")]})
    if encoding == "deflate":
        body = zlib.compress(raw)
    elif encoding == "br":
        import brotli

        body = brotli.compress(raw)
    else:
        try:
            from compression import zstd  # type: ignore[import-not-found]
        except ImportError:
            from backports import zstd
        body = zstd.compress(raw)
    resp = await client.post(
        "/v1/batch",
        data=body,
        headers={
            **basic(SERVER_KEY),
            "Content-Encoding": encoding,
            "Content-Type": "application/json",
        },
    )
    assert resp.status == 200, await resp.text()
    assert [e["messageId"] for e in await spooled(client)] == [f"enc-{encoding}"]


async def test_clock_skew_is_corrected_from_sent_at(relay: Any) -> None:
    client = await relay()
    # The device clock is exactly one hour ahead: the event happened 2 s before sending.
    resp = await client.post(
        "/v1/track",
        json=track(timestamp="2030-01-01T13:00:00.000Z", sentAt="2030-01-01T13:00:02.000Z"),
        headers=basic(SERVER_KEY),
    )
    assert resp.status == 200
    [event] = await spooled(client)
    from datetime import datetime

    received = datetime.fromisoformat(event["receivedAt"])
    corrected = datetime.fromisoformat(event["timestamp"])
    assert (received - corrected).total_seconds() == 2.0
    assert event["originalTimestamp"] == "2030-01-01T13:00:00.000Z"


async def test_ip_and_user_agent_come_from_the_request_for_browser_keys(relay: Any) -> None:
    client = await relay(server={"trusted_proxies": ["127.0.0.1/32"]})
    spoof = track(context={"ip": "6.6.6.6", "userAgent": "spoofed"})
    resp = await client.post(
        "/v1/track",
        json=spoof,
        headers={
            **basic(BROWSER_KEY),
            "User-Agent": "Mozilla/5.0 real",
            "X-Forwarded-For": "203.0.113.9, 10.0.0.1",
        },
    )
    assert resp.status == 200
    server = track(context={"ip": "198.51.100.7", "userAgent": "backend-said"})
    resp = await client.post("/v1/track", json=server, headers=basic(SERVER_KEY))
    assert resp.status == 200
    browser_event, server_event = await spooled(client)
    # 10.0.0.1 is not a trusted proxy, so it is the right-most untrusted hop: the client.
    assert browser_event["context"]["ip"] == "10.0.0.1"
    assert browser_event["context"]["userAgent"] == "Mozilla/5.0 real"
    assert server_event["context"]["ip"] == "198.51.100.7"
    assert server_event["context"]["userAgent"] == "backend-said"


async def test_forwarded_for_is_ignored_from_untrusted_peers(relay: Any) -> None:
    client = await relay(server={"trusted_proxies": []})
    resp = await client.post(
        "/v1/track", json=track(), headers={**basic(BROWSER_KEY), "X-Forwarded-For": "203.0.113.9"}
    )
    assert resp.status == 200
    [event] = await spooled(client)
    assert event["context"]["ip"] == "127.0.0.1"


async def test_utm_parameters_become_the_campaign(relay: Any) -> None:
    client = await relay()
    page = {
        "type": "page",
        "anonymousId": "a",
        "context": {
            "page": {
                "url": "https://shop.test/signup?utm_source=news&utm_medium=email&utm_campaign=spring"
            }
        },
    }
    resp = await client.post("/v1/page", json=page, headers=basic(SERVER_KEY))
    assert resp.status == 200
    [event] = await spooled(client)
    assert event["context"]["campaign"] == {"source": "news", "medium": "email", "name": "spring"}


async def test_jitsu_endpoints_answer_json_and_s2s_needs_a_server_key(relay: Any) -> None:
    client = await relay()
    r1 = await client.post("/api/s/track", json=track(), headers={"X-Write-Key": BROWSER_KEY})
    assert r1.status == 200
    assert await r1.json() == {"ok": True}
    r2 = await client.post(
        "/api/s/p", json={"anonymousId": "a"}, headers={"X-Write-Key": BROWSER_KEY}
    )
    assert r2.status == 200
    r3 = await client.post("/api/s/s2s/track", json=track(), headers={"X-Write-Key": BROWSER_KEY})
    assert r3.status == 401
    assert (await r3.json())["error"] == "server_key_required"
    r4 = await client.post(
        "/api/s/s2s/identify", json={"userId": "u"}, headers={"X-Write-Key": SERVER_KEY}
    )
    assert r4.status == 200
    events = await spooled(client)
    assert [(e["type"], e["context"]["source"]) for e in events] == [
        ("track", "jitsu"),
        ("page", "jitsu"),
        ("identify", "jitsu"),
    ]


async def test_cors_preflight_and_origin_enforcement(relay: Any) -> None:
    client = await relay()
    pre = await client.options(
        "/v1/t",
        headers={
            "Origin": "https://www.shop.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,x-retry-count,content-type",
        },
    )
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://www.shop.test"
    assert pre.headers["Access-Control-Allow-Credentials"] == "true"
    assert "x-retry-count" in pre.headers["Access-Control-Allow-Headers"]
    bad_pre = await client.options(
        "/v1/t", headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"}
    )
    assert bad_pre.status == 403
    ok = await client.post(
        "/v1/t", json=track(), headers={**basic(BROWSER_KEY), "Origin": "https://www.shop.test"}
    )
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://www.shop.test"
    evil = await client.post(
        "/v1/t", json=track(), headers={**basic(BROWSER_KEY), "Origin": "https://evil.test"}
    )
    assert evil.status == 403
    assert (await evil.json())["error"] == "origin_not_allowed"
    assert len(await spooled(client)) == 1
