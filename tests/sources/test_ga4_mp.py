"""GA4 Measurement Protocol bodies into events (sources.ga4.parse_measurement_protocol)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from tagrelay.errors import IngestError
from tagrelay.sources.ga4 import MAX_MP_EVENTS, Hits, parse_measurement_protocol

TID = "G-8XK2MS9Q4T"
CID = "1938271044.1731420000"
HASHED_EMAIL = "a8af8341993604f29cd4e0e5a5a4b5d48c575436c38b28abbfd7d481f345d5db"

PURCHASE = {
    "name": "purchase",
    "params": {
        "transaction_id": "T-1001",
        "value": 42.5,
        "currency": "EUR",
        "session_id": "1731425080",
        "engagement_time_msec": 100,
        "items": [
            {"item_id": "SKU_1", "item_name": "Tee", "price": 10.01, "quantity": 3},
            {"item_id": "SKU_2", "price": 12.47, "quantity": 1, "color": "blue"},
        ],
    },
}
PAGE_VIEW = {
    "name": "page_view",
    "params": {
        "page_location": "https://shop.example.com/thanks?order=T-1001",
        "page_referrer": "https://shop.example.com/checkout",
        "page_title": "Thank you",
        "session_id": 1731425080,
    },
}


def body(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "client_id": CID,
        "user_id": "user-881",
        "timestamp_micros": 1731425083917123,
        "user_properties": {
            "plan": {"value": "pro"},
            "lifetime_orders": {"value": 3, "set_timestamp_micros": 1731425000000000},
        },
        "consent": {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
        "user_data": {"sha256_email_address": [HASHED_EMAIL]},
        "events": copy.deepcopy([PURCHASE, PAGE_VIEW]),
    }
    raw.update(overrides)
    return raw


def parse(raw: Any, measurement_id: str = TID) -> Hits:
    return parse_measurement_protocol(raw, measurement_id)


def test_a_full_request_decodes_every_part() -> None:
    hits = parse(body())
    assert hits.rejected == []
    purchase, page_view = hits.events
    shared_context = {
        "traits": {"plan": "pro", "lifetime_orders": 3},
        "consent": {"ad_user_data": "granted", "ad_personalization": "denied"},
    }
    assert purchase == {
        "type": "track",
        "event": "purchase",
        "messageId": purchase["messageId"],
        "anonymousId": CID,
        "userId": "user-881",
        "timestamp": "2024-11-12T15:24:43.917Z",
        "properties": PURCHASE["params"],
        "context": {
            **shared_context,
            "clientIds": {"ga4": {"clientId": CID, "sessionIds": {TID: "1731425080"}}},
            "ga4": {
                "measurementId": TID,
                "mp": True,
                "sessionId": "1731425080",
                "engagementTimeMsec": 100,
                "userData": {"sha256_email_address": [HASHED_EMAIL]},
            },
        },
    }
    assert page_view == {
        "type": "page",
        "event": "page_view",
        "name": "Thank you",
        "messageId": page_view["messageId"],
        "anonymousId": CID,
        "userId": "user-881",
        "timestamp": "2024-11-12T15:24:43.917Z",
        "properties": PAGE_VIEW["params"],
        "context": {
            "page": {
                "url": "https://shop.example.com/thanks?order=T-1001",
                "path": "/thanks",
                "search": "?order=T-1001",
                "referrer": "https://shop.example.com/checkout",
                "title": "Thank you",
                "host": "shop.example.com",
            },
            **shared_context,
            "clientIds": {"ga4": {"clientId": CID, "sessionIds": {TID: "1731425080"}}},
            "ga4": {
                "measurementId": TID,
                "mp": True,
                "sessionId": 1731425080,
                "userData": {"sha256_email_address": [HASHED_EMAIL]},
            },
        },
    }
    assert purchase["messageId"] != page_view["messageId"]
    assert re.fullmatch(r"[0-9a-f]{32}", purchase["messageId"])


def test_a_minimal_request() -> None:
    hits = parse({"client_id": CID, "events": [{"name": "sign_up"}]})
    assert hits.events == [
        {
            "type": "track",
            "event": "sign_up",
            "messageId": hits.events[0]["messageId"],
            "anonymousId": CID,
            "properties": {},
            "context": {
                "clientIds": {"ga4": {"clientId": CID}},
                "ga4": {"measurementId": TID, "mp": True},
            },
        }
    ]


def test_the_properties_are_a_copy() -> None:
    raw = body()
    event = parse(raw).events[0]
    event["properties"]["added"] = 1
    assert "added" not in raw["events"][0]["params"]


def test_app_stream_request_uses_the_app_instance_id() -> None:
    hits = parse({"app_instance_id": "cbd7c30a8e4a4a2cb02f1b5a8c1f3c6d", "events": [PURCHASE]})
    event = hits.events[0]
    assert event["anonymousId"] == "cbd7c30a8e4a4a2cb02f1b5a8c1f3c6d"
    assert event["context"]["clientIds"] == {"ga4": {"sessionIds": {TID: "1731425080"}}}
    assert event["context"]["ga4"]["appInstanceId"] == "cbd7c30a8e4a4a2cb02f1b5a8c1f3c6d"


def test_request_extras_are_kept_for_the_forwarder() -> None:
    raw = body(
        user_location={"city": "Mountain View", "country_id": "US"},
        device={"category": "mobile", "language": "en"},
        ip_override="198.51.100.7",
    )
    ga4 = parse(raw).events[0]["context"]["ga4"]
    assert ga4["userLocation"] == {"city": "Mountain View", "country_id": "US"}
    assert ga4["device"] == {"category": "mobile", "language": "en"}
    assert ga4["ipOverride"] == "198.51.100.7"


def test_numeric_ids_become_strings() -> None:
    event = parse(body(client_id=123.456, user_id=42)).events[0]
    assert event["anonymousId"] == "123.456"
    assert event["userId"] == "42"


def test_user_properties_without_value_are_skipped() -> None:
    raw = body(user_properties={"ok": {"value": "x"}, "bad": "x", "empty": {}})
    assert parse(raw).events[0]["context"]["traits"] == {"ok": "x"}


# -- consent -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("consent", "extra", "expected"),
    [
        (
            {"ad_user_data": "GRANTED", "ad_personalization": "GRANTED"},
            {},
            {"ad_user_data": "granted", "ad_personalization": "granted"},
        ),
        ({"ad_user_data": "denied"}, {}, {"ad_user_data": "denied"}),
        ({"ad_user_data": "MAYBE", "ad_storage": "GRANTED"}, {}, None),
        ("GRANTED", {}, None),
        (
            {"ad_personalization": "GRANTED"},
            {"non_personalized_ads": True},
            {"ad_personalization": "denied"},
        ),
        (None, {"non_personalized_ads": False}, None),
    ],
)
def test_consent(consent: Any, extra: dict[str, Any], expected: dict[str, str] | None) -> None:
    raw = {"client_id": CID, "events": [{"name": "x"}], **extra}
    if consent is not None:
        raw["consent"] = consent
    assert parse(raw).events[0]["context"].get("consent") == expected


# -- time --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_micros", "event_micros", "expected"),
    [
        (1731425083917123, None, "2024-11-12T15:24:43.917Z"),
        ("1731425083000999", None, "2024-11-12T15:24:43.000Z"),
        (1731425083917123, 1731425000000000, "2024-11-12T15:23:20.000Z"),
        (None, 1731425000500000, "2024-11-12T15:23:20.500Z"),
        (0, None, "1970-01-01T00:00:00.000Z"),
        (None, None, None),
    ],
)
def test_timestamps(request_micros: Any, event_micros: Any, expected: str | None) -> None:
    event: dict[str, Any] = {"name": "x"}
    if event_micros is not None:
        event["timestamp_micros"] = event_micros
    raw: dict[str, Any] = {"client_id": CID, "events": [event]}
    if request_micros is not None:
        raw["timestamp_micros"] = request_micros
    assert parse(raw).events[0].get("timestamp") == expected


@pytest.mark.parametrize("micros", ["soon", -1, 1.5e15, True, 10**30, "١٢"])
def test_an_invalid_request_timestamp_rejects_the_request(micros: Any) -> None:
    with pytest.raises(IngestError) as caught:
        parse({"client_id": CID, "timestamp_micros": micros, "events": [{"name": "x"}]})
    assert caught.value.code == "invalid_timestamp"


def test_an_invalid_event_timestamp_rejects_that_event() -> None:
    raw = {"client_id": CID, "events": [{"name": "a", "timestamp_micros": "x"}, {"name": "b"}]}
    hits = parse(raw)
    assert [e["event"] for e in hits.events] == ["b"]
    assert [(i, e.code) for i, e in hits.rejected] == [(0, "invalid_timestamp")]


# -- message ids -------------------------------------------------------------------------


def test_message_ids_are_deterministic() -> None:
    first = [e["messageId"] for e in parse(body()).events]
    assert first == [e["messageId"] for e in parse(body()).events]


def test_message_ids_differ_by_index_stream_client_time_and_content() -> None:
    same_twice = parse({"client_id": CID, "events": [{"name": "x"}, {"name": "x"}]}).events
    ids = {e["messageId"] for e in same_twice}
    assert len(ids) == 2
    base = {"client_id": CID, "events": [{"name": "x"}]}
    variants = [
        parse(base).events[0],
        parse(base, "G-OTHER").events[0],
        parse({**base, "client_id": "1.2"}).events[0],
        parse({**base, "timestamp_micros": 1731425083917123}).events[0],
        parse({**base, "events": [{"name": "x", "params": {"a": 1}}]}).events[0],
    ]
    assert len({e["messageId"] for e in variants}) == len(variants)


def test_the_event_json_is_hashed_with_sorted_keys() -> None:
    a = parse({"client_id": CID, "events": [{"name": "x", "params": {"a": 1, "b": 2}}]})
    b = parse({"client_id": CID, "events": [{"params": {"b": 2, "a": 1}, "name": "x"}]})
    assert a.events[0]["messageId"] == b.events[0]["messageId"]


# -- errors ------------------------------------------------------------------------------


def error_of(raw: Any, measurement_id: str = TID) -> IngestError:
    with pytest.raises(IngestError) as caught:
        parse(raw, measurement_id)
    return caught.value


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ([{"name": "x"}], "invalid_body"),
        ("events", "invalid_body"),
        (None, "invalid_body"),
        ({"client_id": CID}, "missing_events"),
        ({"client_id": CID, "events": []}, "missing_events"),
        ({"client_id": CID, "events": {"name": "x"}}, "invalid_events"),
        ({"client_id": CID, "events": "x"}, "invalid_events"),
        ({"events": [{"name": "x"}]}, "missing_client_id"),
        (
            {"client_id": "", "app_instance_id": None, "events": [{"name": "x"}]},
            "missing_client_id",
        ),
        ({"client_id": ["x"], "events": [{"name": "x"}]}, "invalid_field"),
        ({"client_id": CID, "user_id": {"id": 1}, "events": [{"name": "x"}]}, "invalid_field"),
        ({"client_id": True, "events": [{"name": "x"}]}, "invalid_field"),
    ],
)
def test_request_errors(raw: Any, code: str) -> None:
    error = error_of(raw)
    assert error.code == code
    assert error.status == 400


def test_missing_measurement_id() -> None:
    assert error_of(body(), "").code == "missing_measurement_id"


def test_at_most_25_events() -> None:
    events = [{"name": f"e{i}"} for i in range(MAX_MP_EVENTS)]
    assert len(parse({"client_id": CID, "events": events}).events) == MAX_MP_EVENTS
    error = error_of({"client_id": CID, "events": [*events, {"name": "one_more"}]})
    assert error.code == "too_many_events"
    assert "26" in error.message


def test_invalid_events_are_rejected_one_by_one() -> None:
    raw = {
        "client_id": CID,
        "events": [
            {"name": "ok"},
            "not an event",
            {"params": {}},
            {"name": 5},
            {"name": ""},
            {"name": "bad_params", "params": [1]},
            {"name": "null_params", "params": None},
        ],
    }
    hits = parse(raw)
    assert [e["event"] for e in hits.events] == ["ok", "null_params"]
    assert [(i, e.code) for i, e in hits.rejected] == [
        (1, "invalid_event"),
        (2, "missing_event_name"),
        (3, "missing_event_name"),
        (4, "missing_event_name"),
        (5, "invalid_params"),
    ]
