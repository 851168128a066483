"""What vendor SDKs fetch from the relay (settings, source config, the library), and their
request quirks, over real HTTP."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import orjson
import pytest

from tagrelay.appkeys import SPOOL
from tests.support import BROWSER_KEY, SERVER_KEY, basic, metric_value

ORIGIN = "https://www.shop.test"


async def spooled(client: Any) -> list[dict[str, Any]]:
    return [orjson.loads(r.payload) for r in await client.app[SPOOL].read(0, 1000)]


async def test_segment_settings_point_the_sdk_at_this_relay(relay: Any) -> None:
    client = await relay(server={"base_path": "/t"})
    resp = await client.get(
        f"/t/v1/projects/{BROWSER_KEY}/settings",
        headers={"Origin": ORIGIN, "Host": "data.shop.test:8443", "X-Forwarded-Proto": "https"},
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    settings = await resp.json()
    assert settings["integrations"]["Segment.io"] == {
        "apiKey": BROWSER_KEY,
        "apiHost": "data.shop.test:8443/t/v1",
        "protocol": "https",
    }
    assert settings["metrics"] == {"sampleRate": 0.0}
    assert settings["remotePlugins"] == []


async def test_settings_only_for_known_browser_keys_and_allowed_origins(relay: Any) -> None:
    client = await relay()
    unknown = await client.get("/v1/projects/nope/settings")
    assert unknown.status == 401
    assert (await unknown.json())["error"] == "unknown_key"
    server = await client.get(f"/v1/projects/{SERVER_KEY}/settings")
    assert server.status == 401
    assert (await server.json())["error"] == "browser_key_required"
    assert SERVER_KEY not in await server.text()
    other = await client.get(
        f"/v1/projects/{BROWSER_KEY}/settings", headers={"Origin": "https://evil.example"}
    )
    assert other.status == 403


async def test_the_segment_library_is_served_from_the_configured_dir(
    relay: Any, tmp_path: Path
) -> None:
    library = tmp_path / "umd"
    library.mkdir()
    (library / "standalone.js").write_text("/* standalone */")
    (library / "queryString.bundle.abc123.js").write_text("/* chunk */")
    (tmp_path / "secret.js").write_text("/* outside */")
    client = await relay(sdks={"segment": {"library_dir": str(library)}})
    resp = await client.get(f"/analytics.js/v1/{BROWSER_KEY}/analytics.min.js")
    assert resp.status == 200
    assert await resp.text() == "/* standalone */"
    assert resp.headers["Content-Type"].startswith("text/javascript")
    chunk = await client.get("/analytics-next/bundles/queryString.bundle.abc123.js")
    assert await chunk.text() == "/* chunk */"
    for bad in ("..%2Fsecret.js", "%2E%2E%2Fsecret.js", "missing.js", "standalone.txt"):
        assert (await client.get(f"/analytics-next/bundles/{bad}")).status == 404
    assert (await client.get("/analytics.js/v1/unknown/analytics.min.js")).status == 401


async def test_symlinks_are_served_only_when_they_resolve_inside_the_library_dir(
    relay: Any, tmp_path: Path
) -> None:
    library = tmp_path / "umd"
    (library / "chunks").mkdir(parents=True)
    (library / "chunks" / "real.js").write_text("/* inside */")
    (tmp_path / "secret.js").write_text("/* outside */")
    (library / "standalone.js").symlink_to(tmp_path / "secret.js")
    (library / "inside.js").symlink_to(library / "chunks" / "real.js")
    (library / "relative-out.js").symlink_to("../secret.js")
    (library / "dir.js").symlink_to(library / "chunks")
    (library / "dangling.js").symlink_to(library / "missing.js")
    (library / "loop.js").symlink_to(library / "loop.js")
    client = await relay(sdks={"segment": {"library_dir": str(library)}})

    inside = await client.get("/analytics-next/bundles/inside.js")
    assert inside.status == 200
    assert await inside.text() == "/* inside */"
    for name in ("relative-out.js", "dir.js", "dangling.js", "loop.js"):
        resp = await client.get(f"/analytics-next/bundles/{name}")
        assert resp.status == 404, name
        assert (await resp.json())["error"] == "not_found"
    # The snippet's library itself: a link out of the directory is not followed either.
    out = await client.get(f"/analytics.js/v1/{BROWSER_KEY}/analytics.min.js")
    assert out.status == 404
    assert "outside" not in await out.text()
    for bad in ("..%2Fsecret.js", "%2Fetc%2Fpasswd", "a%00.js", "chunks%2Freal.js"):
        assert (await client.get(f"/analytics-next/bundles/{bad}")).status == 404


async def test_without_a_library_dir_the_library_is_404(relay: Any) -> None:
    client = await relay()
    resp = await client.get(f"/analytics.js/v1/{BROWSER_KEY}/analytics.min.js")
    assert resp.status == 404
    assert (await resp.json())["error"] == "library_not_configured"


async def test_segment_metrics_are_counted_not_stored(relay: Any) -> None:
    client = await relay()
    body = {"series": [{"type": "Counter", "metric": "analytics_js.invoke", "value": 1}] * 3}
    resp = await client.post(
        "/v1/m", data=orjson.dumps(body), headers={"Content-Type": "text/plain"}
    )
    assert resp.status == 200
    assert await client.app[SPOOL].read(0, 10) == []
    labels = {"sdk": "segment", "outcome": "accepted"}
    assert metric_value(client.app, "tagrelay_sdk_metrics_total", labels) == 3
    bad = await client.post("/v1/m", data=b"nope", headers={"Content-Type": "text/plain"})
    assert bad.status == 400


async def test_rudderstack_source_config(relay: Any) -> None:
    client = await relay()
    resp = await client.get(
        "/sourceConfig/?p=npm&v=3.34.1&build=modern&writeKey=" + BROWSER_KEY,
        headers={**basic(BROWSER_KEY), "Origin": ORIGIN},
    )
    assert resp.status == 200
    document = await resp.json()
    assert document["source"]["writeKey"] == BROWSER_KEY
    assert document["source"]["enabled"] is True
    assert document["source"]["destinations"] == []
    assert isinstance(document["source"]["config"], dict)
    preflight = await client.options(
        "/sourceConfig/",
        headers={"Origin": ORIGIN, "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status == 204
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]


async def test_rudderstack_beacon_batch_with_the_key_in_the_query(relay: Any) -> None:
    client = await relay()
    body = {
        "batch": [
            {
                "type": "track",
                "event": "Beacon",
                "anonymousId": "rs-1",
                "userId": "",
                "messageId": "b-1",
            }
        ],
        "sentAt": "2026-11-29T10:00:00.000Z",
    }
    resp = await client.post(
        f"/beacon/v1/batch?writeKey={BROWSER_KEY}",
        data=orjson.dumps(body),
        headers={"Content-Type": "text/plain", "Origin": ORIGIN},
    )
    assert resp.status == 200
    [event] = await spooled(client)
    assert event["event"] == "Beacon"
    assert "userId" not in event  # RudderStack's "" means no user


async def test_rudderstack_identify_traits_and_anonymous_id_header(relay: Any) -> None:
    client = await relay()
    body = {
        "type": "identify",
        "userId": "u1",
        "messageId": "i-1",
        "context": {"traits": {"email": "a@b.com"}},
    }
    resp = await client.post(
        "/v1/identify",
        data=orjson.dumps(body),
        headers={
            **basic(BROWSER_KEY),
            "Content-Type": "application/json;charset=UTF-8",
            "AnonymousId": base64.b64encode(b"rs-anon-9").decode(),
            "SentAt": "2026-11-29T10:00:00.000Z",
            "Origin": ORIGIN,
        },
    )
    assert resp.status == 200
    [event] = await spooled(client)
    assert event["traits"] == {"email": "a@b.com"}
    assert event["anonymousId"] == "rs-anon-9"


@pytest.mark.parametrize(
    ("library", "channel", "source"),
    [
        ("RudderLabs JavaScript SDK", "web", "rudderstack"),
        ("com.rudderstack.android.sdk.core", "mobile", "rudderstack"),
        ("rudder-ios-library", "mobile", "rudderstack"),
        ("rudder-analytics-python", "server", "rudderstack"),
        ("analytics-node", "server", "rudderstack"),  # RudderStack's Node SDK
        ("analytics-node", None, "segment"),  # Segment's classic Node library
        ("analytics.js", None, "segment"),
        ("analytics-python", None, "segment"),
        (None, None, "segment"),
    ],
)
async def test_rudderstack_sdks_are_labelled_rudderstack(
    relay: Any, library: str | None, channel: str | None, source: str
) -> None:
    client = await relay()
    event: dict[str, Any] = {"type": "track", "event": "E", "anonymousId": "a", "messageId": "m-1"}
    if library is not None:
        event["context"] = {"library": {"name": library, "version": "1.0"}}
    if channel is not None:
        event["channel"] = channel
    resp = await client.post(
        "/v1/batch",
        data=orjson.dumps({"batch": [event, {**event, "messageId": "m-2", "event": ""}]}),
        headers={**basic(BROWSER_KEY), "Content-Type": "application/json"},
    )
    assert resp.status == 200
    assert await resp.json() == {
        "success": True,
        "accepted": 1,
        "rejected": [{"index": 1, "error": "missing_event", "message": ANY}],
    }
    [stored] = await spooled(client)
    assert stored["context"]["source"] == source
    app = client.app
    assert metric_value(app, "tagrelay_events_received_total", {"source": source}) == 2
    assert metric_value(app, "tagrelay_events_accepted_total", {"source": source}) == 1
    rejected = {"source": source, "reason": "missing_event"}
    assert metric_value(app, "tagrelay_events_rejected_total", rejected) == 1
    other = "segment" if source == "rudderstack" else "rudderstack"
    assert metric_value(app, "tagrelay_events_received_total", {"source": other}) == 0


async def test_a_rudderstack_batch_is_labelled_by_its_shared_context_too(relay: Any) -> None:
    client = await relay()
    body = {
        "batch": [{"type": "track", "event": "E", "anonymousId": "a", "messageId": "m-1"}],
        "context": {"library": {"name": "RudderLabs JavaScript SDK", "version": "3.34.1"}},
    }
    resp = await client.post(
        f"/beacon/v1/batch?writeKey={BROWSER_KEY}",
        data=orjson.dumps(body),
        headers={"Content-Type": "text/plain"},
    )
    assert resp.status == 200
    [stored] = await spooled(client)
    assert stored["context"]["source"] == "rudderstack"


async def test_preflights_allow_what_the_sdks_send(relay: Any) -> None:
    client = await relay()
    for requested in (
        "authorization,x-retry-count",
        "anonymousid,authorization,content-type,sentat",
        "content-type,x-write-key",
    ):
        resp = await client.options(
            "/v1/t",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": requested,
            },
        )
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Headers"] == requested
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
