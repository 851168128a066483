"""The microsoft forwarder (UET Conversions API): the exact requests a fake Microsoft
receives (golden files under ``golden/microsoft_uet/``, one per behaviour), UET's event
names and what is not sent, Microsoft's answers classified (events it names as invalid are
dead letters alone), the match-key counts, and end to end through the relay against a fake
that checks the guide's required fields: an ``Order Completed`` reaches it with its
``messageId`` as ``eventId``, an event denying ``ads`` does not, the tracking script's
``_uetvid`` cookie and landing ``msclkid`` reach it as ``anonymousId`` and ``msclkid``.

Regenerate the golden files after an intended change with ``TAGRELAY_UPDATE_GOLDEN=1``
(and read the diff)."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tagrelay.appkeys import SPOOL
from tagrelay.config.models import Config
from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._http import HttpResponse, send
from tagrelay.forwarders._user_data import sha256_hex
from tagrelay.forwarders.microsoft_uet import (
    MicrosoftConfig,
    MicrosoftForwarder,
    classify_microsoft_response,
)
from tagrelay.metrics import Metrics
from tagrelay.model import Dead, Delivered, Event, Retry
from tests.support import (
    BROWSER_KEY,
    SERVER_KEY,
    Recorder,
    basic,
    fake_server,
    metric_value,
    recording_server,
    wait_idle,
)

GOLDEN = Path(__file__).parent / "golden" / "microsoft_uet"
UPDATE = os.environ.get("TAGRELAY_UPDATE_GOLDEN") == "1"

TAG = "187012345"
TOKEN = "uet-test/token+with=odd&chars"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WHEN = (NOW - timedelta(minutes=10)).isoformat()
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari"
PATH = f"/v1/{TAG}/events"
MSCLKID = "cdd4afcccb1c9a4cad9544dd7e5006d5"  # as Microsoft appends it to landing URLs
MSCLKID_UUID = "cdd4afcc-cb1c-9a4c-ad95-44dd7e5006d5"
UETVID = "b171a9b06ce011ecafcd1b209be8601b"
FAST_RETRY = {"max_attempts": 10, "initial_backoff_secs": 0.01, "max_backoff_secs": 0.05}
OK = b'{"eventsReceived": 1}'
HEX64 = re.compile(r"[0-9a-f]{64}")


def config(**overrides: Any) -> MicrosoftConfig:
    raw = {"id": "microsoft", "type": "microsoft", "uet_tag_id": TAG, "access_token": TOKEN}
    return MicrosoftConfig.model_validate({**raw, **overrides})


def offline(**overrides: Any) -> MicrosoftForwarder:
    """A forwarder for planning only (no HTTP)."""
    context = ForwarderContext(Path("."), None, Metrics())  # type: ignore[arg-type]
    return MicrosoftForwarder(config(**overrides), context)


def browser_context(**extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "consent": dict(GRANTED),
        "ip": "203.0.113.7",
        "userAgent": UA,
        "page": {
            "url": f"https://www.shop.test/checkout/done?msclkid={MSCLKID}",
            "referrer": "https://www.shop.test/cart",
            "title": "Thank you",
        },
        "clientIds": {"_uetvid": UETVID, "_rdt_uuid": "not-for-microsoft"},
    }
    context.update(extra)
    return context


def purchase(message_id: str = "msg-purchase-1", **context: Any) -> Event:
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": message_id,
        "anonymousId": "anon-1",
        "userId": "User-42",
        "timestamp": WHEN,
        "properties": {
            "order_id": "order-1001",
            "total": 65.5,
            "currency": "eur",
            "products": [
                {"product_id": "sku-1", "price": 20, "quantity": 2, "name": "Mug"},
                {"sku": "sku-2", "price": 25.5, "quantity": 1},
                {"name": "Gift wrap", "price": 0},
            ],
        },
        "context": browser_context(
            traits={"email": " Jo.hn+shop@Contoso.com ", "phone": "(425) 555-1234"},
            **context,
        ),
    }


def page_view(message_id: str = "msg-page-1") -> Event:
    return {
        "type": "page",
        "name": "Home",
        "messageId": message_id,
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
        "anonymousId": "anon-1",
        "timestamp": WHEN,
        "properties": {"category": "videos", "label": "intro", "email": "viewer@example.com"},
        "context": browser_context(),
    }


def search() -> Event:
    return {
        "type": "track",
        "event": "Products Searched",
        "messageId": "msg-search-1",
        "anonymousId": "anon-1",
        "timestamp": WHEN,
        "properties": {"query": " wall clocks "},
        "context": browser_context(),
    }


def backend_lead() -> Event:
    return {
        "type": "track",
        "event": "Lead Generated",
        "messageId": "msg-lead-1",
        "userId": "crm-7",
        "timestamp": WHEN,
        "properties": {"value": 120, "currency": "USD"},
        "context": {"consent": GRANTED, "traits": {"email": "lead@contoso.com"}},
    }


def hashed_email_event() -> Event:
    event = purchase("msg-hashed-1")
    event["context"]["traits"] = {"email": sha256_hex("johndoe@contoso.com").upper()}
    return event


def denied_event() -> Event:
    return purchase("msg-denied-1", consent={**GRANTED, "ad_user_data": "denied"})


CASES: dict[str, tuple[dict[str, Any], list[Event]]] = {
    "purchase_with_items_and_user_data": ({"default_phone_country": "US"}, [purchase()]),
    "page_load": ({}, [page_view()]),
    "custom_event": ({}, [custom_event()]),
    "search_with_term": ({}, [search()]),
    "lead_from_a_backend": ({}, [backend_lead()]),
    "ad_user_data_denied": ({}, [denied_event()]),
    "already_hashed_email": ({}, [hashed_email_event()]),
    "configured_event_name_and_data_provider": (
        {"events": {"Order Completed": "checkout_complete"}, "data_provider": "shop-relay"},
        [purchase()],
    ),
}


@pytest.fixture
async def microsoft() -> AsyncIterator[Recorder]:
    async with recording_server("Microsoft", [PATH]) as rec:
        yield rec


def received(request: dict[str, Any]) -> dict[str, Any]:
    """What the fake Microsoft got, without what the HTTP client adds by itself."""
    return {
        "method": request["method"],
        "path": request["path"],
        "query": request["query"],
        "headers": {
            name: request["headers"].get(name)
            for name in ("Authorization", "Content-Type", "User-Agent")
        },
        "body": orjson.loads(request["body"]),
    }


def sent_events(microsoft: Recorder) -> list[dict[str, Any]]:
    return [e for r in microsoft.requests for e in orjson.loads(r["body"])["data"]]


@pytest.mark.parametrize("case", sorted(CASES))
async def test_golden_requests(case: str, microsoft: Recorder, context: ForwarderContext) -> None:
    overrides, events = CASES[case]
    fwd = MicrosoftForwarder(config(base_url=microsoft.url.rstrip("/"), **overrides), context)
    plan = fwd.plan(events, NOW)
    assert {r: n for r, n in plan.drops.items() if r in fwd.event_drop_reasons} == {}
    for planned in plan.requests:
        assert isinstance(await send(context.http, planned.request, 5.0), HttpResponse)
    [request] = [received(r) for r in microsoft.requests]
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(request, option=orjson.OPT_INDENT_2) + b"\n")
    assert request == orjson.loads(path.read_bytes())


def golden(case: str) -> tuple[dict[str, Any], dict[str, Any]]:
    request = orjson.loads((GOLDEN / f"{case}.json").read_bytes())
    [event] = request["body"]["data"]
    return request, event


def test_golden_files_pin_the_rules() -> None:
    """What the golden files show, said once more in words."""
    request, event = golden("purchase_with_items_and_user_data")
    assert (request["method"], request["path"], request["query"]) == ("POST", PATH, {})
    assert request["headers"] == {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json",
        "User-Agent": "tagrelay",
    }
    body = request["body"]
    assert (body["continueOnValidationError"], body["dataProvider"]) == (True, "tagrelay")
    assert event == {
        "eventType": "custom",
        "eventId": "msg-purchase-1",  # the messageId: the UET tag's event_id
        "eventName": "purchase",  # GA4's name, as the UET tag's gtag-style events
        "eventTime": int((NOW - timedelta(minutes=10)).timestamp()),  # seconds
        "eventSourceUrl": f"https://www.shop.test/checkout/done?msclkid={MSCLKID}",
        "referrerUrl": "https://www.shop.test/cart",
        "pageTitle": "Thank you",
        "adStorageConsent": "G",
        "userData": {
            # Microsoft's email rule (dots and +alias out of the local part): the guide's
            # own example, john@contoso.com, and +14255551234
            "em": "ec81f3ac7b2b19675bab9d54cf416f9f18cff87c97da5cca82c0f0891bc40602",
            "ph": "c59475d96e9f01d7d18d06cfad84dd02333207f02c0c2c5663ef2782cda0390e",
            "externalId": sha256_hex("User-42"),  # "anonymized": hashed
            "anonymousId": UETVID,  # the UET tag's cookie wins over the event's id
            "msclkid": MSCLKID_UUID,  # the UUID Microsoft takes
            "clientIpAddress": "203.0.113.7",
            "clientUserAgent": UA,
        },
        "customData": {
            "value": 65.5,
            "currency": "EUR",
            "transactionId": "order-1001",
            "items": [
                {"id": "sku-1", "name": "Mug", "quantity": 2, "price": 20},
                {"id": "sku-2", "quantity": 1, "price": 25.5},
            ],
            "itemIds": ["sku-1", "sku-2"],
            "pageType": "purchase",
            "ecommTotalValue": 65.5,
        },
    }

    _, page = golden("page_load")
    assert page["eventType"] == "pageLoad" and "eventName" not in page
    assert page["eventSourceUrl"] == "https://www.shop.test/"  # required for page loads
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        page["pageLoadId"])  # fmt: skip
    assert page["userData"]["anonymousId"] == "anon-1"  # no _uetvid: the event's own id
    assert "customData" not in page  # page loads take no revenue
    _, custom = golden("custom_event")
    assert custom["eventName"] == "Video Played"
    # an email in the properties is user data only
    assert custom["customData"] == {"eventCategory": "videos", "eventLabel": "intro"}
    assert custom["userData"]["em"] == sha256_hex("viewer@example.com")
    _, found = golden("search_with_term")
    assert found["eventName"] == "search"
    assert found["customData"] == {"pageType": "searchresults", "searchTerm": "wall clocks"}
    _, backend = golden("lead_from_a_backend")
    assert backend["userData"] == {
        "em": sha256_hex("lead@contoso.com"),
        "externalId": sha256_hex("crm-7"),
    }
    assert "eventSourceUrl" not in backend and backend["eventName"] == "generate_lead"
    _, denied = golden("ad_user_data_denied")
    assert set(denied["userData"]) == {"anonymousId", "msclkid", "clientUserAgent"}
    _, hashed = golden("already_hashed_email")
    assert hashed["userData"]["em"] == sha256_hex("johndoe@contoso.com")
    configured, renamed = golden("configured_event_name_and_data_provider")
    assert renamed["eventName"] == "checkout_complete"
    assert configured["body"]["dataProvider"] == "shop-relay"


# -- names and what is not sent ------------------------------------------------------------


def planned_events(fwd: MicrosoftForwarder, events: list[Event]) -> list[dict[str, Any]]:
    plan = fwd.plan(events, NOW)
    return [e for p in plan.requests for e in orjson.loads(p.request.body)["data"]]


def named(name: str, message_id: str = "m-1", **properties: Any) -> Event:
    return {
        "type": "track",
        "event": name,
        "messageId": message_id,
        "anonymousId": "anon-1",
        "timestamp": WHEN,
        "properties": properties,
        "context": {"consent": GRANTED, "page": {"url": "https://www.shop.test/p"}},
    }


@pytest.mark.parametrize(
    ("name", "event_name", "page_type"),
    [
        ("Order Completed", "purchase", "purchase"),
        ("purchase", "purchase", "purchase"),
        ("Product Viewed", "view_item", "product"),
        ("Product List Viewed", "view_item_list", "category"),
        ("Products Searched", "search", "searchresults"),
        ("Product Added", "add_to_cart", "cart"),
        ("Cart Viewed", "view_cart", "cart"),
        ("Checkout Started", "begin_checkout", "cart"),
        ("Signed Up", "sign_up", None),
        ("Form Submitted", "generate_lead", None),
        ("Demo Booked", "Demo Booked", None),  # no canonical name: its own
    ],
)
def test_event_names_are_uets_gtag_style_names(
    name: str, event_name: str, page_type: str | None
) -> None:
    [event] = planned_events(offline(), [named(name, value=5, currency="USD")])
    assert (event["eventType"], event["eventName"]) == ("custom", event_name)
    assert event["customData"].get("pageType") == page_type


def test_page_views_are_page_loads_unless_configured_and_unmapped_skip() -> None:
    gtag_page = {**page_view("m-2"), "type": "track", "event": "page_view"}
    sent = planned_events(offline(), [page_view(), gtag_page])
    assert [e["eventType"] for e in sent] == ["pageLoad", "pageLoad"]
    [renamed] = planned_events(offline(events={"page_view": "home_visit"}), [page_view()])
    assert (renamed["eventType"], renamed["eventName"]) == ("custom", "home_visit")
    plan = offline(unmapped="skip").plan([named("Demo Booked"), named("Signed Up", "m-2")], NOW)
    [planned] = plan.requests
    assert [e["eventName"] for e in orjson.loads(planned.request.body)["data"]] == ["sign_up"]
    assert dict(plan.drops) == {"unmapped_event": 1}


def test_what_is_not_sent_is_counted() -> None:
    old = purchase("m-old")
    old["timestamp"] = (NOW - timedelta(days=7)).isoformat()
    nearly = purchase("m-6-days")
    nearly["timestamp"] = (NOW - timedelta(days=6, hours=23)).isoformat()
    screen: Event = {
        "type": "screen",
        "name": "Home",
        "messageId": "m-screen",
        "anonymousId": "anon-1",
        "timestamp": WHEN,
        "context": {"consent": GRANTED},
    }
    nobody: Event = {
        "type": "track",
        "event": "Signed Up",
        "messageId": "m-nobody",
        "timestamp": WHEN,
        "context": {"consent": GRANTED, "ip": "203.0.113.9", "userAgent": UA},
    }
    bad_click = named("Signed Up", "m-bad-click")
    bad_click["context"]["clickIds"] = {"msclkid": "not-a-uuid"}
    identify: Event = {"type": "identify", "messageId": "m-id", "traits": {"email": "a@b.co"}}
    plan = offline().plan([old, nearly, screen, nobody, bad_click, identify], NOW)
    [planned] = plan.requests
    assert planned.indices == (1, 4)
    assert dict(plan.drops) == {
        "too_old": 1,  # Microsoft takes events up to 7 days old
        "no_page_url": 1,  # a page load needs its URL
        "no_user_data": 1,  # neither em, ph, externalId, msclkid nor anonymousId
        "invalid_click_id": 1,  # left out, the event goes
        "not_a_conversion": 1,
        "invalid_phone": 1,  # a national number without default_phone_country
    }
    [_, clicked] = orjson.loads(planned.request.body)["data"]
    assert "msclkid" not in clicked["userData"]


def test_a_dashed_msclkid_stays_and_odd_case_is_lowered() -> None:
    event = named("Signed Up")
    event["context"]["clickIds"] = {"msclkid": "DD4AFCCC-B1C9-4A4C-AD95-44DD7E5006AB"}
    [sent] = planned_events(offline(), [event])
    assert sent["userData"]["msclkid"] == "dd4afccc-b1c9-4a4c-ad95-44dd7e5006ab"


def test_ad_storage_consent_follows_the_event() -> None:
    denied = named("Signed Up")
    denied["context"]["consent"] = {"ads": "denied", "ad_user_data": "denied"}
    unstated = named("Signed Up", "m-2")
    unstated["context"]["consent"] = {}
    [no, silent] = planned_events(offline(requires_consent=[]), [denied, unstated])
    assert no["adStorageConsent"] == "D"
    assert "adStorageConsent" not in silent


def test_at_most_1000_events_per_request() -> None:
    events = [{**page_view(), "messageId": f"m-{i}"} for i in range(2001)]
    assert [len(p.indices) for p in offline().plan(events, NOW).requests] == [1000, 1000, 1]


# -- Microsoft's answers -------------------------------------------------------------------

# The guide's own examples ("Detailed API error response examples").
UNAUTHORIZED = orjson.dumps(
    {
        "error": {
            "code": "Unauthorized",
            "message": "You are not authorized to access this resource.",
        }
    }
)


def validation(*details: dict[str, Any]) -> bytes:
    message = (
        "One or multiple parameters did not pass validation checks, see details. Note that "
        "only the first 10 errors and warnings are shown."
    )
    return orjson.dumps(
        {"error": {"code": "ValidationError", "message": message, "details": details}}
    )


def issue(index: int, prop: str, code: str, *, warning: bool = False) -> dict[str, Any]:
    return {
        "index": index,
        "propertyName": f"data[{index}].{prop}",
        "attemptedValue": "203.0.113.7",
        "errorMessage": f"'{prop.split('.')[-1]}' is not valid.",
        "errorCode": code,
        "isWarning": warning,
    }


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (200, OK, Delivered, None),
        (200, b"", Delivered, None),
        (401, UNAUTHORIZED, Dead, "microsoft_unauthorized"),
        (403, b'{"error": {"code": "Forbidden", "message": "no"}}', Dead, "microsoft_forbidden"),
        (400, validation(), Dead, "microsoft_invalid_request"),
        (400, b"not json", Dead, "microsoft_invalid_request"),
        (404, b"", Dead, "microsoft_error"),
        (429, b"", Retry, "status_429"),
        (500, b'{"error": {"code": "InternalError", "message": "later"}}', Retry, "status_5xx"),
        (503, b"<html>unavailable</html>", Retry, "status_5xx"),
    ],
)
def test_answer_classification(status: int, body: bytes, kind: type, reason: str | None) -> None:
    outcome = classify_microsoft_response(HttpResponse(status, {"Retry-After": "4"}, body), 2)
    assert isinstance(outcome, kind)
    if reason is not None:
        assert outcome.reason == reason  # type: ignore[union-attr]
    if isinstance(outcome, Retry):
        assert outcome.after_secs == 4.0


def test_events_microsoft_names_as_invalid_are_rejected_alone() -> None:
    answer = validation(
        issue(1, "eventTime", "InvalidEventTime"),
        issue(1, "referrerUrl", "InvalidUrl", warning=True),
        issue(0, "userData.em", "InvalidSha256", warning=True),
        issue(7, "eventType", "InvalidEnumValue"),  # not in this request: ignored
    )
    took_some = classify_microsoft_response(HttpResponse(200, {}, answer), 3)
    assert took_some == Delivered(
        rejected={1: "Microsoft: data[1].eventTime: 'eventTime' is not valid. (InvalidEventTime)"}
    )
    # a 400: none was valid; those Microsoft did not list (it lists 10) get its message
    none = classify_microsoft_response(HttpResponse(400, {}, answer), 3)
    assert isinstance(none, Delivered)
    assert none.rejected[1] == took_some.rejected[1]  # type: ignore[union-attr]
    assert none.rejected[0] == none.rejected[2]
    assert none.rejected[0].startswith("Microsoft: One or multiple parameters")
    dead = classify_microsoft_response(HttpResponse(401, {}, UNAUTHORIZED), 3)
    assert dead == Dead(
        "microsoft_unauthorized",
        "HTTP 401: Microsoft Unauthorized: You are not authorized to access this resource.",
    )
    assert "203.0.113.7" not in str(took_some) + str(none)  # attemptedValue is never kept


def now_events(*events: Event) -> list[Event]:
    at = datetime.now(UTC).isoformat()
    return [{**e, "timestamp": at} for e in events]


async def test_an_invalid_event_is_a_dead_letter_and_warnings_are_logged_without_the_token(
    microsoft: Recorder, context: ForwarderContext, caplog: pytest.LogCaptureFixture
) -> None:
    fwd = MicrosoftForwarder(config(base_url=microsoft.url.rstrip("/")), context)
    batch = now_events(page_view("m-1"), page_view("m-2"), page_view("m-3"))
    answer = orjson.loads(validation(issue(1, "eventTime", "InvalidEventTime")))
    answer["error"]["details"].append(
        {**issue(2, "referrerUrl", "InvalidUrl", warning=True), "errorMessage": f"{TOKEN}?"}
    )
    answer["eventsReceived"] = 2
    microsoft.script = [(200, {}, orjson.dumps(answer))]
    with caplog.at_level(logging.WARNING, logger="tagrelay.forwarders.microsoft_uet"):
        outcome = await fwd.deliver(batch)
    assert outcome == Delivered(
        rejected={1: "Microsoft: data[1].eventTime: 'eventTime' is not valid. (InvalidEventTime)"}
    )
    assert len(microsoft.requests) == 1  # the others were taken: not sent again
    [record] = caplog.records
    assert record.__dict__["warnings"] == "data[2].referrerUrl: ***? (InvalidUrl)"
    assert TOKEN not in record.getMessage() + str(record.__dict__)
    assert keys_counted(context.metrics, "user_agent") == 2


async def test_an_unauthorized_answer_dead_letters_the_batch_without_the_token(
    microsoft: Recorder, context: ForwarderContext
) -> None:
    fwd = MicrosoftForwarder(config(base_url=microsoft.url.rstrip("/")), context)
    answer = {"error": {"code": "Unauthorized", "message": f"Token {TOKEN} is not the tag's."}}
    microsoft.script = [(401, {}, orjson.dumps(answer))]
    outcome = await fwd.deliver(now_events(page_view()))
    assert outcome == Dead(
        "microsoft_unauthorized", "HTTP 401: Microsoft Unauthorized: Token *** is not the tag's."
    )


async def test_a_rate_limit_is_retried_after_microsofts_wait_and_sent_again(
    microsoft: Recorder, context: ForwarderContext
) -> None:
    fwd = MicrosoftForwarder(config(base_url=microsoft.url.rstrip("/")), context)
    events = now_events(page_view())
    microsoft.script = [(429, {"Retry-After": "3"}, b""), (200, {}, OK)]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs) == ("status_429", 3.0)
    assert await fwd.deliver(events) == Delivered()
    first, second = microsoft.requests
    assert first["body"] == second["body"]


# -- match keys ----------------------------------------------------------------------------


def keys_counted(metrics: Metrics, key: str) -> float:
    labels = {"forwarder": "microsoft", "key": key}
    return metrics.registry.get_sample_value("tagrelay_forwarder_match_keys_total", labels) or 0.0


async def test_match_keys_of_the_sent_events_are_counted(
    microsoft: Recorder, context: ForwarderContext
) -> None:
    cfg = config(base_url=microsoft.url.rstrip("/"), default_phone_country="US")
    fwd = MicrosoftForwarder(cfg, context)
    events = now_events(purchase(), denied_event(), page_view(), backend_lead())
    assert await fwd.deliver(events) == Delivered()
    expected = {
        "email": 2,  # the purchase and the backend lead
        "phone": 1,
        "name": 0,  # Microsoft takes no names or address
        "address": 0,
        "external_id": 2,
        "ip": 2,  # the purchase and the page view; not the event denying ad_user_data
        "user_agent": 3,
        "click_id": 2,  # the msclkid
        "browser_id": 3,  # the _uetvid, or the event's anonymousId
        "none": 0,
    }
    assert {key: keys_counted(context.metrics, key) for key in expected} == expected


# -- registry and config -------------------------------------------------------------------


def test_microsoft_is_registered_and_configured_from_yaml_keys() -> None:
    assert FORWARDERS["microsoft"] is MicrosoftForwarder
    cfg = config()
    assert cfg.requires_consent == ["ads"]
    assert (cfg.base_url, cfg.api_version) == ("https://capi.uet.microsoft.com", "v1")
    assert (cfg.data_provider, cfg.unmapped) == ("tagrelay", "custom")
    assert TOKEN not in repr(cfg)
    for bad in (
        {"uet_tag_id": "UET-187012345"},
        {"api_version": "1"},
        {"base_url": "https://capi.uet.microsoft.com/"},
        {"access_token": ""},
        {"data_provider": ""},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            config(**bad)
    fwd = offline(api_version="v2", base_url="http://127.0.0.1:9")
    [planned] = fwd.plan([page_view()], NOW).requests
    assert planned.request.url == f"http://127.0.0.1:9/v2/{TAG}/events"


def test_a_yaml_config_with_microsoft_validates() -> None:
    raw = {
        "keys": [{"id": "backend", "kind": "server", "key": "k"}],
        "forwarders": [
            {
                "id": "microsoft",
                "type": "microsoft",
                "uet_tag_id": TAG,
                "access_token": TOKEN,
                "events": {"Order Completed": "purchase"},
                "filter": {"exclude_types": ["page", "screen"]},
            }
        ],
    }
    [fwd] = Config.model_validate(raw).forwarders
    assert isinstance(fwd, MicrosoftConfig)
    assert fwd.events == {"Order Completed": "purchase"}


# -- end to end through the relay ----------------------------------------------------------


def microsoft_forwarder(url: str) -> dict[str, Any]:
    return {
        "id": "microsoft",
        "type": "microsoft",
        "uet_tag_id": TAG,
        "access_token": TOKEN,
        "base_url": url.rstrip("/"),
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
        "retry": FAST_RETRY,
    }


def checking_microsoft(seen: list[dict[str, Any]]) -> Callable[..., Any]:
    """A fake Microsoft that checks what the guide's "Core data schema requirements" say of
    each event and answers as Microsoft does with continueOnValidationError: 200 naming the
    invalid events by index (here, those whose eventName is "invalid")."""

    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"code": "Unauthorized"}}, status=401)
        body = await request.json()
        assert body["continueOnValidationError"] is True and body["dataProvider"]
        assert 1 <= len(body["data"]) <= 1000
        details = []
        for at, event in enumerate(body["data"]):
            seen.append(event)
            assert event["eventType"] in ("pageLoad", "custom")
            assert time.time() - 7 * 86_400 < event["eventTime"] <= time.time() + 60
            if event["eventType"] == "pageLoad":
                assert event["eventSourceUrl"].startswith("https://")
            else:
                assert event["eventName"]
            user = event["userData"]
            assert user.keys() & {"anonymousId", "externalId", "em", "ph", "msclkid"}
            for key in ("em", "ph"):
                assert key not in user or HEX64.fullmatch(user[key])
            if "msclkid" in user:
                assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", user["msclkid"])
            if event.get("eventName") == "invalid":
                details.append(
                    {
                        "index": at,
                        "propertyName": f"data[{at}].eventName",
                        "errorMessage": "'eventName' is refused by the test.",
                        "errorCode": "Refused",
                        "isWarning": False,
                    }
                )
        answer: dict[str, Any] = {"eventsReceived": len(body["data"]) - len(details)}
        if details:
            answer["error"] = {
                "code": "ValidationError",
                "message": "see details",
                "details": details,
            }
        return web.json_response(answer)

    return handle


def segment_order(
    message_id: str, consent: dict[str, str], event: str = "Order Completed"
) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "user-42",
        "anonymousId": "anon-42",
        "event": event,
        "messageId": message_id,
        "properties": {"order_id": "o-77", "revenue": 42.0, "currency": "USD"},
        "context": {
            "consent": consent,
            "traits": {"email": "buyer@contoso.com"},
            "userAgent": UA,
            "ip": "198.51.100.4",
            "page": {"url": f"https://www.shop.test/thanks?msclkid={MSCLKID}"},
        },
    }


async def test_an_order_reaches_microsoft_and_an_invalid_event_is_dead_lettered_alone(
    relay: Any,
) -> None:
    seen: list[dict[str, Any]] = []
    async with fake_server("Microsoft", {PATH: checking_microsoft(seen)}) as server:
        client = await relay(forwarders=[microsoft_forwarder(str(server.make_url("/")))])
        orders = [
            segment_order("order-denied", {"ads": "denied"}),
            segment_order("order-1", GRANTED),
            segment_order("order-bad", GRANTED, event="invalid"),
        ]
        sent = await client.post("/v1/batch", json={"batch": orders}, headers=basic(SERVER_KEY))
        assert sent.status == 200
        await wait_idle(client.app)
    assert [e["eventId"] for e in seen] == ["order-1", "order-bad"]
    order = seen[0]
    assert (order["eventName"], order["customData"]["value"]) == ("purchase", 42.0)
    assert order["userData"]["em"] == sha256_hex("buyer@contoso.com")
    assert order["userData"]["msclkid"] == MSCLKID_UUID
    app = client.app
    [dead] = await app[SPOOL].dead_letters("microsoft")
    assert dead.reason == "rejected_by_destination"
    assert (
        dead.detail == "Microsoft: data[1].eventName: 'eventName' is refused by the test. (Refused)"
    )
    consent = {"forwarder": "microsoft", "reason": "consent_denied"}
    assert metric_value(app, "tagrelay_forwarder_dropped_total", consent) == 1
    delivered = {"forwarder": "microsoft", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 1


async def test_an_unauthorized_answer_is_dead_lettered_through_the_relay(
    relay: Any, microsoft: Recorder
) -> None:
    client = await relay(forwarders=[microsoft_forwarder(microsoft.url)])
    microsoft.script = [(401, {}, UNAUTHORIZED)]
    sent = await client.post(
        "/v1/track", json=segment_order("order-3", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    assert len(microsoft.requests) == 1  # not retried
    [dead] = await client.app[SPOOL].dead_letters("microsoft")
    assert dead.reason == "microsoft_unauthorized"
    assert "You are not authorized" in dead.detail and TOKEN not in dead.detail


async def test_a_script_purchase_carries_the_uetvid_cookie_and_the_landing_click_id(
    relay: Any, microsoft: Recorder
) -> None:
    """The tracking script's path: ``_uetvid`` (set by the UET tag on the site's domain)
    comes with the request as a cookie; the ``msclkid`` of the landing URL is kept by the
    relay and attached to the later purchase."""
    client = await relay(forwarders=[microsoft_forwarder(microsoft.url)])
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
            "page": {"url": f"https://www.shop.test/?msclkid={MSCLKID}", "path": "/"},
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
    cookies = {"_uetvid": UETVID}
    for event in (landing, order):
        body = orjson.dumps({"writeKey": BROWSER_KEY, "batch": [event]})
        jar = "; ".join(f"{name}={value}" for name, value in cookies.items())
        resp = await client.post("/d", data=body, headers={**headers, "Cookie": jar})
        assert resp.status == 200
        for header in resp.headers.getall("Set-Cookie", []):
            name, _, rest = header.partition("=")
            cookies[name] = rest.split(";", 1)[0]
    await wait_idle(client.app)
    by_id = {e["eventId"]: e for e in sent_events(microsoft)}
    assert by_id["m-order"]["eventName"] == "purchase"
    assert by_id["m-order"]["userData"]["msclkid"] == MSCLKID_UUID
    assert by_id["m-order"]["userData"]["anonymousId"] == UETVID
    assert by_id["m-landing"]["eventType"] == "pageLoad"
