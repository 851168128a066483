"""The Google tag gateway from a real page: Chromium loads the Google tag from the site's
own path (``/t/gtg/``, the site's proxy passing it to the relay, the relay to a local
fake of ``<tag>.fps.goog``), the tag sends its GA4 hit there with ``sendBeacon``, and the
relay keeps a copy for its forwarders.

What only a browser shows: the site's session cookie never reaches Google while its
``_ga`` does; the cookie Google sets on its answer lands on the site's domain through the
relay and the site's proxy; the hit's copy reaches the webhook marked as delivered, and the
``ga4`` forwarder does not send it again. The rig (site server, relay subprocess, Chromium)
is conftest.py's, with a relay of this module's own whose gateway points at the fake.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.browser.conftest import BASE, BROWSER_KEY, Relay, Site
from tests.rig import free_port, relay_process, serve_in_thread

pytestmark = pytest.mark.browser

TAG_ID = "GTM-GATEWAY1"
MEASUREMENT_ID = "G-GATEWAY1"
CID = "1122334455.1764400000"
LINES = "en=page_view&_et=1\nen=scroll&epn.percent_scrolled=90"

RELAY_CONFIG = """
data_dir: {data_dir}
server:
  host: 127.0.0.1
  port: {port}
  base_path: {base}
metrics: {{public: true}}
admin: {{listen: "127.0.0.1:0"}}
keys:
  - id: website
    kind: browser
    key: {browser_key}
    allowed_origins: ["http://www.shop.test:{site_port}"]
google:
  gateway:
    routes:
      - {{path: /gtg, tag_id: {tag_id}}}
    upstream: http://127.0.0.1:{google_port}
forwarders:
  - id: all
    type: webhook
    endpoint: http://127.0.0.1:{site_port}/hooks/all
    batch: {{max_events: 100, max_wait_secs: 0.05}}
  - id: ga4
    type: ga4
    measurement_id: {measurement_id}
    api_secret: test-secret
    gtag_hits: all
    collect_url: http://127.0.0.1:{site_port}/google/g/collect
    mp_url: http://127.0.0.1:{site_port}/google/mp/collect
    batch: {{max_events: 100, max_wait_secs: 0.05}}
"""

# What the tag does once loaded from the gateway: it calls back to the same path.
TAG = """(function () {{
  var query = "v=2&tid={measurement_id}&cid={cid}&_uip=%3A%3A&fp=1"
    + "&dl=" + encodeURIComponent(location.href) + "&dt=gateway";
  window.hitQueued = navigator.sendBeacon("{base}/gtg/ag/g/c?" + query, {lines!r});
}})();
"""

PAGE = """<!doctype html><html><head><title>gateway</title>
<script async src="{base}/gtg/?id={tag_id}"></script>
</head><body>shop</body></html>"""


@dataclass
class FakeGoogle:
    """``<tag>.fps.goog``: the tag, the hits and the health check; records every request."""

    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def build_app(self) -> web.Application:
        app = web.Application()

        async def handle(request: web.Request) -> web.Response:
            record = {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": dict(request.headers),
                "body": (await request.read()).decode(),
            }
            with self.lock:
                self.requests.append(record)
            if request.path.endswith("/healthy"):
                return web.Response(text="ok")
            if request.path.endswith("/g/c"):
                return web.Response(status=204, headers={"Cache-Control": "no-store"})
            tag = TAG.format(measurement_id=MEASUREMENT_ID, cid=CID, base=BASE, lines=LINES)
            response = web.Response(
                text=tag,
                content_type="application/javascript",
                headers={"Cache-Control": "private, max-age=900"},
            )
            response.headers.add("Set-Cookie", "FPID=FPID2.2.gateway; Path=/; Max-Age=3600")
            return response

        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    def wait_for(self, marker: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [r for r in self.requests if marker in r["raw_path"]]
            if found or time.monotonic() > deadline:
                assert found, f"Google never saw {marker}"
                return found[0]
            time.sleep(0.05)


@dataclass
class Rig:
    site: Site
    relay: Relay
    google: FakeGoogle


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("gateway-relay")
    site = Site(port=free_port(), relay_port=free_port())
    google = FakeGoogle(port=free_port())
    config = tmp / "tagrelay.yaml"
    config.write_text(
        RELAY_CONFIG.format(
            data_dir=tmp / "data",
            port=site.relay_port,
            base=BASE,
            browser_key=BROWSER_KEY,
            site_port=site.port,
            google_port=google.port,
            tag_id=TAG_ID,
            measurement_id=MEASUREMENT_ID,
        )
    )
    stop_google = serve_in_thread(google.build_app(), google.port)
    stop_site = serve_in_thread(site.build_app(), site.port)
    try:
        with relay_process(config, site.relay_port, BASE, tmp / "relay.log"):
            yield Rig(site, Relay(site.relay_port), google)
    finally:
        stop_site()
        stop_google()


def dropped_as_delivered(relay: Relay) -> float:
    for family in text_string_to_metric_families(relay.metrics()):
        for sample in family.samples:
            if sample.name == "tagrelay_forwarder_dropped_total" and sample.labels == {
                "forwarder": "ga4",
                "reason": "gateway_delivered",
            }:
                return sample.value
    return 0.0


def test_the_tag_loads_and_hits_through_the_gateway_and_the_copy_reaches_the_forwarders(
    rig: Rig, context: Any
) -> None:
    site, google = rig.site, rig.google
    site.pages["/gateway/shop"] = PAGE.format(base=BASE, tag_id=TAG_ID)
    # The site's session and GA's cookie, from earlier visits.
    context.add_cookies(
        [
            {"name": "sessionid", "value": "s3cret", "url": site.origin},
            {"name": "_ga", "value": f"GA1.1.{CID}", "url": site.origin},
        ]
    )
    page = context.new_page()
    page.goto(site.origin + "/gateway/shop")
    page.wait_for_function("window.hitQueued === true")

    script = google.wait_for(f"{BASE}/gtg/?id={TAG_ID}")
    assert script["method"] == "GET"
    assert script["headers"]["Cookie"] == f"_ga=GA1.1.{CID}"  # never sessionid
    assert script["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert script["headers"]["User-Agent"] == page.evaluate("navigator.userAgent")

    hit = google.wait_for(f"{BASE}/gtg/ag/g/c?")
    assert hit["method"] == "POST"
    assert hit["body"] == LINES
    assert hit["headers"]["Content-Type"] == "text/plain;charset=UTF-8"
    # The cookie Google set on the tag's answer comes back to it with the hit.
    assert hit["headers"]["Cookie"] == f"_ga=GA1.1.{CID}; FPID=FPID2.2.gateway"

    # Google's cookie, set through the relay and the site's proxy, is the site's.
    cookies = {c["name"]: c for c in context.cookies(site.origin)}
    assert cookies["FPID"]["value"] == "FPID2.2.gateway"
    assert cookies["FPID"]["domain"] == "www.shop.test"

    copies = site.wait_for(
        lambda e: e["context"].get("ga4", {}).get("measurementId") == MEASUREMENT_ID, count=2
    )
    assert sorted(e["event"] for e in copies) == ["page_view", "scroll"]
    for event in copies:
        assert event["context"]["ga4"]["gateway"] is True
        assert event["anonymousId"] == CID
        assert event["context"]["page"]["path"] == "/gateway/shop"

    deadline = time.monotonic() + 10
    while dropped_as_delivered(rig.relay) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dropped_as_delivered(rig.relay) == 2
    assert site.events("google") == []  # the ga4 forwarder sent Google nothing
