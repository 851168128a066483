"""Hostile ``Host`` headers never reach a ``Set-Cookie`` attribute: the cookies' Domain comes
from a valid host name (``pipeline.host``) or nowhere. Sent over a raw socket, byte for byte,
so that no client library tidies the header first."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.support import BROWSER_KEY

MAX_AGE = 400 * 86_400


def script_body() -> bytes:
    event = {"type": "page", "anonymousId": "aid-1", "messageId": "m-1"}
    return orjson.dumps({"writeKey": BROWSER_KEY, "batch": [event]})


async def raw_request(
    client: Any, host: bytes, *, path: bytes = b"/d", extra: bytes = b""
) -> tuple[int, list[tuple[str, str]]]:
    """Send one request with ``Host: <host>`` as given; the status and the headers."""
    body = script_body() if path == b"/d" else b""
    method = b"POST" if body else b"GET"
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        method + b" " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra
        + b"Content-Type: text/plain\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n" + body
    )  # fmt: skip
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = [tuple(line.split(": ", 1)) for line in head[1:]]
    return status, [(name, value) for name, value in headers]


def cookie_attributes(headers: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Each Set-Cookie's attributes, as sent, by cookie name."""
    cookies: dict[str, list[str]] = {}
    for name, value in headers:
        if name.lower() == "set-cookie":
            pair, *attributes = value.split("; ")
            cookies[pair.split("=", 1)[0]] = attributes
    return cookies


def expected(domain: str | None) -> dict[str, list[str]]:
    at = [f"Domain={domain}"] if domain else []
    return {
        "tr_aid": [*at, "HttpOnly", f"Max-Age={MAX_AGE}", "Path=/", "SameSite=Lax"],
        "_fbp": [*at, f"Max-Age={MAX_AGE}", "Path=/", "SameSite=Lax"],
    }


HOSTS = [
    pytest.param(b"a.shop.test", "shop.test", id="valid"),
    pytest.param(b"A.Shop.TEST", "shop.test", id="upper-case"),
    pytest.param(b"a.shop.test:8443", "shop.test", id="port"),
    pytest.param(b"a.shop.test; SameSite=None; Secure", None, id="attributes"),
    pytest.param(b"a.shop.test;Domain=evil.test", None, id="domain-attribute"),
    pytest.param(b"evil.test; a.shop.test", None, id="semicolon-first"),
    pytest.param(b"a.shop.test, evil.test", None, id="comma"),
    pytest.param(b"a.shop.test evil.test", None, id="space"),
    pytest.param(b"a=b.shop.test", None, id="equals"),
    pytest.param(b"a_b.shop.test", None, id="underscore"),
    pytest.param(b"x" * 64 + b".shop.test", None, id="label-too-long"),
    pytest.param(b"a." * 130 + b"shop.test", None, id="name-too-long"),
    pytest.param("bücher.shop.test".encode(), None, id="unicode-utf8"),
    pytest.param(b"xn--bcher-kva.shop.test", "shop.test", id="a-label"),
    pytest.param(b"a.shop.test.", None, id="trailing-dot"),
    pytest.param(b"127.0.0.1:8080", None, id="ipv4"),
    pytest.param(b"[::1]:8080", None, id="ipv6"),
    pytest.param(b"a.shop.test:99999", None, id="bad-port"),
    pytest.param(b"localhost", None, id="single-label"),
    pytest.param(b"", None, id="empty"),
]


@pytest.mark.parametrize("path", [b"/d", b"/id"])
@pytest.mark.parametrize(("host", "domain"), HOSTS)
async def test_cookie_attributes_under_hostile_host_headers(
    relay: Any, host: bytes, domain: str | None, path: bytes
) -> None:
    client = await relay()
    status, headers = await raw_request(client, host, path=path)
    assert status == 200
    cookies = cookie_attributes(headers)
    want = expected(domain)
    if path == b"/id":
        want = {"tr_aid": want["tr_aid"]}
    assert cookies == want


@pytest.mark.parametrize(
    "host", [b"a.shop.test\rSet-Cookie: x=1", b"a.shop.test\x00", b"a.shop.test\x0bSecure"]
)
async def test_control_characters_in_host_are_refused_without_cookies(
    relay: Any, host: bytes
) -> None:
    client = await relay()
    status, headers = await raw_request(client, host)
    assert status == 400
    assert cookie_attributes(headers) == {}


async def test_a_crlf_ends_the_host_header_and_starts_a_request_header_only(relay: Any) -> None:
    client = await relay()
    status, headers = await raw_request(client, b"a.shop.test\r\nSet-Cookie: injected=1")
    assert status == 200
    assert cookie_attributes(headers) == expected("shop.test")
    assert not any(name.lower().startswith("x-") for name, _ in headers)


async def test_x_forwarded_host_does_not_choose_the_cookie_domain(relay: Any) -> None:
    # The test client connects from 127.0.0.1, a trusted proxy by default.
    client = await relay()
    status, headers = await raw_request(
        client, b"a.shop.test", extra=b"X-Forwarded-Host: evil.test; Secure\r\n"
    )
    assert status == 200
    assert cookie_attributes(headers) == expected("shop.test")


async def test_a_configured_cookie_domain_is_used_whatever_the_host(relay: Any) -> None:
    client = await relay(identity={"cookie_domain": ".shop.test"})
    _, headers = await raw_request(client, b"a.shop.test; Domain=evil.test")
    assert cookie_attributes(headers) == expected("shop.test")


HOSTILE_HOST = 'a.shop.test"><script>alert(1)</script>'


async def test_segment_settings_name_only_a_valid_host(relay: Any) -> None:
    client = await relay()
    url = f"/v1/projects/{BROWSER_KEY}/settings"
    resp = await client.get(url, headers={"Host": HOSTILE_HOST})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_host"
    assert "script" not in await resp.text()
    ok = await client.get(url, headers={"Host": "Data.Shop.Test:8443"})
    api_host = (await ok.json())["integrations"]["Segment.io"]["apiHost"]
    assert api_host == "data.shop.test:8443/v1"


async def test_the_demo_page_copies_only_a_valid_host(relay: Any) -> None:
    client = await relay(demo={"enabled": True})
    page = await (await client.get("/demo", headers={"Host": HOSTILE_HOST})).text()
    assert "alert" not in page
    assert 'src="/p.js"' in page
    valid = await (await client.get("/demo", headers={"Host": "data.shop.test:8443"})).text()
    assert 'src="http://data.shop.test:8443/p.js"' in valid
