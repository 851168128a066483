"""Small helpers of the ingest handler."""

from __future__ import annotations

import base64

import pytest

from tagrelay.web.auth import key_from_headers


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
