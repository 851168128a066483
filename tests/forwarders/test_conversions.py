"""The conversions layer (``forwarders._conversions``) on its own, with a toy platform: event
names to standard events, the age window, consent for user data, chunking, drop counts and
the match-key counts (once per batch, never on a retried attempt)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
from pydantic import Field, ValidationError

import tagrelay.forwarders._conversions as conversions
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._conversions import (
    AD_EVENT_NAMES,
    CANONICAL_EVENT_NAMES,
    EVENT_DROP_REASONS,
    FIELD_DROP_REASONS,
    Conversion,
    ConversionsConfig,
    ConversionsForwarder,
    epoch_millis,
    epoch_seconds,
)
from tagrelay.forwarders._ecommerce import SEGMENT_EVENT_NAMES
from tagrelay.forwarders._http import HttpRequest
from tagrelay.forwarders._user_data import sha256_hex
from tagrelay.metrics import Metrics
from tagrelay.model import Delivered, Event, Retry
from tagrelay.sources.ga4 import parse_collect, parse_measurement_protocol
from tests.support import Recorder, recording_server

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (X11; Linux x86_64) Chrome/124.0"


class ToyConfig(ConversionsConfig):
    """A toy ad platform."""

    type: Literal["toy"] = Field("toy", description="Forwarder type.", examples=["toy"])
    base_url: str = Field("https://toy.test", description="API host.", examples=["https://x"])
    api_version: str = Field("v1", description="API version.", examples=["v1"])


class Toy(ConversionsForwarder[ToyConfig]):
    """Snap's user-data rules and standard events, two events per request, a 7-day window:
    ``POST {base_url}/{api_version}/events`` with one line per conversion."""

    config_model = ToyConfig
    platform = "snapchat"
    standard_events = "snap"
    max_events_per_request = 2
    max_event_age_secs = 7 * 86_400.0

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        body = {
            "events": [
                {
                    "name": c.name,
                    "standard": c.standard,
                    "id": c.event_id,
                    "t": epoch_seconds(c.time),
                    "user": dict(c.prepared.values),
                    "keys": sorted(c.match_keys),
                    "value": c.commerce.value,
                    "currency": c.commerce.currency,
                    "url": c.page_url,
                }
                for c in conversions
            ]
        }
        url = f"{self.config.base_url}/{self.config.api_version}/events"
        return HttpRequest("POST", url, {"Content-Type": "application/json"}, orjson.dumps(body))


def toy(context: ForwarderContext | None = None, **overrides: Any) -> Toy:
    config = ToyConfig.model_validate({"id": "toy", **overrides})
    http: Any = None
    return Toy(config, context or ForwarderContext(Path("."), http, Metrics()))


def track(name: str, message_id: str = "m-1", **fields: Any) -> Event:
    event: Event = {
        "type": "track",
        "event": name,
        "messageId": message_id,
        "timestamp": (NOW - timedelta(minutes=5)).isoformat(),
        "context": {"consent": dict(GRANTED)},
    }
    event.update(fields)
    return event


def sent(fwd: Toy, events: list[Event]) -> list[dict[str, Any]]:
    plan = fwd.plan(events, NOW)
    return [e for p in plan.requests for e in orjson.loads(p.request.body)["events"]]


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Order Completed", "PURCHASE"),
        ("order  completed", "PURCHASE"),
        ("purchase", "PURCHASE"),  # GA4's name, from /g/collect or /mp/collect
        ("add_to_cart", "ADD_CART"),
        ("Product Added", "ADD_CART"),
        ("Product Viewed", "VIEW_CONTENT"),
        ("Checkout Started", "START_CHECKOUT"),
        ("Payment Info Entered", "ADD_BILLING"),
        ("Products Searched", "SEARCH"),
        ("Signed Up", "SIGN_UP"),
        ("Subscription Started", "SUBSCRIBE"),
        ("Trial Started", "START_TRIAL"),
        ("SIGN_UP", "SIGN_UP"),  # already the platform's own standard event
        ("ADD_BILLING", "ADD_BILLING"),
    ],
)
def test_names_map_to_the_platforms_standard_events(name: str, expected: str) -> None:
    [event] = sent(toy(), [track(name)])
    assert (event["name"], event["standard"]) == (expected, True)


def test_page_views_from_every_source_are_page_views() -> None:
    segment_page: Event = {**track("x"), "type": "page", "name": "Home"}
    del segment_page["event"]
    ga4_page: Event = {**track("page_view"), "type": "page"}  # how sources/ga4 stores them
    screen: Event = {**track("x"), "type": "screen"}
    assert [e["name"] for e in sent(toy(), [segment_page, ga4_page, screen])] == ["PAGE_VIEW"] * 3


def test_configured_names_add_and_override() -> None:
    fwd = toy(events={"Demo Booked": "CUSTOM_EVENT_1", "order completed": "CUSTOM_EVENT_2"})
    events = [track("Demo Booked"), track("Order Completed", "m-2")]
    assert [e["name"] for e in sent(fwd, events)] == ["CUSTOM_EVENT_1", "CUSTOM_EVENT_2"]


def test_unmapped_events_are_custom_or_skipped() -> None:
    [event] = sent(toy(), [track(" Video Played ")])
    assert (event["name"], event["standard"]) == ("Video Played", False)
    # A platform's own name counts only when spelled exactly.
    [event] = sent(toy(), [track("add_billing")])
    assert (event["name"], event["standard"]) == ("add_billing", False)
    plan = toy(unmapped="skip").plan([track("Video Played")], NOW)
    assert (plan.requests, dict(plan.drops)) == ([], {"unmapped_event": 1})


def test_identify_group_alias_are_not_conversions() -> None:
    events: list[Event] = [
        {"type": t, "messageId": f"m-{t}", "context": {"consent": GRANTED}}
        for t in ("identify", "group", "alias")
    ]
    events.append({"type": "track", "messageId": "m-x", "context": {}})
    plan = toy().plan(events, NOW)
    assert plan.requests == []
    assert dict(plan.drops) == {"not_a_conversion": 3, "no_event_name": 1}


def test_the_ad_table_leaves_ga4s_table_alone() -> None:
    assert not set(AD_EVENT_NAMES) & set(SEGMENT_EVENT_NAMES)
    assert CANONICAL_EVENT_NAMES["form submitted"] == "generate_lead"
    assert CANONICAL_EVENT_NAMES["lead generated"] == "generate_lead"
    assert CANONICAL_EVENT_NAMES["add_to_cart"] == "add_to_cart"


# -- time, ids, consent --------------------------------------------------------------------


def test_event_id_is_the_message_id_and_time_is_never_in_the_future() -> None:
    future = track("Order Completed", "m-future", timestamp=(NOW + timedelta(hours=2)).isoformat())
    [event] = sent(toy(), [future])
    assert event["id"] == "m-future"
    assert event["t"] == epoch_seconds(NOW)
    assert epoch_millis(NOW) == epoch_seconds(NOW) * 1000


def test_a_future_time_is_cut_to_the_arrival_so_a_retry_is_the_same_request() -> None:
    """A fast client clock is cut to when the relay received the event, not to the time of
    the attempt: a retried batch is then the same bytes, and a request the destination took
    is not sent again."""
    received = NOW - timedelta(minutes=1)
    future = track(
        "Order Completed",
        "m-future",
        timestamp=(NOW + timedelta(hours=2)).isoformat(),
        receivedAt=received.isoformat(),
    )
    fwd = toy()
    first = fwd.plan([future], NOW).requests[0].request.body
    again = fwd.plan([future], NOW + timedelta(minutes=3)).requests[0].request.body
    assert first == again
    assert orjson.loads(first)["events"][0]["t"] == epoch_seconds(received)


def test_events_older_than_the_window_are_dropped_and_counted() -> None:
    old = track("Order Completed", "m-old", timestamp=(NOW - timedelta(days=7)).isoformat())
    fresh = track("Order Completed", "m-new")
    plan = toy().plan([old, fresh], NOW)
    assert dict(plan.drops) == {"too_old": 1}
    assert [p.indices for p in plan.requests] == [(1,)]


def person(consent: dict[str, str]) -> Event:
    return track(
        "Order Completed",
        userId="user-42",
        properties={"total": "19.90", "currency": "eur", "email": "Jane@Example.com"},
        context={
            "consent": consent,
            "ip": "203.0.113.7",
            "userAgent": UA,
            "traits": {"phone": "+44 844 412 4653", "firstName": "Jane"},
            "clickIds": {"ScCid": "abc-123"},
            "page": {"url": "https://www.shop.test/checkout?x=1"},
        },
    )


def test_user_data_is_hashed_for_the_platform_when_ad_user_data_is_granted() -> None:
    [event] = sent(toy(), [person(GRANTED)])
    assert event["user"]["email"] == sha256_hex("jane@example.com")
    assert event["user"]["phone"] == sha256_hex("448444124653")
    assert event["keys"] == [
        "click_id", "email", "external_id", "ip", "name", "phone", "user_agent"
    ]  # fmt: skip
    assert (event["value"], event["currency"]) == (19.9, "EUR")
    assert event["url"] == "https://www.shop.test/checkout?x=1"


def test_without_ad_user_data_only_the_ad_interaction_goes() -> None:
    denied = {**GRANTED, "ad_user_data": "denied"}
    [event] = sent(toy(), [person(denied)])
    assert event["user"] == {}
    assert event["keys"] == ["click_id", "user_agent"]
    plan = toy(ad_user_data_denied="skip").plan([person(denied), person({})], NOW)
    assert (plan.requests, dict(plan.drops)) == ([], {"ad_user_data_denied": 2})


def test_without_ad_user_data_the_pixels_browser_id_cookies_stay() -> None:
    """Like click ids, the cookies an ad pixel set (Snap's ``_scid`` here) describe the ad
    interaction, not the person: they go without ``ad_user_data`` too."""
    event = person({**GRANTED, "ad_user_data": "denied"})
    event["context"]["clientIds"] = {"_scid": "scid-1"}
    [sent_event] = sent(toy(), [event])
    assert sent_event["keys"] == ["browser_id", "click_id", "user_agent"]


def test_without_ad_user_data_every_browser_id_stays_and_no_personal_data() -> None:
    event = person({**GRANTED, "ad_user_data": "denied"})
    event["context"]["traits"].update(
        {"lastName": "Doe", "address": {"city": "Paris", "postalCode": "75001"}}
    )
    event["context"]["clientIds"] = {
        "fbc": "fb.1.2.c",
        "fbp": "fb.1.2.p",
        "_ttp": "t",
        "_rdt_uuid": "1677712978045.b8f7eb7d",
        "_uetvid": "b171a9b06ce011ecafcd1b209be8601b",
    }
    conversion = toy().convert(0, event, NOW, Counter())
    assert conversion is not None
    assert conversion.user.present() == (
        "user_agent", "click_ids", "fbc", "fbp", "ttp", "browser_ids"
    )  # fmt: skip
    assert conversion.user.browser_ids == {
        "_ttp": "t",
        "_rdt_uuid": "1677712978045.b8f7eb7d",
        "_uetvid": "b171a9b06ce011ecafcd1b209be8601b",
    }
    assert conversion.prepared.values == {}


def test_a_platform_adds_its_own_drop_reasons() -> None:
    class Picky(Toy):
        platform_event_drop_reasons = frozenset({"no_toy_id"})
        platform_field_drop_reasons = frozenset({"invalid_toy_click_id"})

    assert Picky.event_drop_reasons == EVENT_DROP_REASONS | {"no_toy_id"}
    assert Picky.field_drop_reasons == FIELD_DROP_REASONS | {"invalid_toy_click_id"}
    assert Toy.field_drop_reasons == FIELD_DROP_REASONS


def test_only_the_keys_a_payload_carries_are_match_keys() -> None:
    class NoBrowserFacts(Toy):
        payload_match_keys = frozenset({"email", "phone", "click_id"})

    fwd = NoBrowserFacts(ToyConfig.model_validate({"id": "toy"}), toy().context)
    [event] = sent(fwd, [person(GRANTED)])
    assert event["keys"] == ["click_id", "email", "phone"]


def test_values_that_do_not_normalize_are_left_out_and_counted() -> None:
    event = track(
        "Order Completed",
        properties={"email": "not-an-email", "value": "lots", "currency": "euros"},
    )
    plan = toy().plan([event], NOW)
    assert dict(plan.drops) == {"invalid_email": 1, "invalid_value": 1, "invalid_currency": 1}
    assert set(plan.drops) <= FIELD_DROP_REASONS


def test_conversions_are_chunked_in_batch_order() -> None:
    events = [track("Order Completed", f"m-{i}") for i in range(5)]
    events.insert(2, {"type": "identify", "messageId": "m-id"})
    plan = toy().plan(events, NOW)
    assert [p.indices for p in plan.requests] == [(0, 1), (3, 4), (5,)]


# -- config --------------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    config = ToyConfig.model_validate({"id": "toy"})
    assert config.requires_consent == ["ads"]
    assert (config.unmapped, config.ad_user_data_denied) == ("custom", "send_without")
    with pytest.raises(ValidationError, match="ISO 3166"):
        ToyConfig.model_validate({"id": "toy", "default_phone_country": "XX"})
    with pytest.raises(ValidationError):
        ToyConfig.model_validate({"id": "toy", "base_url": "https://toy.test/"})
    with pytest.raises(ValidationError, match="blank"):
        ToyConfig.model_validate({"id": "toy", "events": {"Demo Booked": " "}})


def test_every_layer_option_documents_itself() -> None:
    for name, info in ConversionsConfig.model_fields.items():
        assert info.description and info.examples, name


# -- delivery: drops and match keys counted once per batch ---------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[Recorder]:
    async with recording_server("toy platform", ["/v1/events"]) as rec:
        yield rec


def match_count(context: ForwarderContext, key: str) -> float:
    labels = {"forwarder": "toy", "key": key}
    value = context.metrics.registry.get_sample_value("tagrelay_forwarder_match_keys_total", labels)
    return value or 0.0


async def test_match_keys_are_counted_once_the_batch_is_done(
    fake: Recorder, context: ForwarderContext
) -> None:
    fwd = toy(context, base_url=fake.url.rstrip("/"))
    bare = track("Order Completed", "m-bare")
    events = [person(GRANTED), bare, {"type": "identify", "messageId": "m-id"}]
    fake.script = [(503, {}, b"busy")]
    assert isinstance(await fwd.deliver(events), Retry)
    assert match_count(context, "email") == 0  # an attempt that will be retried counts nothing
    assert await fwd.deliver(events) == Delivered(dropped={"not_a_conversion": 1})
    for key in ("email", "phone", "name", "external_id", "ip", "user_agent", "click_id"):
        assert match_count(context, key) == 1, key
    assert match_count(context, "address") == 0
    assert match_count(context, "none") == 1  # the bare event
    assert fwd.drops == {"not_a_conversion": 1}
    assert set(fwd.drops) <= EVENT_DROP_REASONS


async def test_a_dead_batch_counts_no_match_keys(fake: Recorder, context: ForwarderContext) -> None:
    fwd = toy(context, base_url=fake.url.rstrip("/"))
    fake.script = [(400, {}, b"bad")]
    outcome = await fwd.deliver([person(GRANTED)])
    assert not isinstance(outcome, Delivered | Retry)
    assert match_count(context, "email") == 0


# -- GA4 events as the GA4 sources store them ----------------------------------------------


def test_gtag_and_measurement_protocol_events_map_with_their_commerce() -> None:
    gtag = parse_collect(
        "v=2&tid=G-TEST1234&cid=1.2&en=purchase&cu=eur&epn.value=30&ep.transaction_id=T-1"
        "&pr1=idSKU_1~nmTee~pr10~qt3&dl=https%3A%2F%2Fwww.shop.test%2Fdone"
    ).events
    gtag_page = parse_collect("v=2&tid=G-TEST1234&cid=1.2&en=page_view").events
    mp = parse_measurement_protocol(
        {
            "client_id": "1.2",
            "events": [
                {
                    "name": "add_to_cart",
                    "params": {
                        "currency": "USD",
                        "value": 5,
                        "items": [{"item_id": "SKU_2", "price": 5, "quantity": 1}],
                    },
                }
            ],
        },
        "G-TEST1234",
    ).events
    events = [*gtag, *gtag_page, *mp]
    for event in events:
        event["context"]["consent"] = dict(GRANTED)
    plan = toy().plan(events, NOW)
    assert dict(plan.drops) == {}
    sent_events = [e for p in plan.requests for e in orjson.loads(p.request.body)["events"]]
    assert [(e["name"], e["value"], e["currency"]) for e in sent_events] == [
        ("PURCHASE", 30, "EUR"),
        ("PAGE_VIEW", None, None),
        ("ADD_CART", 5, "USD"),
    ]
    assert sent_events[0]["url"] == "https://www.shop.test/done"
    conversion = toy().convert(0, gtag[0], NOW, Counter())
    assert conversion is not None
    assert conversion.commerce.order_id == "T-1"
    assert [(i.id, i.price, i.quantity) for i in conversion.commerce.items] == [("SKU_1", 10, 3)]


def test_the_module_exports_its_public_names() -> None:
    for name in conversions.__all__:
        assert getattr(conversions, name) is not None
