"""A fake Google tag gateway (``<tag>.fps.goog``) on 127.0.0.1, and relays whose gateway
routes point at it.

The relay's upstream template stays ``http://{tag_id}.fps.goog:<port>``: its client
resolves every ``*.fps.goog`` name to 127.0.0.1 (``LoopbackResolver``), so that the
``Host`` header and the URL are the ones a real route would send, and no request leaves
the machine.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from yarl import URL

from tagrelay.app import create_app
from tagrelay.web.gateway import GATEWAY
from tests.support import make_config

TAG_ID = "GTM-ABCD1234"
UPSTREAM_HOST = "gtm-abcd1234.fps.goog"
SCRIPT = b"/* the container, templated with /metrics/ */ var google_tag_manager = {};"


class LoopbackResolver(AbstractResolver):
    """Every ``*.fps.goog`` name is 127.0.0.1; any other name fails the test."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        assert host.endswith(".fps.goog"), f"the gateway asked for {host}"
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


@dataclass
class Seen:
    """A request as the fake Google received it."""

    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes


Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeGoogle:
    """Records every request; answers with ``answer`` when set, else like fps.goog: ``ok``
    for health checks, 204 for hits, the script for the rest."""

    requests: list[Seen] = field(default_factory=list)
    answer: Answer | None = None
    port: int = 0

    @property
    def upstream(self) -> str:
        return "http://{tag_id}.fps.goog:" + str(self.port)

    def hits(self) -> list[Seen]:
        """What reached Google, the start-up health checks left out."""
        return [r for r in self.requests if not r.raw_path.endswith("/healthy")]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Seen(request.method, request.raw_path, CIMultiDict(request.headers), body)
        )
        if self.answer is not None:
            return await self.answer(request)
        if request.path.endswith("/healthy") or "validate_geo=healthy" in request.query_string:
            return web.Response(text="ok", content_type="text/plain")
        if request.path.endswith(("/g/c", "/g/collect", "/ccm/collect")):
            return web.Response(status=204, headers={"Cache-Control": "no-cache, no-store"})
        return web.Response(
            body=SCRIPT,
            content_type="application/javascript",
            headers={"Cache-Control": "private, max-age=900"},
        )


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogle]:
    fake = FakeGoogle()
    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    fake.port = server.port
    try:
        yield fake
    finally:
        await server.close()


def gateway_config(google: FakeGoogle, **gateway: Any) -> dict[str, Any]:
    """``google:`` of a relay with one route, ``/metrics``, to the fake."""
    return {
        "gateway": {
            "routes": [{"path": "/metrics", "tag_id": TAG_ID}],
            "upstream": google.upstream,
            **gateway,
        }
    }


def loopback_connector() -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(resolver=LoopbackResolver())


@pytest.fixture
async def gateway_relay(
    tmp_path: Path, aiohttp_client: Callable[..., Any], google: FakeGoogle
) -> Callable[..., Awaitable[TestClient]]:
    """``await gateway_relay(gateway={...}, **config)``: a TestClient on a real relay whose
    gateway (``/metrics`` -> GTM-ABCD1234 unless ``google`` is given) goes to the fake."""

    async def start(gateway: dict[str, Any] | None = None, **overrides: Any) -> TestClient:
        overrides.setdefault("google", gateway_config(google, **(gateway or {})))
        app = create_app(make_config(tmp_path, **overrides), admin_socket=False)
        app[GATEWAY].connector_factory = loopback_connector
        client: TestClient = await aiohttp_client(app)
        return client

    return start


def raw_url(client: TestClient, path_and_query: str) -> URL:
    """A URL sent exactly as written, as a browser sends it (an empty query too: a URL
    drops its ``?``, kept here in the path, which is sent as it is)."""
    base = client.make_url("/")
    path, sep, query = path_and_query.partition("?")
    return URL.build(
        scheme=base.scheme,
        host=base.raw_host or "",
        port=base.explicit_port,
        path=path + ("?" if sep and not query else ""),
        query_string=query,
        encoded=True,
    )
