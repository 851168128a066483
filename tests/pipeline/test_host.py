"""pipeline.host: which Host header values name a host, and how."""

from __future__ import annotations

import pytest

from tagrelay.pipeline.host import RequestHost, parse_host


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("data.example.com", RequestHost("data.example.com")),
        ("Data.Example.COM:8443", RequestHost("data.example.com", 8443)),
        ("example.com.", RequestHost("example.com", trailing_dot=True)),
        ("xn--bcher-kva.example", RequestHost("xn--bcher-kva.example")),
        ("localhost:8080", RequestHost("localhost", 8080)),
        ("127.0.0.1:8080", RequestHost("127.0.0.1", 8080, is_ip=True)),
        ("[::1]", RequestHost("::1", is_ip=True)),
        ("[2001:DB8::1]:443", RequestHost("2001:db8::1", 443, is_ip=True)),
    ],
)
def test_host_names_and_ip_literals(value: str, host: RequestHost) -> None:
    assert parse_host(value) == host


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "a.shop.test; SameSite=None; Secure",
        "a.shop.test,b",
        "a b",
        "a=b",
        "a_b.test",
        "bücher.example",
        "a..b",
        ".a.b",
        "a-.b",
        "a.b:",
        "a.b:0x50",
        "a.b:65536",
        "a.b:1:2",
        "::1",
        "[::1",
        "[::1]x",
        "[not-ip]:80",
        "127.0.0.1.",
        "1.2.3.999",
        "0x7f.1",
        "x" * 64 + ".test",
        "a." * 127 + "test",
    ],
)
def test_anything_else_names_no_host(value: str | None) -> None:
    assert parse_host(value) is None
