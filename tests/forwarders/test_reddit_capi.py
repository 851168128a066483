"""The reddit forwarder (Conversions API v3, v2.0 selectable): the exact requests a fake
Reddit receives (golden files under ``golden/reddit_capi/``, one per behaviour), the
metadata each tracking type takes, Reddit's answers classified (a 400 naming invalid events
dead-letters those and sends the others again), the match-key counts, and end to end
through the relay: an ``Order Completed`` reaches the fake Reddit with its ``messageId`` as
``conversion_id``, an event denying ``ads`` does not, and the tracking script's ``_rdt_uuid``
cookie and landing ``rdt_cid`` reach it as ``uuid`` and ``click_id``.

Regenerate the golden files after an intended change with ``TAGRELAY_UPDATE_GOLDEN=1``
(and read the diff)."""

from __future__ import annotations

import os
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
from tagrelay.forwarders.reddit_capi import (
    RedditConfig,
    RedditForwarder,
    classify_reddit_response,
    invalid_events,
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

GOLDEN = Path(__file__).parent / "golden" / "reddit_capi"
UPDATE = os.environ.get("TAGRELAY_UPDATE_GOLDEN") == "1"

PIXEL = "a2_gu5a8gq2hzbq"
TOKEN = "rdt-test/token+with=odd&chars"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WHEN = (NOW - timedelta(minutes=10)).isoformat()
WHEN_MS = int((NOW - timedelta(minutes=10)).timestamp() * 1000)
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari"
PATH = f"/api/v3/pixels/{PIXEL}/conversion_events"
V2_PATH = f"/api/v2.0/conversions/events/{PIXEL}"
RDT_CID = "3184742045291813272"
RDT_UUID = "1677712978045.b8f7eb7d-b357-437b-8bd3-e1c8166c7132"
FAST_RETRY = {"max_attempts": 10, "initial_backoff_secs": 0.01, "max_backoff_secs": 0.05}
OK = b'{"data": {"message": "Successfully processed 1 conversion events."}}'


def config(**overrides: Any) -> RedditConfig:
    raw = {"id": "reddit", "type": "reddit", "pixel_id": PIXEL, "access_token": TOKEN}
    return RedditConfig.model_validate({**raw, **overrides})


def offline(**overrides: Any) -> RedditForwarder:
    """A forwarder for planning only (no HTTP)."""
    context = ForwarderContext(Path("."), None, Metrics())  # type: ignore[arg-type]
    return RedditForwarder(config(**overrides), context)


def browser_context(**extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "consent": dict(GRANTED),
        "ip": "203.0.113.7",
        "userAgent": UA,
        "page": {
            "url": f"https://www.shop.test/checkout/done?rdt_cid={RDT_CID}",
            "referrer": "https://www.shop.test/cart",
        },
        "screen": {"width": 1512, "height": 982, "density": 2},
        "clientIds": {"_rdt_uuid": RDT_UUID, "_ttp": "not-for-reddit"},
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
                {"sku": "sku-2", "price": 25.5, "quantity": 1, "category": "Kitchen"},
                {"name": "Gift wrap", "price": 0},
            ],
        },
        "context": browser_context(
            traits={
                "email": " Jane.Doe+shop@Example.com ",
                "phone": "(650) 555-1212",
                "firstName": "Jane",
            },
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
        "timestamp": WHEN,
        "properties": {"video_id": "v-9", "value": 3, "currency": "USD"},
        "context": browser_context(),
    }


def lead() -> Event:
    return {
        "type": "track",
        "event": "Lead Generated",
        "messageId": "msg-lead-1",
        "timestamp": WHEN,
        "properties": {"value": 120, "currency": "USD", "products": [{"id": "plan-pro"}]},
        "context": {"consent": GRANTED, "traits": {"email": "lead@example.com"}},
    }


def hashed_email_event() -> Event:
    event = purchase("msg-hashed-1")
    event["context"]["traits"] = {"email": sha256_hex("janedoe@example.com").upper()}
    return event


def denied_event() -> Event:
    return purchase("msg-denied-1", consent={**GRANTED, "ad_user_data": "denied"})


CASES: dict[str, tuple[dict[str, Any], list[Event]]] = {
    "purchase_with_products_and_user_data": ({"default_phone_country": "US"}, [purchase()]),
    "page_visit": ({}, [page_view()]),
    "custom_event": ({}, [custom_event()]),
    "lead_from_a_backend": ({}, [lead()]),
    "ad_user_data_denied": ({}, [denied_event()]),
    "already_hashed_email": ({}, [hashed_email_event()]),
    "test_id": ({"test_id": "t2_testid42"}, [page_view()]),
    "limited_data_use": (
        {"limited_data_use": True, "limited_data_use_country": "US"},
        [page_view()],
    ),
    "v2_purchase": ({"api_version": "v2.0", "default_phone_country": "US"}, [purchase()]),
    "v2_custom_event_in_test_mode": (
        {"api_version": "v2.0", "test_id": "t2_testid42"},
        [custom_event()],
    ),
}


@pytest.fixture
async def reddit() -> AsyncIterator[Recorder]:
    async with recording_server("Reddit", [PATH, V2_PATH]) as rec:
        yield rec


def received(request: dict[str, Any]) -> dict[str, Any]:
    """What the fake Reddit got, without what the HTTP client adds by itself."""
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


def bodies(reddit: Recorder) -> list[dict[str, Any]]:
    return [orjson.loads(r["body"]) for r in reddit.requests]


def sent_events(reddit: Recorder) -> list[dict[str, Any]]:
    return [e for body in bodies(reddit) for e in body["data"]["events"]]


@pytest.mark.parametrize("case", sorted(CASES))
async def test_golden_requests(case: str, reddit: Recorder, context: ForwarderContext) -> None:
    overrides, events = CASES[case]
    fwd = RedditForwarder(config(base_url=reddit.url.rstrip("/"), **overrides), context)
    plan = fwd.plan(events, NOW)
    assert {r: n for r, n in plan.drops.items() if r in fwd.event_drop_reasons} == {}
    for planned in plan.requests:
        assert isinstance(await send(context.http, planned.request, 5.0), HttpResponse)
    [request] = [received(r) for r in reddit.requests]
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(request, option=orjson.OPT_INDENT_2) + b"\n")
    assert request == orjson.loads(path.read_bytes())


def golden(case: str) -> tuple[dict[str, Any], dict[str, Any]]:
    request = orjson.loads((GOLDEN / f"{case}.json").read_bytes())
    body = request["body"]
    [event] = body["data"]["events"] if "data" in body else body["events"]
    return request, event


def test_golden_files_pin_the_rules() -> None:
    """What the golden files show, said once more in words."""
    request, event = golden("purchase_with_products_and_user_data")
    assert (request["method"], request["path"], request["query"]) == ("POST", PATH, {})
    assert request["headers"] == {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json",
        "User-Agent": "tagrelay",  # Reddit throttles libraries' default user agents
    }
    assert set(request["body"]) == {"data"} and set(request["body"]["data"]) == {"events"}
    assert event == {
        "event_at": WHEN_MS,  # milliseconds
        "action_source": "WEBSITE",
        "type": {"tracking_type": "PURCHASE"},
        "event_source_url": f"https://www.shop.test/checkout/done?rdt_cid={RDT_CID}",
        "click_id": RDT_CID,
        "user": {
            # Reddit's email rule: dots and the +alias out of the local part
            "email": sha256_hex("janedoe@example.com"),
            "phone_number": sha256_hex("+16505551212"),  # E.164 with "+"
            "external_id": sha256_hex("User-42"),
            "ip_address": "203.0.113.7",
            "user_agent": UA,
            "uuid": RDT_UUID,
            "screen_dimensions": {"width": 1512, "height": 982},
        },
        "metadata": {
            "conversion_id": "msg-purchase-1",  # the messageId: the pixel's conversionId
            "currency": "EUR",
            "value": 65.5,
            "item_count": 4,  # 2 + 1 + 1 (the gift wrap, which has no id)
            "products": [
                {"id": "sku-1", "name": "Mug", "quantity": 2, "item_price": 20},
                {"id": "sku-2", "category": "Kitchen", "quantity": 1, "item_price": 25.5},
            ],
        },
    }

    _, page = golden("page_visit")
    assert page["type"] == {"tracking_type": "PAGE_VISIT"}
    assert page["metadata"] == {"conversion_id": "msg-page-1"}
    assert "uuid" not in page["user"] and "click_id" not in page
    _, custom = golden("custom_event")
    assert custom["type"] == {"tracking_type": "CUSTOM", "custom_event_name": "Video Played"}
    assert custom["metadata"] == {"conversion_id": "msg-video-1", "currency": "USD", "value": 3}
    _, backend = golden("lead_from_a_backend")
    # a backend's event: no page, user agent or screen; LEAD takes value but no item_count
    assert backend["user"] == {"email": sha256_hex("lead@example.com")}
    assert "event_source_url" not in backend
    assert backend["metadata"] == {
        "conversion_id": "msg-lead-1",
        "currency": "USD",
        "value": 120,
        "products": [{"id": "plan-pro"}],
    }
    _, denied = golden("ad_user_data_denied")
    # no hashed identifier and no IP; the ad interaction stays
    assert set(denied["user"]) == {"user_agent", "uuid", "screen_dimensions"}
    assert denied["click_id"] == RDT_CID
    _, hashed = golden("already_hashed_email")
    assert hashed["user"]["email"] == sha256_hex("janedoe@example.com")
    tested, _ = golden("test_id")
    assert tested["body"]["data"]["test_id"] == "t2_testid42"
    _, ldu = golden("limited_data_use")
    assert ldu["user"]["data_processing_options"] == {"modes": ["LDU"], "country": "US"}

    v2, old = golden("v2_purchase")
    assert v2["path"] == V2_PATH and set(v2["body"]) == {"events"}
    assert old["event_at"] == "2026-12-05T11:50:00.000Z"
    assert old["event_type"] == {"tracking_type": "Purchase"}
    assert "action_source" not in old and "event_source_url" not in old
    assert old["event_metadata"]["value_decimal"] == 65.5
    assert old["event_metadata"]["products"] == [
        {"id": "sku-1", "name": "Mug"},
        {"id": "sku-2", "category": "Kitchen"},
    ]
    assert old["user"] == event["user"]
    v2_test, v2_custom = golden("v2_custom_event_in_test_mode")
    assert v2_test["body"]["test_mode"] is True and "test_id" not in v2_test["body"]
    assert v2_custom["event_type"] == {
        "tracking_type": "Custom",
        "custom_event_name": "Video Played",
    }


# -- names, metadata, what is not sent ------------------------------------------------------


def planned_events(fwd: RedditForwarder, events: list[Event]) -> list[dict[str, Any]]:
    plan = fwd.plan(events, NOW)
    found = []
    for planned in plan.requests:
        body = orjson.loads(planned.request.body)
        found.extend(body["data"]["events"] if "data" in body else body["events"])
    return found


def named(name: str, message_id: str = "m-1", **properties: Any) -> Event:
    return {
        "type": "track",
        "event": name,
        "messageId": message_id,
        "timestamp": WHEN,
        "properties": properties,
        "context": {"consent": GRANTED},
    }


@pytest.mark.parametrize(
    ("name", "v3", "v2"),
    [
        ("Order Completed", "PURCHASE", "Purchase"),
        ("purchase", "PURCHASE", "Purchase"),  # GA4's name
        ("Product Added", "ADD_TO_CART", "AddToCart"),
        ("Product Added to Wishlist", "ADD_TO_WISHLIST", "AddToWishlist"),
        ("Product Viewed", "VIEW_CONTENT", "ViewContent"),
        ("Product List Viewed", "VIEW_CONTENT", "ViewContent"),
        ("Products Searched", "SEARCH", "Search"),
        ("view_search_results", "SEARCH", "Search"),
        ("Lead Generated", "LEAD", "Lead"),
        ("generate_lead", "LEAD", "Lead"),
        ("Signed Up", "SIGN_UP", "SignUp"),
        ("SIGN_UP", "SIGN_UP", "SignUp"),  # Reddit's own names, either spelling
        ("SignUp", "SIGN_UP", "SignUp"),
        ("PageVisit", "PAGE_VISIT", "PageVisit"),
    ],
)
def test_standard_events_in_each_versions_spelling(name: str, v3: str, v2: str) -> None:
    [new] = planned_events(offline(), [named(name)])
    [old] = planned_events(offline(api_version="v2.0"), [named(name)])
    assert new["type"] == {"tracking_type": v3}
    assert old["event_type"] == {"tracking_type": v2}


def test_events_reddit_has_no_standard_event_for_are_custom_or_skipped() -> None:
    names = ["Checkout Started", "Subscription Started", "Signed In", "Video Played"]
    events = [named(name, f"m-{i}") for i, name in enumerate(names)]
    sent = planned_events(offline(), events)
    assert [e["type"] for e in sent] == [
        {"tracking_type": "CUSTOM", "custom_event_name": name} for name in names
    ]
    plan = offline(unmapped="skip", events={"Demo Booked": "Lead"}).plan(
        [*events, named("Demo Booked", "m-demo")], NOW
    )
    [planned] = plan.requests
    [demo] = orjson.loads(planned.request.body)["data"]["events"]
    assert demo["type"] == {"tracking_type": "LEAD"}
    assert dict(plan.drops) == {"unmapped_event": 4}


def test_a_custom_event_name_is_cut_to_reddits_64_characters() -> None:
    name = "A very long custom event name that goes well past sixty-four characters"
    [event] = planned_events(offline(), [named(name)])
    assert event["type"]["custom_event_name"] == name[:64]


@pytest.mark.parametrize(
    ("name", "value", "item_count"),
    [
        ("Order Completed", True, True),
        ("Product Added", True, True),
        ("Product Added to Wishlist", True, True),
        ("Lead Generated", True, False),
        ("Signed Up", True, False),
        ("Products Searched", False, False),
        ("Product Viewed", False, False),
        ("Demo Watched", True, True),  # custom
    ],
)
def test_the_metadata_each_tracking_type_takes(name: str, value: bool, item_count: bool) -> None:
    properties = {"value": 10, "currency": "USD", "products": [{"id": "p-1", "quantity": 2}]}
    [event] = planned_events(offline(), [named(name, **properties)])
    metadata = event["metadata"]
    assert ("value" in metadata, "currency" in metadata) == (value, value)
    assert ("item_count" in metadata) == item_count
    assert metadata["products"] == [{"id": "p-1", "quantity": 2}]
    assert metadata["conversion_id"] == "m-1"


def test_what_is_not_sent_is_counted() -> None:
    old = purchase("m-old")
    old["timestamp"] = (NOW - timedelta(hours=168)).isoformat()
    nearly = purchase("m-167h")
    nearly["timestamp"] = (NOW - timedelta(hours=167)).isoformat()
    identify: Event = {"type": "identify", "messageId": "m-id", "traits": {"email": "a@b.co"}}
    bad = purchase("m-bad")
    bad["context"]["traits"] = {"email": "not-an-email", "phone": "12"}
    plan = offline().plan([old, nearly, identify, bad], NOW)
    [planned] = plan.requests
    assert planned.indices == (1, 3)
    assert dict(plan.drops) == {
        "too_old": 1,  # Reddit's limit: less than 168 hours old
        "not_a_conversion": 1,
        "invalid_email": 1,
        "invalid_phone": 2,  # "12", and a national number without default_phone_country
    }
    [_, sent] = orjson.loads(planned.request.body)["data"]["events"]
    assert "email" not in sent["user"] and "phone_number" not in sent["user"]


def test_screen_dimensions_only_when_both_are_whole_numbers() -> None:
    for screen in ({"width": 0, "height": 5}, {"width": "1512", "height": 982}, {"width": 3.5}):
        event = page_view()
        event["context"]["screen"] = screen
        [sent] = planned_events(offline(), [event])
        assert "screen_dimensions" not in sent["user"]


def test_at_most_1000_events_per_request_and_one_in_test_mode() -> None:
    events = [{**page_view(), "messageId": f"m-{i}"} for i in range(2001)]
    assert [len(p.indices) for p in offline().plan(events, NOW).requests] == [1000, 1000, 1]
    tested = offline(test_id="t2_x").plan(events[:3], NOW).requests
    assert [p.indices for p in tested] == [(0,), (1,), (2,)]


# -- Reddit's answers ----------------------------------------------------------------------

INVALID = orjson.dumps(
    {
        "message": "There were 1 invalid conversion events. None were processed.",
        "invalid_events": [
            {
                "error_message": "event_at timestamp must be less than 168h0m0s old",
                "event": {
                    "metadata": {"conversion_id": "m-2"},
                    "user": {"ip_address": "203.0.113.7"},
                },
            }
        ],
    }
)


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (200, OK, Delivered, None),
        (200, b"", Delivered, None),
        (400, INVALID, Dead, "reddit_invalid_events"),
        (400, b'{"error": {"code": 400, "message": "missing action_source"}}', Dead,
         "reddit_invalid_request"),
        (400, b"Bad Request", Dead, "reddit_invalid_request"),
        (401, b'{"error": {"reason": "UNAUTHORIZED", "explanation": "bad token"}}', Dead,
         "reddit_unauthorized"),
        (401, b"No bearer token provided", Dead, "reddit_unauthorized"),
        (403, b'{"error": {"code": 403, "message": "You\'re not authorized"}}', Dead,
         "reddit_forbidden"),
        (404, b"", Dead, "reddit_error"),
        (429, b'{"message": "Too many requests/events within timeframe."}', Retry, "status_429"),
        (500, b'{"message": "The service is currently unavailable."}', Retry, "status_5xx"),
        (502, b"<html>bad gateway</html>", Retry, "status_5xx"),
        (408, b"", Retry, "status_408"),
    ],
)  # fmt: skip
def test_answer_classification(status: int, body: bytes, kind: type, reason: str | None) -> None:
    outcome = classify_reddit_response(HttpResponse(status, {"Retry-After": "3"}, body))
    assert isinstance(outcome, kind)
    if reason is not None:
        assert outcome.reason == reason  # type: ignore[union-attr]
    if isinstance(outcome, Retry):
        assert outcome.after_secs == 3.0


def test_a_dead_letter_carries_reddits_words_but_not_the_echoed_events() -> None:
    outcome = classify_reddit_response(HttpResponse(400, {}, INVALID))
    assert outcome == Dead(
        "reddit_invalid_events",
        "HTTP 400: Reddit: There were 1 invalid conversion events. None were processed.; "
        "event_at timestamp must be less than 168h0m0s old",
    )
    unauthorized = b'{"success": false, "error": {"reason": "UNAUTHORIZED", "explanation": "x"}}'
    assert classify_reddit_response(HttpResponse(401, {}, unauthorized)) == Dead(
        "reddit_unauthorized", "HTTP 401: Reddit: UNAUTHORIZED: x"
    )
    assert invalid_events({"data": {"invalid_events": [{"error_message": "bad"}]}}) == [
        (None, "bad")
    ]


def now_events(*events: Event) -> list[Event]:
    at = datetime.now(UTC).isoformat()
    return [{**e, "timestamp": at} for e in events]


async def test_an_invalid_event_is_dead_lettered_and_the_others_are_sent_again(
    reddit: Recorder, context: ForwarderContext
) -> None:
    fwd = RedditForwarder(config(base_url=reddit.url.rstrip("/")), context)
    batch = now_events(page_view("m-1"), page_view("m-2"), page_view("m-3"))
    reddit.script = [(400, {}, INVALID), (200, {}, OK)]
    # Reddit took none of them: the others go again at once, in the same delivery
    assert await fwd.deliver(batch) == Delivered(
        rejected={1: "Reddit: event_at timestamp must be less than 168h0m0s old"}
    )
    sent = [[e["metadata"]["conversion_id"] for e in b["data"]["events"]] for b in bodies(reddit)]
    assert sent == [["m-1", "m-2", "m-3"], ["m-1", "m-3"]]
    assert keys_counted(context.metrics, "user_agent") == 2  # the two Reddit took


async def test_an_invalid_event_reddit_does_not_point_at_is_found_one_by_one(
    reddit: Recorder, context: ForwarderContext
) -> None:
    fwd = RedditForwarder(config(base_url=reddit.url.rstrip("/")), context)
    batch = now_events(page_view("m-1"), page_view("m-2"), page_view("m-3"))
    vague = b'{"message": "There were 1 invalid conversion events.", "invalid_events": [{}]}'
    reddit.script = [(400, {}, vague), (200, {}, OK), (400, {}, vague), (200, {}, OK)]
    assert isinstance(await fwd.deliver(batch), Retry)
    outcome = await fwd.deliver(batch)
    assert outcome == Delivered(rejected={1: "Reddit: invalid"})
    assert [len(b["data"]["events"]) for b in bodies(reddit)] == [3, 1, 1, 1]
    # the next batch goes in one request again
    reddit.script = [(200, {}, OK)]
    assert await fwd.deliver(now_events(page_view("m-4"), page_view("m-5"))) == Delivered()
    assert len(bodies(reddit)[-1]["data"]["events"]) == 2


async def test_named_and_unnamed_invalid_events_in_one_answer(
    context: ForwarderContext,
) -> None:
    """The event Reddit names by its conversion id is dead-lettered and the others go again
    at once; the one it names without pointing at it is then found by sending them one
    per request."""
    seen: list[list[str]] = []

    async def handle(request: web.Request) -> web.Response:
        ids = [e["metadata"]["conversion_id"] for e in (await request.json())["data"]["events"]]
        seen.append(ids)
        invalid: list[dict[str, Any]] = []
        if "m-2" in ids:
            invalid.append(
                {"error_message": "too old", "event": {"metadata": {"conversion_id": "m-2"}}}
            )
        if "m-3" in ids:
            invalid.append({"error_message": "bad user"})  # no event echoed
        if invalid:
            return web.json_response({"invalid_events": invalid}, status=400)
        return web.json_response({"data": {"message": "ok"}})

    async with fake_server("Reddit", {PATH: handle}) as server:
        base_url = str(server.make_url("")).rstrip("/")
        fwd = RedditForwarder(config(base_url=base_url), context)
        batch = now_events(*(page_view(f"m-{i}") for i in range(1, 5)))
        first = await fwd.deliver(batch)
        assert isinstance(first, Retry) and first.after_secs == 0.0
        assert seen == [["m-1", "m-2", "m-3", "m-4"], ["m-1", "m-3", "m-4"]]
        assert await fwd.deliver(batch) == Delivered(
            rejected={1: "Reddit: too old", 2: "Reddit: bad user"}
        )
    assert sorted(seen[2:]) == [["m-1"], ["m-2"], ["m-3"], ["m-4"]]


async def test_a_request_of_invalid_events_only_dead_letters_them_without_resending(
    reddit: Recorder, context: ForwarderContext
) -> None:
    fwd = RedditForwarder(config(base_url=reddit.url.rstrip("/")), context)
    both = orjson.dumps(
        {
            "invalid_events": [
                {"error_message": "bad one", "event": {"metadata": {"conversion_id": "m-1"}}},
                {"error_message": "bad two", "event": {"metadata": {"conversion_id": "m-2"}}},
            ]
        }
    )
    reddit.script = [(400, {}, both)]
    outcome = await fwd.deliver(now_events(page_view("m-1"), page_view("m-2")))
    assert outcome == Delivered(rejected={0: "Reddit: bad one", 1: "Reddit: bad two"})
    assert len(reddit.requests) == 1


async def test_an_unauthorized_answer_dead_letters_the_batch_without_the_token(
    reddit: Recorder, context: ForwarderContext
) -> None:
    fwd = RedditForwarder(config(base_url=reddit.url.rstrip("/")), context)
    answer = {"error": {"reason": "UNAUTHORIZED", "explanation": f"token {TOKEN} is invalid"}}
    reddit.script = [(401, {}, orjson.dumps(answer))]
    outcome = await fwd.deliver(now_events(page_view()))
    assert isinstance(outcome, Dead) and outcome.reason == "reddit_unauthorized"
    assert TOKEN not in outcome.detail
    assert outcome.detail == "HTTP 401: Reddit: UNAUTHORIZED: token *** is invalid"


async def test_a_rate_limit_is_retried_after_reddits_wait_and_sent_again(
    reddit: Recorder, context: ForwarderContext
) -> None:
    fwd = RedditForwarder(config(base_url=reddit.url.rstrip("/")), context)
    events = now_events(page_view())
    limited = b'{"message": "Too many requests/events within timeframe."}'
    reddit.script = [(429, {"Retry-After": "2"}, limited), (200, {}, OK)]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs) == ("status_429", 2.0)
    assert "Too many requests" in outcome.detail
    assert await fwd.deliver(events) == Delivered()
    first, second = reddit.requests
    assert first["body"] == second["body"]


# -- match keys ----------------------------------------------------------------------------


def keys_counted(metrics: Metrics, key: str) -> float:
    labels = {"forwarder": "reddit", "key": key}
    return metrics.registry.get_sample_value("tagrelay_forwarder_match_keys_total", labels) or 0.0


async def test_match_keys_of_the_sent_events_are_counted(
    reddit: Recorder, context: ForwarderContext
) -> None:
    cfg = config(base_url=reddit.url.rstrip("/"), default_phone_country="US")
    fwd = RedditForwarder(cfg, context)
    backend: Event = named("Signed Up", "m-backend")
    assert await fwd.deliver(now_events(purchase(), denied_event(), page_view(), backend)) == (
        Delivered()
    )
    expected = {
        "email": 1,
        "phone": 1,
        "name": 0,  # Reddit takes no names
        "external_id": 1,
        "ip": 2,  # not the event denying ad_user_data
        "user_agent": 3,
        "click_id": 2,  # the rdt_cid
        "browser_id": 2,  # the _rdt_uuid (a _ttp is not Reddit's)
        "none": 1,  # the backend event
    }
    assert {key: keys_counted(context.metrics, key) for key in expected} == expected


# -- registry and config -------------------------------------------------------------------


def test_reddit_is_registered_and_configured_from_yaml_keys() -> None:
    assert FORWARDERS["reddit"] is RedditForwarder
    cfg = config()
    assert cfg.requires_consent == ["ads"]
    assert (cfg.base_url, cfg.api_version) == ("https://ads-api.reddit.com", "v3")
    assert (cfg.unmapped, cfg.action_source, cfg.test_id) == ("custom", "WEBSITE", None)
    assert TOKEN not in repr(cfg)
    for bad in (
        {"pixel_id": "not a pixel"},
        {"api_version": "v2"},
        {"base_url": "https://ads-api.reddit.com/"},
        {"action_source": "website"},
        {"limited_data_use_region": "California"},
        {"access_token": ""},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            config(**bad)
    fwd = offline(base_url="http://127.0.0.1:9", api_version="v2.0")
    [planned] = fwd.plan([page_view()], NOW).requests
    assert planned.request.url == f"http://127.0.0.1:9{V2_PATH}"


def test_a_yaml_config_with_reddit_validates() -> None:
    raw = {
        "keys": [{"id": "backend", "kind": "server", "key": "k"}],
        "forwarders": [
            {
                "id": "reddit",
                "type": "reddit",
                "pixel_id": PIXEL,
                "access_token": TOKEN,
                "events": {"Demo Booked": "LEAD"},
                "test_id": "t2_testid42",
                "limited_data_use": True,
                "limited_data_use_region": "US-CA",
            }
        ],
    }
    [fwd] = Config.model_validate(raw).forwarders
    assert isinstance(fwd, RedditConfig)
    assert (fwd.events, fwd.limited_data_use_region) == ({"Demo Booked": "LEAD"}, "US-CA")


# -- end to end through the relay ----------------------------------------------------------


def reddit_forwarder(url: str) -> dict[str, Any]:
    return {
        "id": "reddit",
        "type": "reddit",
        "pixel_id": PIXEL,
        "access_token": TOKEN,
        "base_url": url.rstrip("/"),
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
        "retry": FAST_RETRY,
    }


def segment_order(message_id: str, consent: dict[str, str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "user-42",
        "event": "Order Completed",
        "messageId": message_id,
        "properties": {"order_id": "o-77", "revenue": 42.0, "currency": "USD", **properties},
        "context": {
            "consent": consent,
            "traits": {"email": "buyer@example.com"},
            "userAgent": UA,
            "ip": "198.51.100.4",
            "page": {"url": f"https://www.shop.test/thanks?rdt_cid={RDT_CID}"},
        },
    }


def checking_reddit(bad: set[str], seen: list[list[str]]) -> Callable[..., Any]:
    """A fake Reddit that checks what destinations.md §8 says a v3 request must be and
    refuses, as Reddit does, a whole request for the events whose conversion_id is in
    ``bad``."""

    async def handle(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        body = await request.json()
        events = body["data"]["events"]
        assert 1 <= len(events) <= 1000
        for event in events:
            assert isinstance(event["event_at"], int) and event["event_at"] > 10**12
            assert event["action_source"] == "WEBSITE"
            assert event["type"]["tracking_type"] in {"PURCHASE", "PAGE_VISIT", "CUSTOM"}
        ids = [e["metadata"]["conversion_id"] for e in events]
        seen.append(ids)
        invalid = [
            {"error_message": f"{cid} is invalid", "event": e}
            for cid, e in zip(ids, events, strict=True)
            if cid in bad
        ]
        if invalid:
            message = f"There were {len(invalid)} invalid conversion events. None were processed."
            return web.json_response({"message": message, "invalid_events": invalid}, status=400)
        return web.json_response({"data": {"message": f"Successfully processed {len(ids)}"}})

    return handle


async def test_an_order_reaches_reddit_and_an_invalid_one_is_dead_lettered_alone(
    relay: Any,
) -> None:
    seen: list[list[str]] = []
    async with fake_server("Reddit", {PATH: checking_reddit({"order-bad"}, seen)}) as server:
        client = await relay(forwarders=[reddit_forwarder(str(server.make_url("/")))])
        auth = basic(SERVER_KEY)
        orders = [
            segment_order("order-denied", {"ads": "denied"}),
            segment_order("order-1", GRANTED),
            segment_order("order-bad", GRANTED),
            segment_order("order-2", GRANTED),
        ]
        sent = await client.post("/v1/batch", json={"batch": orders}, headers=auth)
        assert sent.status == 200
        await wait_idle(client.app)
    assert seen == [["order-1", "order-bad", "order-2"], ["order-1", "order-2"]]
    app = client.app
    [dead] = await app[SPOOL].dead_letters("reddit")
    assert dead.reason == "rejected_by_destination"
    assert dead.detail == "Reddit: order-bad is invalid"
    consent = {"forwarder": "reddit", "reason": "consent_denied"}
    assert metric_value(app, "tagrelay_forwarder_dropped_total", consent) == 1
    delivered = {"forwarder": "reddit", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 2
    # the others went again at once, not as a retry of the batch
    retried = {"forwarder": "reddit", "reason": "reddit_invalid_events"}
    assert metric_value(app, "tagrelay_forwarder_retries_total", retried) == 0


async def test_an_unauthorized_answer_is_dead_lettered_through_the_relay(
    relay: Any, reddit: Recorder
) -> None:
    client = await relay(forwarders=[reddit_forwarder(reddit.url)])
    answer = {"error": {"reason": "UNAUTHORIZED", "explanation": "Invalid conversion token"}}
    reddit.script = [(401, {}, orjson.dumps(answer))]
    sent = await client.post(
        "/v1/track", json=segment_order("order-3", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    assert len(reddit.requests) == 1  # not retried
    [dead] = await client.app[SPOOL].dead_letters("reddit")
    assert dead.reason == "reddit_unauthorized"
    assert "Invalid conversion token" in dead.detail and TOKEN not in dead.detail


async def test_a_script_purchase_carries_the_rdt_uuid_cookie_and_the_landing_click_id(
    relay: Any, reddit: Recorder
) -> None:
    """The tracking script's path: ``_rdt_uuid`` (set by Reddit's pixel on the site's
    domain) comes with the request as a cookie; the ``rdt_cid`` of the landing URL is kept
    by the relay and attached to the later purchase."""
    client = await relay(forwarders=[reddit_forwarder(reddit.url)])
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
            "page": {"url": f"https://www.shop.test/?rdt_cid={RDT_CID}", "path": "/"},
            "screen": {"width": 390, "height": 844, "density": 3},
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
    cookies = {"_rdt_uuid": RDT_UUID}
    for event in (landing, order):
        body = orjson.dumps({"writeKey": BROWSER_KEY, "batch": [event]})
        jar = "; ".join(f"{name}={value}" for name, value in cookies.items())
        resp = await client.post("/d", data=body, headers={**headers, "Cookie": jar})
        assert resp.status == 200
        for header in resp.headers.getall("Set-Cookie", []):
            name, _, rest = header.partition("=")
            cookies[name] = rest.split(";", 1)[0]
    await wait_idle(client.app)
    by_id = {e["metadata"]["conversion_id"]: e for e in sent_events(reddit)}
    assert by_id["m-order"]["type"] == {"tracking_type": "PURCHASE"}
    assert by_id["m-order"]["click_id"] == RDT_CID
    assert by_id["m-order"]["user"]["uuid"] == RDT_UUID
    assert by_id["m-landing"]["type"] == {"tracking_type": "PAGE_VISIT"}
    assert by_id["m-landing"]["user"]["screen_dimensions"] == {"width": 390, "height": 844}
