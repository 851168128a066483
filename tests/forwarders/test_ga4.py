"""The ga4 forwarder: the exact requests it builds (golden, both paths), GA4's limits and
the counts of what it leaves out, consent, user data hashing, validation mode, and delivery
against a recording fake Google (a local aiohttp app)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from pydantic import ValidationError

from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import Plan
from tagrelay.forwarders._ecommerce import SEGMENT_EVENT_NAMES
from tagrelay.forwarders.ga4 import (
    DROP_REASONS,
    GA4Config,
    GA4Forwarder,
    build_plan,
    client_hints,
    derived_client_id,
    snake_name,
)
from tagrelay.model import Dead, Delivered, Event, Retry
from tests.support import Recorder, fake_server, recording_server

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
MID = "G-TEST1234"
SECRET = "s3cret-api"
MP = f"https://region1.google-analytics.com/mp/collect?measurement_id={MID}&api_secret={SECRET}"
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 Chrome/124.0 Safari/537.36"
SHARED = (
    "v=2&tid=G-TEST1234&gtm=45je4bk0&_p=1732881000000&cid=123456789.1700000000"
    "&ul=en-us&sr=1920x1080&sid=1732880000&sct=3&seg=1"
    "&dl=https%3A%2F%2Fwww.shop.test%2Fcart&dt=Cart%20%7C%20Shop&_uip=198.51.100.7&gcs=G111"
)


def config(**overrides: Any) -> GA4Config:
    raw: dict[str, Any] = {"id": "ga4", "type": "ga4", "measurement_id": MID, "api_secret": SECRET}
    raw.update(overrides)
    return GA4Config.model_validate(raw)


def gtag_event(line: str, message_id: str, request: str = SHARED, **context: Any) -> Event:
    return {
        "type": "track",
        "event": "gtag",
        "messageId": message_id,
        "anonymousId": "anon-1",
        "timestamp": "2026-11-29T11:59:00.000Z",
        "context": {
            "source": "ga4",
            "ip": "203.0.113.0",
            "userAgent": UA,
            "consent": {"analytics": "granted"},
            "ga4": {"request": request, "event": line, "measurementId": MID},
            **context,
        },
    }


def track(name: str, message_id: str = "m-1", anonymous_id: str = "anon-1", **extra: Any) -> Event:
    event: Event = {
        "type": "track",
        "event": name,
        "messageId": message_id,
        "anonymousId": anonymous_id,
        "timestamp": "2026-11-29T11:59:00.000Z",
        "context": {"consent": {"analytics": "granted"}},
        "properties": {},
    }
    event.update(extra)
    return event


def body(plan: Plan, n: int = 0) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(plan.requests[n].request.body)
    return result


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- gtag hits -----------------------------------------------------------------------------


def test_a_gtag_batch_is_one_post_with_the_shared_query_uip_and_its_lines() -> None:
    lines = [
        "en=page_view&_et=12&_ss=1",
        "en=scroll&epn.percent_scrolled=90&_et=4021",
        "en=add_to_cart&cu=EUR&pr1=idP1~nmShoe~pr12.5~qt2&epn.value=25",
    ]
    uad = {
        "brands": [
            {"brand": "Chromium", "version": "124"},
            {"brand": 'Not"A\\Brand', "version": "99"},
        ],
        "mobile": False,
        "platform": "macOS",
        "platformVersion": "14.4.1",
        "architecture": "arm",
        "bitness": "64",
        "model": "",
        "wow64": False,
        "fullVersionList": [{"brand": "Chromium", "version": "124.0.6367.91"}],
    }
    events = [gtag_event(line, f"m-{i}", userAgentData=uad) for i, line in enumerate(lines)]
    plan = build_plan(config(), events, NOW)
    assert len(plan.requests) == 1
    [planned] = plan.requests
    request = planned.request
    assert planned.indices == (0, 1, 2)
    assert request.method == "POST"
    # the query exactly as received, the received _uip replaced by the visitor's IP
    assert request.url == (
        "https://region1.google-analytics.com/g/collect?"
        "v=2&tid=G-TEST1234&gtm=45je4bk0&_p=1732881000000&cid=123456789.1700000000"
        "&ul=en-us&sr=1920x1080&sid=1732880000&sct=3&seg=1"
        "&dl=https%3A%2F%2Fwww.shop.test%2Fcart&dt=Cart%20%7C%20Shop&gcs=G111&_uip=203.0.113.0"
    )
    assert request.headers == {
        "User-Agent": UA,
        "Sec-CH-UA": '"Chromium";v="124", "Not\\"A\\\\Brand";v="99"',
        "Sec-CH-UA-Mobile": "?0",
        "Sec-CH-UA-WoW64": "?0",
        "Sec-CH-UA-Platform": '"macOS"',
        "Sec-CH-UA-Platform-Version": '"14.4.1"',
        "Sec-CH-UA-Arch": '"arm"',
        "Sec-CH-UA-Bitness": '"64"',
        "Sec-CH-UA-Model": '""',
        "Sec-CH-UA-Full-Version-List": '"Chromium";v="124.0.6367.91"',
        "Content-Type": "text/plain;charset=UTF-8",
    }
    assert request.body == (
        b"en=page_view&_et=12&_ss=1\n"
        b"en=scroll&epn.percent_scrolled=90&_et=4021\n"
        b"en=add_to_cart&cu=EUR&pr1=idP1~nmShoe~pr12.5~qt2&epn.value=25"
    )
    assert plan.drops == {}


def test_a_query_only_hit_is_a_post_without_body_or_content_type() -> None:
    request_string = SHARED.replace("&_uip=198.51.100.7", "") + "&en=page_view&_ss=1"
    plan = build_plan(config(), [gtag_event("", "m-1", request=request_string)], NOW)
    [planned] = plan.requests
    assert planned.request.method == "POST"
    assert planned.request.url == (
        "https://region1.google-analytics.com/g/collect?" + request_string + "&_uip=203.0.113.0"
    )
    assert planned.request.body == b""
    assert planned.request.headers == {"User-Agent": UA}


def test_an_ipv6_address_is_percent_encoded_and_a_missing_ip_sends_no_uip() -> None:
    v6 = gtag_event("en=a", "m-1", ip="2001:db8:85a3::")
    plan = build_plan(config(), [v6], NOW)
    assert plan.requests[0].request.url.endswith("&gcs=G111&_uip=2001%3Adb8%3A85a3%3A%3A")
    anonymous = gtag_event("en=a", "m-2")
    del anonymous["context"]["ip"]
    plan = build_plan(config(), [anonymous], NOW)
    assert "_uip" not in plan.requests[0].request.url


def test_hits_of_different_requests_go_apart_and_keep_their_order() -> None:
    other = SHARED.replace("_p=1732881000000", "_p=1732881999999")
    events = [
        gtag_event("en=a", "m-0"),
        gtag_event("en=b", "m-1", request=other),
        gtag_event("en=c", "m-2"),
    ]
    plan = build_plan(config(), events, NOW)
    assert [p.indices for p in plan.requests] == [(0, 2), (1,)]
    assert [p.request.body for p in plan.requests] == [b"en=a\nen=c", b"en=b"]


def test_gtag_hits_of_another_property_are_counted_unless_all_are_forwarded() -> None:
    foreign = gtag_event("en=a", "m-1")
    foreign["context"]["ga4"]["measurementId"] = "G-OTHER999"
    plan = build_plan(config(), [foreign], NOW)
    assert plan.requests == []
    assert plan.drops == {"other_measurement_id": 1}
    assert len(build_plan(config(gtag_hits="all"), [foreign], NOW).requests) == 1
    skipped = build_plan(config(gtag_hits="skip"), [gtag_event("en=a", "m-2")], NOW)
    assert (skipped.requests, skipped.drops) == ([], {"gtag_hits_skipped": 1})


# -- Measurement Protocol: golden bodies ---------------------------------------------------

SEGMENT_CONTEXT: dict[str, Any] = {
    "ip": "203.0.113.0",
    "locale": "de-DE",
    "userAgent": UA,
    "screen": {"width": 1440, "height": 900},
    "page": {
        "url": "https://www.shop.test/checkout/done",
        "title": "Thank you",
        "referrer": "https://www.shop.test/checkout",
        "path": "/checkout/done",
    },
    "consent": {
        "analytics": "granted",
        "ads": "granted",
        "ad_user_data": "granted",
        "ad_personalization": "denied",
    },
    "clientIds": {
        "ga4": {"clientId": "123456789.1700000000", "sessionIds": {MID: "1764414000"}},
    },
    "traits": {"plan": "pro", "email": "jane@example.com"},
}


def test_order_completed_with_products_is_a_purchase_with_items() -> None:
    event = track(
        "Order Completed",
        userId="user-42",
        context=SEGMENT_CONTEXT,
        properties={
            "order_id": "o-1001",
            "affiliation": "Web",
            "total": 30.5,
            "revenue": 25,
            "shipping": 3.5,
            "tax": 2,
            "coupon": "WINTER",
            "currency": "eur",
            "products": [
                {
                    "product_id": "p-1",
                    "sku": "SKU-1",
                    "name": "Runner",
                    "brand": "Acme",
                    "category": "Shoes",
                    "variant": "red",
                    "price": 12.5,
                    "quantity": 2,
                    "position": 1,
                    "url": "https://www.shop.test/p/1",
                },
                {"sku": "SKU-2", "name": "Socks", "price": "5.5", "quantity": 1},
            ],
        },
    )
    plan = build_plan(config(), [event], NOW)
    assert plan.requests[0].request.url == MP
    assert plan.requests[0].request.headers == {
        "Content-Type": "application/json",
        "User-Agent": "tagrelay",
    }
    assert body(plan) == {
        "client_id": "123456789.1700000000",
        "user_id": "user-42",
        "timestamp_micros": 1795953540000000,
        "consent": {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
        "ip_override": "203.0.113.0",
        "user_properties": {"plan": {"value": "pro"}},
        "events": [
            {
                "name": "purchase",
                "params": {
                    "session_id": "1764414000",
                    "engagement_time_msec": 1,
                    "page_location": "https://www.shop.test/checkout/done",
                    "page_referrer": "https://www.shop.test/checkout",
                    "page_title": "Thank you",
                    "language": "de-de",
                    "screen_resolution": "1440x900",
                    "value": 30.5,
                    "currency": "EUR",
                    "transaction_id": "o-1001",
                    "tax": 2,
                    "shipping": 3.5,
                    "items": [
                        {
                            "item_id": "p-1",
                            "item_name": "Runner",
                            "item_brand": "Acme",
                            "item_category": "Shoes",
                            "item_variant": "red",
                            "price": 12.5,
                            "quantity": 2,
                            "index": 1,
                        },
                        {"item_id": "SKU-2", "item_name": "Socks", "price": 5.5, "quantity": 1},
                    ],
                    "affiliation": "Web",
                    "coupon": "WINTER",
                },
                "timestamp_micros": 1795953540000000,
            }
        ],
    }
    # the email trait is personal data (kept out); the product's url has no GA4 item field
    assert plan.drops == {"pii_removed": 1, "unmapped_item_field": 1}


def test_track_and_page_events_of_one_visitor_share_a_request() -> None:
    context = {**SEGMENT_CONTEXT, "traits": {}}
    events = [
        {
            "type": "page",
            "name": "Home",
            "messageId": "m-1",
            "anonymousId": "anon-1",
            "timestamp": "2026-11-29T11:58:00.000Z",
            "context": context,
            "properties": {
                "url": "https://www.shop.test/",
                "path": "/",
                "title": "Shop",
                "referrer": "https://search.test/",
            },
        },
        track(
            "Video Played",
            "m-2",
            context=context,
            properties={
                "videoId": "v-9",
                "Play Speed": 1.5,
                "autoplay": False,
                "engagement_time_msec": 850,
            },
        ),
    ]
    plan = build_plan(config(), events, NOW)
    assert len(plan.requests) == 1
    assert body(plan)["events"] == [
        {
            "name": "page_view",
            "params": {
                "session_id": "1764414000",
                "engagement_time_msec": 1,
                "page_location": "https://www.shop.test/",
                "page_referrer": "https://search.test/",
                "page_title": "Shop",
                "language": "de-de",
                "screen_resolution": "1440x900",
            },
            "timestamp_micros": 1795953480000000,
        },
        {
            "name": "video_played",
            "params": {
                "session_id": "1764414000",
                "engagement_time_msec": 850,
                "page_location": "https://www.shop.test/checkout/done",
                "page_referrer": "https://www.shop.test/checkout",
                "page_title": "Thank you",
                "language": "de-de",
                "screen_resolution": "1440x900",
                "videoId": "v-9",
                "play_speed": 1.5,
                "autoplay": "false",
            },
            "timestamp_micros": 1795953540000000,
        },
    ]
    assert body(plan)["timestamp_micros"] == 1795953480000000
    assert plan.drops == {}


def test_the_exact_bytes_of_a_minimal_track_request() -> None:
    event = track("Signed Up", context={"consent": {"analytics": "granted"}})
    plan = build_plan(config(), [event], NOW)
    client_id = derived_client_id("anon-1")
    assert plan.requests[0].request.body == (
        b'{"client_id":"' + client_id.encode() + b'","timestamp_micros":1795953540000000,'
        b'"events":[{"name":"sign_up","params":{"session_id":"1795910400",'
        b'"engagement_time_msec":1},"timestamp_micros":1795953540000000}]}'
    )


def test_a_screen_is_a_page_view_titled_with_its_name() -> None:
    screen: Event = {
        "type": "screen",
        "name": "Settings",
        "messageId": "m-1",
        "anonymousId": "anon-1",
        "timestamp": "2026-11-29T11:59:00.000Z",
        "context": {},
        "properties": {},
    }
    plan = build_plan(config(), [screen], NOW)
    [event] = body(plan)["events"]
    assert event["name"] == "page_view"
    assert event["params"]["page_title"] == "Settings"


def test_identify_group_and_alias_are_not_sent_and_counted() -> None:
    events = [
        {"type": kind, "messageId": f"m-{kind}", "userId": "u", "traits": {"plan": "pro"}}
        for kind in ("identify", "group", "alias")
    ]
    plan = build_plan(config(), events, NOW)
    assert plan.requests == []
    assert plan.drops == {"unsupported_type": 3}


# -- identity and request grouping ---------------------------------------------------------


def test_client_id_comes_from_the_ga_cookie_else_is_derived_from_the_anonymous_id() -> None:
    from_cookie = track("Clicked", context=SEGMENT_CONTEXT)
    derived = track("Clicked", "m-2", anonymous_id="anon-7")
    user_only = track("Clicked", "m-3", anonymous_id="", userId="user-9")
    plan = build_plan(config(), [from_cookie, derived, user_only], NOW)
    assert [body(plan, i)["client_id"] for i in range(3)] == [
        "123456789.1700000000",
        derived_client_id("anon-7"),
        derived_client_id("user-9"),
    ]
    digest = hashlib.sha256(b"tagrelay.ga4:anon-7").digest()
    expected = f"{int.from_bytes(digest[:4], 'big')}.{int.from_bytes(digest[4:8], 'big')}"
    assert derived_client_id("anon-7") == expected
    # the cookie's session, else the start of the event's UTC day
    assert body(plan, 0)["events"][0]["params"]["session_id"] == "1764414000"
    assert body(plan, 1)["events"][0]["params"]["session_id"] == str(
        int(datetime(2026, 11, 29, tzinfo=UTC).timestamp())
    )


def test_thirty_events_of_one_visitor_make_two_requests_of_25_and_5() -> None:
    events = [track("Clicked", f"m-{i}") for i in range(30)]
    plan = build_plan(config(), events, NOW)
    assert [len(body(plan, i)["events"]) for i in range(2)] == [25, 5]
    assert [p.indices for p in plan.requests] == [tuple(range(25)), tuple(range(25, 30))]


def test_events_of_two_visitors_go_in_two_requests() -> None:
    events = [
        track("Clicked", "m-1", "anon-a"),
        track("Clicked", "m-2", "anon-b"),
        track("Clicked", "m-3", "anon-a"),
    ]
    plan = build_plan(config(), events, NOW)
    assert [p.indices for p in plan.requests] == [(0, 2), (1,)]
    assert [body(plan, i)["client_id"] for i in range(2)] == [
        derived_client_id("anon-a"),
        derived_client_id("anon-b"),
    ]


def test_a_user_id_change_starts_another_request() -> None:
    events = [track("Clicked", "m-1"), track("Clicked", "m-2", userId="u-1")]
    plan = build_plan(config(), events, NOW)
    assert [body(plan, i).get("user_id") for i in range(2)] == [None, "u-1"]


def test_events_older_than_72_hours_are_dropped() -> None:
    old = track("Clicked", "m-1", timestamp="2026-11-26T11:59:59.000Z")
    fresh = track("Clicked", "m-2", timestamp="2026-11-26T12:00:01.000Z")
    plan = build_plan(config(), [old, fresh], NOW)
    assert [p.indices for p in plan.requests] == [(1,)]
    assert plan.drops == {"too_old": 1}


# -- names ---------------------------------------------------------------------------------


EVENT_NAMES = [
    ("Products Searched", "search"),
    ("Product List Viewed", "view_item_list"),
    ("Product Clicked", "select_item"),
    ("Product Viewed", "view_item"),
    ("Product Added", "add_to_cart"),
    ("Product Removed", "remove_from_cart"),
    ("Cart Viewed", "view_cart"),
    ("Checkout Started", "begin_checkout"),
    ("Payment Info Entered", "add_payment_info"),
    ("Order Completed", "purchase"),
    ("Order Refunded", "refund"),
    ("Product Added to Wishlist", "add_to_wishlist"),
    ("Product Shared", "share"),
    ("Promotion Viewed", "view_promotion"),
    ("Promotion Clicked", "select_promotion"),
    ("Signed Up", "sign_up"),
    ("Signed In", "login"),
    ("Lead Generated", "generate_lead"),
    ("order completed", "purchase"),
    ("Video  Played", "video_played"),
    ("videoPlayed", "video_played"),
    ("Ünïcode Évent!", "unicode_event"),
    ("2nd Step", "nd_step"),
]


@pytest.mark.parametrize(("segment", "ga4"), EVENT_NAMES)
def test_event_names(segment: str, ga4: str) -> None:
    plan = build_plan(config(), [track(segment)], NOW)
    assert body(plan)["events"][0]["name"] == ga4


def test_the_cases_above_cover_the_whole_built_in_table() -> None:
    assert dict(EVENT_NAMES[: len(SEGMENT_EVENT_NAMES)]) == SEGMENT_EVENT_NAMES


def test_a_yaml_override_renames_and_extends_the_table() -> None:
    raw = yaml.safe_load(
        """
        id: ga4
        type: ga4
        measurement_id: G-TEST1234
        api_secret: s3cret
        event_names:
          My Event: my_event
          Order Completed: offline_purchase
        """
    )
    cfg = GA4Config.model_validate(raw)
    plan = build_plan(cfg, [track("My Event"), track("Order Completed", "m-2")], NOW)
    assert [e["name"] for e in body(plan)["events"]] == ["my_event", "offline_purchase"]


@pytest.mark.parametrize("target", ["session_start", "ga_thing", "9lives", "with-dash", "x" * 41])
def test_an_override_to_an_invalid_or_reserved_name_is_a_config_error(target: str) -> None:
    with pytest.raises(ValidationError, match="GA4 event names"):
        config(event_names={"Thing": target})


def test_reserved_event_names_are_not_sent_and_long_names_are_cut() -> None:
    events = [
        track("Session Start", "m-1"),
        track("first_visit", "m-2"),
        track("google_thing", "m-3"),
        track("!!!", "m-4"),
        track("A very long event name that goes on and on forever", "m-5"),
    ]
    plan = build_plan(config(), events, NOW)
    assert [p.indices for p in plan.requests] == [(4,)]
    assert body(plan)["events"][0]["name"] == "a_very_long_event_name_that_goes_on_and"
    assert plan.drops == {"reserved_name": 3, "invalid_name": 1, "name_truncated": 1}


def test_snake_name() -> None:
    assert snake_name("Checkout Step 2 Viewed") == "checkout_step_2_viewed"
    assert snake_name("__private") == "private"
    assert snake_name("123") == ""


# -- limits --------------------------------------------------------------------------------


def test_params_beyond_25_nested_values_and_long_values_are_counted() -> None:
    properties: dict[str, Any] = {f"p{i:02d}": i for i in range(30)}
    properties["long_text"] = "x" * 150
    properties["nested"] = {"a": 1}
    properties["list"] = [1, 2]
    properties["_private"] = "x"
    properties["contact"] = "write to jane@example.com"
    properties["email"] = "jane@example.com"
    plan = build_plan(config(), [track("Clicked", properties=properties)], NOW)
    params = body(plan)["events"][0]["params"]
    assert len(params) == 25
    assert list(params)[:3] == ["session_id", "engagement_time_msec", "p00"]
    assert "long_text" not in params  # beyond the 25th
    assert plan.drops == {
        "too_many_params": 8,  # 2 own + 30 + long_text = 33
        "value_truncated": 1,
        "nested_value": 2,
        "reserved_param": 1,
        "pii_removed": 2,
    }


def test_page_context_has_its_own_length_limits() -> None:
    long_url = "https://www.shop.test/?" + "q" * 2000
    context = {"page": {"url": long_url, "referrer": long_url, "title": "t" * 400}}
    plan = build_plan(config(), [track("Clicked", context=context)], NOW)
    params = body(plan)["events"][0]["params"]
    assert [len(params[k]) for k in ("page_location", "page_referrer", "page_title")] == [
        1000,
        420,
        300,
    ]
    assert plan.drops == {"value_truncated": 3}


def test_user_properties_follow_ga4_limits_and_leave_personal_data_out() -> None:
    traits: dict[str, Any] = {f"trait_{i:02d}": "v" for i in range(27)}
    traits.update(
        {
            "name": "Jane Doe",
            "firstName": "Jane",
            "first_visit_time": "x",
            "company": {"name": "Acme"},
            "a_rather_long_trait_name_indeed": "x" * 50,
        }
    )
    plan = build_plan(config(), [track("Clicked", context={"traits": traits})], NOW)
    user_properties = body(plan)["user_properties"]
    assert len(user_properties) == 25
    assert "name" not in user_properties and "firstName" not in user_properties
    assert plan.drops == {
        "too_many_user_properties": 3,  # trait_25, trait_26 and the long one
        "pii_removed": 2,
        "reserved_param": 1,
        "nested_value": 1,
        "name_truncated": 1,
        "value_truncated": 1,
    }


def test_a_trait_value_is_cut_to_36_characters() -> None:
    plan = build_plan(config(), [track("Clicked", traits={"segment_name": "s" * 40})], NOW)
    assert body(plan)["user_properties"] == {"segment_name": {"value": "s" * 36}}


def test_single_product_events_carry_the_product_as_their_item() -> None:
    properties = {
        "product_id": "p-1",
        "name": "Runner",
        "price": 12.5,
        "quantity": 2,
        "currency": "USD",
        "image_url": "https://cdn.shop.test/1.png",
    }
    plan = build_plan(config(), [track("Product Added", properties=properties)], NOW)
    params = body(plan)["events"][0]["params"]
    assert params["items"] == [
        {"item_id": "p-1", "item_name": "Runner", "price": 12.5, "quantity": 2}
    ]
    assert params["value"] == 25.0
    assert params["currency"] == "USD"
    assert params["image_url"] == "https://cdn.shop.test/1.png"


def test_search_list_and_promotion_fields_are_renamed() -> None:
    events = [
        track("Products Searched", "m-1", properties={"query": "red shoes"}),
        track("Product List Viewed", "m-2", properties={"list_id": "l-1", "category": "Shoes"}),
        track(
            "Promotion Clicked",
            "m-3",
            properties={
                "promotion_id": "pr-1",
                "name": "Winter",
                "creative": "b",
                "position": "top",
            },
        ),
    ]
    plan = build_plan(config(), events, NOW)
    params = [e["params"] for e in body(plan)["events"]]
    assert params[0]["search_term"] == "red shoes"
    assert (params[1]["item_list_id"], params[1]["item_list_name"]) == ("l-1", "Shoes")
    assert {k: params[2][k] for k in ("promotion_id", "promotion_name", "creative_name")} == {
        "promotion_id": "pr-1",
        "promotion_name": "Winter",
        "creative_name": "b",
    }
    assert params[2]["creative_slot"] == "top"


# -- consent -------------------------------------------------------------------------------


def denied(event: Event) -> Event:
    event["context"]["consent"] = {"analytics": "denied", "ad_user_data": "granted"}
    return event


def test_denied_analytics_with_skip_sends_nothing_and_counts() -> None:
    events = [denied(gtag_event("en=a", "m-1")), denied(track("Clicked", "m-2"))]
    plan = build_plan(config(analytics_denied="skip"), events, NOW)
    assert plan.requests == []
    assert plan.drops == {"consent_denied": 2}


def test_denied_analytics_cookieless_resends_gtag_hits_unchanged() -> None:
    plan = build_plan(config(), [denied(gtag_event("en=a", "m-1"))], NOW)
    [planned] = plan.requests
    assert planned.request.url.endswith("&gcs=G111&_uip=203.0.113.0")
    assert planned.request.body == b"en=a"


def test_denied_analytics_cookieless_sends_a_one_off_client_id_and_nothing_personal() -> None:
    events = [
        denied(
            track(
                "Clicked",
                f"m-{i}",
                userId="user-42",
                traits={"email": "jane@example.com", "plan": "pro"},
            )
        )
        for i in range(2)
    ]
    for event in events:
        event["context"]["clientIds"] = SEGMENT_CONTEXT["clientIds"]
    plan = build_plan(config(send_user_data=True), events, NOW)
    assert len(plan.requests) == 2  # one client id each: nothing links them
    for i, message_id in enumerate(("m-0", "m-1")):
        sent = body(plan, i)
        assert sent["client_id"] == derived_client_id("cookieless:" + message_id)
        assert sent["consent"] == {"ad_user_data": "DENIED", "ad_personalization": "DENIED"}
        assert not {"user_id", "user_properties", "user_data"} & sent.keys()
        assert sent["events"][0]["params"]["session_id"] == "1795910400"


# -- user data -----------------------------------------------------------------------------

TRAITS: dict[str, Any] = {
    "email": "  John.Doe@GMail.com ",
    "phone": "+1 (650) 555-1212",
    "firstName": "Jöhn2!",
    "lastName": "O'Neil",
    "address": {
        "street": "1600 Amphitheatre Pkwy.",
        "city": "Mountain View 1",
        "state": "CA",
        "postalCode": " 94043 ",
        "country": "us",
    },
}


def test_user_data_is_normalized_and_hashed_by_googles_rules() -> None:
    event = track(
        "Signed Up",
        userId="user-42",
        traits=TRAITS,
        context={"consent": {"analytics": "granted", "ad_user_data": "granted"}},
    )
    plan = build_plan(config(send_user_data=True), [event], NOW)
    assert body(plan)["user_data"] == {
        "sha256_email_address": [sha("johndoe@gmail.com")],
        "sha256_phone_number": [sha("+16505551212")],
        "address": [
            {
                "sha256_first_name": sha("jöhn"),
                "sha256_last_name": sha("oneil"),
                "sha256_street": sha("1600 amphitheatre pkwy"),
                "city": "mountain view",
                "region": "ca",
                "postal_code": "94043",
                "country": "US",
            }
        ],
    }


def test_user_data_needs_the_option_and_granted_ad_user_data() -> None:
    granted = {"consent": {"analytics": "granted", "ad_user_data": "granted"}}
    refused = {"consent": {"analytics": "granted", "ad_user_data": "denied"}}
    off = build_plan(config(), [track("Signed Up", traits=TRAITS, context=granted)], NOW)
    assert "user_data" not in body(off)
    no = build_plan(
        config(send_user_data=True), [track("Signed Up", traits=TRAITS, context=refused)], NOW
    )
    assert "user_data" not in body(no)
    assert body(no)["consent"] == {"ad_user_data": "DENIED"}


def user_data_of(traits: dict[str, Any], **overrides: Any) -> Any:
    """The user_data GA4 is sent for a track event with ``traits``, and what was left out
    of it (the traits also count as pii_removed from the user properties: not shown)."""
    event = track("Signed Up", traits=traits, context={"consent": {"ad_user_data": "granted"}})
    plan = build_plan(config(send_user_data=True, **overrides), [event], NOW)
    drops = {k: n for k, n in plan.drops.items() if k != "pii_removed"}
    return body(plan).get("user_data"), drops


def test_user_data_phone_numbers_take_their_country_code() -> None:
    # Google's formatting rules (Data Manager "Format user data"): the US number
    # (800)555-0100 is +18005550100. It used to be hashed as +8005550100 (no country code);
    # without a default country it cannot be completed: left out and counted.
    sent, drops = user_data_of({"phone": "(800)555-0100", "email": "jane@example.com"})
    assert sent == {"sha256_email_address": [sha("jane@example.com")]}
    assert drops == {"invalid_phone": 1}
    sent, _ = user_data_of({"phone": "(800)555-0100"}, default_phone_country="US")
    assert sent == {"sha256_phone_number": [sha("+18005550100")]}
    # 00 is the international prefix, not part of the number (it used to be +0044...).
    sent, _ = user_data_of({"phone": "0044 20 7946 0958"}, default_phone_country="US")
    assert sent == {"sha256_phone_number": [sha("+442079460958")]}
    # A number with its country code needs no default.
    sent, _ = user_data_of({"phone": "+1 800 555 0100"})
    assert sent == {"sha256_phone_number": [sha("+18005550100")]}


def test_user_data_gmail_addresses_lose_dots_and_plus_suffix() -> None:
    # Google's example: cloudy.sanfrancisco+shopping@gmail.com -> cloudysanfrancisco@gmail.com
    # (the +suffix used to be kept); other domains keep both (user.name+nyc@example.com).
    sent, _ = user_data_of({"email": "cloudy.sanfrancisco+shopping@gmail.com"})
    assert sent == {"sha256_email_address": [sha("cloudysanfrancisco@gmail.com")]}
    sent, _ = user_data_of({"email": "user.name+NYC@Example.com"})
    assert sent == {"sha256_email_address": [sha("user.name+nyc@example.com")]}
    sent, _ = user_data_of({"email": "j.o.h.n@googlemail.com"})
    assert sent == {"sha256_email_address": [sha("john@googlemail.com")]}


def test_user_data_already_hashed_and_invalid_values() -> None:
    already = sha("jane@example.com")
    sent, drops = user_data_of({"email": already.upper(), "phone": "n/a"})
    assert sent == {"sha256_email_address": [already]}
    assert drops == {"invalid_phone": 1}
    sent, drops = user_data_of({"email": "not an email"})
    assert sent is None and drops == {"invalid_email": 1}


def test_user_data_takes_email_and_phone_properties_but_params_do_not() -> None:
    event = track(
        "Lead Generated",
        properties={"email": "Jane@Example.com", "phone": "+44 20 7946 0958", "plan": "pro"},
        context={"consent": {"ad_user_data": "granted"}},
    )
    sent = body(build_plan(config(send_user_data=True), [event], NOW))
    assert sent["user_data"] == {
        "sha256_email_address": [sha("jane@example.com")],
        "sha256_phone_number": [sha("+442079460958")],
    }
    params = sent["events"][0]["params"]
    assert params["plan"] == "pro" and not {"email", "phone"} & params.keys()


def test_default_phone_country_must_be_a_country_code() -> None:
    assert config(default_phone_country="GB").default_phone_country == "GB"
    for bad in ("us", "USA", "ZZ"):
        with pytest.raises(ValidationError):
            config(default_phone_country=bad)


def test_client_hints_leave_out_what_a_header_cannot_carry() -> None:
    assert client_hints({"brands": [{"brand": "Bräve", "version": "1"}], "mobile": True}) == {
        "Sec-CH-UA-Mobile": "?1"
    }
    assert client_hints("not a dict") == {}


# -- validation mode -----------------------------------------------------------------------


def test_validate_only_uses_the_debug_endpoint_and_skips_gtag_hits() -> None:
    plan = build_plan(
        config(validate_only=True), [track("Clicked"), gtag_event("en=a", "m-2")], NOW
    )
    [planned] = plan.requests
    assert planned.request.url == MP.replace("/mp/collect", "/debug/mp/collect")
    assert planned.validation
    assert plan.drops == {"validate_mode": 1}


# -- config --------------------------------------------------------------------------------


def test_every_option_has_a_description_and_an_example() -> None:
    assert [
        name
        for name, field in GA4Config.model_fields.items()
        if not (field.description or "").strip() or not field.examples
    ] == []


def test_defaults() -> None:
    cfg = config()
    assert cfg.mp_url == "https://region1.google-analytics.com/mp/collect"
    assert cfg.collect_url == "https://region1.google-analytics.com/g/collect"
    assert (cfg.analytics_denied, cfg.send_user_data, cfg.validate_only) == (
        "cookieless",
        False,
        False,
    )
    assert SECRET not in repr(cfg)


def test_drop_reasons_are_bounded() -> None:
    events = [track("Session Start"), {"type": "identify", "messageId": "m-9"}]
    assert set(build_plan(config(), events, NOW).drops) <= DROP_REASONS


# -- delivery against a fake Google --------------------------------------------------------


@pytest.fixture
async def google() -> AsyncIterator[Recorder]:
    async with recording_server(
        "Google", ["/g/collect", "/mp/collect", "/debug/mp/collect"]
    ) as rec:
        yield rec


def forwarder(google: Recorder, context: ForwarderContext, **overrides: Any) -> GA4Forwarder:
    cfg = config(
        mp_url=google.url + "mp/collect", collect_url=google.url + "g/collect", **overrides
    )
    return GA4Forwarder(cfg, context)


def recent(event: Event) -> Event:
    event["timestamp"] = datetime.now(UTC).isoformat()
    return event


async def test_both_paths_are_delivered(google: Recorder, context: ForwarderContext) -> None:
    google.script = [(204, {}, b""), (204, {}, b"")]
    fwd = forwarder(google, context)
    events = [
        recent(gtag_event("en=page_view", "m-1")),
        recent(gtag_event("en=scroll", "m-2")),
        recent(track("Order Completed", "m-3", properties={"total": 10, "currency": "EUR"})),
    ]
    outcome = await fwd.deliver(events)
    assert outcome == Delivered()
    gtag, mp = sorted(google.requests, key=lambda r: r["path"])
    assert gtag["path"] == "/g/collect"
    assert gtag["query"]["tid"] == MID
    assert gtag["query"]["dl"] == "https://www.shop.test/cart"
    assert gtag["query"]["_uip"] == "203.0.113.0"
    assert gtag["headers"]["User-Agent"] == UA
    assert gtag["headers"]["Content-Type"] == "text/plain;charset=UTF-8"
    assert gtag["body"] == b"en=page_view\nen=scroll"
    assert mp["path"] == "/mp/collect"
    assert mp["query"] == {"measurement_id": MID, "api_secret": SECRET}
    sent = orjson.loads(mp["body"])
    assert sent["events"][0]["name"] == "purchase"
    assert sent["events"][0]["params"]["value"] == 10
    assert fwd.drops == {}


async def test_drops_are_recorded_once_the_batch_is_done(
    google: Recorder, context: ForwarderContext
) -> None:
    fwd = forwarder(google, context)
    old = track("Clicked", timestamp="2020-01-01T00:00:00.000Z")
    outcome = await fwd.deliver([old, {"type": "identify", "messageId": "m-2"}])
    assert outcome == Delivered(dropped={"too_old": 1, "unsupported_type": 1})
    assert fwd.drops == {"too_old": 1, "unsupported_type": 1}
    fwd.dropped("value_truncated", 2)
    assert fwd.drops["value_truncated"] == 2


async def test_a_5xx_is_retried_without_resending_what_google_already_took(
    google: Recorder, context: ForwarderContext
) -> None:
    fwd = forwarder(google, context, max_concurrent_requests=1)
    events = [recent(track("Clicked", "m-1", "anon-a")), recent(track("Clicked", "m-2", "anon-b"))]
    google.script = [(204, {}, b""), (503, {"Retry-After": "7"}, b"busy")]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs) == ("status_5xx", 7.0)
    assert len(google.requests) == 2
    google.script = [(204, {}, b"")]
    assert await fwd.deliver(events) == Delivered()
    # the retry sent only the request that had failed
    assert len(google.requests) == 3
    assert google.requests[2]["body"] == google.requests[1]["body"]


async def test_a_batch_of_many_visitors_keeps_32_requests_in_flight_by_default(
    context: ForwarderContext,
) -> None:
    """The Measurement Protocol takes one visitor per request: a batch of 40 visitors is 40
    requests, and the rate is the requests in flight per round trip. Google's fake holds
    each request until 32 are in flight (or every one has arrived)."""
    in_flight, most, arrived = 0, 0, 0
    full = asyncio.Event()

    async def collect(request: web.Request) -> web.Response:
        nonlocal in_flight, most, arrived
        await request.read()
        in_flight += 1
        arrived += 1
        most = max(most, in_flight)
        if in_flight == 32 or arrived == 40:
            full.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(full.wait(), 1.0)
        in_flight -= 1
        return web.Response(status=204)

    async with fake_server("Google", {"/mp/collect": collect}) as server:
        cfg = config(mp_url=str(server.make_url("/mp/collect")))
        events = [recent(track("Clicked", f"m-{i}", f"anon-{i}")) for i in range(40)]
        assert await GA4Forwarder(cfg, context).deliver(events) == Delivered()
    assert (arrived, most) == (40, 32)


async def test_a_request_refused_for_good_dead_letters_its_own_events(
    google: Recorder, context: ForwarderContext
) -> None:
    fwd = forwarder(google, context, max_concurrent_requests=1)
    events = [recent(track("Clicked", "m-1", "anon-a")), recent(track("Clicked", "m-2", "anon-b"))]
    google.script = [(204, {}, b""), (400, {}, b"bad")]
    outcome = await fwd.deliver(events)
    assert outcome == Delivered(rejected={1: "status_4xx: HTTP 400: bad"})
    google.script = [(400, {}, b"bad")]
    outcome = await fwd.deliver([recent(track("Clicked", "m-3", "anon-c"))])
    assert outcome == Dead(reason="status_4xx", detail="HTTP 400: bad")


async def test_network_errors_are_retried_and_never_show_the_secret(
    context: ForwarderContext,
) -> None:
    cfg = config(mp_url="http://127.0.0.1:9/mp/collect")
    outcome = await GA4Forwarder(cfg, context).deliver([recent(track("Clicked"))])
    assert isinstance(outcome, Retry)
    assert outcome.reason == "connection_error"
    assert SECRET not in outcome.detail


async def test_validation_without_messages_is_delivered(
    google: Recorder, context: ForwarderContext
) -> None:
    google.script = [(200, {}, b'{"validationMessages":[]}')]
    fwd = forwarder(google, context, validate_only=True)
    outcome = await fwd.deliver([recent(track("Clicked")), recent(gtag_event("en=a", "m-2"))])
    assert outcome == Delivered(dropped={"validate_mode": 1})
    [request] = google.requests
    assert request["path"] == "/debug/mp/collect"
    assert fwd.drops == {"validate_mode": 1}


async def test_validation_messages_dead_letter_the_batch(
    google: Recorder, context: ForwarderContext
) -> None:
    messages = [
        {
            "fieldPath": "events",
            "description": "Event at index: [0] has invalid name [_badEventName]. Names "
            "must start with an alphabetic character.",
            "validationCode": "NAME_INVALID",
        }
    ]
    google.script = [(200, {}, orjson.dumps({"validationMessages": messages * 40}))]
    fwd = forwarder(google, context, validate_only=True)
    outcome = await fwd.deliver([recent(track("Clicked"))])
    assert isinstance(outcome, Dead)
    assert outcome.reason == "validation_failed"
    assert len(outcome.detail) == 2000
    assert outcome.detail.startswith(orjson.dumps(messages).decode()[:-1])
    assert fwd.drops == {}


async def test_an_unreadable_validation_answer_is_dead(
    google: Recorder, context: ForwarderContext
) -> None:
    google.script = [(200, {}, b"<html>")]
    outcome = await forwarder(google, context, validate_only=True).deliver(
        [recent(track("Clicked"))]
    )
    assert outcome == Dead(reason="invalid_response", detail="HTTP 200: <html>")


async def test_a_batch_of_dropped_events_sends_nothing(
    google: Recorder, context: ForwarderContext
) -> None:
    fwd = forwarder(google, context, analytics_denied="skip")
    outcome = await fwd.deliver([denied(recent(track("Clicked")))])
    assert outcome == Delivered(dropped={"consent_denied": 1})
    assert google.requests == []
    assert fwd.drops == {"consent_denied": 1}


def test_an_event_received_by_the_measurement_protocol_goes_out_as_it_came() -> None:
    long_url = "https://www.shop.test/?" + "q" * 200
    event: Event = {
        "type": "track",
        "event": "purchase",
        "messageId": "m-1",
        "anonymousId": "app-visitor-7f3a",
        "timestamp": "2026-11-29T11:59:00.000Z",
        "properties": {
            "session_id": "1764414000",
            "engagement_time_msec": 120,
            "page_location": long_url,
            "transaction_id": "o-1",
            "value": 12.5,
            "currency": "EUR",
            "items": [{"item_id": "p-1", "item_name": "Runner", "item_category2": "Men"}],
        },
        "context": {
            "consent": {"analytics": "granted", "ad_user_data": "granted"},
            "clientIds": {
                "ga4": {"clientId": "app-visitor-7f3a", "sessionIds": {MID: "1764414000"}}
            },
            "ga4": {
                "measurementId": MID,
                "mp": True,
                "userData": {"sha256_email_address": [sha("jane@example.com")]},
            },
        },
    }
    plan = build_plan(config(send_user_data=True), [event], NOW)
    sent = body(plan)
    assert sent["client_id"] == "app-visitor-7f3a"
    assert sent["user_data"] == {"sha256_email_address": [sha("jane@example.com")]}
    assert sent["events"][0]["params"] == {
        "session_id": "1764414000",
        "engagement_time_msec": 120,
        "value": 12.5,
        "currency": "EUR",
        "transaction_id": "o-1",
        "items": [{"item_id": "p-1", "item_name": "Runner", "item_category2": "Men"}],
        "page_location": long_url,
    }
    assert plan.drops == {}
