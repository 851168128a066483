"""Identity cookies, click ids, consent and IP privacy over real HTTP into the real spool."""

from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Any

import orjson

from tagrelay.appkeys import SPOOL
from tests.support import BROWSER_KEY, SERVER_KEY, basic, metric_value

ORIGIN = {
    "Origin": "https://www.shop.test",
    "Host": "data.shop.test",
    "Content-Type": "text/plain",
}


async def spooled(client: Any) -> list[dict[str, Any]]:
    rows = await client.app[SPOOL].read(0, 10_000)
    return [orjson.loads(r.payload) for r in rows]


def script_body(*events: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {"writeKey": BROWSER_KEY, "sentAt": "2026-11-29T10:00:00.000Z", "batch": list(events)}
    )


def page(anonymous_id: str = "script-id", **context: Any) -> dict[str, Any]:
    return {
        "type": "page",
        "anonymousId": anonymous_id,
        "messageId": f"m-{anonymous_id}-{len(context)}",
        "context": {"page": {"url": "https://www.shop.test/", "path": "/"}, **context},
    }


def set_cookies(resp: Any) -> dict[str, Any]:
    jar: SimpleCookie = SimpleCookie()
    for header in resp.headers.getall("Set-Cookie", []):
        jar.load(header)
    return dict(jar)


async def test_the_script_endpoint_sets_the_visitor_cookie_with_its_attributes(
    relay: Any,
) -> None:
    client = await relay()
    resp = await client.post(
        "/d", data=script_body(page()), headers={**ORIGIN, "Content-Type": "text/plain"}
    )
    assert resp.status == 200
    assert await resp.json() == {"ok": True, "accepted": 1, "anonymousId": "script-id"}
    assert resp.headers["Access-Control-Allow-Origin"] == "https://www.shop.test"
    cookie = set_cookies(resp)["tr_aid"]
    assert cookie.value == "script-id"
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"
    assert cookie["max-age"] == str(400 * 86_400)
    assert cookie["domain"] == "shop.test"
    assert cookie["path"] == "/"
    assert not cookie["secure"]  # plain HTTP here; see the next test
    [event] = await spooled(client)
    assert event["context"]["source"] == "tagrelay"
    assert event["anonymousId"] == "script-id"


async def test_secure_behind_a_trusted_tls_proxy(relay: Any) -> None:
    client = await relay()
    resp = await client.post(
        "/d", data=script_body(page()), headers={**ORIGIN, "X-Forwarded-Proto": "https"}
    )
    assert set_cookies(resp)["tr_aid"]["secure"] is True


async def test_a_returning_visitor_keeps_the_server_id_and_the_script_adopts_it(
    relay: Any,
) -> None:
    client = await relay()
    resp = await client.post(
        "/d",
        data=script_body(page("fresh-script-id")),
        headers={**ORIGIN, "Cookie": "tr_aid=server-id-1"},
    )
    assert (await resp.json())["anonymousId"] == "server-id-1"
    assert set_cookies(resp)["tr_aid"].value == "server-id-1"  # renewed
    [event] = await spooled(client)
    assert event["anonymousId"] == "server-id-1"


async def test_click_ids_reach_later_events_through_the_cookie(relay: Any) -> None:
    client = await relay()
    landing = page(page={"url": "https://www.shop.test/?gclid=G-1&fbclid=F-1", "path": "/"})
    resp = await client.post("/d", data=script_body(landing), headers=ORIGIN)
    cookies = set_cookies(resp)
    assert {"tr_aid", "tr_clk", "_fbc", "_fbp"} <= set(cookies)
    assert cookies["_fbc"].value.startswith("fb.1.") and cookies["_fbc"].value.endswith(".F-1")
    assert cookies["_fbc"]["httponly"] == ""  # Meta's pixel reads it
    cookie_header = "; ".join(f"{name}={c.value}" for name, c in cookies.items())

    later = page(page={"url": "https://www.shop.test/pricing", "path": "/pricing"})
    later["messageId"] = "m-later"
    later["type"] = "track"
    later["event"] = "Viewed Pricing"
    await client.post("/d", data=script_body(later), headers={**ORIGIN, "Cookie": cookie_header})
    first, second = await spooled(client)
    assert first["context"]["clickIds"] == {"gclid": "G-1", "fbclid": "F-1"}
    assert second["context"]["clickIds"] == {"gclid": "G-1", "fbclid": "F-1"}
    assert second["context"]["clientIds"]["fbc"] == cookies["_fbc"].value
    assert second["context"]["clientIds"]["fbp"] == cookies["_fbp"].value


async def test_segment_sdk_requests_get_the_cookie_but_keep_their_own_id(relay: Any) -> None:
    client = await relay()
    resp = await client.post(
        "/v1/t",
        data=orjson.dumps({"event": "E", "anonymousId": "ajs-1", "writeKey": BROWSER_KEY}),
        headers={**ORIGIN, "Cookie": "tr_aid=server-id-1"},
    )
    assert resp.status == 200
    assert await resp.json() == {"success": True}
    assert set_cookies(resp)["tr_aid"].value == "server-id-1"
    [event] = await spooled(client)
    assert event["anonymousId"] == "ajs-1"


async def test_server_key_requests_get_no_cookie(relay: Any) -> None:
    client = await relay()
    resp = await client.post(
        "/v1/track",
        json={"event": "E", "userId": "u1", "context": {"page": {"search": "?gclid=G"}}},
        headers={**basic(SERVER_KEY), "Cookie": "tr_aid=server-id-1"},
    )
    assert resp.status == 200
    assert "Set-Cookie" not in resp.headers
    [event] = await spooled(client)
    assert event["context"]["consent"]["analytics"] == "granted"
    assert "clickIds" not in event["context"]


async def test_analytics_denied_sets_no_cookie_and_drops_identifiers(relay: Any) -> None:
    client = await relay()
    denied = page(
        "script-id",
        consent={"analytics": "denied", "ads": "denied"},
        page={"url": "https://www.shop.test/?gclid=G", "path": "/"},
    )
    denied["userId"] = "u-1"
    resp = await client.post(
        "/d", data=script_body(denied), headers={**ORIGIN, "Cookie": "tr_aid=server-id-1"}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body == {"ok": True, "accepted": 1}  # no id handed back
    assert "Set-Cookie" not in resp.headers
    [event] = await spooled(client)
    assert "anonymousId" not in event and "userId" not in event
    assert "ip" not in event["context"] and "clickIds" not in event["context"]
    assert event["context"]["anonymized"] is True
    assert event["context"]["consent"]["analytics"] == "denied"
    assert event["context"]["page"]["path"] == "/"
    src = {"source": "tagrelay"}
    assert metric_value(client.app, "tagrelay_events_accepted_total", src) == 1


async def test_analytics_denied_with_keep_keeps_ids_but_still_sets_no_cookie(
    relay: Any,
) -> None:
    client = await relay(consent={"analytics_denied": "keep"})
    denied = page("script-id", consent={"analytics": False})
    resp = await client.post("/d", data=script_body(denied), headers=ORIGIN)
    assert "Set-Cookie" not in resp.headers
    [event] = await spooled(client)
    assert event["anonymousId"] == "script-id"


async def test_opt_in_defaults_deny_until_the_visitor_grants(relay: Any) -> None:
    client = await relay(consent={"default": {"analytics": "denied", "ads": "denied"}})
    resp = await client.post("/d", data=script_body(page("a")), headers=ORIGIN)
    assert "Set-Cookie" not in resp.headers
    granted = page("b", consent={"analytics": "granted"})
    resp = await client.post("/d", data=script_body(granted), headers=ORIGIN)
    assert set(set_cookies(resp)) == {"tr_aid"}  # ads still denied: no _fbp


async def test_gpc_header_denies_ads_cookies(relay: Any) -> None:
    client = await relay()
    landing = page(page={"url": "https://www.shop.test/?fbclid=F", "path": "/"})
    resp = await client.post("/d", data=script_body(landing), headers={**ORIGIN, "Sec-GPC": "1"})
    assert set(set_cookies(resp)) == {"tr_aid"}
    [event] = await spooled(client)
    assert event["context"]["consent"]["ads"] == "denied"


async def test_cookieless_events_set_no_cookie_and_keep_their_page_load_id(relay: Any) -> None:
    client = await relay()
    resp = await client.post(
        "/d",
        data=script_body(page("page-load-id", cookieless=True)),
        headers={**ORIGIN, "Cookie": "tr_aid=server-id-1"},
    )
    assert "Set-Cookie" not in resp.headers
    [event] = await spooled(client)
    assert event["anonymousId"] == "page-load-id"


async def test_ip_truncation(relay: Any) -> None:
    client = await relay(privacy={"truncate_ip": True})
    await client.post(
        "/v1/track",
        json={"event": "E", "userId": "u1"},
        headers={**basic(SERVER_KEY), "X-Forwarded-For": "203.0.113.77"},
    )
    [event] = await spooled(client)
    assert event["context"]["ip"] == "203.0.113.0"


async def test_cookie_keeper(relay: Any) -> None:
    client = await relay(identity={"cookie_keeper": ["_ga", "_ga_*"]})
    resp = await client.post(
        "/d",
        data=script_body(page()),
        headers={**ORIGIN, "Cookie": "_ga=GA1.1.11.22; _ga_ABC=GS1.1.1700000000.2.1.1.0.0.0"},
    )
    cookies = set_cookies(resp)
    assert cookies["_ga"].value == "GA1.1.11.22"
    assert cookies["_ga"]["max-age"] == str(400 * 86_400)
    assert cookies["_ga"]["domain"] == "shop.test"
    assert cookies["_ga"]["path"] == "/"
    [event] = await spooled(client)
    assert event["context"]["clientIds"]["ga4"] == {
        "clientId": "11.22",
        "sessionIds": {"G-ABC": "1700000000"},
        "sessionNumbers": {"G-ABC": 2},
    }


async def test_identity_endpoint(relay: Any) -> None:
    client = await relay()
    resp = await client.get("/id", headers={**ORIGIN, "Cookie": "tr_aid=server-id-1"})
    assert resp.status == 200
    assert await resp.json() == {"anonymousId": "server-id-1"}
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert set_cookies(resp)["tr_aid"].value == "server-id-1"

    fresh = await client.get("/id", headers=ORIGIN)
    new_id = (await fresh.json())["anonymousId"]
    assert len(new_id) == 36 and set_cookies(fresh)["tr_aid"].value == new_id

    reset = await client.get("/id?new=1", headers={**ORIGIN, "Cookie": "tr_aid=server-id-1"})
    assert (await reset.json())["anonymousId"] not in ("server-id-1", new_id)

    stranger = await client.get("/id", headers={"Origin": "https://evil.example"})
    assert stranger.status == 403


async def test_identity_can_be_turned_off(relay: Any) -> None:
    client = await relay(identity={"enabled": False})
    resp = await client.post("/d", data=script_body(page()), headers=ORIGIN)
    assert "Set-Cookie" not in resp.headers
    assert await resp.json() == {"ok": True, "accepted": 1}
    assert (await client.get("/id")).status == 404


async def test_renamed_paths_and_base_path(relay: Any) -> None:
    client = await relay(server={"base_path": "/t"}, paths={"events": "/x9", "identity": "/w"})
    resp = await client.post("/t/x9", data=script_body(page()), headers=ORIGIN)
    assert resp.status == 200
    assert set_cookies(resp)["tr_aid"]["path"] == "/t"
    assert (await client.get("/t/w")).status == 200
    assert (await client.get("/t/healthz")).status == 200
    assert (
        await client.post(
            "/t/v1/track", json={"event": "E", "userId": "u"}, headers=basic(SERVER_KEY)
        )
    ).status == 200
    # nothing is served outside the base path
    assert (await client.post("/d", data=script_body(page()), headers=ORIGIN)).status == 404
    assert (await client.get("/healthz")).status == 404


async def test_a_reset_moves_the_cookie_to_the_new_id(relay: Any) -> None:
    client = await relay()
    body = orjson.loads(script_body(page("after-reset-id")))
    body["reset"] = True
    resp = await client.post(
        "/d", data=orjson.dumps(body), headers={**ORIGIN, "Cookie": "tr_aid=old-id"}
    )
    assert (await resp.json())["anonymousId"] == "after-reset-id"
    assert set_cookies(resp)["tr_aid"].value == "after-reset-id"
    [event] = await spooled(client)
    assert event["anonymousId"] == "after-reset-id"
