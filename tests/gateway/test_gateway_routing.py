"""The gateway as a route to Google, over real HTTP to a fake fps.goog: paths and queries
kept byte for byte, the headers Google needs and those it must not get, Google's answers
passed back as they are, and the failures answered in JSON."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any

import aiohttp
import pydantic
import pytest
from aiohttp import web

from tagrelay.web.gateway import GATEWAY
from tests.gateway.conftest import SCRIPT, UPSTREAM_HOST, FakeGoogle, raw_url
from tests.support import make_config, metric_value

BROWSER = {"User-Agent": "Mozilla/5.0 (test)", "Accept-Language": "de-DE"}


async def test_path_and_query_reach_google_byte_for_byte(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay()
    targets = [
        "/metrics/?id=GTM-ABCD1234&l=shopLayer",
        "/metrics/",
        "/metrics/?",
        "/metrics/gtag/js?id=G-8XK2MS9Q4T&cx=c&gtm=4e61k2",
        "/metrics/td?id=GTM-ABCD1234&v=3&t=t&dl=https%3A%2F%2Fwww.shop.test%2F%3Fa%3D1%26b",
        "/metrics/C_mYUAFo%2Fx~y?z=%20&q",
    ]
    for target in targets:
        resp = await client.session.get(raw_url(client, target), headers=BROWSER)
        assert resp.status == 200, target
    assert [seen.raw_path for seen in google.hits()] == targets


async def test_the_request_names_googles_host_and_the_visitor(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay()
    await client.get(
        "/metrics/",
        headers={
            **BROWSER,
            "Referer": "https://www.shop.test/cart",
            "Sec-CH-UA-Platform": '"Linux"',
            "X-Forwarded-For": "198.51.100.23",  # from 127.0.0.1: a trusted proxy
            "Authorization": "Bearer site-session",
            "Proxy-Authorization": "Basic eA==",
            "X-Write-Key": "test-browser-key",
            "X-Gtg-Tag-Id": "GTM-OTHER",
            "X-Forwarded-CountryRegion": "FR-75",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "hop-by-hop",
        },
    )
    [seen] = google.hits()
    headers = seen.headers
    assert headers["Host"] == f"{UPSTREAM_HOST}:{google.port}"
    assert headers.getall("X-Forwarded-For") == ["198.51.100.23"]
    assert headers["User-Agent"] == "Mozilla/5.0 (test)"
    assert headers["Accept-Language"] == "de-DE"
    assert headers["Referer"] == "https://www.shop.test/cart"
    assert headers["Sec-CH-UA-Platform"] == '"Linux"'
    for name in (
        "Authorization",
        "Proxy-Authorization",
        "X-Write-Key",
        "X-Gtg-Tag-Id",
        "X-Hop",
        # no geo source is configured: a visitor's own claim never passes
        "X-Forwarded-CountryRegion",
    ):
        assert name not in headers, name


async def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay(server={"trusted_proxies": ["10.0.0.0/8"]})
    await client.get("/metrics/", headers={"X-Forwarded-For": "198.51.100.23"})
    [seen] = google.hits()
    assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]


async def test_only_googles_cookies_go_to_google(gateway_relay: Any, google: FakeGoogle) -> None:
    client = await gateway_relay()
    cookie = (
        "sessionid=s3cr3t; _ga=GA1.1.1938271044.1731420000; tr_aid=abc; "
        "_ga_8XK2MS9Q4T=GS1.1.1731425080.7.1.1731425083.0.0.0; _gid=GA1.1.55.66; "
        "_gcl_aw=GCL.1731420000.Cj0KCQ; _gac_UA-1=1.2.x; FPID=FPID2.2.abc; FPLC=lc; "
        "FPAU=1.2; FPGCLAW=2.1.x; wordpress_logged_in_1=admin; _gab=no"
    )
    await client.get("/metrics/", headers={"Cookie": cookie})
    [seen] = google.hits()
    assert seen.headers["Cookie"] == (
        "_ga=GA1.1.1938271044.1731420000; "
        "_ga_8XK2MS9Q4T=GS1.1.1731425080.7.1.1731425083.0.0.0; _gid=GA1.1.55.66; "
        "_gcl_aw=GCL.1731420000.Cj0KCQ; _gac_UA-1=1.2.x; FPID=FPID2.2.abc; FPLC=lc; "
        "FPAU=1.2; FPGCLAW=2.1.x"
    )
    google.requests.clear()
    await client.get("/metrics/", headers={"Cookie": "sessionid=s3cr3t; tr_aid=abc"})
    [seen] = google.hits()
    assert "Cookie" not in seen.headers


async def test_set_cookies_and_redirects_come_back_unchanged(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/sw"):
            return web.Response(status=302, headers={"Location": "/metrics/_/service_worker/x"})
        response = web.Response(
            status=200,
            body=b"ok",
            headers={"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8"},
        )
        response.headers.add("Set-Cookie", "FPID=FPID2.2.abc; Max-Age=34560000; Path=/; Secure")
        response.headers.add("Set-Cookie", "FPLC=lc%3D; Max-Age=72000; Path=/; Secure")
        response.headers.add("Strict-Transport-Security", "max-age=31536000")
        return response

    google.answer = answer
    client = await gateway_relay()
    resp = await client.get("/metrics/g/collect?v=2&tid=G-8XK2MS9Q4T", allow_redirects=False)
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie") == [
        "FPID=FPID2.2.abc; Max-Age=34560000; Path=/; Secure",
        "FPLC=lc%3D; Max-Age=72000; Path=/; Secure",
    ]
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "Strict-Transport-Security" not in resp.headers
    resp = await client.get("/metrics/sw", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/metrics/_/service_worker/x"
    assert [seen.raw_path for seen in google.hits()][-1] == "/metrics/sw"


async def test_compressed_bodies_pass_as_google_sent_them(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    packed = gzip.compress(SCRIPT)

    async def answer(request: web.Request) -> web.StreamResponse:
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(
                body=packed,
                headers={
                    "Content-Type": "application/javascript",
                    "Content-Encoding": "gzip",
                    "Vary": "Accept-Encoding",
                },
            )
        return web.Response(body=SCRIPT, content_type="application/javascript")

    google.answer = answer
    client = await gateway_relay()
    url = client.make_url("/metrics/?id=GTM-ABCD1234")
    async with aiohttp.ClientSession(auto_decompress=False) as browser:
        async with browser.get(url, headers={"Accept-Encoding": "gzip, br"}) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers["Vary"] == "Accept-Encoding"
            assert await resp.read() == packed
        async with browser.get(
            url, headers={"Accept-Encoding": "identity"}, skip_auto_headers=["Accept-Encoding"]
        ) as resp:
            assert "Content-Encoding" not in resp.headers
            assert await resp.read() == SCRIPT
        # A browser that says nothing gets what it asked for: the relay adds no
        # Accept-Encoding of its own.
        async with browser.get(url, skip_auto_headers=["Accept-Encoding"]) as resp:
            assert await resp.read() == SCRIPT
    first, second, third = google.hits()
    assert first.headers["Accept-Encoding"] == "gzip, br"
    assert second.headers["Accept-Encoding"] == "identity"
    assert "Accept-Encoding" not in third.headers


async def test_the_bare_path_redirects_to_its_slash(gateway_relay: Any, google: FakeGoogle) -> None:
    client = await gateway_relay()
    resp = await client.session.get(
        raw_url(client, "/metrics?id=GTM-ABCD1234"), allow_redirects=False
    )
    assert resp.status == 301
    assert resp.headers["Location"] == "/metrics/?id=GTM-ABCD1234"
    resp = await client.post("/metrics", data=b"x", allow_redirects=False)
    assert resp.status == 308
    assert resp.headers["Location"] == "/metrics/"
    assert google.hits() == []


async def test_under_a_base_path_the_full_path_goes_to_google(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay(server={"base_path": "/t"})
    resp = await client.get("/t/metrics/?id=GTM-ABCD1234")
    assert resp.status == 200
    assert [seen.raw_path for seen in google.hits()] == ["/t/metrics/?id=GTM-ABCD1234"]
    resp = await client.get("/t/metrics", allow_redirects=False)
    assert resp.headers["Location"] == "/t/metrics/"
    assert (await client.get("/metrics/")).status == 404


async def test_a_body_over_the_limit_is_refused_before_google_sees_it(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay()
    announced = 100 * 1024 * 1024

    async def body() -> Any:
        chunk = b"x" * 65536
        for _ in range(announced // len(chunk)):
            yield chunk

    resp = await client.post(
        "/metrics/upload", data=body(), headers={"Content-Length": str(announced)}
    )
    assert resp.status == 413
    assert (await resp.json())["error"] == "body_too_large"
    # The same without a length (chunked): cut off as it passes the limit.
    resp = await client.post("/metrics/upload", data=body())
    assert resp.status == 413
    assert (await resp.json())["error"] == "body_too_large"
    resp = await client.post("/metrics/g/collect?v=2&tid=G-8XK2MS9Q4T", data=body())
    assert resp.status == 413
    assert google.hits() == []
    refused = {"route": "/metrics", "kind": "other", "status_class": "refused"}
    assert metric_value(client.app, "tagrelay_gateway_requests_total", refused) == 2


async def test_a_streamed_body_within_the_limit_reaches_google_whole(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay()
    payload = bytes(range(256)) * 1000  # 256 kB, under the 500 kB default

    async def body() -> Any:
        for start in range(0, len(payload), 10_000):
            yield payload[start : start + 10_000]

    resp = await client.post("/metrics/d/upload", data=body())
    assert resp.status == 200
    [seen] = google.hits()
    assert seen.body == payload


async def test_google_down_is_a_502_and_too_slow_a_504(
    gateway_relay: Any, google: FakeGoogle, unused_tcp_port: int
) -> None:
    released = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await released.wait()
        return web.Response(text="late")

    google.answer = slow
    client = await gateway_relay(gateway={"timeout_secs": 0.2, "health_check": False})
    resp = await client.get("/metrics/?id=GTM-ABCD1234")
    released.set()
    assert resp.status == 504
    assert await resp.json() == {
        "error": "upstream_timeout",
        "message": "Google's tag gateway did not answer in time",
    }
    timeout = {"route": "/metrics", "kind": "script", "status_class": "timeout"}
    assert metric_value(client.app, "tagrelay_gateway_requests_total", timeout) == 1

    # Nobody listens on the upstream's port: a 502.
    gateway = client.app[GATEWAY]
    gateway.routes[0].origin = f"http://gtm-abcd1234.fps.goog:{unused_tcp_port}"
    gateway.routes[0].__post_init__()
    resp = await client.get("/metrics/?id=GTM-ABCD1234")
    assert resp.status == 502
    assert (await resp.json())["error"] == "upstream_unavailable"


async def test_googles_5xx_passes_back_as_it_is(gateway_relay: Any, google: FakeGoogle) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="busy", headers={"Retry-After": "3"})

    google.answer = failing
    client = await gateway_relay(gateway={"health_check": False})
    resp = await client.get("/metrics/?id=GTM-ABCD1234")
    assert resp.status == 503
    assert await resp.text() == "busy"
    assert resp.headers["Retry-After"] == "3"
    counted = {"route": "/metrics", "kind": "script", "status_class": "5xx"}
    assert metric_value(client.app, "tagrelay_gateway_requests_total", counted) == 1


async def test_health_checks_pass_through_and_readyz_reports_the_start_up_check(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay()
    resp = await client.get("/metrics/healthy")
    assert (resp.status, await resp.text()) == (200, "ok")
    resp = await client.get("/metrics/?validate_geo=healthy")
    assert (resp.status, await resp.text()) == (200, "ok")
    kinds = {"route": "/metrics", "kind": "health", "status_class": "2xx"}
    assert metric_value(client.app, "tagrelay_gateway_requests_total", kinds) == 2
    gateway = client.app[GATEWAY]
    for _ in range(500):
        if gateway.routes[0].health != "pending":
            break
        await asyncio.sleep(0.01)
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready", "gateway": {"/metrics": "ok"}}
    assert metric_value(client.app, "tagrelay_gateway_upstream_healthy", {"route": "/metrics"}) == 1


async def test_a_failed_health_check_is_reported_but_the_relay_stays_ready(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="Measurement path is empty")

    google.answer = broken
    client = await gateway_relay()
    gateway = client.app[GATEWAY]
    for _ in range(500):
        if gateway.routes[0].health != "pending":
            break
        await asyncio.sleep(0.01)
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready", "gateway": {"/metrics": "failed"}}


async def test_a_gateway_path_may_not_shadow_an_endpoint(tmp_path: Path) -> None:
    route = {"routes": [{"path": "/metrics", "tag_id": "GTM-ABCD1234"}]}
    with pytest.raises(pydantic.ValidationError, match=r"metrics\.public"):
        make_config(tmp_path, google={"gateway": route}, metrics={"public": True})
    for path in ("/v1", "/g", "/d"):
        taken = {"routes": [{"path": path, "tag_id": "GTM-ABCD1234"}]}
        with pytest.raises(pydantic.ValidationError, match="taken"):
            make_config(tmp_path, google={"gateway": taken})
    with pytest.raises(pydantic.ValidationError):
        make_config(tmp_path, google={"gateway": {"routes": [{"path": "/", "tag_id": "G-1"}]}})


async def test_an_answer_cut_by_google_is_never_passed_off_as_whole(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/javascript"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"var part = 1;")
        assert request.transport is not None
        request.transport.close()  # Google goes away mid-answer
        return response

    google.answer = cut
    client = await gateway_relay(gateway={"health_check": False})
    resp = await client.get("/metrics/?id=GTM-ABCD1234")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    # The relay goes on serving.
    google.answer = None
    resp = await client.get("/metrics/?id=GTM-ABCD1234")
    assert await resp.read() == SCRIPT
