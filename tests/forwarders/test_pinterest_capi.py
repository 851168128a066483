"""The pinterest forwarder (Pinterest Conversions API v5): the exact requests a fake Pinterest
receives (golden files under ``golden/pinterest_capi/``, one per behaviour), Pinterest's
normalization rules as its API spec words them, Pinterest's answers classified (per-event
failures dead-letter only those events), the match-key counts, and end to end through the
relay to a fake Pinterest that checks the Bearer token and the payload as Pinterest's spec
describes it: the tracking script's purchase arrives with its ``epik`` click id and
``event_id`` = its ``messageId``; an event denying ``ads`` or ``ad_user_data`` does not; a
rate limit is retried, a refused token dead-lettered without the token; ``test_mode`` sends
``?test=true``.

Regenerate the golden files after an intended change with ``TAGRELAY_UPDATE_GOLDEN=1``
(and read the diff)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
from tagrelay.forwarders._user_data import UserData, prepare, sha256_hex
from tagrelay.forwarders.pinterest_capi import (
    STANDARD_EVENTS,
    PinterestConfig,
    PinterestForwarder,
    classify_pinterest_response,
)
from tagrelay.metrics import Metrics
from tagrelay.model import Dead, Delivered, Event, Retry
from tests.support import (
    BROWSER_KEY,
    SERVER_KEY,
    basic,
    fake_server,
    metric_value,
    wait_idle,
)

GOLDEN = Path(__file__).parent / "golden" / "pinterest_capi"
UPDATE = os.environ.get("TAGRELAY_UPDATE_GOLDEN") == "1"

ACCOUNT = "549755885175"
TOKEN = "pina-test/token+with=odd&chars"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WHEN = (NOW - timedelta(minutes=10)).isoformat()
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
PATH = f"/v5/ad_accounts/{ACCOUNT}/events"
EPIK = "dj0yJnU9b2JDcFFHekV4SHJNcmVrbFBkUEdqakh0akdUT1VjVVUmcD0yJm49cnNBQ3F2Q2dOVDBX"
EPIK_COOKIE = "dj0yJnU9Q29va2llU2V0QnlUaGVUYWcmcD0yJm49c2V0QnlUaGVUYWc"
FAST_RETRY = {"max_attempts": 10, "initial_backoff_secs": 0.01, "max_backoff_secs": 0.05}


def processed(*statuses: str, **messages: str) -> bytes:
    """Pinterest's 200 answer: one result per event, in the request's order."""
    events = [
        {
            "status": status,
            "error_message": messages.get(f"error{i}"),
            "warning_message": messages.get(f"warning{i}"),
        }
        for i, status in enumerate(statuses)
    ]
    return orjson.dumps(
        {
            "num_events_received": len(statuses),
            "num_events_processed": statuses.count("processed"),
            "events": events,
        }
    )


def config(**overrides: Any) -> PinterestConfig:
    raw = {"id": "pinterest", "type": "pinterest", "ad_account_id": ACCOUNT, "access_token": TOKEN}
    return PinterestConfig.model_validate({**raw, **overrides})


def offline(**overrides: Any) -> PinterestForwarder:
    """A forwarder for planning only (no HTTP)."""
    context = ForwarderContext(Path("."), None, Metrics())  # type: ignore[arg-type]
    return PinterestForwarder(config(**overrides), context)


def browser_context(**extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "consent": dict(GRANTED),
        "ip": "203.0.113.7",
        "userAgent": UA,
        "locale": "en-US",
        "page": {"url": "https://www.shop.test/checkout/done"},
        "clickIds": {"epik": EPIK},
        "clientIds": {"_epik": EPIK_COOKIE, "fbp": "fb.1.2.3"},
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
            "currency": "usd",
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
            ],
        },
        "context": browser_context(
            traits={
                "email": " Jane.Doe@Example.com ",
                "phone": "(650) 555-1212",
                "firstName": "Jane",
                "lastName": "Doe",
                "gender": "non-binary",
                "birthday": "1990-02-16",
                "address": {
                    "city": "San Francisco",
                    "state": "California",
                    "postalCode": "94103-1234",
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
        "context": browser_context(page={"url": "https://www.shop.test/"}, clickIds={}),
    }


def search() -> Event:
    return {
        "type": "track",
        "event": "Products Searched",
        "messageId": "msg-search-1",
        "timestamp": WHEN,
        "properties": {"query": " blue mugs "},
        "context": browser_context(clickIds={}, clientIds={}),
    }


def custom_event() -> Event:
    return {
        "type": "track",
        "event": "Video Played",
        "messageId": "msg-video-1",
        "timestamp": WHEN,
        "properties": {"video_id": "v-9", "email": "viewer@example.com"},
        "context": browser_context(clickIds={}),
    }


def personalization_denied() -> Event:
    event = page_view()
    event["messageId"] = "msg-page-2"
    event["context"]["consent"] = {**GRANTED, "ad_personalization": "denied"}
    return event


def hashed_email_event() -> Event:
    event = purchase("msg-hashed-1")
    event["context"]["traits"] = {"email": sha256_hex("jane.doe@example.com").upper()}
    return event


def denied_event() -> Event:
    return purchase("msg-denied-1", consent={**GRANTED, "ad_user_data": "denied"})


CASES: dict[str, tuple[dict[str, Any], list[Event]]] = {
    "purchase_with_user_data_and_click_id": ({"default_phone_country": "US"}, [purchase()]),
    "page_view_with_the_epik_cookie": ({}, [page_view()]),
    "search_with_query": ({}, [search()]),
    "custom_event": ({}, [custom_event()]),
    "ad_personalization_denied_opts_out": ({}, [personalization_denied()]),
    "already_hashed_email": ({}, [hashed_email_event()]),
    "test_mode": ({"test_mode": True}, [page_view()]),
    "limited_data_processing": ({"limited_data_processing": True}, [page_view()]),
}


@dataclass
class FakePinterest:
    """A fake Pinterest Conversions API: checks the Bearer token and each event the way
    Pinterest's spec describes them (P1, destinations.md §7), records every request, answers
    every event processed (or failed, with Pinterest's reason), or from ``script``."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    script: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if self.script:
            status, headers, text = self.script.pop(0)
            return web.Response(status=status, headers=headers, body=text)
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {TOKEN}":
            given = auth.removeprefix("Bearer ")
            answer = {"code": 2, "message": f"Authentication failed for token {given}."}
            return web.json_response(answer, status=401)
        parsed = orjson.loads(body)
        if not isinstance(parsed.get("data"), list) or not 1 <= len(parsed["data"]) <= 1000:
            return web.json_response({"code": 1, "message": "data: 1 to 1,000 events"}, status=400)
        results = []
        for event in parsed["data"]:
            problems = pinterest_problems(event)
            self.problems.extend(problems)
            failed = {"status": "failed", "error_message": "; ".join(problems)}
            results.append(failed if problems else {"status": "processed"})
        return web.json_response(
            {
                "num_events_received": len(results),
                "num_events_processed": sum(r["status"] == "processed" for r in results),
                "events": results,
            }
        )


HEX64 = re.compile(r"[0-9a-f]{64}")
HASHED = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id")
PLAIN = ("client_ip_address", "client_user_agent", "click_id")


def pinterest_problems(event: dict[str, Any]) -> list[str]:
    """What Pinterest's spec says an event must be (P1), checked."""
    problems = []
    name = event.get("event_name")
    if not isinstance(name, str) or not name:
        problems.append("event_name required")
    if event.get("action_source") not in ("app_android", "app_ios", "web", "offline"):
        problems.append("action_source")
    if not isinstance(event.get("event_time"), int) or event["event_time"] > 2_000_000_000:
        problems.append("event_time must be Unix seconds")
    if not isinstance(event.get("event_id"), str):
        problems.append("event_id required")
    user = event.get("user_data", {})
    for key, value in user.items():
        if key in HASHED:
            if not (isinstance(value, list) and all(HEX64.fullmatch(v) for v in value)):
                problems.append(f"{key} must be an array of SHA-256 hex")
        elif key not in PLAIN or not isinstance(value, str):
            problems.append(f"user_data.{key}")
    if not ("em" in user or (PLAIN[0] in user and PLAIN[1] in user)):
        problems.append("em, or client_ip_address and client_user_agent, required")
    custom = event.get("custom_data", {})
    if "value" in custom and not isinstance(custom["value"], str):
        problems.append("value must be a string")
    for content in custom.get("contents", []):
        if not isinstance(content.get("item_price", ""), str):
            problems.append("item_price must be a string")
        if not isinstance(content.get("quantity", 0), int):
            problems.append("quantity must be an integer")
    return problems


@pytest.fixture
async def pinterest() -> AsyncIterator[FakePinterest]:
    fake = FakePinterest()
    async with fake_server("Pinterest", {PATH: fake.handle}) as server:
        fake.url = str(server.make_url("/")).rstrip("/")
        yield fake


def received(request: dict[str, Any]) -> dict[str, Any]:
    """What the fake Pinterest got, without what the HTTP client adds by itself."""
    return {
        "method": request["method"],
        "path": request["path"],
        "query": request["query"],
        "headers": {
            name: request["headers"].get(name) for name in ("Authorization", "Content-Type")
        },
        "body": orjson.loads(request["body"]),
    }


# -- golden requests -------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
async def test_golden_requests(
    case: str, pinterest: FakePinterest, context: ForwarderContext
) -> None:
    overrides, events = CASES[case]
    fwd = PinterestForwarder(config(base_url=pinterest.url, **overrides), context)
    plan = fwd.plan(events, NOW)
    assert dict(plan.drops) == {}
    for planned in plan.requests:
        response = await send(context.http, planned.request, 5.0)
        assert isinstance(response, HttpResponse)
        assert fwd.classify(planned, response) == Delivered(), pinterest.problems
    [request] = [received(r) for r in pinterest.requests]
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(request, option=orjson.OPT_INDENT_2) + b"\n")
    assert request == orjson.loads(path.read_bytes())


def golden(case: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((GOLDEN / f"{case}.json").read_bytes())
    return loaded


def test_golden_files_pin_the_rules() -> None:
    """What the golden files show, said once more in words."""
    request = golden("purchase_with_user_data_and_click_id")
    assert (request["path"], request["query"]) == (PATH, {})
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    [event] = request["body"]["data"]
    assert (event["event_name"], event["action_source"]) == ("checkout", "web")
    assert event["event_id"] == "msg-purchase-1"
    assert event["event_time"] == int((NOW - timedelta(minutes=10)).timestamp())
    assert (event["event_source_url"], event["language"]) == (
        "https://www.shop.test/checkout/done",
        "en",
    )
    assert "opt_out" not in event
    user = event["user_data"]
    assert user["em"] == [sha256_hex("jane.doe@example.com")]
    assert user["ph"] == [sha256_hex("16505551212")]
    assert (user["fn"], user["ln"]) == ([sha256_hex("jane")], [sha256_hex("doe")])
    assert user["ge"] == [sha256_hex("n")]
    assert user["db"] == [sha256_hex("19900216")]
    assert user["ct"] == [sha256_hex("sanfrancisco")]
    assert user["st"] == [sha256_hex("ca")]
    assert user["zp"] == [sha256_hex("941031234")]
    assert user["country"] == [sha256_hex("us")]
    assert user["external_id"] == [sha256_hex("User-42")]
    assert (user["client_ip_address"], user["client_user_agent"]) == ("203.0.113.7", UA)
    assert user["click_id"] == EPIK  # the landing URL's epik wins over the _epik cookie
    custom = event["custom_data"]
    assert (custom["value"], custom["currency"], custom["order_id"]) == (
        "65.5",
        "USD",
        "order-1001",
    )
    assert custom["content_ids"] == ["sku-1", "sku-2"]
    assert custom["contents"] == [
        {
            "id": "sku-1",
            "item_price": "20",
            "quantity": 2,
            "item_name": "Mug",
            "item_category": "Kitchen",
            "item_brand": "Acme",
        },
        {"id": "sku-2", "item_price": "25.5", "quantity": 1},
    ]
    assert custom["num_items"] == 3
    [page] = golden("page_view_with_the_epik_cookie")["body"]["data"]
    assert (page["event_name"], page["user_data"]["click_id"]) == ("page_visit", EPIK_COOKIE)
    [searched] = golden("search_with_query")["body"]["data"]
    assert (searched["event_name"], searched["custom_data"]) == (
        "search",
        {"search_string": "blue mugs"},
    )
    [custom_sent] = golden("custom_event")["body"]["data"]
    assert custom_sent["event_name"] == "Video Played"  # an advertiser-defined event
    assert "custom_data" not in custom_sent  # the properties may hold personal data
    [opted_out] = golden("ad_personalization_denied_opts_out")["body"]["data"]
    assert opted_out["opt_out"] is True
    hashed = golden("already_hashed_email")["body"]["data"][0]["user_data"]
    assert hashed["em"] == [sha256_hex("jane.doe@example.com")]
    assert golden("test_mode")["query"] == {"test": "true"}
    [ldp] = golden("limited_data_processing")["body"]["data"]
    assert ldp["custom_data"] == {"opt_out_type": "LDP"}


# -- Pinterest's normalization rules ---------------------------------------------------------


def pinterest_hash(field: str, raw: str, default_phone_country: str | None = None) -> str | None:
    data = UserData(**{field: raw})
    prepared = prepare(data, "pinterest", default_phone_country=default_phone_country)
    return prepared.values.get(field)  # type: ignore[call-overload]


def test_pinterests_rules_as_its_spec_words_them() -> None:
    # pinterest/pinterest-python-generated-api-client, docs/ConversionEventsUserData.md (the
    # API spec's words); Pinterest prints no hashes, so they are computed from the normalized
    # forms the words give.
    # em: "Sha256 hashes of lowercase version of user's email addresses".
    assert pinterest_hash("email", " Jane.Doe@Example.COM ") == sha256_hex("jane.doe@example.com")
    # ph: "only digits with country code, area code, and number. Remove any symbols,
    # letters, spaces and leading zeros."
    for raw in ("+1 (650) 555-1212", "001-650-555-1212", "1.650.555.1212"):
        assert pinterest_hash("phone", raw) == sha256_hex("16505551212")
    assert pinterest_hash("phone", "0650 555 1212", "US") is None  # not a US number
    # ge: "Either "f" or "m" or "n" for non-binary gender", in lowercase.
    assert [pinterest_hash("gender", g) for g in ("Female", "M", "nonbinary")] == [
        sha256_hex("f"),
        sha256_hex("m"),
        sha256_hex("n"),
    ]
    # fn, ln: "in lowercase"; ct: "in lowercase, and without spaces or punctuation".
    assert pinterest_hash("first_name", "JANE") == sha256_hex("jane")
    assert pinterest_hash("city", "St. Paul") == sha256_hex("stpaul")
    # st: "a two-letter code in lowercase"; zp: "only digits"; country: "two-character
    # ISO-3166 country code ... in lowercase".
    assert pinterest_hash("state", "MN") == sha256_hex("mn")
    assert pinterest_hash("zip", "55101-1234") == sha256_hex("551011234")
    assert pinterest_hash("country", "US") == sha256_hex("us")


# -- what is sent and what is not ------------------------------------------------------------


def test_what_is_not_sent_is_counted() -> None:
    fwd = offline()
    backend: Event = {
        "type": "track",
        "event": "Signed Up",
        "messageId": "m-1",
        "userId": "u-1",
        "timestamp": WHEN,
        "context": {"consent": GRANTED, "traits": {"phone": "+16505551212"}},
    }
    old = purchase("m-2")
    old["timestamp"] = (NOW - timedelta(days=61)).isoformat()
    identify: Event = {"type": "identify", "messageId": "m-3", "traits": {"email": "a@b.co"}}
    plan = fwd.plan([denied_event(), backend, old, identify], NOW)
    assert plan.requests == []
    assert dict(plan.drops) == {
        "no_user_data": 2,  # neither an email nor IP + user agent: Pinterest requires one
        "too_old": 1,
        "not_a_conversion": 1,
    }
    recent = purchase("m-4")
    recent["timestamp"] = (NOW - timedelta(days=59)).isoformat()
    assert [p.indices for p in fwd.plan([recent], NOW).requests] == [(0,)]
    skip = offline(unmapped="skip").plan([custom_event()], NOW)
    assert dict(skip.drops) == {"unmapped_event": 1}


def test_without_ad_user_data_no_identifier_leaves_and_pinterest_cannot_match() -> None:
    for option, drop in (("send_without", "no_user_data"), ("skip", "ad_user_data_denied")):
        plan = offline(ad_user_data_denied=option).plan([denied_event()], NOW)
        assert (plan.requests, dict(plan.drops)) == ([], {drop: 1})


def test_pinterest_event_names_pass_and_standard_events_map() -> None:
    fwd = offline(events={"Demo Booked": "lead"})
    names = ["watch_video", "Demo Booked", "Checkout Started", "Subscription Started", "contact"]
    events = [{**custom_event(), "event": name, "messageId": f"m-{name}"} for name in names]
    [planned] = fwd.plan(events, NOW).requests
    sent = [e["event_name"] for e in orjson.loads(planned.request.body)["data"]]
    assert sent == ["watch_video", "lead", "initiate_checkout", "subscribe", "contact"]
    assert set(sent) <= STANDARD_EVENTS


def test_at_most_1000_events_per_request() -> None:
    events = [{**page_view(), "messageId": f"m-{i}"} for i in range(2001)]
    plan = offline().plan(events, NOW)
    assert [len(p.indices) for p in plan.requests] == [1000, 1000, 1]


# -- Pinterest's answers ---------------------------------------------------------------------


def error(code: int, message: str) -> bytes:
    return orjson.dumps({"code": code, "message": message})


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (200, processed("processed", "processed"), Delivered, None),
        (200, b"", Delivered, None),
        (400, error(1, "Invalid parameters."), Dead, "pinterest_invalid"),
        (401, error(2, "Authentication failed."), Dead, "pinterest_invalid_token"),
        (403, error(29, "You are not permitted to access that resource."), Dead, None),
        (404, error(2601, "Ad account not found."), Dead, "pinterest_error"),
        (429, error(8, "Rate limit exceeded."), Retry, "status_429"),
        (503, error(0, "The endpoint has been ramped down."), Retry, "status_5xx"),
        (500, b"<html>oops</html>", Retry, "status_5xx"),
        (400, b"not json", Dead, "status_4xx"),
    ],
)
def test_answer_classification(status: int, body: bytes, kind: type, reason: str | None) -> None:
    outcome = classify_pinterest_response(HttpResponse(status, {}, body), 2)
    assert isinstance(outcome, kind)
    expected = reason or "pinterest_permission"
    if kind is not Delivered:
        assert outcome.reason == expected  # type: ignore[union-attr]


def test_per_event_failures_are_rejected_one_by_one() -> None:
    body = processed("processed", "failed", "failed", error1="Event time is too old.")
    outcome = classify_pinterest_response(HttpResponse(200, {}, body), 3)
    assert outcome == Delivered(
        rejected={
            1: "pinterest_event_failed: Event time is too old.",
            2: "pinterest_event_failed: event failed",
        }
    )
    # Results that do not line up with the request's events name none of them.
    assert classify_pinterest_response(HttpResponse(200, {}, body), 4) == Delivered()


def test_a_dead_letter_carries_pinterests_words() -> None:
    outcome = classify_pinterest_response(HttpResponse(400, {}, error(1, "Invalid body.")), 1)
    assert outcome == Dead("pinterest_invalid", "HTTP 400: Pinterest code 1: Invalid body.")
    retry = classify_pinterest_response(
        HttpResponse(429, {"Retry-After": "7"}, error(8, "Rate limit exceeded.")), 1
    )
    assert retry == Retry("status_429", "HTTP 429: Pinterest code 8: Rate limit exceeded.", 7.0)


async def test_failed_events_are_dead_letters_and_the_rest_delivered(
    pinterest: FakePinterest, context: ForwarderContext
) -> None:
    fwd = PinterestForwarder(config(base_url=pinterest.url), context)
    now = datetime.now(UTC).isoformat()
    events = [{**page_view(), "messageId": f"m-{i}", "timestamp": now} for i in range(3)]
    reason = "Event 1: click_id is malformed."
    pinterest.script = [(200, {}, processed("processed", "failed", "processed", error1=reason))]
    outcome = await fwd.deliver(events)
    assert outcome == Delivered(rejected={1: f"pinterest_event_failed: {reason}"})


async def test_warnings_are_logged_without_personal_data_or_the_token(
    pinterest: FakePinterest, context: ForwarderContext, caplog: pytest.LogCaptureFixture
) -> None:
    fwd = PinterestForwarder(config(base_url=pinterest.url), context)
    events = [{**page_view(), "timestamp": datetime.now(UTC).isoformat()}]
    warning = f"client_ip_address 203.0.113.7 and em jane@example.com look odd ({TOKEN})"
    pinterest.script = [(200, {}, processed("processed", warning0=warning))]
    with caplog.at_level(logging.WARNING, "tagrelay.forwarders.pinterest_capi"):
        assert await fwd.deliver(events) == Delivered()
    [record] = caplog.records
    assert record.getMessage() == "pinterest took events with warnings"
    detail = record.__dict__["detail"]
    assert detail == "client_ip_address *** and em *** look odd (***)"


async def test_a_refused_token_dead_letters_the_batch_without_the_token(
    pinterest: FakePinterest, context: ForwarderContext
) -> None:
    wrong = "pina-revoked/token+x"
    fwd = PinterestForwarder(config(base_url=pinterest.url, access_token=wrong), context)
    outcome = await fwd.deliver([{**page_view(), "timestamp": datetime.now(UTC).isoformat()}])
    assert outcome == Dead(
        "pinterest_invalid_token",
        "HTTP 401: Pinterest code 2: Authentication failed for token ***.",
    )


async def test_a_rate_limit_is_retried_and_the_retry_is_sent_again(
    pinterest: FakePinterest, context: ForwarderContext
) -> None:
    fwd = PinterestForwarder(config(base_url=pinterest.url), context)
    events = [{**page_view(), "timestamp": datetime.now(UTC).isoformat()}]
    pinterest.script = [(429, {"Retry-After": "30"}, error(8, "Rate limit exceeded."))]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs) == ("status_429", 30.0)
    assert await fwd.deliver(events) == Delivered()
    first, second = pinterest.requests
    assert first["body"] == second["body"]


# -- match keys ------------------------------------------------------------------------------


def keys_counted(metrics: Metrics, key: str) -> float:
    labels = {"forwarder": "pinterest", "key": key}
    return metrics.registry.get_sample_value("tagrelay_forwarder_match_keys_total", labels) or 0.0


async def test_match_keys_of_the_events_pinterest_took_are_counted(
    pinterest: FakePinterest, context: ForwarderContext
) -> None:
    fwd = PinterestForwarder(config(base_url=pinterest.url, default_phone_country="US"), context)
    now = datetime.now(UTC).isoformat()
    events = [
        {**purchase(), "timestamp": now},
        {**page_view(), "timestamp": now},
        {**search(), "timestamp": now},
    ]
    pinterest.script = [(200, {}, processed("processed", "processed", "failed"))]
    assert await fwd.deliver(events) == Delivered(
        rejected={2: "pinterest_event_failed: event failed"}
    )
    expected = {
        "email": 1,
        "phone": 1,
        "name": 1,
        "address": 1,
        "external_id": 1,
        "ip": 2,  # not the search Pinterest refused
        "user_agent": 2,
        "click_id": 2,  # the purchase's epik, the page view's _epik cookie
        "browser_id": 0,  # an fbp is not Pinterest's
        "none": 0,
    }
    assert {key: keys_counted(context.metrics, key) for key in expected} == expected


# -- registry and config ---------------------------------------------------------------------


def test_pinterest_is_registered_and_configured_from_yaml_keys() -> None:
    assert FORWARDERS["pinterest"] is PinterestForwarder
    cfg = config()
    assert cfg.requires_consent == ["ads"]
    assert (cfg.base_url, cfg.api_version) == ("https://api.pinterest.com", "v5")
    assert (cfg.unmapped, cfg.test_mode, cfg.limited_data_processing) == ("custom", False, False)
    assert TOKEN not in repr(cfg)
    assert config(ad_account_id=f" {ACCOUNT} ").ad_account_id == ACCOUNT
    for bad in (
        {"ad_account_id": "act_123"},
        {"ad_account_id": "../events"},
        {"api_version": "5"},
        {"access_token": ""},
        {"base_url": "api.pinterest.com"},
        {"default_phone_country": "us"},
        {"test": True},  # unknown keys are refused: the option is test_mode
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            config(**bad)


def test_a_yaml_config_with_pinterest_validates() -> None:
    raw = {
        "keys": [{"id": "backend", "kind": "server", "key": "k"}],
        "forwarders": [
            {
                "id": "pinterest",
                "type": "pinterest",
                "ad_account_id": ACCOUNT,
                "access_token": TOKEN,
                "events": {"Demo Booked": "lead"},
                "test_mode": True,
            }
        ],
    }
    [fwd] = Config.model_validate(raw).forwarders
    assert isinstance(fwd, PinterestConfig)
    assert (fwd.events, fwd.test_mode) == ({"Demo Booked": "lead"}, True)


# -- end to end through the relay ------------------------------------------------------------


def pinterest_forwarder(url: str, **options: Any) -> dict[str, Any]:
    return {
        "id": "pinterest",
        "type": "pinterest",
        "ad_account_id": ACCOUNT,
        "access_token": TOKEN,
        "base_url": url,
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
        "retry": FAST_RETRY,
        **options,
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
            "page": {"url": f"https://www.shop.test/thanks?epik={EPIK}"},
        },
    }


async def test_a_script_purchase_carries_the_landing_epik_and_its_message_id(
    relay: Any, pinterest: FakePinterest
) -> None:
    """The tracking script's path: the ``epik`` of the landing URL is kept by the relay and
    attached to the later purchase; the Pinterest Tag's ``_epik`` cookie comes with the
    request and stands in for it where no landing was seen."""
    client = await relay(forwarders=[pinterest_forwarder(pinterest.url)])
    headers = {
        "Origin": "https://www.shop.test",
        "Host": "data.shop.test",
        "Content-Type": "text/plain",
    }
    browsing = {
        "type": "page",
        "anonymousId": "visitor-1",
        "messageId": "m-before-landing",
        "context": {"consent": GRANTED, "page": {"url": "https://www.shop.test/", "path": "/"}},
    }
    landing = {
        "type": "page",
        "anonymousId": "visitor-1",
        "messageId": "m-landing",
        "context": {
            "consent": GRANTED,
            "page": {"url": f"https://www.shop.test/?epik={EPIK}", "path": "/"},
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
            "traits": {"email": "buyer@example.com"},
        },
    }
    cookies = {"_epik": EPIK_COOKIE}
    for event in (browsing, landing, order):
        body = orjson.dumps({"writeKey": BROWSER_KEY, "batch": [event]})
        jar = "; ".join(f"{name}={value}" for name, value in cookies.items())
        resp = await client.post("/d", data=body, headers={**headers, "Cookie": jar})
        assert resp.status == 200
        for header in resp.headers.getall("Set-Cookie", []):
            name, _, rest = header.partition("=")
            cookies[name] = rest.split(";", 1)[0]
    await wait_idle(client.app)
    assert pinterest.problems == []
    sent = [e for r in pinterest.requests for e in orjson.loads(r["body"])["data"]]
    by_id = {e["event_id"]: e for e in sent}
    assert by_id["m-before-landing"]["user_data"]["click_id"] == EPIK_COOKIE
    assert by_id["m-order"]["event_name"] == "checkout"
    assert by_id["m-order"]["user_data"]["click_id"] == EPIK
    assert by_id["m-order"]["user_data"]["em"] == [sha256_hex("buyer@example.com")]
    assert by_id["m-order"]["custom_data"] == {"currency": "USD", "value": "10", "order_id": "o-9"}
    assert all(r["headers"]["Authorization"] == f"Bearer {TOKEN}" for r in pinterest.requests)


async def test_consent_ads_denied_is_not_sent_and_ad_user_data_denied_carries_nothing(
    relay: Any, pinterest: FakePinterest
) -> None:
    client = await relay(forwarders=[pinterest_forwarder(pinterest.url)])
    auth = basic(SERVER_KEY)
    orders = [
        segment_order("order-ads-denied", {"ads": "denied"}),
        segment_order("order-user-data-denied", {**GRANTED, "ad_user_data": "denied"}),
        segment_order("order-1", GRANTED),
    ]
    for order in orders:
        assert (await client.post("/v1/track", json=order, headers=auth)).status == 200
    await wait_idle(client.app)
    [request] = pinterest.requests
    [event] = orjson.loads(request["body"])["data"]
    assert event["event_id"] == "order-1"
    assert event["user_data"]["click_id"] == EPIK
    assert b"order-user-data-denied" not in request["body"]
    app = client.app
    for reason in ("consent_denied", "no_user_data"):
        labels = {"forwarder": "pinterest", "reason": reason}
        assert metric_value(app, "tagrelay_forwarder_dropped_total", labels) == 1, reason
    delivered = {"forwarder": "pinterest", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 1


async def test_a_failed_event_is_dead_lettered_alone_through_the_relay(
    relay: Any, pinterest: FakePinterest
) -> None:
    client = await relay(forwarders=[pinterest_forwarder(pinterest.url)])
    reason = "Event 0: order_id is too long."
    pinterest.script = [(200, {}, processed("failed", "processed", error0=reason))]
    auth = basic(SERVER_KEY)
    batch = {"batch": [{**segment_order(f"order-{i}", GRANTED), "type": "track"} for i in (5, 6)]}
    assert (await client.post("/v1/batch", json=batch, headers=auth)).status == 200
    await wait_idle(client.app)
    app = client.app
    [dead] = await app[SPOOL].dead_letters("pinterest")
    assert (dead.reason, dead.detail) == (
        "rejected_by_destination",
        f"pinterest_event_failed: {reason}",
    )
    delivered = {"forwarder": "pinterest", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 1


async def test_a_rate_limit_is_retried_then_delivered_through_the_relay(
    relay: Any, pinterest: FakePinterest
) -> None:
    client = await relay(forwarders=[pinterest_forwarder(pinterest.url)])
    pinterest.script = [(429, {"Retry-After": "0"}, error(8, "Rate limit exceeded."))]
    sent = await client.post(
        "/v1/track", json=segment_order("order-2", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    first, second = pinterest.requests
    assert first["body"] == second["body"]
    app = client.app
    retried = {"forwarder": "pinterest", "reason": "status_429"}
    assert metric_value(app, "tagrelay_forwarder_retries_total", retried) == 1
    assert await app[SPOOL].dead_letters("pinterest") == []


async def test_a_refused_token_is_dead_lettered_with_pinterests_message_and_no_token(
    relay: Any, pinterest: FakePinterest, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "pina-expired/token+y"
    client = await relay(forwarders=[pinterest_forwarder(pinterest.url, access_token=wrong)])
    sent = await client.post(
        "/v1/track", json=segment_order("order-3", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    assert len(pinterest.requests) == 1  # not retried
    app = client.app
    [dead] = await app[SPOOL].dead_letters("pinterest")
    assert dead.reason == "pinterest_invalid_token"
    assert "Authentication failed for token ***." in dead.detail
    assert wrong not in dead.detail
    assert wrong not in caplog.text
    labels = {"forwarder": "pinterest", "reason": "pinterest_invalid_token"}
    assert metric_value(app, "tagrelay_dead_letters_total", labels) == 1


async def test_test_mode_marks_every_request_as_a_test_through_the_relay(
    relay: Any, pinterest: FakePinterest
) -> None:
    client = await relay(forwarders=[pinterest_forwarder(pinterest.url, test_mode=True)])
    sent = await client.post(
        "/v1/track", json=segment_order("order-4", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    [request] = pinterest.requests
    assert request["query"] == {"test": "true"}
    assert pinterest.problems == []
