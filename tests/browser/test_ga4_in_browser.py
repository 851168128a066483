"""gtag-shaped hits from a real page, through the relay's /g/collect, to a fake Google
collection endpoint: a single GET, and a batched text/plain POST sent with sendBeacon, as
gtag.js sends them once ``transport_url`` / ``server_container_url`` points at the relay."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

import pytest

from tests.browser.conftest import BASE, MEASUREMENT_ID, Relay, Site

pytestmark = pytest.mark.browser

CID = "1122334455.1764400000"


@pytest.fixture(scope="module")
def rig(site_and_relay: tuple[Site, Relay]) -> tuple[Site, Relay]:
    return site_and_relay


def google_requests(site: Site, marker: str, count: int, timeout: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in site.events("google") if marker in r["query"] + r["body"]]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def shared_query(page_url: str, marker: str) -> str:
    # What gtag puts in the query: the request-level parameters (percent-encoded as gtag
    # does), including a valueless flag.
    from urllib.parse import quote

    return (
        f"v=2&tid={MEASUREMENT_ID}&gtm=45je4b20v9175741929za200&_p=1764400000123"
        f"&gcs=G111&gcd=13r3r2r2r5l1&cid={CID}&ul=en-us&sr=1280x720&sid=1764400001&sct=2"
        f"&seg=1&dl={quote(page_url, safe='')}&dt={marker}&_s=1&richsstsse"
    )


def test_a_single_get_hit_reaches_google_with_the_visitor_s_ip_and_user_agent(
    rig: Any, context: Any
) -> None:
    site, _ = rig
    site.pages["/ga4/get"] = "<!doctype html><title>ga4</title><p>hi</p>"
    page = context.new_page()
    page.goto(site.origin + "/ga4/get?x=1")
    user_agent = page.evaluate("navigator.userAgent")
    query = shared_query(site.origin + "/ga4/get?x=1", "ga4-get") + "&en=page_view&_et=5"
    status = page.evaluate(
        "async (url) => (await fetch(url, {credentials: 'include', keepalive: true})).status",
        f"{site.relay_origin}{BASE}/g/collect?{query}",
    )
    assert status == 204
    [sent] = google_requests(site, "ga4-get", 1)
    assert sent["method"] == "POST" and sent["path"] == "/google/g/collect"
    params = parse_qsl(sent["query"], keep_blank_values=True)
    assert ("_uip", "127.0.0.1") in params
    # everything gtag sent is passed on as it was sent (same order, same encoding)
    assert sent["query"] == query + "&_uip=127.0.0.1"
    assert sent["headers"]["User-Agent"] == user_agent
    assert sent["body"] == ""


def test_a_batched_beacon_post_stays_one_batch(rig: Any, context: Any) -> None:
    site, _ = rig
    site.pages["/ga4/beacon"] = "<!doctype html><title>ga4</title><p>hi</p>"
    page = context.new_page()
    page.goto(site.origin + "/ga4/beacon")
    query = shared_query(site.origin + "/ga4/beacon", "ga4-beacon")
    lines = [
        "en=add_to_cart&ep.currency=EUR&epn.value=12.5&pr1=idSKU_1~nmMug~pr12.5~qt1&_et=300",
        "en=begin_checkout&epn.value=12.5&_et=800",
        "en=scroll&epn.percent_scrolled=90&_et=1200",
    ]
    queued = page.evaluate(
        "([url, body]) => navigator.sendBeacon(url, body)",
        [f"{site.relay_origin}{BASE}/g/collect?{query}", "\n".join(lines)],
    )
    assert queued is True
    [sent] = google_requests(site, "ga4-beacon", 1)
    assert sent["query"] == query + "&_uip=127.0.0.1"
    assert sent["body"].split("\n") == lines
    assert sent["headers"]["Content-Type"] == "text/plain;charset=UTF-8"
    assert sent["headers"]["User-Agent"] == page.evaluate("navigator.userAgent")
    # stored too, as three events of the visitor
    events = site.wait_for(lambda e: e["context"].get("ga4", {}).get("request") == query, count=3)
    assert sorted(e["event"] for e in events) == ["add_to_cart", "begin_checkout", "scroll"]
    assert {e["anonymousId"] for e in events} == {CID}
