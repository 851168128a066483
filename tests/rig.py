"""What the browser suites (tests/browser, tests/sdk) share: Chromium offline, a relay
subprocess, a threaded site server, and the site's reverse proxy to the relay.

Chromium maps ``*.shop.test`` to 127.0.0.1 and fails every other name at once, so nothing
can leave the machine. Without Chromium the suites skip, unless ``TAGRELAY_REQUIRE_BROWSER=1``
(``.ci/run`` sets it and installs Chromium): then a missing browser is a failure.
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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest
from aiohttp import ClientSession, web

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP *.shop.test 127.0.0.1, MAP * ~NOTFOUND, "
    "EXCLUDE 127.0.0.1, EXCLUDE localhost",
]


def chromium_executable() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require(what: str) -> NoReturn:
    """Skip (or fail under ``TAGRELAY_REQUIRE_BROWSER=1``) because ``what`` is missing."""
    if os.environ.get("TAGRELAY_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what} (required: TAGRELAY_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(what)


def chromium_or_skip() -> str:
    executable = chromium_executable()
    if executable is None:
        require("Chromium is not installed (apt-get install chromium)")
    return executable


@contextmanager
def launched_chromium(executable: str) -> Iterator[Any]:
    """Playwright's sync API with Debian's Chromium. Use it from a module-scoped fixture at
    most: while it is open its event loop counts as running, which would break the asyncio
    tests of the modules that run after it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_in_thread(app: web.Application, port: int) -> Callable[[], None]:
    """Serve ``app`` on 127.0.0.1:``port`` from a thread of its own; return its stopper."""
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


def page_handler(pages: dict[str, str]) -> Callable[[web.Request], Any]:
    """A handler serving the test pages registered in ``pages`` (path -> HTML)."""

    async def page(request: web.Request) -> web.Response:
        html = pages.get(request.path)
        if html is None:
            return web.Response(status=404, text="no such page")
        return web.Response(text=html, content_type="text/html")

    return page


def reverse_proxy(relay_port: int) -> Callable[[web.Request], Any]:
    """A handler that does what the site's own proxy does for a same-origin deployment
    (nginx's ``proxy_pass`` with X-Forwarded-For, X-Forwarded-Proto and the Host kept)."""

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        headers["X-Forwarded-For"] = request.remote or ""
        headers["X-Forwarded-Proto"] = "http"
        headers["Host"] = request.host
        url = f"http://127.0.0.1:{relay_port}{request.rel_url}"
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

    return proxy


@contextmanager
def relay_process(config_path: Path, port: int, base: str, log_path: Path) -> Iterator[Any]:
    """``tagrelay serve`` in a subprocess of its own session, ready (``/readyz``) when this
    yields it; stopped with SIGTERM (then SIGKILL) afterwards."""
    tagrelay = Path(sys.executable).with_name("tagrelay")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(tagrelay), "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_ready(process, f"http://127.0.0.1:{port}{base}/readyz", log_path)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the relay exited:\n" + log_path.read_text())
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # loopback only
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError("the relay did not become ready:\n" + log_path.read_text())
