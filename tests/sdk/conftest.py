"""Real vendor SDKs against a real relay: Segment analytics-next, Jitsu and RudderStack in
Debian's Chromium (Playwright for Python), and the Segment Python library. Offline.

The SDKs come from npm, pinned in ``tests/sdk/package.json`` and installed into
``tests/sdk/node_modules`` (``npm ci --prefix tests/sdk``, which the suite runs itself when
they are missing and npm is there). Without them, or without Chromium, this directory is
skipped, unless ``TAGRELAY_REQUIRE_BROWSER=1`` (CI), where either is a failure.

One relay for the whole session: ``tagrelay serve`` in a subprocess, mounted under ``/t``,
with a ``warehouse`` forwarder (queried with ``tagrelay sql`` through the admin socket while
the relay runs) and a ``webhook`` forwarder that posts to the site server, which records
every delivery. One browser for the session, a fresh context (no cookies, no storage) per
test.

Host names: Chromium maps ``*.shop.test`` to 127.0.0.1 and fails every other name at once,
so nothing can leave the machine. The site is ``http://www.shop.test:<site port>``; the
relay is ``http://data.shop.test:<relay port>/t`` (cross-origin, same site) or
``http://www.shop.test:<site port>/t`` (same origin: the site server proxies ``/t/`` to the
relay as nginx would). The SDK builds that pages load by URL come from
``http://cdn.shop.test:<site port>/static/...`` (the site server again, another origin).

The proxy below is a copy of the one in ``tests/browser/conftest.py`` (that file is not
ours to change; its ``Site`` has no static routes).
"""

from __future__ import annotations

import shutil
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
from aiohttp import web

from tests.rig import (
    chromium_or_skip,
    free_port,
    launched_chromium,
    page_handler,
    relay_process,
    require,
    reverse_proxy,
    serve_in_thread,
)

SDK_DIR = Path(__file__).resolve().parent
NODE_MODULES = SDK_DIR / "node_modules"
BASE = "/t"
# Jitsu insists on keys of the form id:secret; Segment and RudderStack send any key as it
# is (as the Basic username, "<key>:"), so one key of Jitsu's form serves all of them.
BROWSER_KEY = "sdktest:8cF2kQ9xLm4Rv7Tz"
SERVER_KEY = "sdk-server-key-5Jp8"
HOOK = "hook"

STATIC_FILES = {
    "segment/index.js": "@segment/analytics-next/dist/umd/index.js",
    "jitsu/jitsu.es.js": "@jitsu/js/dist/jitsu.es.js",
    "rudder/bundled.js": "@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js",
    "rudder/lite.js": "@rudderstack/analytics-js/dist/npm/modern/lite/umd/index.js",
}

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
    key: "{browser_key}"
    allowed_origins: ["http://www.shop.test:{site_port}"]
  - id: backend
    kind: server
    key: "{server_key}"
sdks:
  segment:
    library_dir: {library_dir}
forwarders:
  - id: warehouse
    type: warehouse
    batch: {{max_events: 1000, max_wait_secs: 0.2}}
  - id: {hook}
    type: webhook
    endpoint: http://127.0.0.1:{site_port}/hooks/{hook}
    batch: {{max_events: 100, max_wait_secs: 0.05}}
"""


@pytest.fixture(scope="session")
def sdk_prerequisites() -> str:
    """Chromium's path, once node_modules and Chromium are known to be there. The pinned
    SDKs are installed (``npm ci``) when they are missing and npm is on the machine, so
    that the README's test command runs this suite too."""
    missing = [rel for rel in STATIC_FILES.values() if not (NODE_MODULES / rel).is_file()]
    npm = shutil.which("npm")
    if missing and npm is not None:
        subprocess.run(
            [npm, "ci", "--prefix", str(SDK_DIR), "--no-audit", "--no-fund"],
            capture_output=True,
            timeout=600,
            check=False,
        )
        missing = [rel for rel in STATIC_FILES.values() if not (NODE_MODULES / rel).is_file()]
    if missing:
        require(
            "the SDKs are not installed in tests/sdk/node_modules "
            f"(run: npm ci --prefix tests/sdk); missing {missing[0]}"
        )
    return chromium_or_skip()


@dataclass
class Site:
    """The site's server: test pages, SDK builds, the /t/ proxy, the recording webhook."""

    port: int = 0
    relay_port: int = 0
    pages: dict[str, str] = field(default_factory=dict)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def origin(self) -> str:
        return f"http://www.shop.test:{self.port}"

    @property
    def static(self) -> str:
        return f"http://cdn.shop.test:{self.port}/static"

    def relay(self, same_origin: bool = False) -> str:
        """The relay's base URL as the page sees it."""
        if same_origin:
            return self.origin + BASE
        return f"http://data.shop.test:{self.relay_port}{BASE}"

    def add_page(self, path: str, html: str) -> str:
        self.pages[path] = html
        return self.origin + path

    def delivered(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Events the webhook forwarder delivered that match ``predicate``."""
        with self.lock:
            return [e for e in self.deliveries if predicate(e)]

    def build_app(self) -> web.Application:
        app = web.Application()

        async def static(request: web.Request) -> web.StreamResponse:
            rel = STATIC_FILES.get(request.match_info["name"])
            if rel is None:
                return web.Response(status=404, text="no such file")
            return web.FileResponse(
                NODE_MODULES / rel,
                headers={
                    "Content-Type": "text/javascript; charset=utf-8",
                    "Access-Control-Allow-Origin": "*",
                },
            )

        async def hook(request: web.Request) -> web.Response:
            body = orjson.loads(await request.read())
            with self.lock:
                self.deliveries.extend(body["batch"])
            return web.json_response({"ok": True})

        app.router.add_post(f"/hooks/{HOOK}", hook)
        app.router.add_get("/static/{name:.+}", static)
        app.router.add_route("*", BASE + "/{tail:.*}", reverse_proxy(self.relay_port))
        app.router.add_get("/{tail:.*}", page_handler(self.pages))
        return app


@dataclass
class Relay:
    port: int
    data_dir: Path
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def sql(self, query: str) -> list[dict[str, Any]]:
        """Run ``query`` with ``tagrelay sql`` (through the running relay's admin socket)."""
        tagrelay = Path(sys.executable).with_name("tagrelay")
        done = subprocess.run(
            [str(tagrelay), "sql", "--data-dir", str(self.data_dir), "--format", "json", query],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"tagrelay sql failed ({done.returncode}): {query}\n"
                + done.stderr.decode(errors="replace")
            )
        rows: list[dict[str, Any]] = orjson.loads(done.stdout)
        return rows


@dataclass
class Rig:
    site: Site
    relay: Relay

    def duplicates(self) -> float:
        """How many resent events the relay has recognised (by messageId) and dropped."""
        import urllib.request

        url = f"http://127.0.0.1:{self.relay.port}{BASE}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tagrelay_events_duplicate_total")
        )

    def rows(self, where: str) -> list[dict[str, Any]]:
        """Warehouse rows matching the SQL condition ``where``, oldest first."""
        return self.relay.sql(f"select * from events where {where} order by received_at")

    def wait_rows(
        self,
        where: str,
        count: int,
        timeout: float = 15.0,
        sleep: Callable[[float], Any] = time.sleep,
        give_up: Callable[[], bool] = lambda: False,
    ) -> list[dict[str, Any]]:
        """The rows matching ``where`` once there are at least ``count``, or at the deadline,
        or as soon as ``give_up()``. ``sleep`` takes milliseconds: a page's
        ``wait_for_timeout`` lets Playwright deliver the browser's events meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                rows = self.rows(where)
            except AssertionError:
                # A column named in ``where`` appears with the first event that has it.
                if time.monotonic() > deadline:
                    raise
                rows = []
            if len(rows) >= count or time.monotonic() > deadline or give_up():
                return rows
            sleep(100)


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory, sdk_prerequisites: str) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("sdk-relay")
    site = Site(port=free_port(), relay_port=free_port())
    config = tmp / "tagrelay.yaml"
    data_dir = tmp / "data"
    config.write_text(
        RELAY_CONFIG.format(
            data_dir=data_dir,
            port=site.relay_port,
            base=BASE,
            browser_key=BROWSER_KEY,
            server_key=SERVER_KEY,
            site_port=site.port,
            library_dir=NODE_MODULES / "@segment/analytics-next/dist/umd",
            hook=HOOK,
        )
    )
    log_path = tmp / "relay.log"
    stop_site = serve_in_thread(site.build_app(), site.port)
    try:
        with relay_process(config, site.relay_port, BASE, log_path):
            yield Rig(site, Relay(site.relay_port, data_dir, log_path))
    finally:
        stop_site()


@pytest.fixture(scope="module")
def browser(sdk_prerequisites: str) -> Iterator[Any]:
    with launched_chromium(sdk_prerequisites) as launched:
        yield launched


@dataclass
class Journal:
    """What the browser saw in one context: console errors, failed and refused requests,
    and the requests that reached other hosts than ours. Shown when an assertion fails."""

    lines: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.lines[-60:]) or "(nothing)"


@pytest.fixture
def context(browser: Any) -> Iterator[tuple[Any, Journal]]:
    ctx = browser.new_context()
    ctx.set_default_timeout(15_000)
    journal = Journal()

    def on_console(msg: Any) -> None:
        if msg.type in ("error", "warning"):
            journal.lines.append(f"console.{msg.type}: {msg.text}")

    def on_request(request: Any) -> None:
        journal.requests.append(request)
        host = request.url.split("/")[2] if "://" in request.url else ""
        if request.url.startswith("http") and not (
            host.split(":")[0].endswith(".shop.test") or host.startswith("127.0.0.1")
        ):
            journal.foreign.append(request.url)

    def on_failed(request: Any) -> None:
        journal.lines.append(f"failed: {request.method} {request.url} {request.failure}")

    def on_response(response: Any) -> None:
        if response.status >= 400:
            req = response.request
            try:
                body = response.text()[:300]
            except Exception as exc:  # the page may be gone already
                body = f"(body unavailable: {exc})"
            line = f"{response.status}: {req.method} {response.url} -> {body}"
            journal.lines.append(line)
            if not response.url.endswith("/favicon.ico"):
                journal.refused.append(line)

    ctx.on("console", on_console)
    ctx.on("request", on_request)
    ctx.on("requestfailed", on_failed)
    ctx.on("response", on_response)
    try:
        yield ctx, journal
    finally:
        ctx.close()
