"""Small helpers of the ingest handler."""

from __future__ import annotations

import base64

import pytest

from tagrelay.web.auth import key_from_headers
from tagrelay.web.ingest import count_brackets_up_to


@pytest.mark.parametrize(
    ("body", "limit", "expected"),
    [
        (b"", 16, 0),
        (b'{"a": 1}', 16, 1),
        (b'{"a": [1, {"b": "[{"}]}', 16, 5),
        (b'{"a": [1, {"b": "[{"}]}', 5, 5),
        (b'{"a": [1, {"b": "[{"}]}', 4, None),
        (b"[" * 3 + b"{" * 3, 6, 6),
        (b"[" * 3 + b"{" * 3, 5, None),
        (b"{" * 40, 16, None),
    ],
)
def test_count_brackets_up_to(body: bytes, limit: int, expected: int | None) -> None:
    assert count_brackets_up_to(body, limit) == expected
    if expected is not None:
        assert expected == body.count(b"{") + body.count(b"[")


def test_count_brackets_up_to_on_large_bodies() -> None:
    padding = b" " * 5000
    assert count_brackets_up_to(b"{" * 20 + padding, 16) is None
    assert count_brackets_up_to(padding + b"{" * 20, 16) is None
    assert count_brackets_up_to(padding + b"{[" * 8 + padding, 16) == 16


@pytest.mark.parametrize(
    ("userpass", "expected"),
    [
        ("wk_123:", "wk_123"),
        ("sdktest:8cF2kQ9xLm4Rv7Tz:", "sdktest:8cF2kQ9xLm4Rv7Tz"),  # Jitsu's id:secret form
        ("wk_123:some-password", "wk_123"),
        ("wk_123", "wk_123"),
    ],
)
def test_basic_auth_keys_may_contain_colons(userpass: str, expected: str) -> None:
    header = "Basic " + base64.b64encode(userpass.encode()).decode()
    assert key_from_headers({"Authorization": header}, {}) == expected
