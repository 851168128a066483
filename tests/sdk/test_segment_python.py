"""The Segment Python library (segment-analytics-python), unmodified, with its host set to
the relay and a server key: page, track and identify go out as one ``POST /v1/batch`` (gzip
off and on) and land in the warehouse. See conftest.py for the rig (no browser needed, but
the rig's relay is shared with the browser tests)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from segment.analytics import Client

from tests.sdk.conftest import BASE, SERVER_KEY, Rig


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_segment_python_batch_lands_in_the_warehouse(rig: Rig, gzip: bool) -> None:
    user = f"py-{'gzip' if gzip else 'plain'}-u1"
    errors: list[Any] = []
    client = Client(
        write_key=SERVER_KEY,
        host=f"http://127.0.0.1:{rig.relay.port}{BASE}",
        gzip=gzip,
        max_retries=1,
        on_error=lambda error, batch: errors.append((error, batch)),
    )
    client.page(user, "Docs", "Home", {"url": "https://www.shop.test/docs", "path": "/docs"})
    client.track(user, "Purchase", {"revenue": 42, "currency": "USD"})
    client.identify(user, {"email": "a@b.com"})
    client.flush()
    client.join()
    assert errors == []

    rows = rig.wait_rows(f"user_id = '{user}'", 3)
    assert len(rows) == 3, rows
    by_type = {row["type"]: row for row in rows}
    assert set(by_type) == {"page", "track", "identify"}, rows
    for row in rows:
        assert row["user_id"] == user
        assert row["anonymous_id"] is None
        assert row["context_library_name"] == "analytics-python"
        assert row["context_library_version"] == "2.4.0"
        assert row["message_id"]
    page, track, identify = by_type["page"], by_type["track"], by_type["identify"]
    assert page["name"] == "Home"
    assert page["category"] == "Docs"
    assert page["properties_path"] == "/docs"
    assert page["event"] is None
    assert track["event"] == "Purchase"
    assert track["properties_revenue"] == 42
    assert track["properties_currency"] == "USD"
    assert identify["traits_email"] == "a@b.com"
    assert identify["event"] is None
    # The key is never stored, in any column.
    secret = SERVER_KEY.encode()
    assert not any(secret in repr(row).encode() for row in rows)
    assert not any(base64.b64encode(secret).decode() in repr(row) for row in rows)
