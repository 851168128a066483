"""A real browser against a real relay: Debian's Chromium driven by Playwright, offline.

One relay (``tagrelay serve`` in a subprocess, mounted under ``/t``) and one browser serve
the whole module; each test opens a fresh browser context (no cookies, no storage).

Host names: Chromium maps ``*.shop.test`` to 127.0.0.1 and fails every other name at once,
so nothing can leave the machine. The site is ``http://www.shop.test:<site port>``; the
relay is reached two ways:

- cross-origin (same site): ``http://data.shop.test:<relay port>/t/...``, a CNAME'd
  tracking subdomain;
- same-origin: ``http://www.shop.test:<site port>/t/...``, the site's own server
  proxying ``/t/`` to the relay, as nginx would (X-Forwarded-For, X-Forwarded-Proto, Host).

A recording webhook (on the site server) receives what the relay forwards: ``all`` gets
every event, ``ads`` only those that grant ads consent; ``/google/...`` records what the
``ga4`` forwarder sends to "Google". The shared machinery is in ``tests/rig.py``.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.rig import (
    chromium_or_skip,
    free_port,
    launched_chromium,
    page_handler,
    relay_process,
    reverse_proxy,
    serve_in_thread,
)

BROWSER_KEY = "browser-test-key"
SERVER_KEY = "server-test-key"
BASE = "/t"
MEASUREMENT_ID = "G-BROWSER1"


@dataclass
class Site:
    """The site's own server: test pages, the /t/ proxy to the relay, the webhooks."""

    port: int = 0
    relay_port: int = 0
    pages: dict[str, str] = field(default_factory=dict)
    received: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"all": [], "ads": [], "google": []}
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def origin(self) -> str:
        return f"http://www.shop.test:{self.port}"

    @property
    def relay_origin(self) -> str:
        return f"http://data.shop.test:{self.relay_port}"

    def events(self, hook: str = "all") -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received[hook])

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        count: int = 1,
        hook: str = "all",
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """The events matching ``predicate`` once there are at least ``count``."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(hook) if predicate(e)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def build_app(self) -> web.Application:
        app = web.Application()

        async def hook(request: web.Request) -> web.Response:
            body = orjson.loads(await request.read())
            with self.lock:
                self.received[request.match_info["name"]].extend(body["batch"])
            return web.json_response({"ok": True})

        async def google(request: web.Request) -> web.Response:
            # The fake Google collection endpoint the relay's ga4 forwarder sends to.
            record = {
                "method": request.method,
                "path": request.path,
                "query": request.raw_path.partition("?")[2],
                "headers": dict(request.headers),
                "body": (await request.read()).decode(),
            }
            with self.lock:
                self.received["google"].append(record)
            return web.Response(status=204)

        app.router.add_post("/hooks/{name}", hook)
        app.router.add_route("*", "/google/{tail:.*}", google)
        app.router.add_route("*", BASE + "/{tail:.*}", reverse_proxy(self.relay_port))
        app.router.add_get("/{tail:.*}", page_handler(self.pages))
        return app


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
  - id: backend
    kind: server
    key: {server_key}
identity:
  cookie_keeper: ["_ga", "_ga_*"]
google:
  collect:
    measurement_ids: [{measurement_id}]
demo:
  enabled: true
forwarders:
  - id: all
    type: webhook
    endpoint: http://127.0.0.1:{site_port}/hooks/all
    batch: {{max_events: 100, max_wait_secs: 0.05}}
  - id: ga4
    type: ga4
    measurement_id: {measurement_id}
    api_secret: test-secret
    collect_url: http://127.0.0.1:{site_port}/google/g/collect
    mp_url: http://127.0.0.1:{site_port}/google/mp/collect
    batch: {{max_events: 100, max_wait_secs: 0.05}}
  - id: ads
    type: webhook
    endpoint: http://127.0.0.1:{site_port}/hooks/ads
    requires_consent: [ads]
    batch: {{max_events: 100, max_wait_secs: 0.05}}
"""


@dataclass
class Relay:
    port: int

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.port}{BASE}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:  # loopback only
            text: str = resp.read().decode()
            return text


@pytest.fixture(scope="module")
def site_and_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Relay]]:
    tmp = tmp_path_factory.mktemp("browser-relay")
    site = Site(port=free_port(), relay_port=free_port())
    config = tmp / "tagrelay.yaml"
    config.write_text(
        RELAY_CONFIG.format(
            data_dir=tmp / "data",
            port=site.relay_port,
            base=BASE,
            browser_key=BROWSER_KEY,
            server_key=SERVER_KEY,
            site_port=site.port,
            measurement_id=MEASUREMENT_ID,
        )
    )
    stop_site = serve_in_thread(site.build_app(), site.port)
    try:
        with relay_process(config, site.relay_port, BASE, tmp / "relay.log"):
            yield site, Relay(site.relay_port)
    finally:
        stop_site()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launched_chromium(chromium_or_skip()) as launched:
        yield launched


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context()
    yield ctx
    ctx.close()
