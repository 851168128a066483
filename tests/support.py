"""Shared test helpers: configs built from inline dicts, relays from the real ``create_app``,
and recording fake destinations (small aiohttp apps) for forwarder tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tagrelay.app import create_app
from tagrelay.appkeys import DELIVERY_LOOP, METRICS, SPOOL, WORKERS
from tagrelay.config.models import Config
from tagrelay.forwarders import ForwarderContext
from tagrelay.metrics import Metrics

BROWSER_KEY = "test-browser-key"
SERVER_KEY = "test-server-key"


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    raw: dict[str, Any] = {
        "data_dir": str(tmp_path),
        "keys": [
            {
                "id": "website",
                "kind": "browser",
                "key": BROWSER_KEY,
                "allowed_origins": ["https://www.shop.test"],
            },
            {"id": "backend", "kind": "server", "key": SERVER_KEY},
        ],
        "forwarders": [],
    }
    raw.update(overrides)
    return Config.model_validate(raw)


def metric_value(app: web.Application, name: str, labels: dict[str, str] | None = None) -> float:
    value = app[METRICS].registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@pytest.fixture
async def relay(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    """``await relay(**config_overrides)`` -> a TestClient on a real app with a real spool."""

    async def start(**overrides: Any) -> TestClient:
        app = create_app(make_config(tmp_path, **overrides), admin_socket=False)
        client: TestClient = await aiohttp_client(app)
        return client

    return start


async def wait_idle(app: web.Application, timeout: float = 10.0) -> None:
    """Wait until every forwarder has caught up with the spool, and has counted what it
    delivered."""
    spool = app[SPOOL]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if all(spool.depth(fid) == 0 for fid in app[WORKERS]):
            delivery = app[DELIVERY_LOOP]
            if delivery.running:
                # A worker moves its cursor, then counts the batch, in one step of the
                # delivery loop; this thread may read the depth between the two. A step of
                # that loop queued now runs after it.
                await delivery.call(asyncio.sleep(0))
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"forwarders still behind: {spool.positions()} head={spool.head}")


@dataclass
class Recorder:
    """A fake destination: records every request; answers from a script of responses."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    script: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            {
                "at": time.monotonic(),
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if self.script:
            status, headers, text = self.script.pop(0)
            return web.Response(status=status, headers=headers, body=text)
        return web.Response(status=200, body=b'{"ok":true}', content_type="application/json")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def fake_server(
    name: str, routes: Mapping[str, Handler], method: str = "POST"
) -> AsyncIterator[TestServer]:
    """A local fake ``name``: an aiohttp app on 127.0.0.1 that answers ``method`` on each
    path of ``routes`` with its handler; any other request fails the test. Yields the
    running server (``server.make_url(path)``)."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route(method, path, handler)

    async def unexpected(request: web.Request) -> web.Response:
        raise AssertionError(f"unexpected request to the fake {name}: {request.path}")

    app.router.add_route("*", "/{tail:.*}", unexpected)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def recording_server(
    name: str, paths: Sequence[str], url_path: str = "/"
) -> AsyncIterator[Recorder]:
    """A local fake ``name`` that records POSTs to ``paths``; any other request fails the
    test. ``Recorder.url`` is the server's URL for ``url_path``."""
    rec = Recorder()
    async with fake_server(name, dict.fromkeys(paths, rec.handle)) as server:
        rec.url = str(server.make_url(url_path))
        yield rec


@pytest.fixture
async def context(tmp_path: Path) -> AsyncIterator[ForwarderContext]:
    """What a forwarder runs with outside an app: an HTTP session and metrics of its own."""
    async with aiohttp.ClientSession() as http:
        yield ForwarderContext(data_dir=tmp_path, http=http, metrics=Metrics())


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    async with recording_server("destination", ["/hook"], "/hook") as rec:
        yield rec
