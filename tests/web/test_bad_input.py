"""A table of bad inputs: each gets a 4xx JSON error with its reason, is counted, stores
nothing, and never costs an event that was accepted before it."""

from __future__ import annotations

import gzip
from typing import Any

import orjson
import pytest

from tagrelay.appkeys import SPOOL
from tests.support import SERVER_KEY, basic, metric_value

AUTH = basic(SERVER_KEY)
JSON = {**AUTH, "Content-Type": "application/json"}


def deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        node = {"n": node}
    return node


CASES = [
    # name, path, body bytes, headers, status, reason
    ("malformed json", "/v1/track", b'{"event": "x",', JSON, 400, "malformed_json"),
    ("empty body", "/v1/track", b"", JSON, 400, "empty_body"),
    (
        "invalid utf-8",
        "/v1/track",
        b'{"event": "\xff\xfe", "anonymousId": "a"}',
        JSON,
        400,
        "invalid_utf8",
    ),
    ("body is an array", "/v1/track", b"[1, 2]", JSON, 400, "invalid_body"),
    (
        "properties not an object",
        "/v1/track",
        orjson.dumps({"event": "x", "anonymousId": "a", "properties": "nope"}),
        JSON,
        400,
        "invalid_field",
    ),
    (
        "context not an object",
        "/v1/page",
        orjson.dumps({"anonymousId": "a", "context": [1]}),
        JSON,
        400,
        "invalid_field",
    ),
    (
        "track without event name",
        "/v1/track",
        orjson.dumps({"anonymousId": "a"}),
        JSON,
        400,
        "missing_event",
    ),
    (
        "track with blank event name",
        "/v1/track",
        orjson.dumps({"anonymousId": "a", "event": "  "}),
        JSON,
        400,
        "missing_event",
    ),
    ("no ids at all", "/v1/track", orjson.dumps({"event": "x"}), JSON, 400, "missing_id"),
    (
        "userId is an object",
        "/v1/identify",
        orjson.dumps({"userId": {"a": 1}}),
        JSON,
        400,
        "invalid_field",
    ),
    (
        "unparseable timestamp",
        "/v1/track",
        orjson.dumps({"event": "x", "anonymousId": "a", "timestamp": "yesterday"}),
        JSON,
        400,
        "invalid_timestamp",
    ),
    (
        "timestamp at the end of the calendar",
        "/v1/track",
        orjson.dumps({"event": "x", "anonymousId": "a", "timestamp": "0001-01-01T00:00:00+01:00"}),
        JSON,
        400,
        "invalid_timestamp",
    ),
    (
        "body that is not the gzip it claims",
        "/v1/track",
        b"not gzip at all",
        {**JSON, "Content-Encoding": "gzip"},
        400,
        "invalid_body_encoding",
    ),
    (
        "batch is not an array",
        "/v1/batch",
        orjson.dumps({"batch": {"a": 1}}),
        JSON,
        400,
        "invalid_batch",
    ),
    (
        "batch of invalid events only",
        "/v1/batch",
        orjson.dumps({"batch": [{"type": "nope", "anonymousId": "a"}]}),
        JSON,
        400,
        "no_valid_events",
    ),
    (
        "too deep",
        "/v1/track",
        orjson.dumps({"event": "x", "anonymousId": "a", "properties": deep(40)}),
        JSON,
        400,
        "too_deep",
    ),
    (
        "event too large",
        "/v1/track",
        orjson.dumps({"event": "x", "anonymousId": "a", "properties": {"blob": "x" * 40_000}}),
        JSON,
        400,
        "event_too_large",
    ),
    (
        "body too large",
        "/v1/batch",
        orjson.dumps(
            {
                "batch": [
                    {
                        "type": "track",
                        "event": "x",
                        "anonymousId": "a",
                        "properties": {"b": "y" * 30_000},
                    }
                ]
                * 20
            }
        ),
        JSON,
        413,
        "body_too_large",
    ),
    (
        "gzip bomb beyond the body limit",
        "/v1/batch",
        gzip.compress(b'{"batch": [' + b" " * 5_000_000 + b"]}"),
        {**JSON, "Content-Encoding": "gzip"},
        413,
        "body_too_large",
    ),
    (
        "form content type",
        "/v1/track",
        b"event=x",
        {**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_content_type",
    ),
    (
        "too many events in a batch",
        "/v1/batch",
        orjson.dumps({"batch": [{"type": "track", "event": "x", "anonymousId": "a"}] * 2501}),
        JSON,
        413,
        "too_many_events",
    ),
    (
        "jitsu unknown type",
        "/api/s/purchase",
        orjson.dumps({"anonymousId": "a"}),
        {"X-Write-Key": SERVER_KEY, "Content-Type": "application/json"},
        400,
        "unknown_type",
    ),
    (
        "malformed basic auth",
        "/v1/track",
        orjson.dumps({"event": "x", "anonymousId": "a"}),
        {"Authorization": "Basic !!!", "Content-Type": "application/json"},
        401,
        "invalid_auth",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_bad_input_is_a_counted_4xx_with_a_reason(
    relay: Any, path: str, body: bytes, headers: dict[str, str], status: int, reason: str
) -> None:
    client = await relay()
    # An event accepted before the bad request must survive it.
    ok = await client.post("/v1/track", json={"event": "Before", "anonymousId": "a"}, headers=AUTH)
    assert ok.status == 200

    resp = await client.post(path, data=body, headers=headers)
    assert resp.status == status, await resp.text()
    payload = await resp.json()
    assert payload["error"] == reason
    assert isinstance(payload["message"], str) and payload["message"]

    rows = await client.app[SPOOL].read(0, 100)
    assert [orjson.loads(r.payload)["event"] for r in rows] == ["Before"]
    source = "jitsu" if path.startswith("/api/s/") else "segment"
    counted = sum(
        metric_value(client.app, "tagrelay_events_rejected_total", {"source": source, "reason": r})
        for r in {reason, "missing_type", "unknown_type"}
    )
    assert counted >= 1


async def test_unknown_paths_and_methods_are_json(relay: Any) -> None:
    client = await relay()
    r1 = await client.post("/v1/purchase", json={}, headers=AUTH)
    assert r1.status == 404
    assert (await r1.json())["error"] == "unknown_endpoint"
    r2 = await client.get("/nothing-here")
    assert r2.status == 404
    assert (await r2.json())["error"] == "not_found"
    r3 = await client.get("/v1/track")
    assert r3.status == 405
    assert (await r3.json())["error"] == "method_not_allowed"


async def test_request_metrics_keep_bounded_labels_for_odd_methods(relay: Any) -> None:
    client = await relay(metrics={"public": True})
    for method in ("PURGE", "PROPFIND", "LINK"):
        resp = await client.request(method, "/v1/track")
        assert resp.status in (404, 405)
    text = await (await client.get("/metrics")).text()
    assert 'method="other"' in text
    for method in ("PURGE", "PROPFIND", "LINK"):
        assert f'method="{method}"' not in text
