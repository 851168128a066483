"""The tiktok forwarder (Events API 2.0): the exact requests a fake TikTok receives (golden
files under ``golden/tiktok_events/``, one per behaviour), TikTok's answer codes classified,
the match-key counts, and end to end through the relay: a Segment ``Order Completed``
reaches the fake TikTok with ``event_id`` = its ``messageId``; an event denying ``ads``
does not; a rate-limit answer is retried, a permission answer dead-lettered.

Regenerate the golden files after an intended change with ``TAGRELAY_UPDATE_GOLDEN=1``
(and read the diff)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from tagrelay.appkeys import SPOOL
from tagrelay.config.models import Config
from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._http import HttpResponse, send
from tagrelay.forwarders._user_data import sha256_hex
from tagrelay.forwarders.tiktok_events import (
    TikTokConfig,
    TikTokForwarder,
    classify_tiktok_response,
)
from tagrelay.metrics import Metrics
from tagrelay.model import Dead, Delivered, Event, Retry
from tests.support import (
    BROWSER_KEY,
    SERVER_KEY,
    Recorder,
    basic,
    metric_value,
    recording_server,
    wait_idle,
)

GOLDEN = Path(__file__).parent / "golden" / "tiktok_events"
UPDATE = os.environ.get("TAGRELAY_UPDATE_GOLDEN") == "1"

PIXEL = "CQ1A2B3C4D5E6F7G8H9J"
TOKEN = "tt-test/token+with=odd&chars"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WHEN = (NOW - timedelta(minutes=10)).isoformat()
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari"
PATH = "/open_api/v1.3/event/track/"
TTCLID = "E.C.P.v3kXoR2Lq8nJ5dW0aYbZ"
TTP = "2F7h37YkS1j57AYSKTI7IHhJPYH"
FAST_RETRY = {"max_attempts": 10, "initial_backoff_secs": 0.01, "max_backoff_secs": 0.05}


def answer(code: int, message: str = "OK", **fields: Any) -> bytes:
    return orjson.dumps(
        {"code": code, "message": message, "request_id": "2026120512000001", **fields}
    )


OK = answer(0)


def config(**overrides: Any) -> TikTokConfig:
    raw = {"id": "tiktok", "type": "tiktok", "pixel_code": PIXEL, "access_token": TOKEN}
    return TikTokConfig.model_validate({**raw, **overrides})


def offline(**overrides: Any) -> TikTokForwarder:
    """A forwarder for planning only (no HTTP)."""
    context = ForwarderContext(Path("."), None, Metrics())  # type: ignore[arg-type]
    return TikTokForwarder(config(**overrides), context)


def browser_context(**extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "consent": dict(GRANTED),
        "ip": "203.0.113.7",
        "userAgent": UA,
        "locale": "en-US",
        "page": {
            "url": "https://www.shop.test/checkout/done",
            "referrer": "https://www.shop.test/cart",
        },
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
                {
                    "product_id": "sku-1",
                    "price": 20,
                    "quantity": 2,
                    "name": "Mug",
                    "category": "Kitchen",
                    "brand": "Acme",
                },
                {"sku": "sku-2", "price": 25.5, "quantity": 1},
                {"name": "Gift wrap", "price": 0},
            ],
        },
        "context": browser_context(
            traits={
                "email": " Jane.Doe@Example.com ",
                "phone": "(650) 555-1212",
                "firstName": " Valéry ",
                "lastName": "O'Brien",
                "address": {"city": "Menlo Park", "postalCode": "94025-1234", "country": "US"},
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
        "context": browser_context(page={"url": "https://www.shop.test/"}),
    }


def custom_event() -> Event:
    return {
        "type": "track",
        "event": "Video Played",
        "messageId": "msg-video-1",
        "timestamp": WHEN,
        "properties": {"video_id": "v-9", "email": "viewer@example.com"},
        "context": browser_context(),
    }


def search() -> Event:
    return {
        "type": "track",
        "event": "Products Searched",
        "messageId": "msg-search-1",
        "timestamp": WHEN,
        "properties": {"query": " blue mugs "},
        "context": browser_context(),
    }


def hashed_email_event() -> Event:
    event = purchase("msg-hashed-1")
    event["context"]["traits"] = {"email": sha256_hex("jane.doe@example.com").upper()}
    return event


def denied_event() -> Event:
    return purchase("msg-denied-1", consent={**GRANTED, "ad_user_data": "denied"})


def clicked_event() -> Event:
    event = page_view()
    event["messageId"] = "msg-clicked-1"
    event["context"]["clickIds"] = {"ttclid": TTCLID, "gclid": "not-for-tiktok"}
    event["context"]["clientIds"] = {"_ttp": TTP, "fbp": "fb.1.2.3"}
    return event


CASES: dict[str, tuple[dict[str, Any], list[Event]]] = {
    "purchase_with_products_and_user_data": ({"default_phone_country": "US"}, [purchase()]),
    "page_view": ({}, [page_view()]),
    "custom_event": ({}, [custom_event()]),
    "search_with_query": ({}, [search()]),
    "ad_user_data_denied": ({}, [denied_event()]),
    "already_hashed_email": ({}, [hashed_email_event()]),
    "test_event_code": ({"test_event_code": "TEST12345"}, [page_view()]),
    "ttclid_and_ttp": ({}, [clicked_event()]),
    "limited_data_use": ({"limited_data_use": True}, [page_view()]),
}


@pytest.fixture
async def tiktok() -> AsyncIterator[Recorder]:
    async with recording_server("TikTok", [PATH]) as rec:
        yield rec


def received(request: dict[str, Any]) -> dict[str, Any]:
    """What the fake TikTok got, without what the HTTP client adds by itself."""
    return {
        "method": request["method"],
        "path": request["path"],
        "query": request["query"],
        "headers": {
            name: request["headers"].get(name) for name in ("Access-Token", "Content-Type")
        },
        "body": orjson.loads(request["body"]),
    }


@pytest.mark.parametrize("case", sorted(CASES))
async def test_golden_requests(case: str, tiktok: Recorder, context: ForwarderContext) -> None:
    overrides, events = CASES[case]
    fwd = TikTokForwarder(config(base_url=tiktok.url.rstrip("/"), **overrides), context)
    plan = fwd.plan(events, NOW)
    assert {r: n for r, n in plan.drops.items() if r in fwd.event_drop_reasons} == {}
    for planned in plan.requests:
        assert isinstance(await send(context.http, planned.request, 5.0), HttpResponse)
    [request] = [received(r) for r in tiktok.requests]
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(request, option=orjson.OPT_INDENT_2) + b"\n")
    assert request == orjson.loads(path.read_bytes())


def golden_event(case: str) -> tuple[dict[str, Any], dict[str, Any]]:
    request = orjson.loads((GOLDEN / f"{case}.json").read_bytes())
    [event] = request["body"]["data"]
    return request, event


def test_golden_files_pin_the_rules() -> None:
    """What the golden files show, said once more in words."""
    request, event = golden_event("purchase_with_products_and_user_data")
    assert (request["method"], request["path"], request["query"]) == ("POST", PATH, {})
    assert request["headers"] == {"Access-Token": TOKEN, "Content-Type": "application/json"}
    body = request["body"]
    assert (body["event_source"], body["event_source_id"]) == ("web", PIXEL)
    assert "test_event_code" not in body
    assert event["event"] == "Purchase"
    assert event["event_id"] == "msg-purchase-1"
    assert event["event_time"] == int((NOW - timedelta(minutes=10)).timestamp())
    assert event["user"] == {
        "email": sha256_hex("jane.doe@example.com"),
        "phone": sha256_hex("+16505551212"),
        "external_id": sha256_hex("User-42"),  # trimmed, case kept
        "first_name": sha256_hex("valéry"),
        "last_name": sha256_hex("o'brien"),
        "zip_code": sha256_hex("940251234"),
        "ip": "203.0.113.7",
        "user_agent": UA,
        "locale": "en-US",
    }
    assert event["properties"] == {
        "contents": [
            {
                "content_id": "sku-1",
                "content_type": "product",
                "content_name": "Mug",
                "content_category": "Kitchen",
                "price": 20,
                "quantity": 2,
                "brand": "Acme",
            },
            {"content_id": "sku-2", "content_type": "product", "price": 25.5, "quantity": 1},
        ],
        "content_type": "product",
        "currency": "EUR",
        "value": 65.5,
        "order_id": "order-1001",
    }
    assert event["page"] == {
        "url": "https://www.shop.test/checkout/done",
        "referrer": "https://www.shop.test/cart",
    }
    assert "limited_data_use" not in event

    _, page = golden_event("page_view")
    assert page["event"] == "Pageview"
    assert "properties" not in page
    _, custom = golden_event("custom_event")
    # a custom event under its own name; the email in its properties is user data only
    assert custom["event"] == "Video Played"
    assert custom["user"]["email"] == sha256_hex("viewer@example.com")
    assert "properties" not in custom
    _, found = golden_event("search_with_query")
    assert (found["event"], found["properties"]) == ("Search", {"query": "blue mugs"})
    _, denied = golden_event("ad_user_data_denied")
    assert set(denied["user"]) == {"user_agent", "locale"}
    _, hashed = golden_event("already_hashed_email")
    assert hashed["user"]["email"] == sha256_hex("jane.doe@example.com")
    test_request, _ = golden_event("test_event_code")
    assert test_request["body"]["test_event_code"] == "TEST12345"
    _, clicked = golden_event("ttclid_and_ttp")
    assert (clicked["user"]["ttclid"], clicked["user"]["ttp"]) == (TTCLID, TTP)
    _, ldu = golden_event("limited_data_use")
    assert ldu["limited_data_use"] is True


def test_what_is_not_sent_is_counted() -> None:
    old = purchase("m-old")
    old["timestamp"] = (NOW - timedelta(days=29)).isoformat()
    recent_enough = purchase("m-27-days")
    recent_enough["timestamp"] = (NOW - timedelta(days=27)).isoformat()
    identify: Event = {"type": "identify", "messageId": "m-id", "traits": {"email": "a@b.co"}}
    nameless: Event = {"type": "track", "messageId": "m-nameless", "timestamp": WHEN}
    bad_email = purchase("m-bad-email")
    bad_email["context"]["traits"] = {"email": "not-an-email", "phone": "12"}
    plan = offline().plan([old, recent_enough, identify, nameless, bad_email], NOW)
    [planned] = plan.requests
    assert planned.indices == (1, 4)
    assert dict(plan.drops) == {
        "too_old": 1,
        "not_a_conversion": 1,
        "no_event_name": 1,
        "invalid_email": 1,
        "invalid_phone": 2,  # "12", and a national number without default_phone_country
    }
    [_, sent] = orjson.loads(planned.request.body)["data"]
    assert "email" not in sent["user"] and "phone" not in sent["user"]


def test_page_views_are_pageview_unless_configured() -> None:
    gtag_page: Event = {**page_view(), "type": "track", "event": "page_view"}
    events = [page_view(), gtag_page]
    for unmapped in ("custom", "skip"):
        fwd = offline(unmapped=unmapped)
        [planned] = fwd.plan(events, NOW).requests
        assert [e["event"] for e in orjson.loads(planned.request.body)["data"]] == [
            "Pageview",
            "Pageview",
        ]
    fwd = offline(events={"page_view": "ViewContent"})
    [planned] = fwd.plan(events, NOW).requests
    assert [e["event"] for e in orjson.loads(planned.request.body)["data"]] == [
        "ViewContent",
        "ViewContent",
    ]


def test_standard_and_legacy_names_pass_and_unmapped_skip_drops_the_rest() -> None:
    fwd = offline(unmapped="skip", events={"Demo Booked": "Schedule"})
    names = ["CompletePayment", "Demo Booked", "Signed Up", "Video Played"]
    events = [{**custom_event(), "event": name, "messageId": f"m-{name}"} for name in names]
    plan = fwd.plan(events, NOW)
    [planned] = plan.requests
    sent = [e["event"] for e in orjson.loads(planned.request.body)["data"]]
    assert sent == ["CompletePayment", "Schedule", "CompleteRegistration"]
    assert dict(plan.drops) == {"unmapped_event": 1}


def test_at_most_1000_events_per_request() -> None:
    events = [{**page_view(), "messageId": f"m-{i}"} for i in range(2001)]
    plan = offline().plan(events, NOW)
    assert [len(p.indices) for p in plan.requests] == [1000, 1000, 1]


# -- TikTok's answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (200, OK, Delivered, None),
        (200, answer(20001, "Partial success"), Delivered, None),
        (200, answer(40100, "Too many requests. Please retry in some time."), Retry, None),
        (200, answer(40001, "No permission to operate pixel code"), Dead, "tiktok_permission"),
        (200, answer(40002, "Batch.0.event: Not a valid string"), Dead, "tiktok_invalid"),
        (200, answer(50000, "System error"), Retry, "tiktok_internal"),
        (200, answer(51002, "Service busy"), Retry, "tiktok_internal"),
        (200, answer(40105, "Access token invalid"), Dead, "tiktok_error"),
        (200, answer(1, "Unknown"), Dead, "tiktok_error"),
        (400, answer(40002, "Bad field"), Dead, "tiktok_invalid"),
        (400, answer(0), Dead, "tiktok_error"),  # "OK" on an error status is no success
        (401, answer(40001, "No permission"), Dead, "tiktok_permission"),
        (200, b'{"ok":true}', Delivered, None),
        (200, b"", Delivered, None),
        (502, b"<html>bad gateway</html>", Retry, "status_5xx"),
        (503, answer(50002, "Service unavailable"), Retry, "status_5xx"),
        (429, b"", Retry, "status_429"),
        (408, b"", Retry, "status_408"),
        (400, b"not json", Dead, "status_4xx"),
        (403, b'{"code": "40001"}', Dead, "status_4xx"),  # a code must be a number
    ],
)
def test_answer_classification(status: int, body: bytes, kind: type, reason: str | None) -> None:
    outcome = classify_tiktok_response(HttpResponse(status, {}, body))
    assert isinstance(outcome, kind)
    if kind is Retry and reason is None:
        reason = "tiktok_throttled"
    if reason is not None:
        assert outcome.reason == reason  # type: ignore[union-attr]


def test_a_dead_letter_carries_tiktoks_words() -> None:
    message = "Batch.0.properties.contents.0.content_id: Not a valid string."
    outcome = classify_tiktok_response(HttpResponse(200, {}, answer(40002, message)))
    assert outcome == Dead(
        "tiktok_invalid", f"HTTP 200: TikTok code 40002: {message}; request_id 2026120512000001"
    )


def test_a_rate_limit_waits_for_the_runtimes_backoff_or_retry_after() -> None:
    throttled = answer(40100, "Too many requests. Please retry in some time.")
    assert classify_tiktok_response(HttpResponse(200, {}, throttled)) == Retry(
        "tiktok_throttled",
        "HTTP 200: TikTok code 40100: Too many requests. Please retry in some time.; "
        "request_id 2026120512000001",
        None,
    )
    outcome = classify_tiktok_response(HttpResponse(200, {"Retry-After": "7"}, throttled))
    assert isinstance(outcome, Retry) and outcome.after_secs == 7.0


async def test_a_permission_answer_dead_letters_the_batch_without_the_token(
    tiktok: Recorder, context: ForwarderContext
) -> None:
    fwd = TikTokForwarder(config(base_url=tiktok.url.rstrip("/")), context)
    message = f"No permission to operate pixel code {PIXEL} with token {TOKEN}"
    tiktok.script = [(200, {}, answer(40001, message))]
    outcome = await fwd.deliver([{**page_view(), "timestamp": datetime.now(UTC).isoformat()}])
    assert isinstance(outcome, Dead)
    assert outcome.reason == "tiktok_permission"
    assert TOKEN not in outcome.detail
    assert f"No permission to operate pixel code {PIXEL} with token ***" in outcome.detail


async def test_a_rate_limit_is_retried_and_the_retry_is_sent_again(
    tiktok: Recorder, context: ForwarderContext
) -> None:
    fwd = TikTokForwarder(config(base_url=tiktok.url.rstrip("/")), context)
    events = [{**page_view(), "timestamp": datetime.now(UTC).isoformat()}]
    tiktok.script = [(200, {}, answer(40100, "Too many requests.")), (200, {}, OK)]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs) == ("tiktok_throttled", None)
    assert await fwd.deliver(events) == Delivered()
    assert len(tiktok.requests) == 2
    assert tiktok.requests[0]["body"] == tiktok.requests[1]["body"]


async def test_a_partial_success_is_delivered_and_logged_without_the_token(
    tiktok: Recorder, context: ForwarderContext, caplog: pytest.LogCaptureFixture
) -> None:
    fwd = TikTokForwarder(config(base_url=tiktok.url.rstrip("/")), context)
    events = [{**page_view(), "timestamp": datetime.now(UTC).isoformat()}]
    partial = answer(20001, f"Partial success ({TOKEN})")
    tiktok.script = [(200, {}, partial), (200, {}, partial)]
    with caplog.at_level(logging.WARNING, logger="tagrelay.forwarders.tiktok_events"):
        assert await fwd.deliver(events) == Delivered()
        assert await fwd.deliver([{**events[0], "messageId": "m-2"}]) == Delivered()
    [record] = caplog.records  # the second within the minute is only counted
    assert record.levelno == logging.WARNING
    assert record.__dict__["detail"] == (
        "HTTP 200: TikTok code 20001: Partial success (***); request_id 2026120512000001"
    )
    assert TOKEN not in record.getMessage()


# -- match keys ----------------------------------------------------------------------------


def keys_counted(metrics: Metrics, key: str) -> float:
    labels = {"forwarder": "tiktok", "key": key}
    return metrics.registry.get_sample_value("tagrelay_forwarder_match_keys_total", labels) or 0.0


async def test_match_keys_of_the_sent_events_are_counted(
    tiktok: Recorder, context: ForwarderContext
) -> None:
    cfg = config(base_url=tiktok.url.rstrip("/"), default_phone_country="US")
    fwd = TikTokForwarder(cfg, context)
    now = datetime.now(UTC).isoformat()
    backend: Event = {
        "type": "track",
        "event": "Signed Up",
        "messageId": "m-backend",
        "timestamp": now,
        "context": {"consent": GRANTED},
    }
    events = [
        {**purchase(), "timestamp": now},
        {**clicked_event(), "timestamp": now},
        {**denied_event(), "timestamp": now},
        backend,
    ]
    assert await fwd.deliver(events) == Delivered()
    expected = {
        "email": 1,
        "phone": 1,
        "name": 1,
        "address": 1,  # the zip code: TikTok takes no city, state or country
        "external_id": 1,
        "ip": 2,  # the purchase and the page view; not the event denying ad_user_data
        "user_agent": 3,
        "click_id": 1,  # the ttclid (a gclid is not TikTok's)
        "browser_id": 1,  # the _ttp (an fbp is not TikTok's)
        "none": 1,  # the backend event
    }
    assert {key: keys_counted(context.metrics, key) for key in expected} == expected


async def test_match_keys_are_not_counted_for_a_dead_batch(
    tiktok: Recorder, context: ForwarderContext
) -> None:
    fwd = TikTokForwarder(config(base_url=tiktok.url.rstrip("/")), context)
    tiktok.script = [(200, {}, answer(40002, "Bad"))]
    events = [{**purchase(), "timestamp": datetime.now(UTC).isoformat()}]
    assert isinstance(await fwd.deliver(events), Dead)
    assert keys_counted(context.metrics, "email") == 0


# -- registry and config -------------------------------------------------------------------


def test_tiktok_is_registered_and_configured_from_yaml_keys() -> None:
    assert FORWARDERS["tiktok"] is TikTokForwarder
    cfg = config()
    assert cfg.requires_consent == ["ads"]
    assert (cfg.base_url, cfg.api_version) == ("https://business-api.tiktok.com", "v1.3")
    assert TOKEN not in repr(cfg)
    with pytest.raises(ValueError, match="pixel_code"):
        config(pixel_code="not a pixel")
    with pytest.raises(ValueError, match="api_version"):
        config(api_version="1.3")
    with pytest.raises(ValueError, match="base_url"):
        config(base_url="https://business-api.tiktok.com/")
    fwd = offline(api_version="v1.4", base_url="http://127.0.0.1:9")
    [planned] = fwd.plan([page_view()], NOW).requests
    assert planned.request.url == "http://127.0.0.1:9/open_api/v1.4/event/track/"


def test_a_yaml_config_with_tiktok_validates() -> None:
    raw = {
        "keys": [{"id": "backend", "kind": "server", "key": "k"}],
        "forwarders": [
            {
                "id": "tiktok",
                "type": "tiktok",
                "pixel_code": PIXEL,
                "access_token": TOKEN,
                "events": {"Order Completed": "CompletePayment"},
                "test_event_code": "TEST12345",
                "limited_data_use": True,
            }
        ],
    }
    [fwd] = Config.model_validate(raw).forwarders
    assert isinstance(fwd, TikTokConfig)
    assert fwd.events == {"Order Completed": "CompletePayment"}


# -- end to end through the relay ----------------------------------------------------------


def tiktok_forwarder(url: str) -> dict[str, Any]:
    return {
        "id": "tiktok",
        "type": "tiktok",
        "pixel_code": PIXEL,
        "access_token": TOKEN,
        "base_url": url.rstrip("/"),
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
        "retry": FAST_RETRY,
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
            "page": {"url": f"https://www.shop.test/thanks?ttclid={TTCLID}"},
        },
    }


async def test_an_order_reaches_tiktok_with_its_message_id_and_ads_denied_does_not(
    relay: Any, tiktok: Recorder
) -> None:
    client = await relay(forwarders=[tiktok_forwarder(tiktok.url)])
    auth = basic(SERVER_KEY)
    tiktok.script = [(200, {}, OK)]
    denied = await client.post(
        "/v1/track", json=segment_order("order-denied", {"ads": "denied"}), headers=auth
    )
    granted = await client.post("/v1/track", json=segment_order("order-1", GRANTED), headers=auth)
    assert (denied.status, granted.status) == (200, 200)
    await wait_idle(client.app)
    [request] = tiktok.requests
    assert (request["method"], request["path"]) == ("POST", PATH)
    assert request["headers"]["Access-Token"] == TOKEN
    body = orjson.loads(request["body"])
    assert (body["event_source"], body["event_source_id"]) == ("web", PIXEL)
    [event] = body["data"]
    assert event["event_id"] == "order-1"
    assert event["event"] == "Purchase"
    assert event["properties"]["value"] == 42.0
    assert event["properties"]["contents"] == [
        {"content_id": "p-1", "content_type": "product", "price": 42.0, "quantity": 1}
    ]
    assert event["user"]["email"] == sha256_hex("buyer@example.com")
    assert event["user"]["ttclid"] == TTCLID
    app = client.app
    consent = {"forwarder": "tiktok", "reason": "consent_denied"}
    assert metric_value(app, "tagrelay_forwarder_dropped_total", consent) == 1
    delivered = {"forwarder": "tiktok", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 1
    email = {"forwarder": "tiktok", "key": "email"}
    assert metric_value(app, "tagrelay_forwarder_match_keys_total", email) == 1


async def test_a_rate_limit_is_retried_then_delivered_through_the_relay(
    relay: Any, tiktok: Recorder
) -> None:
    client = await relay(forwarders=[tiktok_forwarder(tiktok.url)])
    tiktok.script = [(200, {}, answer(40100, "Too many requests.")), (200, {}, OK)]
    sent = await client.post(
        "/v1/track", json=segment_order("order-2", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    first, second = tiktok.requests
    assert first["body"] == second["body"]
    assert orjson.loads(second["body"])["data"][0]["event_id"] == "order-2"
    app = client.app
    retried = {"forwarder": "tiktok", "reason": "tiktok_throttled"}
    assert metric_value(app, "tagrelay_forwarder_retries_total", retried) == 1
    delivered = {"forwarder": "tiktok", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 1
    assert await app[SPOOL].dead_letters("tiktok") == []


async def test_a_permission_answer_is_dead_lettered_with_tiktoks_message(
    relay: Any, tiktok: Recorder
) -> None:
    client = await relay(forwarders=[tiktok_forwarder(tiktok.url)])
    message = "No permission to operate pixel code. You must be an admin or operator."
    tiktok.script = [(200, {}, answer(40001, message))]
    sent = await client.post(
        "/v1/track", json=segment_order("order-3", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    assert len(tiktok.requests) == 1  # not retried
    app = client.app
    [dead] = await app[SPOOL].dead_letters("tiktok")
    assert dead.reason == "tiktok_permission"
    assert message in dead.detail
    assert TOKEN not in dead.detail
    labels = {"forwarder": "tiktok", "reason": "tiktok_permission"}
    assert metric_value(app, "tagrelay_dead_letters_total", labels) == 1


async def test_a_script_purchase_carries_the_ttp_cookie_and_the_landing_ttclid(
    relay: Any, tiktok: Recorder
) -> None:
    """The tracking script's path: ``_ttp`` (set by TikTok's pixel on the site's domain)
    comes with the request as a cookie; the ``ttclid`` of the landing URL is kept by the
    relay and attached to the later purchase."""
    client = await relay(forwarders=[tiktok_forwarder(tiktok.url)])
    headers = {
        "Origin": "https://www.shop.test",
        "Host": "data.shop.test",
        "Content-Type": "text/plain",
    }
    landing = {
        "type": "page",
        "anonymousId": "visitor-1",
        "messageId": "m-landing",
        "context": {
            "consent": GRANTED,
            "page": {"url": f"https://www.shop.test/?ttclid={TTCLID}", "path": "/"},
        },
    }
    order = {
        "type": "track",
        "event": "Order Completed",
        "anonymousId": "visitor-1",
        "messageId": "m-order",
        "properties": {"order_id": "o-9", "revenue": 10, "currency": "USD"},
        "context": {
            "consent": GRANTED,
            "page": {"url": "https://www.shop.test/thanks", "path": "/thanks"},
        },
    }
    cookies = {"_ttp": TTP}
    for event in (landing, order):
        body = orjson.dumps({"writeKey": BROWSER_KEY, "batch": [event]})
        jar = "; ".join(f"{name}={value}" for name, value in cookies.items())
        resp = await client.post("/d", data=body, headers={**headers, "Cookie": jar})
        assert resp.status == 200
        for header in resp.headers.getall("Set-Cookie", []):
            name, _, rest = header.partition("=")
            cookies[name] = rest.split(";", 1)[0]
    assert "tr_clk" in cookies  # the relay keeps the landing's ttclid
    await wait_idle(client.app)
    sent = [e for r in tiktok.requests for e in orjson.loads(r["body"])["data"]]
    by_id = {e["event_id"]: e for e in sent}
    assert by_id["m-order"]["event"] == "Purchase"
    assert by_id["m-order"]["user"]["ttp"] == TTP
    assert by_id["m-order"]["user"]["ttclid"] == TTCLID
    assert by_id["m-landing"]["event"] == "Pageview"
