"""A copy of each hit that passes: GA4 hits through the GA4 source into the spool and the
warehouse (never re-sent by the ga4 forwarder), Google Ads hits with an event name and a
click id; a copy that cannot be stored never stops the hit."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from tagrelay.appkeys import SPOOL, warehouse_of
from tests.gateway.conftest import FakeGoogle, gateway_config, raw_url
from tests.support import SERVER_KEY, basic, metric_value, recording_server, wait_idle

TID = "G-8XK2MS9Q4T"
CID = "1938271044.1731420000"
QUERY = (
    f"v=2&tid={TID}&gtm=45je5ca1v9z8&_p=1731425083917&gcs=G111&gcd=13r3r2r2r5l1"
    f"&cid={CID}&ul=en-us&sid=1731425080&sct=7&seg=1&_uip=%3A%3A&fp=1"
    "&dl=https%3A%2F%2Fwww.shop.test%2Fcheckout%3Fstep%3D2%26x&dt=Checkout"
)
LINES = (
    "en=add_payment_info&_et=1200&ep.payment_type=card\n"
    "en=purchase&ep.transaction_id=T-1&epn.value=42.5&cu=EUR&pr1=idSKU_1~nmTee~pr42.5~qt1\n"
    "en=scroll&epn.percent_scrolled=90"
)
BROWSER = {"User-Agent": "Mozilla/5.0 (test)", "Content-Type": "text/plain;charset=UTF-8"}


def copies(client: Any, kind: str, outcome: str) -> float:
    labels = {"route": "/metrics", "kind": kind, "outcome": outcome}
    return metric_value(client.app, "tagrelay_gateway_copies_total", labels)


async def spooled(client: Any) -> list[dict[str, Any]]:
    return [orjson.loads(r.payload) for r in await client.app[SPOOL].read(0, 1000)]


async def test_a_ga4_post_passes_whole_and_lands_as_three_warehouse_rows(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    async with recording_server("ga4", ["/g/collect", "/mp/collect"]) as ga4:
        forwarders = [
            {"id": "warehouse", "type": "warehouse", "batch": {"max_wait_secs": 0.05}},
            {
                "id": "ga4",
                "type": "ga4",
                "measurement_id": TID,
                "api_secret": "s3cret",
                "collect_url": ga4.url.rstrip("/") + "/g/collect",
                "mp_url": ga4.url.rstrip("/") + "/mp/collect",
                "gtag_hits": "all",
                "batch": {"max_wait_secs": 0.05},
            },
        ]
        client = await gateway_relay(forwarders=forwarders)
        resp = await client.session.post(
            raw_url(client, "/metrics/ag/g/c?" + QUERY), data=LINES.encode(), headers=BROWSER
        )
        assert resp.status == 204
        assert "Set-Cookie" not in resp.headers  # the relay's cookies stay off Google's answer
        [seen] = google.hits()
        assert (seen.method, seen.raw_path, seen.body) == (
            "POST",
            "/metrics/ag/g/c?" + QUERY,
            LINES.encode(),
        )
        assert seen.headers["Content-Type"] == "text/plain;charset=UTF-8"

        # Committed before the answer: in the spool already.
        events = await spooled(client)
        assert [e["event"] for e in events] == ["add_payment_info", "purchase", "scroll"]
        for event in events:
            assert event["context"]["ga4"]["gateway"] is True
            assert event["context"]["ga4"]["request"] == QUERY
            assert event["context"]["source"] == "ga4"
            assert event["context"]["writeKeyId"] == "google-gateway"
            assert event["anonymousId"] == CID
            assert event["context"]["consent"]["gcs"] == "G111"
            assert event["context"]["consent"]["ads"] == "granted"
        assert events[1]["properties"]["value"] == 42.5

        await wait_idle(client.app)
        warehouse = warehouse_of(client.app)
        assert warehouse is not None
        rows = warehouse.query("select event, context_ga4_gateway from events order by event").rows
        assert rows == [("add_payment_info", True), ("purchase", True), ("scroll", True)]
        assert ga4.requests == []
        dropped = {"forwarder": "ga4", "reason": "gateway_delivered"}
        assert metric_value(client.app, "tagrelay_forwarder_dropped_total", dropped) == 3
    assert copies(client, "ga4_hit", "stored") == 1
    counted = {"route": "/metrics", "kind": "ga4_hit", "status_class": "2xx"}
    assert metric_value(client.app, "tagrelay_gateway_requests_total", counted) == 1


async def test_the_copy_is_committed_while_google_has_the_hit(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay(gateway={"health_check": False})
    spool = client.app[SPOOL]
    watch = spool.subscribe()
    watch.arm(spool.head + 3)

    async def after_the_commit(request: web.Request) -> web.StreamResponse:
        # Google answers only once the copy is in the spool: a copy made after Google's
        # answer would never come, and this request would time out.
        await asyncio.wait_for(watch.wait(), 10)
        return web.Response(status=204)

    google.answer = after_the_commit
    resp = await client.session.post(
        raw_url(client, "/metrics/ga/g/c?" + QUERY), data=LINES.encode(), headers=BROWSER
    )
    spool.unsubscribe(watch)
    assert resp.status == 204
    assert len(await spooled(client)) == 3


async def test_a_get_hit_on_each_ga4_path_is_copied(gateway_relay: Any, google: FakeGoogle) -> None:
    client = await gateway_relay()
    for path in ("/metrics/ga/g/c", "/metrics/ag/g/c", "/metrics/g/collect"):
        hit = f"v=2&tid={TID}&cid={CID}&en=page_view&dt={path[9:].replace('/', '_')}"
        resp = await client.session.get(raw_url(client, f"{path}?{hit}"))
        assert resp.status == 204
    events = await spooled(client)
    assert [e["type"] for e in events] == ["page", "page", "page"]
    assert copies(client, "ga4_hit", "stored") == 3


async def fill(client: Any, events: int, pad: int) -> None:
    """Store batches of ``events`` events of ``pad`` bytes until the spool refuses one."""
    for _ in range(100):
        batch = [
            {"type": "track", "event": "x", "anonymousId": "a", "properties": {"pad": "y" * pad}}
            for _ in range(events)
        ]
        resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
        if resp.status == 503:
            return
    raise AssertionError("the spool never filled")


async def test_a_hit_whose_copy_cannot_be_stored_still_reaches_google(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay(spool={"max_size_mb": 1})
    # Full for a copy of the hit below: three events of ~25 kB each.
    await fill(client, 15, 30_000)
    await fill(client, 3, 25_000)
    stored_before = len(await spooled(client))
    lines = "\n".join(f"en=e{i}&ep.pad={'z' * 12_000}" for i in range(3)).encode()

    resp = await client.session.post(
        raw_url(client, "/metrics/ga/g/c?" + QUERY), data=lines, headers=BROWSER
    )
    assert resp.status == 204
    [seen] = google.hits()
    assert seen.body == lines
    assert len(await spooled(client)) == stored_before
    assert copies(client, "ga4_hit", "not_stored") == 1
    assert copies(client, "ga4_hit", "stored") == 0
    refused = {"source": "ga4", "reason": "spool_unavailable"}
    assert metric_value(client.app, "tagrelay_events_rejected_total", refused) == 3


async def test_a_hit_that_does_not_decode_passes_and_counts_invalid(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay()
    resp = await client.session.get(raw_url(client, "/metrics/g/collect?v=1&en=x"))
    assert resp.status == 204
    assert [s.raw_path for s in google.hits()] == ["/metrics/g/collect?v=1&en=x"]
    assert await spooled(client) == []
    assert copies(client, "ga4_hit", "invalid") == 1
    rejected = {"source": "ga4", "reason": "missing_measurement_id"}
    assert metric_value(client.app, "tagrelay_events_rejected_total", rejected) == 1


async def test_ads_hits_with_an_event_name_and_a_click_id_are_stored(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay()
    conversion = (
        "/metrics/as/p/c/123456789/?random=1731425083917&cv=11&fst=1731425083917"
        "&en=conversion&label=AbC-dEf&value=49.9&currency_code=EUR&oid=T-9"
        "&gclaw=GCL.1731420000.Cj0KCQiA&gcs=G111&gcd=13r3r2r2r5l1"
        "&url=https%3A%2F%2Fwww.shop.test%2Fthanks&tiba=Thanks"
    )
    no_click = "/metrics/gs/ccm/collect?tid=AW-123456789&en=page_view&url=https%3A%2F%2Fx.test%2F"
    page_with_click = (
        "/metrics/gs/ccm/collect?tid=AW-123456789&en=page_view"
        "&url=https%3A%2F%2Fwww.shop.test%2F%3Fgclid%3DCj0Landing"
    )
    headers = {"Cookie": "_ga=GA1.1.1938271044.1731420000; sessionid=x"}
    for target in (conversion, no_click, page_with_click):
        resp = await client.session.get(raw_url(client, target), headers=headers)
        assert resp.status in (200, 204)
    assert [s.raw_path for s in google.hits()] == [conversion, no_click, page_with_click]
    stored_conversion, stored_page = await spooled(client)
    assert stored_conversion["event"] == "conversion"
    assert stored_conversion["anonymousId"] == CID
    assert stored_conversion["properties"] == {
        "conversion_label": "AbC-dEf",
        "value": 49.9,
        "currency": "EUR",
        "order_id": "T-9",
    }
    context = stored_conversion["context"]
    assert context["clickIds"]["gclid"] == "Cj0KCQiA"
    assert context["googleAds"]["accountId"] == "AW-123456789"
    assert context["googleAds"]["gateway"] is True
    assert context["source"] == "google_ads_tag"
    assert context["page"]["url"] == "https://www.shop.test/thanks"
    assert stored_page["context"]["clickIds"]["gclid"] == "Cj0Landing"
    assert copies(client, "ads_hit", "stored") == 2
    assert copies(client, "ads_hit", "skipped") == 1


async def test_copies_can_be_turned_off(gateway_relay: Any, google: FakeGoogle) -> None:
    client = await gateway_relay(google=gateway_config(google, copy_hits=False))
    resp = await client.session.post(
        raw_url(client, "/metrics/ga/g/c?" + QUERY), data=LINES.encode(), headers=BROWSER
    )
    assert resp.status == 204
    assert len(google.hits()) == 1
    assert await spooled(client) == []


async def test_odd_hits_pass_to_google_and_never_answer_500(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay(gateway={"health_check": False})
    hit = "/metrics/ga/g/c?" + QUERY
    odd = [
        ("POST", hit, {"Content-Encoding": "gzip"}, b"not gzip"),
        ("POST", hit, {"Content-Encoding": "compress"}, b"x"),
        ("POST", hit, {}, b"\xff\xfe not utf-8"),
        ("POST", "/metrics/g/collect?v=2", {}, b"en=x"),
        (
            "POST",
            "/metrics/gs/ccm/collect?en=conversion&gclid=Cj0",
            {"Content-Encoding": "br"},
            b"?",
        ),
        ("PATCH", "/metrics/anything", {}, b"{}"),
        ("DELETE", "/metrics/", {}, b""),
    ]
    for method, target, headers, body in odd:
        resp = await client.session.request(
            method, raw_url(client, target), headers=headers, data=body
        )
        assert resp.status < 500, (method, target)
    assert [(s.method, s.raw_path, s.body) for s in google.hits()] == [
        (method, target, body) for method, target, _, body in odd
    ]
    assert copies(client, "ga4_hit", "invalid") == 4
    assert copies(client, "ads_hit", "stored") == 1
