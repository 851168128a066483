"""The meta forwarder (Conversions API): the exact requests a fake Meta receives (golden files
under ``golden/meta_capi/``, one per behaviour), Meta's error codes classified, the
match-key counts, and end to end through the relay: a Segment ``Order Completed`` reaches
the fake Meta with ``event_id`` = its ``messageId``; an event denying ``ads`` does not.

Regenerate the golden files after an intended change with ``TAGRELAY_UPDATE_GOLDEN=1``
(and read the diff)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from tagrelay.config.models import Config
from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._http import HttpResponse, send
from tagrelay.forwarders._user_data import sha256_hex
from tagrelay.forwarders.meta_capi import MetaConfig, MetaForwarder, classify_meta_response
from tagrelay.metrics import Metrics
from tagrelay.model import Dead, Delivered, Event, Retry
from tests.support import SERVER_KEY, Recorder, basic, metric_value, recording_server, wait_idle

GOLDEN = Path(__file__).parent / "golden" / "meta_capi"
UPDATE = os.environ.get("TAGRELAY_UPDATE_GOLDEN") == "1"

PIXEL = "123456789012345"
TOKEN = "EAAB-test/token+with=odd&chars"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WHEN = (NOW - timedelta(minutes=10)).isoformat()
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari"
PATH = f"/v25.0/{PIXEL}/events"


def config(**overrides: Any) -> MetaConfig:
    raw = {"id": "meta", "type": "meta", "pixel_id": PIXEL, "access_token": TOKEN}
    return MetaConfig.model_validate({**raw, **overrides})


def browser_context(**extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "consent": dict(GRANTED),
        "ip": "203.0.113.7",
        "userAgent": UA,
        "page": {
            "url": "https://www.shop.test/checkout/done?fbclid=IwAR2F4-dbP0l7Mn1",
            "referrer": "https://www.shop.test/cart",
        },
        "clientIds": {"fbp": "fb.1.1733400000000.1234567890"},
    }
    context.update(extra)
    return context


def purchase(message_id: str = "msg-purchase-1", **context: Any) -> Event:
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": message_id,
        "userId": "User-42",
        "timestamp": WHEN,
        "properties": {
            "order_id": "order-1001",
            "total": 65.5,
            "currency": "eur",
            "products": [
                {"product_id": "sku-1", "price": 20, "quantity": 2, "name": "Mug"},
                {"sku": "sku-2", "price": 25.5, "quantity": 1},
            ],
        },
        "context": browser_context(
            traits={
                "email": " Jane.Doe@Example.com ",
                "phone": "(650) 555-1212",
                "firstName": "Valéry",
                "lastName": "O'Brien",
                "gender": "female",
                "birthday": "1990-02-16",
                "address": {
                    "city": "Menlo Park",
                    "state": "California",
                    "postalCode": "94025-1234",
                    "country": "US",
                },
            },
            **context,
        ),
    }


def page_view() -> Event:
    return {
        "type": "page",
        "name": "Home",
        "messageId": "msg-page-1",
        "anonymousId": "anon-1",
        "timestamp": WHEN,
        "properties": {"url": "https://www.shop.test/", "title": "Home"},
        "context": browser_context(page={"url": "https://www.shop.test/"}, clientIds={}),
    }


def custom_event() -> Event:
    return {
        "type": "track",
        "event": "Video Played",
        "messageId": "msg-video-1",
        "timestamp": WHEN,
        "properties": {"video_id": "v-9", "email": "viewer@example.com"},
        "context": browser_context(
            clientIds={"fbc": "fb.1.1733300000000.AbCdEf", "fbp": "fb.1.2.3"}
        ),
    }


def hashed_email_event() -> Event:
    event = purchase("msg-hashed-1")
    event["context"]["traits"] = {"email": sha256_hex("jane.doe@example.com").upper()}
    return event


def denied_event() -> Event:
    return purchase("msg-denied-1", consent={**GRANTED, "ad_user_data": "denied"})


CASES: dict[str, tuple[dict[str, Any], list[Event]]] = {
    "purchase_with_hashed_email": ({"default_phone_country": "US"}, [purchase()]),
    "page_view": ({}, [page_view()]),
    "custom_event": ({}, [custom_event()]),
    "ad_user_data_denied": ({}, [denied_event()]),
    "already_hashed_email": ({}, [hashed_email_event()]),
    "test_event_code": ({"test_event_code": "TEST12345"}, [page_view()]),
    "limited_data_use": (
        {"limited_data_use": True, "limited_data_use_country": 1, "limited_data_use_state": 1000},
        [page_view()],
    ),
}


@pytest.fixture
async def meta() -> AsyncIterator[Recorder]:
    async with recording_server("Meta", [PATH]) as rec:
        yield rec


def received(request: dict[str, Any]) -> dict[str, Any]:
    """What the fake Meta got, without what the HTTP client adds by itself."""
    return {
        "method": request["method"],
        "path": request["path"],
        "query": request["query"],
        "headers": {"Content-Type": request["headers"].get("Content-Type")},
        "body": orjson.loads(request["body"]),
    }


@pytest.mark.parametrize("case", sorted(CASES))
async def test_golden_requests(case: str, meta: Recorder, context: ForwarderContext) -> None:
    overrides, events = CASES[case]
    fwd = MetaForwarder(config(base_url=meta.url.rstrip("/"), **overrides), context)
    plan = fwd.plan(events, NOW)
    assert dict(plan.drops) == {}
    for planned in plan.requests:
        assert isinstance(await send(context.http, planned.request, 5.0), HttpResponse)
    [request] = [received(r) for r in meta.requests]
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(request, option=orjson.OPT_INDENT_2) + b"\n")
    assert request == orjson.loads(path.read_bytes())


def test_golden_files_pin_the_rules() -> None:
    """What the golden files show, said once more in words."""
    body = orjson.loads((GOLDEN / "purchase_with_hashed_email.json").read_bytes())
    assert body["query"] == {"access_token": TOKEN}
    [event] = body["body"]["data"]
    assert event["event_name"] == "Purchase"
    assert event["event_id"] == "msg-purchase-1"
    assert event["event_time"] == int((NOW - timedelta(minutes=10)).timestamp())
    assert event["action_source"] == "website"
    user = event["user_data"]
    assert user["em"] == [sha256_hex("jane.doe@example.com")]
    assert user["ph"] == [sha256_hex("16505551212")]
    assert user["fn"] == [sha256_hex("valéry")]
    assert user["ln"] == [sha256_hex("obrien")]
    assert user["ct"] == [sha256_hex("menlopark")]
    assert user["st"] == [sha256_hex("ca")]
    assert user["zp"] == [sha256_hex("94025")]
    assert user["country"] == [sha256_hex("us")]
    assert user["external_id"] == [sha256_hex("user-42")]
    assert user["fbc"] == f"fb.1.{event['event_time'] * 1000}.IwAR2F4-dbP0l7Mn1"
    assert event["custom_data"]["contents"][0] == {"id": "sku-1", "quantity": 2, "item_price": 20}
    denied = orjson.loads((GOLDEN / "ad_user_data_denied.json").read_bytes())
    [event] = denied["body"]["data"]
    assert set(event["user_data"]) == {"client_user_agent", "fbc", "fbp"}
    hashed = orjson.loads((GOLDEN / "already_hashed_email.json").read_bytes())
    assert hashed["body"]["data"][0]["user_data"]["em"] == [sha256_hex("jane.doe@example.com")]


def test_purchase_without_value_and_events_without_user_data_are_dropped() -> None:
    fwd = MetaForwarder(config(), ForwarderContext(Path("."), None, Metrics()))  # type: ignore[arg-type]
    no_value = purchase("m-1")
    no_value["properties"] = {"order_id": "o-1"}
    backend: Event = {
        "type": "track",
        "event": "Signed Up",
        "messageId": "m-2",
        "timestamp": WHEN,
        "context": {"consent": {**GRANTED, "ad_user_data": "denied"}},
    }
    old = purchase("m-3")
    old["timestamp"] = (NOW - timedelta(days=8)).isoformat()
    identify: Event = {"type": "identify", "messageId": "m-4", "traits": {"email": "a@b.co"}}
    plan = fwd.plan([no_value, backend, old, identify], NOW)
    assert plan.requests == []
    assert dict(plan.drops) == {
        "purchase_without_value": 1,
        "no_user_data": 1,
        "too_old": 1,
        "not_a_conversion": 1,
    }


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"traits": {"email": "jane@example.com"}},
        {"traits": {"city": "Menlo Park"}},
        {"traits": {"email": "not an email"}},
        {"ip": "203.0.113.7"},
        {"userAgent": UA},
        {"clientIds": {"fbc": "fb.1.1733400000000.AbCd"}},
        {"clientIds": {"fbp": "fb.1.1733400000000.1234567890"}},
        {"page": {"url": "https://www.shop.test/?fbclid=IwAR2F4"}},
        {"clickIds": {"gclid": "Cj0KCQ"}},  # not Meta's
    ],
)
def test_an_event_is_sent_exactly_when_its_user_data_is_not_empty(
    context: dict[str, Any],
) -> None:
    """Meta requires user data: an event is dropped (no_user_data) exactly when the
    user_data it would carry is empty."""
    fwd = MetaForwarder(config(), ForwarderContext(Path("."), None, Metrics()))  # type: ignore[arg-type]
    event: Event = {
        "type": "track",
        "event": "Signed Up",
        "messageId": "m-1",
        "timestamp": WHEN,
        "context": {"consent": dict(GRANTED), **context},
    }
    plan = fwd.plan([event], NOW)
    if plan.requests:
        body = orjson.loads(plan.requests[0].request.body)
        assert body["data"][0]["user_data"] != {}
    else:
        assert plan.drops["no_user_data"] == 1
        assert context in (
            {},
            {"traits": {"email": "not an email"}},
            {"clickIds": {"gclid": "Cj0KCQ"}},
        )


def test_a_backend_event_is_not_a_website_event() -> None:
    fwd = MetaForwarder(config(), ForwarderContext(Path("."), None, Metrics()))  # type: ignore[arg-type]
    event: Event = {
        "type": "track",
        "event": "Signed Up",
        "messageId": "m-1",
        "userId": "u-1",
        "timestamp": WHEN,
        "context": {"consent": GRANTED},
    }
    [planned] = fwd.plan([event], NOW).requests
    [sent] = orjson.loads(planned.request.body)["data"]
    assert (sent["event_name"], sent["action_source"]) == (
        "CompleteRegistration",
        "system_generated",
    )


def test_at_most_1000_events_per_request() -> None:
    fwd = MetaForwarder(config(), ForwarderContext(Path("."), None, Metrics()))  # type: ignore[arg-type]
    events = [{**page_view(), "messageId": f"m-{i}"} for i in range(2001)]
    plan = fwd.plan(events, NOW)
    assert [len(p.indices) for p in plan.requests] == [1000, 1000, 1]


# -- Meta's errors -------------------------------------------------------------------------


def graph_error(code: int, subcode: int | None = None, **fields: Any) -> bytes:
    error: dict[str, Any] = {"message": "msg", "type": "OAuthException", "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error.update(fields)
    error["fbtrace_id"] = "AbC123"
    return orjson.dumps({"error": error})


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (200, b'{"events_received":1,"messages":[],"fbtrace_id":"x"}', Delivered, None),
        (500, graph_error(1), Retry, "meta_transient"),
        (500, graph_error(2), Retry, "meta_transient"),
        (400, graph_error(341), Retry, "meta_transient"),
        (400, graph_error(368), Retry, "meta_transient"),
        (400, graph_error(5000), Retry, "meta_transient"),
        (400, graph_error(21009), Retry, "meta_transient"),
        (400, graph_error(4), Retry, "meta_throttled"),
        (400, graph_error(17), Retry, "meta_throttled"),
        (400, graph_error(80003), Retry, "meta_throttled"),
        (400, graph_error(100, 2804003), Dead, "meta_invalid_parameter"),
        (400, graph_error(100, 2804009), Dead, "meta_invalid_parameter"),
        (400, graph_error(100, 33), Dead, "meta_invalid_parameter"),
        (401, graph_error(190, 463), Dead, "meta_invalid_token"),
        (403, graph_error(200), Dead, "meta_permission"),
        (400, graph_error(9999, is_transient=True), Retry, "meta_transient"),
        (400, graph_error(9999), Dead, "meta_error"),
        (503, graph_error(9999), Retry, "status_5xx"),
        (502, b"<html>bad gateway</html>", Retry, "status_5xx"),
        (429, b"", Retry, "status_429"),
        (400, b"not json", Dead, "status_4xx"),
    ],
)
def test_error_classification(status: int, body: bytes, kind: type, reason: str | None) -> None:
    outcome = classify_meta_response(HttpResponse(status, {}, body))
    assert isinstance(outcome, kind)
    if reason is not None:
        assert outcome.reason == reason  # type: ignore[union-attr]


def test_a_dead_letter_carries_metas_words() -> None:
    body = graph_error(
        100, 2804003, message="Invalid parameter", error_user_msg="Event Timestamp Too Old"
    )
    outcome = classify_meta_response(HttpResponse(400, {}, body))
    assert outcome == Dead(
        "meta_invalid_parameter",
        "HTTP 400: Meta error 100/2804003; Invalid parameter; Event Timestamp Too Old; "
        "fbtrace_id AbC123",
    )


async def test_an_invalid_token_dead_letters_the_batch_without_the_token(
    meta: Recorder, context: ForwarderContext
) -> None:
    fwd = MetaForwarder(config(base_url=meta.url.rstrip("/")), context)
    message = f"Malformed access token {TOKEN}"
    meta.script = [(401, {}, graph_error(190, message=message))]
    outcome = await fwd.deliver([{**page_view(), "timestamp": datetime.now(UTC).isoformat()}])
    assert isinstance(outcome, Dead)
    assert outcome.reason == "meta_invalid_token"
    assert TOKEN not in outcome.detail
    assert "Malformed access token ***" in outcome.detail


async def test_a_throttle_is_retried_and_the_retry_is_sent_again(
    meta: Recorder, context: ForwarderContext
) -> None:
    fwd = MetaForwarder(config(base_url=meta.url.rstrip("/")), context)
    events = [{**page_view(), "timestamp": datetime.now(UTC).isoformat()}]
    meta.script = [(400, {"Retry-After": "30"}, graph_error(17))]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs) == ("meta_throttled", 30.0)
    assert await fwd.deliver(events) == Delivered()
    assert len(meta.requests) == 2


# -- match keys ----------------------------------------------------------------------------


def keys_counted(metrics: Metrics, key: str) -> float:
    labels = {"forwarder": "meta", "key": key}
    return metrics.registry.get_sample_value("tagrelay_forwarder_match_keys_total", labels) or 0.0


async def test_match_keys_of_the_sent_events_are_counted(
    meta: Recorder, context: ForwarderContext
) -> None:
    fwd = MetaForwarder(config(base_url=meta.url.rstrip("/"), default_phone_country="US"), context)
    now = datetime.now(UTC).isoformat()
    events = [
        {**purchase(), "timestamp": now},
        {**page_view(), "timestamp": now},
        {**denied_event(), "timestamp": now},
    ]
    assert await fwd.deliver(events) == Delivered()
    expected = {
        "email": 1,
        "phone": 1,
        "name": 1,
        "address": 1,
        "external_id": 1,
        "ip": 2,  # the purchase and the page view; not the event denying ad_user_data
        "user_agent": 3,
        "click_id": 2,  # fbc built from the fbclid of the purchase and the denied event
        "browser_id": 2,  # their fbp (the page view has none)
        "none": 0,
    }
    assert {key: keys_counted(context.metrics, key) for key in expected} == expected


# -- registry and config -------------------------------------------------------------------


def test_meta_is_registered_and_configured_from_yaml_keys() -> None:
    assert FORWARDERS["meta"] is MetaForwarder
    cfg = config()
    assert cfg.requires_consent == ["ads"]
    assert (cfg.base_url, cfg.api_version) == ("https://graph.facebook.com", "v25.0")
    assert TOKEN not in repr(cfg)
    with pytest.raises(ValueError, match="pixel_id"):
        config(pixel_id="not-a-pixel")
    with pytest.raises(ValueError, match="api_version"):
        config(api_version="25")


# -- end to end through the relay ----------------------------------------------------------


def meta_forwarder(url: str) -> dict[str, Any]:
    return {
        "id": "meta",
        "type": "meta",
        "pixel_id": PIXEL,
        "access_token": TOKEN,
        "base_url": url.rstrip("/"),
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
    }


def segment_order(message_id: str, consent: dict[str, str]) -> dict[str, Any]:
    return {
        "userId": "user-42",
        "event": "Order Completed",
        "messageId": message_id,
        "properties": {
            "order_id": "o-77",
            "revenue": 42.0,
            "currency": "USD",
            "products": [{"product_id": "p-1", "price": 42.0, "quantity": 1}],
        },
        "context": {
            "consent": consent,
            "traits": {"email": "buyer@example.com"},
            "userAgent": UA,
            "ip": "198.51.100.4",
            "page": {"url": "https://www.shop.test/thanks"},
        },
    }


async def test_an_order_reaches_meta_with_its_message_id_and_ads_denied_does_not(
    relay: Any, meta: Recorder
) -> None:
    client = await relay(forwarders=[meta_forwarder(meta.url)])
    auth = basic(SERVER_KEY)
    denied = await client.post(
        "/v1/track", json=segment_order("order-denied", {"ads": "denied"}), headers=auth
    )
    granted = await client.post("/v1/track", json=segment_order("order-1", GRANTED), headers=auth)
    identify = await client.post(
        "/v1/identify",
        json={"userId": "user-42", "traits": {"plan": "pro"}, "context": {"consent": GRANTED}},
        headers=auth,
    )
    assert (denied.status, granted.status, identify.status) == (200, 200, 200)
    await wait_idle(client.app)
    [request] = meta.requests
    assert request["path"] == PATH
    assert request["query"] == {"access_token": TOKEN}
    [event] = orjson.loads(request["body"])["data"]
    assert event["event_id"] == "order-1"
    assert event["event_name"] == "Purchase"
    assert event["custom_data"]["value"] == 42.0
    assert event["user_data"]["em"] == [sha256_hex("buyer@example.com")]
    app = client.app
    for reason in ("consent_denied", "not_a_conversion"):
        labels = {"forwarder": "meta", "reason": reason}
        assert metric_value(app, "tagrelay_forwarder_dropped_total", labels) == 1, reason
    delivered = {"forwarder": "meta", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 1
    email = {"forwarder": "meta", "key": "email"}
    assert metric_value(app, "tagrelay_forwarder_match_keys_total", email) == 1


def test_a_yaml_config_with_meta_validates() -> None:
    raw = {
        "keys": [{"id": "backend", "kind": "server", "key": "k"}],
        "forwarders": [
            {
                "id": "meta",
                "type": "meta",
                "pixel_id": PIXEL,
                "access_token": TOKEN,
                "events": {"Demo Booked": "Lead"},
                "test_event_code": "TEST12345",
            }
        ],
    }
    [fwd] = Config.model_validate(raw).forwarders
    assert isinstance(fwd, MetaConfig)
    assert fwd.events == {"Demo Booked": "Lead"}
