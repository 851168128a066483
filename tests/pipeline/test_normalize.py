"""Pure normalization: ids, timestamps and clock skew, shapes."""

from __future__ import annotations

import ipaddress
import random
from collections import OrderedDict, UserList
from datetime import UTC, datetime
from typing import Any

import pytest

from tagrelay.errors import IngestError
from tagrelay.pipeline.campaign import apply_campaign
from tagrelay.pipeline.client import ClientResolver, apply_client
from tagrelay.pipeline.normalize import (
    BatchSentAt,
    _exceeds_iterative,
    count_brackets_up_to,
    nesting_depth_exceeds,
    normalize_event,
)

RECEIVED = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def norm(raw: dict[str, Any], **kw: Any) -> dict[str, Any]:
    kw.setdefault("max_depth", 16)
    return normalize_event(raw, received_at=RECEIVED, **kw)


def test_timestamp_is_corrected_by_the_skew_between_sent_at_and_received_at() -> None:
    # Device clock 10 minutes slow; event 5 s before the send.
    event = norm(
        {
            "type": "track",
            "event": "x",
            "anonymousId": "a",
            "timestamp": "2026-11-29T11:49:55Z",
            "sentAt": "2026-11-29T11:50:00Z",
        }
    )
    assert event["timestamp"] == "2026-11-29T11:59:55.000Z"
    assert event["originalTimestamp"] == "2026-11-29T11:49:55.000Z"
    assert event["receivedAt"] == "2026-11-29T12:00:00.000Z"


def test_batch_level_sent_at_applies_to_each_event() -> None:
    event = norm(
        {"type": "page", "anonymousId": "a", "timestamp": "2026-11-29T13:00:00Z"},
        batch_sent_at="2026-11-29T13:00:01Z",
    )
    assert event["timestamp"] == "2026-11-29T11:59:59.000Z"


def test_without_sent_at_the_client_timestamp_is_kept_and_without_it_received_at() -> None:
    kept = norm({"type": "page", "anonymousId": "a", "timestamp": "2026-11-20T08:00:00+02:00"})
    assert kept["timestamp"] == "2026-11-20T06:00:00.000Z"
    none = norm({"type": "page", "anonymousId": "a"})
    assert none["timestamp"] == "2026-11-29T12:00:00.000Z"
    assert "originalTimestamp" not in none


def test_epoch_timestamps_in_seconds_and_milliseconds() -> None:
    ms = norm({"type": "page", "anonymousId": "a", "timestamp": 1_795_000_000_000})
    s = norm({"type": "page", "anonymousId": "a", "timestamp": 1_795_000_000})
    assert ms["timestamp"] == s["timestamp"] == "2026-11-18T11:06:40.000Z"


def test_a_timestamp_far_in_the_future_is_not_believed() -> None:
    event = norm({"type": "page", "anonymousId": "a", "timestamp": "2031-01-01T00:00:00Z"})
    assert event["timestamp"] == "2026-11-29T12:00:00.000Z"


def test_message_id_is_kept_sanitized_or_generated() -> None:
    assert (
        norm({"type": "page", "anonymousId": "a", "messageId": " ajs-1 "})["messageId"] == "ajs-1"
    )
    assert norm({"type": "page", "anonymousId": "a", "messageId": 42})["messageId"] == "42"
    generated = {
        norm({"type": "page", "anonymousId": "a", "messageId": bad})["messageId"]
        for bad in (None, "", "has space", "x" * 200, {"a": 1})
    }
    assert len(generated) == 5 and all(len(g) == 36 for g in generated)


def test_empty_user_id_means_no_user_and_numbers_become_strings() -> None:
    event = norm({"type": "page", "anonymousId": 7, "userId": ""})
    assert event["anonymousId"] == "7"
    assert "userId" not in event


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("string", "invalid_event"),
        ({"anonymousId": "a"}, "missing_type"),
        ({"type": "purchase", "anonymousId": "a"}, "unknown_type"),
        ({"type": "track", "anonymousId": "a", "event": 5}, "missing_event"),
        ({"type": "identify", "traits": []}, "invalid_field"),
        ({"type": "identify", "userId": True}, "invalid_field"),
        ({"type": "identify"}, "missing_id"),
        ({"type": "page", "anonymousId": "a", "sentAt": "soon"}, "invalid_timestamp"),
    ],
)
def test_invalid_events_raise_with_a_reason(raw: Any, code: str) -> None:
    with pytest.raises(IngestError) as info:
        norm(raw)
    assert info.value.code == code


def test_nesting_depth() -> None:
    assert not nesting_depth_exceeds({"a": {"b": [1, {"c": 1}]}}, 4)
    assert nesting_depth_exceeds({"a": {"b": [1, {"c": {}}]}}, 4)


def _random_tree(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 8 or roll < 0.35:
        return rng.choice(["s", 1, 2.5, None, True, OrderedDict(), UserList()])
    if roll < 0.7:
        return {f"k{i}": _random_tree(rng, depth + 1) for i in range(rng.randint(0, 4))}
    return [_random_tree(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def test_nesting_depth_walks_agree_with_each_other() -> None:
    """The recursive walk (limits up to 256) and the iterative one (above) give the same
    answer for every limit, on scalars, dicts, lists and their subclasses alike."""
    rng = random.Random(7)
    trees = [_random_tree(rng) for _ in range(300)]
    trees += ["x", 5, None, {}, [], OrderedDict(a=OrderedDict()), [[[[]]]]]
    for tree in trees:
        for limit in range(-1, 12):
            assert nesting_depth_exceeds(tree, limit) == _exceeds_iterative(tree, limit)
    deep: Any = 0
    for _ in range(300):
        deep = [deep]
    assert nesting_depth_exceeds(deep, 300) is False
    assert nesting_depth_exceeds(deep, 299) is True
    assert nesting_depth_exceeds(deep, 200) is True


def test_client_ip_behind_a_chain_of_trusted_proxies() -> None:
    resolver = ClientResolver([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")])
    headers = {"X-Forwarded-For": "198.51.100.1, 203.0.113.5, 10.1.1.1"}
    assert resolver.client_ip("10.2.2.2", headers) == "203.0.113.5"
    assert resolver.client_ip("::1", {"X-Forwarded-For": "2001:db8::5"}) == "2001:db8::5"
    assert resolver.client_ip("::1", {"X-Real-IP": "192.0.2.1"}) == "192.0.2.1"
    assert resolver.client_ip("192.0.2.99", headers) == "192.0.2.99"
    assert resolver.client_ip("10.2.2.2", {"X-Forwarded-For": "garbage"}) == "10.2.2.2"


def test_apply_client_respects_trust() -> None:
    event: dict[str, Any] = {"context": {"ip": "1.1.1.1", "userAgent": "theirs"}}
    apply_client(event, ip="2.2.2.2", user_agent="ours", trusted_sender=False)
    assert event["context"] == {"ip": "2.2.2.2", "userAgent": "ours"}
    event = {"context": {"ip": "1.1.1.1"}}
    apply_client(event, ip="2.2.2.2", user_agent="ours", trusted_sender=True)
    assert event["context"] == {"ip": "1.1.1.1", "userAgent": "ours"}


def test_campaign_from_search_keeps_client_values() -> None:
    event: dict[str, Any] = {
        "context": {
            "page": {"search": "?utm_source=a&utm_term=t&x=1"},
            "campaign": {"source": "explicit"},
        }
    }
    apply_campaign(event)
    assert event["context"]["campaign"] == {"source": "explicit", "term": "t"}


@pytest.mark.parametrize(
    "batch_sent_at",
    [
        None,
        "",
        "2026-11-29T13:00:01Z",
        "2026-11-29T13:00:01.5+02:00",
        1_795_000_000_000,
        "soon",
        [1],
    ],
)
def test_batch_sent_at_made_once_per_request_normalizes_like_the_raw_value(
    batch_sent_at: Any,
) -> None:
    shared = BatchSentAt(batch_sent_at)
    events = [
        {"type": "page", "anonymousId": "a", "timestamp": "2026-11-29T13:00:00Z"},
        {"type": "page", "anonymousId": "a"},
        {"type": "page", "anonymousId": "a", "sentAt": "2026-11-29T11:00:00Z"},
        {"type": "page", "anonymousId": "a", "timestamp": "2026-11-29T13:00:00Z"},
    ]
    for raw in events:
        outcomes = []
        for given in (batch_sent_at, shared):
            try:
                outcomes.append(norm(dict(raw), batch_sent_at=given))
            except IngestError as exc:
                outcomes.append((exc.code, exc.message))
        plain, once = outcomes
        if isinstance(plain, dict) and isinstance(once, dict):
            plain.pop("messageId")
            once.pop("messageId")
        assert plain == once


@pytest.mark.parametrize(
    "fields",
    [
        {"timestamp": "0001-01-01T00:00:00+01:00"},
        {"timestamp": "9999-12-31T23:59:59Z", "sentAt": "0001-01-01T00:00:00Z"},
        {"timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T23:59:59Z"},
    ],
)
def test_timestamps_at_the_ends_of_the_calendar_are_a_400_not_a_crash(
    fields: dict[str, Any],
) -> None:
    with pytest.raises(IngestError) as info:
        norm({"type": "page", "anonymousId": "a", **fields})
    assert info.value.code == "invalid_timestamp"


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
