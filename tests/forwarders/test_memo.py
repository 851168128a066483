"""ObjectMemo: values found again by the very object they were computed for (the delivery
process gives every forwarder the same event objects), never by an equal copy, and at most
``size`` of them."""

from __future__ import annotations

from tagrelay.forwarders._ecommerce import commerce
from tagrelay.forwarders._memo import ObjectMemo
from tagrelay.forwarders._user_data import extract_user_data


def test_a_value_is_found_by_its_object_and_detail_only() -> None:
    memo: ObjectMemo[str] = ObjectMemo(4)
    event = {"userId": "u-1"}
    assert memo.put(event, "first", "purchase") == "first"
    assert memo.get(event, "purchase") == "first"
    assert memo.get(event, "refund") is None  # another detail
    assert memo.get({"userId": "u-1"}) is None  # an equal copy is another event
    memo.put(event, "second", "refund")
    assert memo.get(event, "refund") == "second" and memo.get(event, "purchase") is None


def test_the_oldest_values_are_forgotten_beyond_the_size() -> None:
    memo: ObjectMemo[int] = ObjectMemo(2)
    events = [{"n": n} for n in range(3)]
    for n, event in enumerate(events):
        memo.put(event, n)
    assert memo.get(events[0]) is None
    assert [memo.get(e) for e in events[1:]] == [1, 2]


def test_the_same_event_object_is_read_once_an_equal_one_again() -> None:
    event = {
        "type": "track",
        "context": {"traits": {"email": "jane@example.com"}},
        "properties": {"revenue": 12, "currency": "usd"},
    }
    copy = {**event, "context": {"traits": {"email": "jane@example.com"}}}
    assert extract_user_data(event) is extract_user_data(event)
    assert extract_user_data(copy) == extract_user_data(event)
    assert extract_user_data(copy) is not extract_user_data(event)
    properties = event["properties"]
    assert commerce(properties, "purchase") is commerce(properties, "purchase")
    assert commerce(dict(properties), "purchase") is not commerce(properties, "purchase")
