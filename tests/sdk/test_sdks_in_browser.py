"""Segment analytics-next, Jitsu and RudderStack, unmodified, in Chromium, pointed at the
relay: each mode sends page(), track('Purchase', {revenue: 42, currency: 'USD'}) and
identify('u1', {email: 'a@b.com'}), and the three land in the warehouse as rows. Then the
unload probe: track('Unload Probe') and a navigation in the same task, a revisit of the page,
and exactly one row and one webhook delivery for the probe (SDKs resend what an unload cut
off; the relay deduplicates on messageId). See conftest.py for the rig.

Every test has its own page path (``/shop/<scenario>``): that tells its rows apart in the
shared warehouse. Each page calls page() as it loads, before the SDK is ready (SDKs queue
such calls), and defines ``window.sdk``: ``ready`` resolves once the SDK has loaded,
``run()`` sends track and identify, ``probe(url)`` tracks the probe and leaves for ``url``
in the same task.
"""

from __future__ import annotations

import base64
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from tests.sdk.conftest import (
    BASE,
    BROWSER_KEY,
    SERVER_KEY,
    Journal,
    Rig,
    Site,
)

pytestmark = pytest.mark.browser


def js(value: Any) -> str:
    """``value`` as a JavaScript literal."""
    return orjson.dumps(value).decode()


def _page(title: str, head: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"{head}</head><body><h1>{title}</h1></body></html>"
    )


# -- Segment analytics-next ------------------------------------------------------------------


def segment_settings(key: str, api_host: str, batching: bool = False) -> dict[str, Any]:
    io: dict[str, Any] = {"apiKey": key, "apiHost": api_host, "protocol": "http"}
    if batching:
        io["deliveryStrategy"] = {
            "strategy": "batching",
            "config": {"size": 10, "timeout": 1000},
        }
    return {"integrations": {"Segment.io": io}, "metrics": {"sampleRate": 0}}


def segment_npm_page(site: Site, title: str, load: str, relay: str) -> str:
    """analytics-next's npm UMD build (global ``AnalyticsNext``); ``load`` is the
    expression that loads it (an ``AnalyticsBrowser``)."""
    return _page(
        title,
        f"<script>window.analytics = {{_cdn: {js(relay)}}};</script>"
        f"<script src='{site.static}/segment/index.js'></script>"
        "<script>"
        f"const analytics = {load};"
        "analytics.page();"
        "window.sdk = {"
        "  ready: new Promise((resolve) => analytics.ready(() => resolve(true))),"
        "  run: async () => {"
        "    await analytics.track('Purchase', {revenue: 42, currency: 'USD'});"
        "    await analytics.identify('u1', {email: 'a@b.com'});"
        "  },"
        "  probe: (to) => { analytics.track('Unload Probe'); location.href = to; },"
        "};"
        "</script>",
    )


def segment_inline(site: Site, title: str, relay: str, key: str, batching: bool = False) -> str:
    api_host = relay.split("://", 1)[1] + "/v1"
    settings = js(segment_settings(key, api_host, batching))
    options = js({"integrations": {"Segment.io": {"apiHost": api_host, "protocol": "http"}}})
    load = (
        f"AnalyticsNext.AnalyticsBrowser.load({{writeKey: {js(key)}, cdnSettings: {settings}}}, "
        f"{options})"
    )
    return segment_npm_page(site, title, load, relay)


def segment_cdn_url(site: Site, title: str, relay: str, key: str) -> str:
    load = f"AnalyticsNext.AnalyticsBrowser.load({{writeKey: {js(key)}, cdnURL: {js(relay)}}})"
    return segment_npm_page(site, title, load, relay)


def segment_snippet(site: Site, title: str, relay: str, key: str) -> str:
    """Segment's own snippet (5.2.0), with ``_cdn`` set to the relay and the library loaded
    from it: ``<relay>/analytics.js/v1/<writeKey>/analytics.min.js``."""
    snippet = (
        '!function(){var i="analytics",analytics=window[i]=window[i]||[];'
        "if(!analytics.initialize)if(analytics.invoked)window.console&&console.error&&"
        'console.error("Segment snippet included twice.");else{analytics.invoked=!0;'
        'analytics.methods=["trackSubmit","trackClick","trackLink","trackForm","pageview",'
        '"identify","reset","group","track","ready","alias","debug","page","screen","once",'
        '"off","on","addSourceMiddleware","addIntegrationMiddleware","setAnonymousId",'
        '"addDestinationMiddleware","register"];analytics.factory=function(e){return function()'
        "{if(window[i].initialized)return window[i][e].apply(window[i],arguments);"
        'var n=Array.prototype.slice.call(arguments);if(["track","screen","alias","group",'
        '"page","identify"].indexOf(e)>-1){var c=document.querySelector("link[rel=\'canonical\']");'
        'n.push({__t:"bpc",c:c&&c.getAttribute("href")||void 0,p:location.pathname,'
        "u:location.href,s:location.search,t:document.title,r:document.referrer})}"
        "n.unshift(e);analytics.push(n);return analytics}};"
        "for(var n=0;n<analytics.methods.length;n++){var key=analytics.methods[n];"
        "analytics[key]=analytics.factory(key)}analytics.load=function(key,n){"
        'var t=document.createElement("script");t.type="text/javascript";t.async=!0;'
        't.setAttribute("data-global-segment-analytics-key",i);'
        't.src=analytics._cdn+"/analytics.js/v1/"+key+"/analytics.min.js";'
        'var r=document.getElementsByTagName("script")[0];r.parentNode.insertBefore(t,r);'
        "analytics._loadOptions=n};"
        f"analytics._writeKey={js(key)};analytics._cdn={js(relay)};"
        'analytics.SNIPPET_VERSION="5.2.0";'
        f"analytics.load({js(key)});"
        "analytics.page();"
        "}}();"
    )
    return _page(
        title,
        f"<script>{snippet}</script>"
        "<script>"
        "window.sdk = {"
        "  ready: new Promise((resolve) => analytics.ready(() => resolve(true))),"
        "  run: async () => {"
        "    await window.analytics.track('Purchase', {revenue: 42, currency: 'USD'});"
        "    await window.analytics.identify('u1', {email: 'a@b.com'});"
        "  },"
        "  probe: (to) => { window.analytics.track('Unload Probe'); location.href = to; },"
        "};"
        "</script>",
    )


# -- Jitsu -----------------------------------------------------------------------------------


def jitsu_esm(site: Site, title: str, relay: str, key: str) -> str:
    return _page(
        title,
        "<script type='module'>"
        f"import {{ jitsuAnalytics }} from '{site.static}/jitsu/jitsu.es.js';"
        f"const jitsu = jitsuAnalytics({{host: {js(relay)}, writeKey: {js(key)}}});"
        "jitsu.page();"
        "window.sdk = {"
        "  ready: Promise.resolve(true),"
        "  run: async () => {"
        "    await jitsu.track('Purchase', {revenue: 42, currency: 'USD'});"
        "    await jitsu.identify('u1', {email: 'a@b.com'});"
        "  },"
        "  probe: (to) => { jitsu.track('Unload Probe'); location.href = to; },"
        "};"
        "</script>",
    )


# -- RudderStack -----------------------------------------------------------------------------


def rudder(
    site: Site, title: str, relay: str, key: str, build: str, options: dict[str, Any]
) -> str:
    return _page(
        title,
        f"<script src='{site.static}/rudder/{build}.js'></script>"
        "<script>"
        "const ra = new rudderanalytics.RudderAnalytics();"
        f"ra.load({js(key)}, {js(relay)}, {js({'configUrl': relay, **options})});"
        "ra.page();"
        "window.sdk = {"
        "  ready: new Promise((resolve) => ra.ready(() => resolve(true))),"
        "  run: async () => {"
        "    ra.track('Purchase', {revenue: 42, currency: 'USD'});"
        "    ra.identify('u1', {email: 'a@b.com'});"
        "  },"
        "  probe: (to) => { ra.track('Unload Probe'); location.href = to; },"
        "};"
        "</script>",
    )


# -- the scenarios -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[Site, str, str, str], str]
    library: str
    key: str = BROWSER_KEY  # Jitsu's id:secret form, which every SDK sends as it is
    same_origin: bool = False
    # analytics-next reads ajs_aid from the URL (in a chunk it loads from _cdn, the relay)
    anonymous_id: str | None = None
    # what the SDK must have requested from the relay (paths after its base URL; {key})
    requests: tuple[str, ...] = ()


SEGMENT = "analytics.js"
JITSU = "@jitsu/js"
RUDDER = "RudderLabs JavaScript SDK"
# The label of each SDK's events (the metrics' source, context.source).
SOURCE_OF_LIBRARY = {SEGMENT: "segment", JITSU: "jitsu", RUDDER: "rudderstack"}
RUDDER_BATCH = {"queueOptions": {"batch": {"enabled": True, "maxItems": 10, "flushInterval": 1000}}}
RUDDER_BEACON = {"useBeacon": True, "beaconQueueOptions": {"flushQueueInterval": 1000}}


def segment_batching(site: Site, title: str, relay: str, key: str) -> str:
    return segment_inline(site, title, relay, key, batching=True)


def rudder_with(build: str, options: dict[str, Any]) -> Callable[[Site, str, str, str], str]:
    return lambda site, title, relay, key: rudder(site, title, relay, key, build, options)


SEGMENT_SETTINGS = "GET /v1/projects/{key}/settings"
SEGMENT_ONE_BY_ONE = ("POST /v1/p", "POST /v1/t", "POST /v1/i")
RUDDER_CONFIG = "GET /sourceConfig/?"
RUDDER_ONE_BY_ONE = ("POST /v1/page", "POST /v1/track", "POST /v1/identify")

SCENARIOS = [
    Scenario("segment-inline", segment_inline, SEGMENT, requests=SEGMENT_ONE_BY_ONE),
    Scenario(
        "segment-cdnurl",
        segment_cdn_url,
        SEGMENT,
        anonymous_id="anon-segment-cdnurl",
        requests=(SEGMENT_SETTINGS, *SEGMENT_ONE_BY_ONE),
    ),
    Scenario(
        "segment-cdnurl-same-origin",
        segment_cdn_url,
        SEGMENT,
        same_origin=True,
        requests=(SEGMENT_SETTINGS, *SEGMENT_ONE_BY_ONE),
    ),
    Scenario(
        "segment-snippet",
        segment_snippet,
        SEGMENT,
        anonymous_id="anon-segment-snippet",
        requests=(
            "GET /analytics.js/v1/{key}/analytics.min.js",
            SEGMENT_SETTINGS,
            *SEGMENT_ONE_BY_ONE,
        ),
    ),
    Scenario("segment-batching", segment_batching, SEGMENT, requests=("POST /v1/b",)),
    Scenario(
        "jitsu-esm",
        jitsu_esm,
        JITSU,
        requests=("POST /api/s/page", "POST /api/s/track", "POST /api/s/identify"),
    ),
    Scenario(
        "jitsu-esm-same-origin",
        jitsu_esm,
        JITSU,
        same_origin=True,
        requests=("POST /api/s/page", "POST /api/s/track", "POST /api/s/identify"),
    ),
    Scenario(
        "rudder-bundled-xhr",
        rudder_with("bundled", {}),
        RUDDER,
        requests=(RUDDER_CONFIG, *RUDDER_ONE_BY_ONE),
    ),
    Scenario(
        "rudder-bundled-xhr-same-origin",
        rudder_with("bundled", {}),
        RUDDER,
        same_origin=True,
        requests=(RUDDER_CONFIG, *RUDDER_ONE_BY_ONE),
    ),
    Scenario(
        "rudder-xhr-batch",
        rudder_with("bundled", RUDDER_BATCH),
        RUDDER,
        requests=(RUDDER_CONFIG, "POST /v1/batch"),
    ),
    Scenario(
        "rudder-beacon",
        rudder_with("bundled", RUDDER_BEACON),
        RUDDER,
        requests=(RUDDER_CONFIG, "POST /beacon/v1/batch?writeKey="),
    ),
    Scenario(
        "rudder-lite", rudder_with("lite", {}), RUDDER, requests=(RUDDER_CONFIG, *RUDDER_ONE_BY_ONE)
    ),
]


def _params() -> list[Any]:
    return [pytest.param(s, id=s.name) for s in SCENARIOS]


# -- helpers -----------------------------------------------------------------------------------


def send_marker(rig: Rig) -> str:
    """An event through the relay after everything else, with the server key: once the
    warehouse and the webhook have it, they have everything that was ingested before."""
    marker = f"marker-{uuid.uuid4()}"
    body = orjson.dumps(
        {"type": "track", "event": "Marker", "userId": "marker", "messageId": marker}
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{rig.relay.port}{BASE}/v1/track",
        data=body,
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"{SERVER_KEY}:".encode()).decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    return marker


def wait_marker(rig: Rig, marker: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hooked = rig.site.delivered(lambda e: e.get("messageId") == marker)
        if hooked and rig.rows(f"message_id = '{marker}'"):
            return
        time.sleep(0.1)
    raise AssertionError(f"the marker {marker} did not reach both forwarders")


def wait_until(page: Any, check: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``check`` until true or the deadline; waiting through the page lets Playwright
    deliver the browser's events meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        page.wait_for_timeout(100)
    return check()


@dataclass
class ProbeWatch:
    """The requests carrying the unload probe, before and after the revisit."""

    revisited: bool = False
    sent_before: int = 0
    after: list[Any] = field(default_factory=list)
    done: list[Any] = field(default_factory=list)

    def attach(self, ctx: Any) -> None:
        ctx.on("request", self._request)
        ctx.on("requestfinished", self._done)
        ctx.on("requestfailed", self._done)

    def _done(self, request: Any) -> None:
        self.done.append(request)

    def _request(self, request: Any) -> None:
        body = request.post_data_buffer
        if request.method == "POST" and body and b"Unload Probe" in body:
            if self.revisited:
                self.after.append(request)
            else:
                self.sent_before += 1

    def resent(self) -> bool:
        """A request after the revisit carried the probe and has completed."""
        return any(any(r is d for d in self.done) for r in self.after)


def probe_in_storage(ctx: Any, origin: str) -> bool:
    """Whether the site's localStorage holds the probe (in an SDK's persisted queue)."""
    for entry in ctx.storage_state()["origins"]:
        if entry["origin"] == origin:
            return any("Unload Probe" in item["value"] for item in entry["localStorage"])
    return False


def wait_ready(page: Any, journal: Journal, timeout: float = 10.0) -> bool:
    """Whether ``sdk.ready`` resolved before the deadline (or the relay refused a request)."""
    # (not awaited here: evaluate() would wait for the promise, without a deadline)
    page.evaluate("void sdk.ready.then((ok) => { window.__sdkReady = ok; })")
    ready = False

    def check() -> bool:
        nonlocal ready
        ready = page.evaluate("window.__sdkReady === true")
        return ready or bool(journal.refused)

    wait_until(page, check, timeout)
    return ready


def explain(rig: Rig, journal: Journal) -> str:
    return (
        f"\n-- browser --\n{journal}\n-- foreign requests --\n{journal.foreign}"
        f"\n-- relay log --\n{rig.relay.log_tail()}"
    )


# -- the test ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", _params())
def test_sdk_delivers_page_track_identify_and_the_unload_probe_once(
    rig: Rig, context: tuple[Any, Journal], scenario: Scenario
) -> None:
    ctx, journal = context
    site = rig.site
    path = f"/shop/{scenario.name}"
    relay = site.relay(same_origin=scenario.same_origin)
    url = site.add_page(path, scenario.build(site, path, relay, scenario.key))
    if scenario.anonymous_id:
        url += f"?ajs_aid={scenario.anonymous_id}"
    probes = ProbeWatch()
    probes.attach(ctx)
    page = ctx.new_page()
    page.goto(url)
    assert wait_ready(page, journal), explain(rig, journal)
    page.evaluate("sdk.run()")

    where = f"context_page_path = '{path}'"
    rows = rig.wait_rows(
        f"{where} and type in ('page', 'track', 'identify')",
        3,
        sleep=page.wait_for_timeout,
        give_up=lambda: bool(journal.refused),
    )
    info = explain(rig, journal)
    assert not journal.refused, f"the relay refused requests{info}"
    assert len(rows) == 3, f"expected page, track and identify rows, got {rows}{info}"
    by_type = {row["type"]: row for row in rows}
    assert set(by_type) == {"page", "track", "identify"}, rows
    anonymous_id = by_type["page"]["anonymous_id"]
    assert anonymous_id
    if scenario.anonymous_id:
        assert anonymous_id == scenario.anonymous_id
    for row in rows:
        assert row["anonymous_id"] == anonymous_id, rows
        assert row["context_page_path"] == path
        assert row["context_library_name"] == scenario.library
        assert row["context_source"] == SOURCE_OF_LIBRARY[scenario.library]
        assert row["message_id"]
    page_row, track, identify = by_type["page"], by_type["track"], by_type["identify"]
    assert page_row["user_id"] is None
    assert page_row["event"] is None
    assert track["event"] == "Purchase"
    assert track["user_id"] is None
    assert track["properties_revenue"] == 42
    assert track["properties_currency"] == "USD"
    assert identify["user_id"] == "u1"
    assert identify["traits_email"] == "a@b.com"
    assert identify["event"] is None
    # The write key is never stored (Segment's bodies carry it as writeKey).
    assert not any(scenario.key in orjson.dumps(row).decode() for row in rows), rows

    # The requests that carried them (Playwright reports them as it gets to them).
    def made(wanted: str) -> bool:
        return any(f"{r.method} {r.url}".startswith(wanted) for r in journal.requests)

    for expected in scenario.requests:
        method, rest = expected.split(" ", 1)
        wanted = f"{method} {relay}{rest.replace('{key}', scenario.key)}"
        assert wait_until(page, lambda w=wanted: made(w), timeout=5), (
            f"no {wanted} in {sorted(f'{r.method} {r.url}' for r in journal.requests)}"
        )
    if scenario.anonymous_id:
        # the query-string chunk that read ?ajs_aid= came from _cdn, the relay
        chunks = f"GET {relay}/analytics-next/bundles/queryString.bundle."
        assert wait_until(page, lambda: made(chunks), timeout=5), journal.requests

    # The unload probe: tracked and the page left in the same task, then a revisit. What the
    # unload cut off is in the SDK's persisted queue (localStorage), and the SDK resends it
    # on the next page view, at a time of its choosing (analytics-next: up to 5 s later).
    duplicates_before = rig.duplicates()
    page.evaluate("sdk.probe('about:blank')")
    page.wait_for_url("about:blank")
    queued = probe_in_storage(ctx, site.origin)
    probes.revisited = True
    page.goto(url)
    assert wait_ready(page, journal), explain(rig, journal)

    def probe_delivered() -> list[dict[str, Any]]:
        return site.delivered(
            lambda e: (
                e.get("event") == "Unload Probe"
                and e.get("context", {}).get("page", {}).get("path") == path
            )
        )

    assert wait_until(page, lambda: bool(probe_delivered())), (
        f"the probe never reached the webhook{explain(rig, journal)}"
    )
    if queued:
        # RudderStack reclaims the queue of a page that is gone once its last
        # acknowledgement is 10 s old (checked every 3 s).
        assert wait_until(page, probes.resent, timeout=25), (
            f"the probe was left in the SDK's queue but not resent{explain(rig, journal)}"
        )
    # Everything ingested so far has reached both forwarders once the marker has.
    wait_marker(rig, send_marker(rig))
    probe_rows = rig.rows(f"{where} and event = 'Unload Probe'")
    deliveries = probe_delivered()
    print(
        f"\n{scenario.name}: probe queued for a resend: {queued}; probe requests seen: "
        f"{probes.sent_before} before the revisit, {len(probes.after)} after; duplicates "
        f"dropped by the relay: {rig.duplicates() - duplicates_before}"
    )
    assert len(probe_rows) == 1, f"{probe_rows}{explain(rig, journal)}"
    assert len(deliveries) == 1, f"{deliveries}{explain(rig, journal)}"
    assert deliveries[0]["messageId"] == probe_rows[0]["message_id"]
    assert probe_rows[0]["anonymous_id"] == anonymous_id
    assert probe_rows[0]["user_id"] == "u1"
    assert journal.foreign == []
