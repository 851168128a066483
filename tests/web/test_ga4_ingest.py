"""GA4's inbound endpoints over real HTTP into the real spool: /g/collect and /mp/collect."""

from __future__ import annotations

from typing import Any

import orjson
from yarl import URL

from tagrelay.appkeys import SPOOL
from tests.support import metric_value

TID = "G-8XK2MS9Q4T"
CID = "1938271044.1731420000"
SECRET = "mp-secret-1"

HIT = (
    f"v=2&tid={TID}&gtm=45je4b20v9175741929za200&_p=1731425083917&gcs=G111&gcd=13r3r2r2r5l1"
    f"&cid={CID}&ul=en-us&sr=1920x1080&sid=1731425080&sct=7&seg=1"
    "&dl=https%3A%2F%2Fwww.shop.test%2Fpricing%3Fplan%3Da%26b&dt=Pricing&en=page_view&_et=12"
)
BATCH_QUERY = (
    f"v=2&tid={TID}&gcs=G100&cid={CID}&sid=1731425080&sct=7&uid=user-881"
    "&dl=https%3A%2F%2Fwww.shop.test%2Fthanks&richsstsse"
)
BATCH_BODY = "en=purchase&ep.transaction_id=T-1&epn.value=42.5&cu=EUR\nen=scroll&epn.percent=90"

GOOGLE = {
    "collect": {"measurement_ids": [TID]},
    "measurement_protocol": [{"measurement_id": TID, "api_secret": SECRET}],
}
BROWSER = {"Host": "data.shop.test", "User-Agent": "Mozilla/5.0 (test)"}


def raw_url(client: Any, path_and_query: str) -> URL:
    """A URL sent exactly as written (the test client would re-quote it otherwise), as
    browsers send gtag's hits."""
    return URL(str(client.make_url("/")).rstrip("/") + path_and_query, encoded=True)


async def spooled(client: Any) -> list[dict[str, Any]]:
    return [orjson.loads(r.payload) for r in await client.app[SPOOL].read(0, 1000)]


async def test_a_single_get_hit_is_stored_and_answered_204(relay: Any) -> None:
    client = await relay(google=GOOGLE)
    resp = await client.session.get(raw_url(client, "/g/collect?" + HIT), headers=BROWSER)
    assert resp.status == 204
    assert await resp.read() == b""
    [event] = await spooled(client)
    assert event["type"] == "page"
    assert event["anonymousId"] == CID
    assert event["context"]["source"] == "ga4"
    assert event["context"]["page"]["path"] == "/pricing"
    assert event["context"]["page"]["search"] == "?plan=a&b"
    # kept byte for byte: %26 inside dl stays encoded
    assert event["context"]["ga4"]["request"] == HIT
    assert event["context"]["ip"] == "127.0.0.1"
    assert event["context"]["userAgent"] == "Mozilla/5.0 (test)"
    assert event["context"]["consent"] == {
        "analytics": "granted",
        "ads": "granted",
        "ad_user_data": "granted",
        "ad_personalization": "granted",
        "gcs": "G111",
        "gcd": "13r3r2r2r5l1",
    }
    assert metric_value(client.app, "tagrelay_events_accepted_total", {"source": "ga4"}) == 1


async def test_a_batched_post_keeps_its_events_and_the_consent_denial(relay: Any) -> None:
    client = await relay(google=GOOGLE)
    resp = await client.post(
        "/g/collect?" + BATCH_QUERY,
        data=BATCH_BODY,
        headers={**BROWSER, "Content-Type": "text/plain;charset=UTF-8"},
    )
    assert resp.status == 204
    purchase, scroll = await spooled(client)
    assert (purchase["event"], scroll["event"]) == ("purchase", "scroll")
    assert purchase["properties"] == {"transaction_id": "T-1", "value": 42.5, "currency": "EUR"}
    assert purchase["context"]["ga4"]["event"] == BATCH_BODY.split("\n")[0]
    # gcs G100 denies analytics: the relay's default policy anonymizes the events
    assert purchase["context"]["consent"]["analytics"] == "denied"
    assert "anonymousId" not in purchase and "userId" not in purchase
    assert "Set-Cookie" not in resp.headers


async def test_a_resent_hit_is_stored_once(relay: Any) -> None:
    client = await relay(google=GOOGLE)
    for _ in range(2):
        assert (await client.get("/g/collect?" + HIT, headers=BROWSER)).status == 204
    assert len(await spooled(client)) == 1
    assert metric_value(client.app, "tagrelay_events_duplicate_total", {"source": "ga4"}) == 1


async def test_hits_for_other_properties_and_bad_hits_are_refused(relay: Any) -> None:
    client = await relay(google=GOOGLE)
    other = await client.get("/g/collect?" + HIT.replace(TID, "G-OTHER"), headers=BROWSER)
    assert other.status == 403
    assert (await other.json())["error"] == "measurement_id_not_allowed"
    no_tid = await client.get("/g/collect?v=2&en=page_view&cid=1.2", headers=BROWSER)
    assert no_tid.status == 400
    assert (await no_tid.json())["error"] == "missing_measurement_id"
    bad_utf8 = await client.post("/g/collect?" + BATCH_QUERY, data=b"en=x\xff", headers=BROWSER)
    assert bad_utf8.status == 400
    assert await spooled(client) == []
    rejected = metric_value(
        client.app,
        "tagrelay_events_rejected_total",
        {"source": "ga4", "reason": "measurement_id_not_allowed"},
    )
    assert rejected == 1


async def test_without_measurement_ids_the_endpoints_are_off(relay: Any) -> None:
    client = await relay()
    assert (await client.get("/g/collect?" + HIT)).status == 404
    assert (await client.post(f"/mp/collect?measurement_id={TID}&api_secret=x")).status == 404


async def test_measurement_protocol_from_a_backend(relay: Any) -> None:
    client = await relay(google=GOOGLE)
    body = {
        "client_id": "123.456",
        "user_id": "u-9",
        "events": [{"name": "sign_up", "params": {"method": "email", "session_id": "777"}}],
    }
    url = f"/mp/collect?measurement_id={TID}&api_secret={SECRET}"
    resp = await client.post(url, json=body)
    assert resp.status == 204
    [event] = await spooled(client)
    assert (event["event"], event["userId"], event["anonymousId"]) == ("sign_up", "u-9", "123.456")
    assert event["context"]["source"] == "ga4_mp"
    assert "Set-Cookie" not in resp.headers

    wrong = await client.post(f"/mp/collect?measurement_id={TID}&api_secret=nope", json=body)
    assert wrong.status == 401
    assert SECRET not in await wrong.text()
    empty = await client.post(url, json={"client_id": "1.2", "events": []})
    assert empty.status == 400


async def test_debug_measurement_protocol_validates_and_stores_nothing(relay: Any) -> None:
    client = await relay(google=GOOGLE)
    url = f"/debug/mp/collect?measurement_id={TID}&api_secret={SECRET}"
    ok = await client.post(url, json={"client_id": "1.2", "events": [{"name": "x"}]})
    assert await ok.json() == {"validationMessages": []}
    bad = await client.post(url, json={"events": [{"name": "x"}]})
    [message] = (await bad.json())["validationMessages"]
    assert message["validationCode"] == "VALUE_REQUIRED"
    assert await spooled(client) == []


async def test_server_managed_client_id_rewrites_the_hit(relay: Any) -> None:
    client = await relay(google={**GOOGLE, "server_client_id": "FPID"})
    resp = await client.session.get(
        raw_url(client, "/g/collect?" + HIT), headers={**BROWSER, "Cookie": "FPID=555.666"}
    )
    assert resp.status == 204
    assert any(h.startswith("FPID=555.666;") for h in resp.headers.getall("Set-Cookie"))
    [event] = await spooled(client)
    assert event["anonymousId"] == "555.666"
    assert event["context"]["ga4"]["request"] == HIT.replace(f"cid={CID}", "cid=555.666")
    assert event["context"]["clientIds"]["ga4"]["clientId"] == "555.666"


async def test_ga4_events_name_their_protocol_and_credential(relay: Any) -> None:
    """GA4's protocols have no write keys: their events name the credential that admitted
    them, a measurement id (gtag, from pages) or an api secret (backends)."""
    client = await relay(google=GOOGLE)
    assert (await client.get("/g/collect?" + HIT, headers=BROWSER)).status == 204
    url = f"/mp/collect?measurement_id={TID}&api_secret={SECRET}"
    body = {"client_id": "1.2", "events": [{"name": "sign_up"}]}
    assert (await client.post(url, json=body)).status == 204
    hit, mp = await spooled(client)
    assert (hit["context"]["source"], hit["context"]["writeKeyId"]) == ("ga4", "ga4-collect")
    assert (mp["context"]["source"], mp["context"]["writeKeyId"]) == ("ga4_mp", "ga4-mp")


async def test_events_the_decoder_and_the_pipeline_reject_are_reported_and_counted(
    relay: Any,
) -> None:
    """A Measurement Protocol request whose events all fail: one rejected while decoding (no
    name), one by the pipeline (too large). The answer lists both, the decoder's first; each
    is counted once, by reason."""
    client = await relay(google=GOOGLE, limits={"max_event_bytes": 1024})
    url = f"/mp/collect?measurement_id={TID}&api_secret={SECRET}"
    body = {
        "client_id": "1.2",
        "events": [{"name": "big", "params": {"text": "x" * 2000}}, {"params": {}}],
    }
    resp = await client.post(url, json=body)
    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"] == "no_valid_events"
    assert [(r["index"], r["error"]) for r in answer["rejected"]] == [
        (1, "missing_event_name"),
        (0, "event_too_large"),
    ]
    assert await spooled(client) == []
    source = {"source": "ga4_mp"}
    assert metric_value(client.app, "tagrelay_events_received_total", source) == 2
    for reason in ("missing_event_name", "event_too_large"):
        labels = {**source, "reason": reason}
        assert metric_value(client.app, "tagrelay_events_rejected_total", labels) == 1

    # One valid event is enough for gtag's 204; the line without a name is still counted.
    resp = await client.post("/g/collect?" + BATCH_QUERY, data="en=scroll\nep.x=1", headers=BROWSER)
    assert resp.status == 204
    [event] = await spooled(client)
    assert event["event"] == "scroll"
    labels = {"source": "ga4", "reason": "missing_event_name"}
    assert metric_value(client.app, "tagrelay_events_rejected_total", labels) == 1
    assert metric_value(client.app, "tagrelay_events_received_total", {"source": "ga4"}) == 2
    assert metric_value(client.app, "tagrelay_events_accepted_total", {"source": "ga4"}) == 1
