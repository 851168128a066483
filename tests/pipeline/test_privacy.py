"""IP truncation (pipeline.privacy)."""

from __future__ import annotations

from typing import Any

import pytest

from tagrelay.pipeline.privacy import apply_ip_truncation, truncate_ip


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("203.0.113.7", "203.0.113.0"),
        ("10.1.2.255", "10.1.2.0"),
        ("2001:db8:1234:5678:9abc::1", "2001:db8:1234::"),
        ("::ffff:198.51.100.23", "198.51.100.0"),
        (" 192.0.2.1 ", "192.0.2.0"),
        ("not an ip", None),
    ],
)
def test_truncate_ip(address: str, expected: str | None) -> None:
    assert truncate_ip(address) == expected


def test_apply_truncates_or_drops() -> None:
    event: dict[str, Any] = {"context": {"ip": "203.0.113.7"}}
    apply_ip_truncation(event)
    assert event["context"]["ip"] == "203.0.113.0"
    odd: dict[str, Any] = {"context": {"ip": "somewhere"}}
    apply_ip_truncation(odd)
    assert "ip" not in odd["context"]
    numeric: dict[str, Any] = {"context": {"ip": 42}}
    apply_ip_truncation(numeric)
    assert "ip" not in numeric["context"]
