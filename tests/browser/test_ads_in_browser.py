"""The ad platforms end to end: the relay's tracking script in Chromium -> relay -> local fake
Meta, TikTok and Google Ads (and Google's token endpoint).

A visitor lands from an ad (``?gclid=...&ttclid=...&fbclid=...``), grants consent, identifies
with an email; on a later page, in a new tab (so only the relay's click-id cookie can carry
the click ids), the site's order confirmation calls ``tagrelay.track('Order Completed', ...)``
and keeps the id it returns, the id a site passes to ``fbq(..., {eventID: id})`` and
``ttq.track(..., {event_id: id})``. Each platform must receive the purchase once, under that
id, with its click id; with ``ad_user_data`` denied each receives it without hashed
identifiers or IP; with ``ads`` denied none receives anything, while the relay stores the
event all the same. The email given to ``identify`` on the landing page reaches each platform
hashed with the later purchase: the script remembers the traits and sends them as
``context.traits`` on later track and page events. The rig (site server, relay subprocess,
Chromium) is conftest.py's, with a relay of this module's own whose ad forwarders point at
the fakes below.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tagrelay.config.models import Config
from tagrelay.web.script import render_snippet
from tests.browser.conftest import BASE, BROWSER_KEY, Relay, Site
from tests.rig import free_port, relay_process, serve_in_thread

pytestmark = pytest.mark.browser

PIXEL_ID = "1234567890"
PIXEL_CODE = "CQ1A2B3C4D5E6F7G8H9J"
CUSTOMER_ID = "1234567890"
ACTION = f"customers/{CUSTOMER_ID}/conversionActions/42"
ACCESS_TOKEN = "ya29.browser-test"
EMAIL = "Ada.Lovelace@Shop.test"
AD_FORWARDERS = ("meta", "tiktok", "gads")

RELAY_CONFIG = """
data_dir: {data_dir}
server:
  host: 127.0.0.1
  port: {port}
  base_path: {base}
# Metrics on the relay's own port, which the tests read; the admin listener on a free port.
metrics: {{public: true}}
admin: {{listen: "127.0.0.1:0"}}
keys:
  - id: website
    kind: browser
    key: {browser_key}
    allowed_origins: ["http://www.shop.test:{site_port}"]
forwarders:
  - id: all
    type: webhook
    endpoint: http://127.0.0.1:{site_port}/hooks/all
    batch: {{max_events: 100, max_wait_secs: 0.05}}
  - id: meta
    type: meta
    pixel_id: "{pixel_id}"
    access_token: meta-secret-token
    base_url: http://127.0.0.1:{fake_port}/meta
    batch: {{max_events: 100, max_wait_secs: 0.05}}
  - id: tiktok
    type: tiktok
    pixel_code: {pixel_code}
    access_token: tiktok-secret-token
    base_url: http://127.0.0.1:{fake_port}/tiktok
    batch: {{max_events: 100, max_wait_secs: 0.05}}
  - id: gads
    type: google_ads
    customer_id: "123-456-7890"
    developer_token: dev-token
    oauth:
      client_id: client.apps.googleusercontent.com
      client_secret: client-secret
      refresh_token: refresh-token
    token_url: http://127.0.0.1:{fake_port}/google/token
    base_url: http://127.0.0.1:{fake_port}/gads
    conversions:
      - {{event: Order Completed, conversion_action: "{action}"}}
    batch: {{max_events: 100, max_wait_secs: 0.05}}
"""

LANDING = """<!doctype html><html><head><title>Landing</title>{snippet}
<script>tagrelay.consent({consent});</script>
</head><body>landing</body></html>"""

# The order confirmation page: once the script is ready, the purchase is tracked and its id
# kept for the pixels (here: for the test).
CHECKOUT = """<!doctype html><html><head><title>Thank you</title>{snippet}
<script>
tagrelay.ready(function () {{
  window.orderEventId = tagrelay.track("Order Completed",
    {{order_id: "{order_id}", revenue: 42, currency: "USD"}});
}});
</script>
</head><body>thank you</body></html>"""

GRANTED = "{analytics: true, ads: true, ad_user_data: true, ad_personalization: false}"
NO_AD_USER_DATA = "{analytics: true, ads: true, ad_user_data: false, ad_personalization: false}"
ADS_DENIED = "{analytics: true, ads: false, ad_user_data: false, ad_personalization: false}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Platforms:
    """Fake Meta, TikTok, Google Ads and Google's token endpoint on one local server, each
    answering as the platform does; every request is recorded."""

    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def build_app(self) -> web.Application:
        app = web.Application()

        async def handle(request: web.Request) -> web.Response:
            platform = request.match_info["platform"]
            raw = await request.read()
            record = {
                "platform": platform,
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "raw": raw.decode(),
            }
            with self.lock:
                self.requests.append(record)
            if platform == "google" and request.path == "/google/token":
                return web.json_response(
                    {"access_token": ACCESS_TOKEN, "expires_in": 3599, "token_type": "Bearer"}
                )
            body = orjson.loads(raw)
            if platform == "meta":
                return web.json_response(
                    {"events_received": len(body["data"]), "fbtrace_id": "AbCdEf"}
                )
            if platform == "tiktok":
                return web.json_response(
                    {"code": 0, "message": "OK", "request_id": "2026120509", "data": {}}
                )
            if platform == "gads":
                results = [
                    {
                        "gclid": c.get("gclid"),
                        "conversionAction": c["conversionAction"],
                        "conversionDateTime": c["conversionDateTime"],
                    }
                    for c in body["conversions"]
                ]
                return web.json_response({"results": results})
            return web.json_response({"error": "no such fake"}, status=404)

        app.router.add_route("*", "/{platform}/{tail:.*}", handle)
        return app

    def recorded(self, platform: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["platform"] == platform]

    def events(self, platform: str) -> list[dict[str, Any]]:
        """Every event (or conversion) ``platform`` received, in order."""
        key = "conversions" if platform == "gads" else "data"
        return [e for r in self.recorded(platform) for e in orjson.loads(r["raw"])[key]]


@dataclass
class Rig:
    site: Site
    relay: Relay
    platforms: Platforms


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("ads-relay")
    site = Site(port=free_port(), relay_port=free_port())
    platforms = Platforms(port=free_port())
    config = tmp / "tagrelay.yaml"
    config.write_text(
        RELAY_CONFIG.format(
            data_dir=tmp / "data",
            port=site.relay_port,
            base=BASE,
            browser_key=BROWSER_KEY,
            site_port=site.port,
            fake_port=platforms.port,
            pixel_id=PIXEL_ID,
            pixel_code=PIXEL_CODE,
            action=ACTION,
        )
    )
    stop_platforms = serve_in_thread(platforms.build_app(), platforms.port)
    stop_site = serve_in_thread(site.build_app(), site.port)
    try:
        with relay_process(config, site.relay_port, BASE, tmp / "relay.log"):
            yield Rig(site, Relay(site.relay_port), platforms)
    finally:
        stop_site()
        stop_platforms()


def add_pages(site: Site, flow: str, consent: str, order_id: str) -> tuple[str, str]:
    """The landing and the order confirmation pages of ``flow``; their URLs."""
    # The relay's own snippet: its stub queues the calls below until the script has loaded,
    # and the script replays them before its automatic page view, so the landing page view
    # already carries the consent.
    config = Config.model_validate({"keys": [{"id": "w", "kind": "browser", "key": "k"}]})
    snippet = render_snippet(config, site.relay_origin + BASE + "/p.js", BROWSER_KEY)
    landing, checkout = f"/ads/{flow}/landing", f"/ads/{flow}/checkout"
    site.pages[landing] = LANDING.format(snippet=snippet, consent=consent)
    site.pages[checkout] = CHECKOUT.format(snippet=snippet, order_id=order_id)
    return site.origin + landing, site.origin + checkout


def on_path(path: str, etype: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == etype and e["context"].get("page", {}).get("path") == path


def poll(read: Callable[[], Any], timeout: float = 15.0) -> Any:
    """``read()`` once it is truthy, or its last (falsy) value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def dropped_for_consent(relay: Relay) -> dict[str, float]:
    """``tagrelay_forwarder_dropped_total{reason="consent_denied"}`` per ad forwarder."""
    counts = dict.fromkeys(AD_FORWARDERS, 0.0)
    for family in text_string_to_metric_families(relay.metrics()):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "tagrelay_forwarder_dropped_total"
                and labels.get("reason") == "consent_denied"
                and labels.get("forwarder") in counts
            ):
                counts[labels["forwarder"]] = sample.value
    return counts


def visit(rig: Rig, context: Any, flow: str, consent: str, order_id: str) -> tuple[str, Any]:
    """Land from an ad with ``consent``, identify, then confirm the order in a new tab; the
    id ``track`` returned and the stored purchase."""
    site = rig.site
    landing, checkout = add_pages(site, flow, consent, order_id)
    page = context.new_page()
    page.goto(landing + "?gclid=G-CLICK-1&ttclid=TT-CLICK-1&fbclid=FB-CLICK-1")
    page.wait_for_function("typeof tagrelay.anonymousId === 'function'")
    assert site.wait_for(on_path(f"/ads/{flow}/landing", "page"))
    page.evaluate(f"tagrelay.identify('u-1', {{email: {EMAIL!r}}})")
    assert site.wait_for(on_path(f"/ads/{flow}/landing", "identify"))
    # A new tab: no sessionStorage, so the click ids can only come from the relay's cookie.
    other = context.new_page()
    other.goto(checkout)
    other.wait_for_function("typeof window.orderEventId === 'string'")
    event_id: str = other.evaluate("window.orderEventId")
    [purchase] = site.wait_for(
        lambda e: (
            e.get("event") == "Order Completed" and e["properties"].get("order_id") == order_id
        )
    )
    return event_id, purchase


def purchases(platforms: Platforms, platform: str, order_id: str) -> list[dict[str, Any]]:
    """The purchases of ``order_id`` that ``platform`` received."""
    if platform == "gads":
        return [e for e in platforms.events(platform) if e.get("orderId") == order_id]
    name, data = ("event_name", "custom_data") if platform == "meta" else ("event", "properties")
    return [
        e
        for e in platforms.events(platform)
        if e.get(name) == "Purchase" and e[data].get("order_id") == order_id
    ]


def test_a_purchase_reaches_meta_tiktok_and_google_ads_under_the_id_track_returned(
    rig: Rig, context: Any
) -> None:
    event_id, purchase = visit(rig, context, "granted", GRANTED, "o-1")
    platforms = rig.platforms
    assert purchase["messageId"] == event_id  # the relay stored it under the same id
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    fbc = cookies["_fbc"]
    assert re.fullmatch(r"fb\.1\.\d{13}\.FB-CLICK-1", fbc)

    [meta] = poll(lambda: purchases(platforms, "meta", "o-1"))
    assert meta["event_id"] == event_id
    assert meta["action_source"] == "website"
    assert meta["event_source_url"].endswith("/ads/granted/checkout")
    user_data = meta["user_data"]
    assert user_data["fbc"] == fbc
    assert user_data["fbp"] == cookies["_fbp"]
    assert user_data["external_id"] == [sha256("u-1")]
    custom = meta["custom_data"]
    assert (custom["value"], custom["currency"], custom["order_id"]) == (42, "USD", "o-1")
    [meta_request] = [r for r in platforms.recorded("meta") if event_id in r["raw"]]
    assert re.fullmatch(rf"/meta/v[\d.]+/{PIXEL_ID}/events", meta_request["path"])

    [tiktok] = poll(lambda: purchases(platforms, "tiktok", "o-1"))
    assert tiktok["event_id"] == event_id
    assert tiktok["user"]["ttclid"] == "TT-CLICK-1"
    assert tiktok["user"]["external_id"] == sha256("u-1")
    properties = tiktok["properties"]
    assert (properties["value"], properties["currency"], properties["order_id"]) == (
        42,
        "USD",
        "o-1",
    )
    [tiktok_request] = [r for r in platforms.recorded("tiktok") if event_id in r["raw"]]
    assert tiktok_request["path"] == "/tiktok/open_api/v1.3/event/track/"
    assert tiktok_request["headers"]["Access-Token"] == "tiktok-secret-token"
    assert orjson.loads(tiktok_request["raw"])["event_source_id"] == PIXEL_CODE

    [ads] = poll(lambda: purchases(platforms, "gads", "o-1"))
    assert ads["gclid"] == "G-CLICK-1"  # from the landing URL, through the relay's cookie
    assert ads["orderId"] == "o-1"
    assert ads["conversionAction"] == ACTION
    assert (ads["conversionValue"], ads["currencyCode"]) == (42, "USD")
    # consent() reached the relay: ad_personalization was denied on the page.
    assert ads["consent"] == {"adUserData": "GRANTED", "adPersonalization": "DENIED"}
    [ads_request] = [r for r in platforms.recorded("gads") if '"o-1"' in r["raw"]]
    assert ads_request["path"] == f"/gads/{ads_request['path'].split('/')[2]}/customers/" + (
        f"{CUSTOMER_ID}:uploadClickConversions"
    )
    assert ads_request["headers"]["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert ads_request["headers"]["developer-token"] == "dev-token"
    [token_request] = platforms.recorded("google")
    assert "grant_type=refresh_token" in token_request["raw"]

    # Once each: nothing else carried the purchase.
    for platform in ("meta", "tiktok", "gads"):
        assert (
            sum(event_id in r["raw"] or '"o-1"' in r["raw"] for r in platforms.recorded(platform))
            == 1
        ), platform


def test_with_ads_denied_no_platform_gets_anything_and_the_relay_keeps_the_event(
    rig: Rig, context: Any
) -> None:
    site, platforms = rig.site, rig.platforms
    before = dropped_for_consent(rig.relay)
    event_id, purchase = visit(rig, context, "denied", ADS_DENIED, "o-2")
    assert purchase["messageId"] == event_id
    assert purchase["context"]["consent"]["ads"] == "denied"
    flow = [
        e
        for e in site.events()
        if e["context"].get("page", {}).get("path", "").startswith("/ads/denied/")
    ]
    # landing view, identify, checkout view, purchase
    assert len(flow) == 4
    expected = {f: before[f] + len(flow) for f in AD_FORWARDERS}
    # Every event of the flow has been decided by each ad forwarder: dropped for consent.
    assert poll(lambda: dropped_for_consent(rig.relay) == expected) is True
    ids = [e["messageId"] for e in flow]
    for platform in ("meta", "tiktok", "gads"):
        for request in platforms.recorded(platform):
            assert not [i for i in ids if i in request["raw"]], platform
            assert '"o-2"' not in request["raw"], platform


def test_without_ad_user_data_each_platform_gets_the_purchase_without_user_data(
    rig: Rig, context: Any
) -> None:
    event_id, _ = visit(rig, context, "no-user-data", NO_AD_USER_DATA, "o-4")
    platforms = rig.platforms
    [meta] = poll(lambda: purchases(platforms, "meta", "o-4"))
    [tiktok] = poll(lambda: purchases(platforms, "tiktok", "o-4"))
    [ads] = poll(lambda: purchases(platforms, "gads", "o-4"))
    assert meta["event_id"] == tiktok["event_id"] == event_id
    assert not {"em", "ph", "external_id", "client_ip_address"} & set(meta["user_data"])
    assert not {"email", "phone", "external_id", "ip"} & set(tiktok["user"])
    assert tiktok["user"]["ttclid"] == "TT-CLICK-1"
    assert ads["gclid"] == "G-CLICK-1"  # the click id still matches it
    assert "userIdentifiers" not in ads
    assert ads["consent"]["adUserData"] == "DENIED"
    text = orjson.dumps([meta, tiktok, ads]).decode()
    assert sha256("u-1") not in text


def test_the_email_given_to_identify_reaches_each_platform_hashed_with_the_purchase(
    rig: Rig, context: Any
) -> None:
    visit(rig, context, "identified", GRANTED, "o-3")
    hashed_email = sha256("ada.lovelace@shop.test")
    platforms = rig.platforms
    [meta] = poll(lambda: purchases(platforms, "meta", "o-3"))
    [tiktok] = poll(lambda: purchases(platforms, "tiktok", "o-3"))
    [ads] = poll(lambda: purchases(platforms, "gads", "o-3"))
    assert meta["user_data"].get("em") == [hashed_email]
    assert tiktok["user"].get("email") == hashed_email
    email_identifier = {"hashedEmail": hashed_email, "userIdentifierSource": "FIRST_PARTY"}
    assert email_identifier in ads.get("userIdentifiers", [])
