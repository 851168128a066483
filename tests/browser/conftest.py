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
every event, ``ads`` only those that grant ads consent.

Without Chromium these tests are skipped, unless ``TAGRELAY_REQUIRE_BROWSER=1`` (set by
``.ci/run``, which installs Chromium), where a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web

BROWSER_KEY = "browser-test-key"
SERVER_KEY = "server-test-key"
BASE = "/t"
MEASUREMENT_ID = "G-BROWSER1"


def chromium_executable() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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

        async def page(request: web.Request) -> web.Response:
            html = self.pages.get(request.path)
            if html is None:
                return web.Response(status=404, text="no such page")
            return web.Response(text=html, content_type="text/html")

        async def hook(request: web.Request) -> web.Response:
            body = orjson.loads(await request.read())
            with self.lock:
                self.received[request.match_info["name"]].extend(body["batch"])
            return web.json_response({"ok": True})

        async def proxy(request: web.Request) -> web.StreamResponse:
            # What the site's reverse proxy does for a same-origin deployment.
            headers = {
                k: v
                for k, v in request.headers.items()
                if k.lower() not in ("host", "content-length", "transfer-encoding")
            }
            headers["X-Forwarded-For"] = request.remote or ""
            headers["X-Forwarded-Proto"] = "http"
            headers["Host"] = request.host
            url = f"http://127.0.0.1:{self.relay_port}{request.rel_url}"
            async with (
                ClientSession(auto_decompress=False) as session,
                session.request(
                    request.method, url, headers=headers, data=await request.read()
                ) as upstream,
            ):
                body = await upstream.read()
                response = web.Response(status=upstream.status, body=body)
                for name, value in upstream.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "date"):
                        response.headers.add(name, value)
                return response

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
        app.router.add_route("*", BASE + "/{tail:.*}", proxy)
        app.router.add_get("/{tail:.*}", page)
        return app


def _serve_in_thread(app: web.Application, port: int) -> Callable[[], None]:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="site-server", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the site server did not start")

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return stop


RELAY_CONFIG = """
data_dir: {data_dir}
server:
  host: 127.0.0.1
  port: {port}
  base_path: {base}
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
    process: subprocess.Popen[bytes]
    log_path: Path

    def metrics(self) -> str:
        import urllib.request

        url = f"http://127.0.0.1:{self.port}{BASE}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text: str = resp.read().decode()
            return text


@pytest.fixture(scope="module")
def site_and_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Relay]]:
    tmp = tmp_path_factory.mktemp("browser-relay")
    site = Site(port=free_port(), relay_port=free_port())
    stop_site = _serve_in_thread(site.build_app(), site.port)
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
    log_path = tmp / "relay.log"
    log = log_path.open("wb")
    tagrelay = Path(sys.executable).with_name("tagrelay")
    process = subprocess.Popen(
        [str(tagrelay), "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    relay = Relay(site.relay_port, process, log_path)
    try:
        _wait_healthy(relay)
        yield site, relay
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
        stop_site()


def _wait_healthy(relay: Relay) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if relay.process.poll() is not None:
            raise RuntimeError("the relay exited:\n" + relay.log_path.read_text())
        try:
            url = f"http://127.0.0.1:{relay.port}{BASE}/readyz"
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError("the relay did not become ready:\n" + relay.log_path.read_text())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_executable()
    if executable is None:
        if os.environ.get("TAGRELAY_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is required (TAGRELAY_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--host-resolver-rules=MAP *.shop.test 127.0.0.1, MAP * ~NOTFOUND, "
                "EXCLUDE 127.0.0.1, EXCLUDE localhost",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context()
    yield ctx
    ctx.close()
