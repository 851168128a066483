"""The live debug view in Chromium: ``tagrelay serve`` in a subprocess with its admin listener
behind a token, local fake destinations (one that fails), and the page at ``/debug`` after
logging in through the form.

Events sent to the relay appear on the open page without a reload, with what each forwarder
did; a failing destination shows the status and body it answered; filters and pause work;
a dead letter is replayed from its button once the destination has recovered; and no secret
(a forwarder's token or API secret, the admin token, a write key) appears in the page or in
the stream it reads."""

from __future__ import annotations

import base64
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.rig import free_port, relay_process, serve_in_thread

pytestmark = pytest.mark.browser

ADMIN_TOKEN = "admin-token-browser-3e9f1c7a"
SERVER_KEY = "server-key-browser-5b2d8e"
BROWSER_KEY = "browser-key-browser-8c1a4f"
BAD_TOKEN = "bad-hook-token-61f0d2"
GOOD_TOKEN = "good-hook-apikey-7a3e55"
GA4_SECRET = "ga4-secret-browser-2d9b"
SECRETS = (ADMIN_TOKEN, SERVER_KEY, BROWSER_KEY, BAD_TOKEN, GOOD_TOKEN, GA4_SECRET)
MEASUREMENT_ID = "G-DEBUGVIEW1"

RELAY_CONFIG = """
data_dir: {data_dir}
server: {{host: 127.0.0.1, port: {port}}}
admin: {{listen: "127.0.0.1:{admin_port}", token: {admin_token}}}
keys:
  - {{id: backend, kind: server, key: {server_key}}}
  - {{id: website, kind: browser, key: {browser_key}, allowed_origins: ["http://www.shop.test"]}}
forwarders:
  - id: good
    type: webhook
    endpoint: http://127.0.0.1:{fake_port}/hooks/good
    headers: {{X-Api-Key: {good_token}}}
    batch: {{max_events: 100, max_wait_secs: 0.05}}
  - id: bad
    type: webhook
    endpoint: http://127.0.0.1:{fake_port}/hooks/bad
    headers: {{Authorization: "Bearer {bad_token}"}}
    batch: {{max_events: 100, max_wait_secs: 0.05}}
  - id: ga4
    type: ga4
    measurement_id: {measurement_id}
    api_secret: {ga4_secret}
    mp_url: http://127.0.0.1:{fake_port}/mp/collect
    batch: {{max_events: 100, max_wait_secs: 0.05}}
"""


@dataclass
class Destinations:
    """The fakes: ``good`` and GA4 take everything; ``bad`` refuses with a 400 and a JSON
    body that echoes the credentials it was sent, until it is told to recover."""

    port: int = 0
    failing: bool = True
    received: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def build_app(self) -> web.Application:
        app = web.Application()

        async def handle(request: web.Request) -> web.Response:
            await request.read()
            name = request.match_info.get("name", "ga4")
            with self.lock:
                self.received[name] = self.received.get(name, 0) + 1
            if name == "bad" and self.failing:
                return web.json_response(
                    {
                        "error": "invalid field 'revenue'",
                        "you_sent": request.headers.get("Authorization", ""),
                    },
                    status=400,
                )
            if name == "ga4":
                return web.Response(status=204)
            return web.json_response({"ok": True})

        app.router.add_post("/hooks/{name}", handle)
        app.router.add_post("/mp/collect", handle)
        return app


@dataclass
class Rig:
    relay_port: int
    admin_port: int
    destinations: Destinations

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def send(self, event: dict[str, Any], key: str = SERVER_KEY) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.relay_port}/v1/track",
            data=orjson.dumps(event),
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode(),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:  # loopback only
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def stream(self, seconds: float) -> bytes:
        """What ``/debug/stream`` sends in ``seconds`` (the backlog, then live)."""
        request = urllib.request.Request(
            self.admin + "/debug/stream", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        data = b""
        deadline = time.monotonic() + seconds
        with urllib.request.urlopen(request, timeout=5) as resp:  # loopback only
            while time.monotonic() < deadline:
                line = resp.readline()
                if not line:
                    break
                data += line
        return data


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp: Path = tmp_path_factory.mktemp("debug-relay")
    destinations = Destinations(port=free_port())
    relay_port, admin_port = free_port(), free_port()
    config = tmp / "tagrelay.yaml"
    config.write_text(
        RELAY_CONFIG.format(
            data_dir=tmp / "data",
            port=relay_port,
            admin_port=admin_port,
            admin_token=ADMIN_TOKEN,
            server_key=SERVER_KEY,
            browser_key=BROWSER_KEY,
            fake_port=destinations.port,
            good_token=GOOD_TOKEN,
            bad_token=BAD_TOKEN,
            ga4_secret=GA4_SECRET,
            measurement_id=MEASUREMENT_ID,
        )
    )
    stop = serve_in_thread(destinations.build_app(), destinations.port)
    try:
        with relay_process(config, relay_port, "", tmp / "relay.log"):
            yield Rig(relay_port, admin_port, destinations)
    finally:
        stop()


@pytest.fixture
def page(rig: Rig, context: Any) -> Any:
    """The debug view, logged in through the form, live."""
    page = context.new_page()
    page.goto(rig.admin + "/debug")  # not logged in: sent to the form
    page.wait_for_url("**/login?next=/debug")
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(rig.admin + "/debug")
    page.wait_for_function("() => document.getElementById('status').textContent === 'live'")
    return page


def order(message_id: str, user: str = "user-1") -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": user,
        "messageId": message_id,
        "properties": {"revenue": 42, "currency": "EUR"},
        "context": {"traits": {"email": "jane@example.com"}},
    }


def event_row(page: Any, message_id: str) -> Any:
    return page.locator(f'tr.event[data-message-id="{message_id}"]')


def wait_text(page: Any, selector: str, text: str, timeout: float = 10_000) -> None:
    page.wait_for_function(
        "([s, t]) => [...document.querySelectorAll(s)].some(e => e.textContent.includes(t))",
        arg=[selector, text],
        timeout=timeout,
    )


def test_events_sent_to_the_relay_appear_live_with_each_forwarders_outcome(
    rig: Rig, page: Any
) -> None:
    assert rig.send(order("m-live-1")) == 200
    assert rig.send({"event": "x"}, key="no-such-key") == 401
    row = event_row(page, "m-live-1")
    row.wait_for(timeout=10_000)
    assert "Order Completed" in row.inner_text()
    assert "user user-1" in row.inner_text()
    wait_text(page, 'tr.event[data-message-id="m-live-1"] .badge', "good: sent")
    wait_text(page, 'tr.event[data-message-id="m-live-1"] .badge', "ga4: sent")
    wait_text(page, 'tr.event[data-message-id="m-live-1"] .badge', "bad: dead letter")
    # The refused request is listed with its reason.
    wait_text(page, "#requests td", "unknown_key")
    # The forwarder panel shows the failing destination's last error.
    wait_text(page, '#forwarders tr[data-forwarder="bad"]', "status_4xx")
    wait_text(page, '#forwarders tr[data-forwarder="good"]', "running")


def test_a_failing_destination_shows_its_status_and_body(rig: Rig, page: Any) -> None:
    assert rig.send(order("m-fail-1")) == 200
    wait_text(page, 'tr.event[data-message-id="m-fail-1"] .badge', "bad: dead letter")
    event_row(page, "m-fail-1").click()
    detail = page.locator("#detail")
    wait_text(page, "#detail .status", "HTTP 400")
    text = detail.inner_text()
    assert "invalid field 'revenue'" in text
    assert "POST http://127.0.0.1:" in text and "/hooks/bad" in text
    assert '"messageId": "m-fail-1"' in text  # the normalized form, and the body sent
    assert "jane@example.com" in text  # personal data: shown here, and only here
    assert "status_4xx" in text


def test_filters_and_pause(rig: Rig, page: Any) -> None:
    rig.send(order("m-ann", user="ann"))
    rig.send(order("m-bob", user="bob"))
    event_row(page, "m-bob").wait_for(timeout=10_000)
    page.fill("#filter-user", "ann")
    page.wait_for_function("() => !document.querySelector('tr.event[data-message-id=\"m-bob\"]')")
    assert event_row(page, "m-ann").count() == 1
    page.fill("#filter-user", "")
    page.click("#pause")
    wait_text(page, "#status", "paused")
    rig.send(order("m-while-paused"))
    wait_text(page, "#status", "new)")  # counted, not shown
    page.wait_for_timeout(500)
    assert event_row(page, "m-while-paused").count() == 0
    page.click("#pause")
    event_row(page, "m-while-paused").wait_for(timeout=10_000)


def test_a_dead_letter_is_replayed_from_its_button(rig: Rig, page: Any) -> None:
    rig.send(order("m-replay"))
    wait_text(page, 'tr.event[data-message-id="m-replay"] .badge', "bad: dead letter")
    page.click("#refresh-dead-letters")
    wait_text(page, "#dead-letters td", "m-replay")
    rig.destinations.failing = False
    try:
        row = page.locator("#dead-letters tr", has_text="m-replay")
        before = rig.destinations.received.get("bad", 0)
        row.locator("button.replay").click()
        wait_text(page, "#dead-letters-note", '"delivered":1')
        assert rig.destinations.received["bad"] == before + 1
        page.wait_for_function(
            "() => ![...document.querySelectorAll('#dead-letters td')]"
            ".some(e => e.textContent === 'm-replay')"
        )
    finally:
        rig.destinations.failing = True


def test_no_secret_appears_in_the_page_or_its_stream(rig: Rig, page: Any) -> None:
    rig.send(order("m-secrets"))
    wait_text(page, 'tr.event[data-message-id="m-secrets"] .badge', "bad: dead letter")
    wait_text(page, 'tr.event[data-message-id="m-secrets"] .badge', "good: sent")
    wait_text(page, 'tr.event[data-message-id="m-secrets"] .badge', "ga4: sent")
    event_row(page, "m-secrets").click()
    wait_text(page, "#detail .status", "HTTP 400")
    # Every part of the page opened: the panel's and the dead letters' details.
    page.click("#refresh-dead-letters")
    wait_text(page, "#dead-letters td", "m-secrets")
    page.eval_on_selector_all("details", "ds => ds.forEach(d => d.open = true)")
    html = page.content()
    text = page.inner_text("body")
    stream = rig.stream(3.0).decode()
    assert "m-secrets" in stream and "/hooks/bad" in stream
    for secret in SECRETS:
        assert secret not in html
        assert secret not in text
        assert secret not in stream
    # The credentials are there, as *** (the destination's echo too).
    assert "X-Api-Key" in text and "Authorization" in text
    assert 'you_sent\\": \\"***\\"' in stream  # JSON in the record's JSON


def test_the_view_needs_the_token(rig: Rig, context: Any) -> None:
    page = context.new_page()
    page.goto(rig.admin + "/login?next=/debug")
    page.fill("#token", "not-the-admin-token-at-all")
    page.click("button[type=submit]")
    assert "not the admin token" in page.content()
    response = page.request.get(rig.admin + "/debug/stream")
    assert response.status == 401
