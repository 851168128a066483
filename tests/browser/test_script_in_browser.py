"""tagrelay.js in a real browser: page views, SPA navigation, unload, identity, click ids,
consent, and the same-origin deployment under a base path. See conftest.py for the rig."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tagrelay.config.models import Config
from tagrelay.web.script import render_snippet
from tests.browser.conftest import BASE, BROWSER_KEY, Relay, Site

pytestmark = pytest.mark.browser

COOKIE_MAX_AGE = 400 * 86_400


@pytest.fixture(scope="module")
def rig(site_and_relay: tuple[Site, Relay]) -> tuple[Site, Relay]:
    return site_and_relay


def snippet(script_url: str) -> str:
    config = Config.model_validate({"keys": [{"id": "w", "kind": "browser", "key": "k"}]})
    return render_snippet(config, script_url, BROWSER_KEY)


def add_page(site: Site, path: str, *, same_origin: bool = False, head: str = "") -> str:
    """Register a page of the site that carries the snippet; return its URL."""
    origin = site.origin if same_origin else site.relay_origin
    site.pages[path] = (
        "<!doctype html><html><head><title>"
        + path
        + "</title>"
        + snippet(origin + BASE + "/p.js")
        + head
        + "</head><body><a id='next' href='#'>next</a></body></html>"
    )
    return site.origin + path


def path_is(path: str, etype: str = "page") -> Any:
    return lambda e: e.get("type") == etype and e["context"].get("page", {}).get("path") == path


def named(name: str) -> Any:
    return lambda e: e.get("type") == "track" and e.get("event") == name


def settle(site: Site, predicate: Any, expected: int, hook: str = "all") -> list[dict[str, Any]]:
    """Wait for ``expected`` matching events, then a little longer to catch extra ones."""
    site.wait_for(predicate, expected, hook=hook)
    time.sleep(0.6)
    return [e for e in site.events(hook) if predicate(e)]


def test_the_snippet_sends_a_page_view_with_its_context(rig: Any, context: Any) -> None:
    site, _ = rig
    url = add_page(site, "/shop/landing")
    page = context.new_page()
    page.goto(url + "?utm_source=news&utm_campaign=winter&gclid=GCLID-1")
    [event] = settle(site, path_is("/shop/landing"), 1)
    ctx = event["context"]
    assert ctx["source"] == "tagrelay"
    assert ctx["library"]["name"] == "tagrelay.js"
    assert ctx["page"]["title"] == "/shop/landing"
    assert ctx["page"]["url"].startswith(url)
    assert ctx["campaign"]["source"] == "news" and ctx["campaign"]["name"] == "winter"
    assert ctx["clickIds"]["gclid"] == "GCLID-1"
    assert ctx["userAgent"].startswith("Mozilla/")
    assert ctx["ip"] == "127.0.0.1"
    assert ctx["consent"]["analytics"] == "granted"
    assert event["anonymousId"] and event["messageId"]
    assert event["properties"]["path"] == "/shop/landing"


def test_single_page_app_navigation_sends_one_page_view_per_url_change(
    rig: Any, context: Any
) -> None:
    site, _ = rig
    url = add_page(site, "/spa/a")
    page = context.new_page()
    page.goto(url)
    site.wait_for(path_is("/spa/a"))
    page.evaluate("history.pushState({}, '', '/spa/b')")
    site.wait_for(path_is("/spa/b"))
    page.evaluate("history.replaceState({}, '', '/spa/b')")  # same URL: no page view
    page.evaluate("history.pushState({}, '', '/spa/c')")
    site.wait_for(path_is("/spa/c"))
    page.go_back()  # popstate back to /spa/b
    views = settle(
        site,
        lambda e: e.get("type") == "page" and e["context"]["page"]["path"].startswith("/spa/"),
        4,
    )
    assert [v["context"]["page"]["path"] for v in views] == ["/spa/a", "/spa/b", "/spa/c", "/spa/b"]
    assert len({v["messageId"] for v in views}) == 4
    assert len({v["anonymousId"] for v in views}) == 1


def test_track_returns_the_message_id_it_sends(rig: Any, context: Any) -> None:
    site, _ = rig
    page = context.new_page()
    page.goto(add_page(site, "/shop/product"))
    site.wait_for(path_is("/shop/product"))
    message_id = page.evaluate("tagrelay.track('Product Added', {sku: 'SKU-1', price: 9.5})")
    [event] = settle(site, named("Product Added"), 1)
    assert event["messageId"] == message_id
    assert event["properties"] == {"sku": "SKU-1", "price": 9.5}
    chosen = page.evaluate(
        "tagrelay.track('Order Completed', {order_id: 'o-1'}, {messageId: 'order-o-1'})"
    )
    assert chosen == "order-o-1"
    [order] = settle(site, named("Order Completed"), 1)
    assert order["messageId"] == "order-o-1"


UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def test_track_before_the_script_loads_returns_a_uuid_on_a_plain_http_page(
    rig: Any, context: Any
) -> None:
    # http://www.shop.test (a name mapped to 127.0.0.1) is no secure context for Chromium,
    # so crypto.randomUUID is missing there: the snippet's stub must make the id without it.
    site, _ = rig
    early = """<script>
      window.probe = {
        secure: isSecureContext, randomUUID: typeof crypto.randomUUID,
        stub: Array.isArray(tagrelay), id: tagrelay.track('Early Bird', {sku: 'SKU-2'})
      };
    </script>"""
    page = context.new_page()
    page.goto(add_page(site, "/early/bird", head=early))
    probe = page.evaluate("window.probe")
    assert (probe["secure"], probe["randomUUID"], probe["stub"]) == (False, "undefined", True)
    assert re.fullmatch(UUID4, probe["id"] or ""), probe["id"]
    [event] = settle(site, named("Early Bird"), 1)
    assert event["messageId"] == probe["id"]
    assert event["properties"] == {"sku": "SKU-2"}


def test_an_event_fired_during_unload_arrives_once(rig: Any, context: Any) -> None:
    site, _ = rig
    first = add_page(site, "/unload/a")
    second = add_page(site, "/unload/b")
    page = context.new_page()
    page.goto(first)
    site.wait_for(path_is("/unload/a"))
    page.evaluate(f"tagrelay.track('Unload Probe'); location.href = {second!r}")
    site.wait_for(path_is("/unload/b"))
    page.reload()  # a revisit would resend anything left in a queue
    site.wait_for(path_is("/unload/b"), 2)
    probes = settle(site, named("Unload Probe"), 1)
    assert len(probes) == 1


def test_the_identity_cookie_is_httponly_and_the_id_survives_reload_and_storage_loss(
    rig: Any, context: Any
) -> None:
    site, _ = rig
    page = context.new_page()
    page.goto(add_page(site, "/id/home"))
    [first] = site.wait_for(path_is("/id/home"))
    anonymous_id = first["anonymousId"]
    [cookie] = [c for c in context.cookies() if c["name"] == "tr_aid"]
    assert cookie["value"] == anonymous_id
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    assert cookie["domain"] == ".shop.test"
    assert cookie["path"] == BASE
    assert abs(cookie["expires"] - (time.time() + COOKIE_MAX_AGE)) < 120
    assert page.evaluate("document.cookie").find("tr_aid") == -1  # invisible to scripts

    page.reload()
    site.wait_for(path_is("/id/home"), 2)
    # The browser forgets script storage (as Safari does after 7 days): the server id wins
    # and the script adopts it.
    page.evaluate("localStorage.clear(); sessionStorage.clear()")
    page.reload()
    views = settle(site, path_is("/id/home"), 3)
    assert [v["anonymousId"] for v in views] == [anonymous_id] * 3
    page.evaluate("tagrelay.track('After Storage Loss')")
    [after] = settle(site, named("After Storage Loss"), 1)
    assert after["anonymousId"] == anonymous_id


def test_click_ids_on_the_landing_url_reach_later_events(rig: Any, context: Any) -> None:
    site, _ = rig
    landing = add_page(site, "/clk/land")
    later = add_page(site, "/clk/later")
    page = context.new_page()
    page.goto(landing + "?gclid=G-77&fbclid=FB-77&msclkid=MS-77")
    site.wait_for(path_is("/clk/land"))
    # A new tab: no sessionStorage, so only the relay's cookie can carry the click ids.
    other = context.new_page()
    other.goto(later)
    [event] = settle(site, path_is("/clk/later"), 1)
    assert event["context"]["clickIds"] == {"gclid": "G-77", "fbclid": "FB-77", "msclkid": "MS-77"}
    fbc = event["context"]["clientIds"]["fbc"]
    assert re.fullmatch(r"fb\.1\.\d{13}\.FB-77", fbc)
    cookies = {c["name"]: c for c in context.cookies()}
    assert cookies["_fbc"]["value"] == fbc
    assert cookies["_fbc"]["httpOnly"] is False and cookies["_fbc"]["domain"] == ".shop.test"
    assert re.fullmatch(r"fb\.1\.\d{13}\.\d+", cookies["_fbp"]["value"])
    assert cookies["tr_clk"]["httpOnly"] is True


def test_consent_denial_suppresses_cookies_identifiers_and_ads_forwarding(
    rig: Any, context: Any
) -> None:
    site, relay = rig
    deny = "<script>tagrelay.consent({analytics: false, ads: false});</script>"
    page = context.new_page()
    page.goto(add_page(site, "/consent/page", head=deny))
    [view] = settle(site, path_is("/consent/page"), 1)
    assert view["context"]["consent"]["analytics"] == "denied"
    assert view["context"]["anonymized"] is True
    assert "anonymousId" not in view and "ip" not in view["context"]
    assert not [c for c in context.cookies() if c["name"] in ("tr_aid", "_fbp")]
    assert not [e for e in site.events("ads") if path_is("/consent/page")(e)]

    page.evaluate(
        "tagrelay.consent({analytics: true, ads: true, ad_user_data: true,"
        " ad_personalization: true}); tagrelay.track('Consent Granted')"
    )
    [granted] = site.wait_for(named("Consent Granted"), hook="ads")
    assert granted["anonymousId"]
    assert {c["name"] for c in context.cookies()} >= {"tr_aid", "_fbp"}
    dropped = re.search(
        r'tagrelay_forwarder_dropped_total\{forwarder="ads",reason="consent_denied"\} (\S+)',
        relay.metrics(),
    )
    assert dropped is not None and float(dropped.group(1)) >= 1


def test_same_origin_under_the_base_path(rig: Any, context: Any) -> None:
    site, _ = rig
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(add_page(site, "/same/home", same_origin=True))
    [view] = settle(site, path_is("/same/home"), 1)
    # Every request went to the site's own origin, under /t.
    relay_requests = [u for u in requests if "/t/" in u]
    assert relay_requests and all(u.startswith(site.origin + BASE + "/") for u in relay_requests)
    assert view["context"]["ip"] == "127.0.0.1"  # from X-Forwarded-For, a trusted proxy
    [cookie] = [c for c in context.cookies() if c["name"] == "tr_aid"]
    assert cookie["path"] == BASE and cookie["httpOnly"] is True
    page.reload()
    views = settle(site, path_is("/same/home"), 2)
    assert views[0]["anonymousId"] == views[1]["anonymousId"] == cookie["value"]


def test_the_demo_page_sends_events(rig: Any, context: Any) -> None:
    site, _ = rig
    page = context.new_page()
    page.goto(site.relay_origin + BASE + "/demo")
    site.wait_for(path_is(BASE + "/demo"))
    page.click("#track")
    [clicked] = settle(site, named("Demo Clicked"), 1)
    assert clicked["context"]["page"]["path"] == BASE + "/demo"
    page.click("#signup")
    site.wait_for(path_is(BASE + "/demo/signup"))
    assert "tagrelay sql" in page.content()
