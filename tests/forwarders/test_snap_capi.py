"""The snapchat forwarder (Snap Conversions API v3): the exact requests a fake Snap receives
(golden files under ``golden/snap_capi/``, one per behaviour), Snap's own normalization
examples, Snap's answers classified, the match-key counts, and end to end through the relay
to a fake Snap that checks the access token and the payload as Snap documents it: the
tracking script's purchase arrives with its ``ScCid`` click id, the ``_scid`` cookie and
``event_id`` = its ``messageId``; an event denying ``ads`` or ``ad_user_data`` does not; a
rate limit is retried, a refused token dead-lettered without the token; ``validate_only``
goes to the validate endpoint and dead-letters only the events Snap finds invalid.

Regenerate the golden files after an intended change with ``TAGRELAY_UPDATE_GOLDEN=1``
(and read the diff)."""

from __future__ import annotations

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
from tagrelay.forwarders.snap_capi import (
    STANDARD_EVENTS,
    SnapConfig,
    SnapForwarder,
    classify_snap_response,
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

GOLDEN = Path(__file__).parent / "golden" / "snap_capi"
UPDATE = os.environ.get("TAGRELAY_UPDATE_GOLDEN") == "1"

PIXEL = "5d8e3f1a-2b4c-4d6e-8f90-1a2b3c4d5e6f"
TOKEN = "snap-test/token+with=odd&chars"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WHEN = (NOW - timedelta(minutes=10)).isoformat()
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"
PATH = f"/v3/{PIXEL}/events"
VALIDATE_PATH = f"/v3/{PIXEL}/events/validate"
SCCID = "9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b"
SCID = "b7e4c1d2-3a4b-4c5d-8e9f-0a1b2c3d4e5f"
FAST_RETRY = {"max_attempts": 10, "initial_backoff_secs": 0.01, "max_backoff_secs": 0.05}
VALID = orjson.dumps({"status": "VALID", "reason": "Request received."})


def config(**overrides: Any) -> SnapConfig:
    raw = {"id": "snapchat", "type": "snapchat", "pixel_id": PIXEL, "access_token": TOKEN}
    return SnapConfig.model_validate({**raw, **overrides})


def offline(**overrides: Any) -> SnapForwarder:
    """A forwarder for planning only (no HTTP)."""
    context = ForwarderContext(Path("."), None, Metrics())  # type: ignore[arg-type]
    return SnapForwarder(config(**overrides), context)


def browser_context(**extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "consent": dict(GRANTED),
        "ip": "203.0.113.7",
        "userAgent": UA,
        "page": {
            "url": "https://www.shop.test/checkout/done",
            "referrer": "https://www.shop.test/cart",
        },
        "clickIds": {"ScCid": SCCID},
        "clientIds": {"_scid": SCID, "fbp": "fb.1.2.3"},
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
                {"product_id": "sku-1", "price": 20, "quantity": 2, "brand": "Acme"},
                {"sku": "sku-2", "price": 25.5, "quantity": 1},
            ],
        },
        "context": browser_context(
            traits={
                "email": " Person@Example.com ",
                "phone": "+44 844 412 4653",
                "firstName": "Raphaël",
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
        "context": browser_context(page={"url": "https://www.shop.test/"}, clickIds={}),
    }


def search() -> Event:
    return {
        "type": "track",
        "event": "Products Searched",
        "messageId": "msg-search-1",
        "timestamp": WHEN,
        "properties": {"query": " blue mugs "},
        "context": browser_context(clientIds={}),
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


def hashed_email_event() -> Event:
    event = purchase("msg-hashed-1")
    event["context"]["traits"] = {"email": sha256_hex("person@example.com").upper()}
    return event


def denied_event() -> Event:
    return purchase("msg-denied-1", consent={**GRANTED, "ad_user_data": "denied"})


CASES: dict[str, tuple[dict[str, Any], list[Event]]] = {
    "purchase_with_user_data_click_id_and_cookie": (
        {"default_phone_country": "US"},
        [purchase()],
    ),
    "page_view": ({}, [page_view()]),
    "search_with_query": ({}, [search()]),
    "custom_event_mapped_to_custom_event_1": (
        {"events": {"Video Played": "CUSTOM_EVENT_1"}},
        [custom_event()],
    ),
    "already_hashed_email": ({}, [hashed_email_event()]),
    "validate_only": ({"validate_only": True}, [page_view()]),
}


@dataclass
class FakeSnap:
    """A fake Snap Conversions API: checks the access token and each event the way Snap's
    pages describe them (destinations.md §6), records every request, answers VALID, or from
    ``script`` when set."""

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
        if request.query.get("access_token") != TOKEN:
            given = request.query.get("access_token", "")
            answer = {"status": "INVALID", "reason": f"Invalid access token: {given}"}
            return web.json_response(answer, status=401)
        problems = snap_problems(orjson.loads(body))
        self.problems.extend(problems)
        if problems:
            answer = {"status": "INVALID", "reason": "; ".join(problems)}
            return web.json_response(answer, status=400)
        return web.Response(status=200, body=VALID, content_type="application/json")


HEX64 = re.compile(r"[0-9a-f]{64}")
HASHED = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id")
PLAIN = ("client_ip_address", "client_user_agent", "sc_click_id", "sc_cookie1")


def snap_problems(body: Any) -> list[str]:
    """What Snap's pages say a v3 request must be (S2, S3), checked."""
    problems = []
    events = body.get("data") if isinstance(body, dict) else None
    if not isinstance(events, list) or not 1 <= len(events) <= 2000:
        return ["data must hold 1 to 2,000 events"]
    for i, event in enumerate(events):
        if event.get("event_name") not in STANDARD_EVENTS:
            problems.append(f"{i}: event_name {event.get('event_name')!r}")
        if not isinstance(event.get("event_time"), int) or event["event_time"] > 2_000_000_000:
            problems.append(f"{i}: event_time must be Unix seconds")
        if event.get("action_source") != "WEB" or not event.get("event_id"):
            problems.append(f"{i}: action_source WEB and event_id required")
        user = event.get("user_data", {})
        for key, value in user.items():
            if key in HASHED:
                if not (isinstance(value, list) and all(HEX64.fullmatch(v) for v in value)):
                    problems.append(f"{i}: {key} must be SHA-256 hex")
            elif key not in PLAIN:
                problems.append(f"{i}: unknown user_data.{key}")
        if not ("em" in user or "ph" in user or (PLAIN[0] in user and PLAIN[1] in user)):
            problems.append(f"{i}: em, ph, or client_ip_address and client_user_agent")
        custom = event.get("custom_data", {})
        for content in custom.get("contents", []):
            if not all(isinstance(v, str) for v in content.values()):
                problems.append(f"{i}: contents are strings")
    return problems


@pytest.fixture
async def snap() -> AsyncIterator[FakeSnap]:
    fake = FakeSnap()
    routes = {PATH: fake.handle, VALIDATE_PATH: fake.handle}
    async with fake_server("Snap", routes) as server:
        fake.url = str(server.make_url("/")).rstrip("/")
        yield fake


def received(request: dict[str, Any]) -> dict[str, Any]:
    """What the fake Snap got, without what the HTTP client adds by itself."""
    return {
        "method": request["method"],
        "path": request["path"],
        "query": request["query"],
        "headers": {"Content-Type": request["headers"].get("Content-Type")},
        "body": orjson.loads(request["body"]),
    }


# -- golden requests -------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
async def test_golden_requests(case: str, snap: FakeSnap, context: ForwarderContext) -> None:
    overrides, events = CASES[case]
    fwd = SnapForwarder(config(base_url=snap.url, **overrides), context)
    plan = fwd.plan(events, NOW)
    assert dict(plan.drops) == {}
    for planned in plan.requests:
        response = await send(context.http, planned.request, 5.0)
        assert isinstance(response, HttpResponse) and response.status == 200, snap.problems
    [request] = [received(r) for r in snap.requests]
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
    request = golden("purchase_with_user_data_click_id_and_cookie")
    assert (request["path"], request["query"]) == (PATH, {"access_token": TOKEN})
    [event] = request["body"]["data"]
    assert event["event_name"] == "PURCHASE"
    assert event["event_id"] == "msg-purchase-1"
    assert event["event_time"] == int((NOW - timedelta(minutes=10)).timestamp())
    assert (event["action_source"], event["event_source_url"]) == (
        "WEB",
        "https://www.shop.test/checkout/done",
    )
    user = event["user_data"]
    assert user["em"] == [sha256_hex("person@example.com")]
    assert user["ph"] == [sha256_hex("448444124653")]
    assert user["fn"] == [sha256_hex("raphaël")]
    assert user["ln"] == [sha256_hex("obrien")]
    assert user["ge"] == [sha256_hex("f")]
    assert user["db"] == [sha256_hex("19900216")]
    assert user["ct"] == [sha256_hex("menlopark")]
    assert user["st"] == [sha256_hex("ca")]
    assert user["zp"] == [sha256_hex("94025")]
    assert user["country"] == [sha256_hex("us")]
    assert user["external_id"] == [sha256_hex("User-42")]
    assert (user["client_ip_address"], user["client_user_agent"]) == ("203.0.113.7", UA)
    assert (user["sc_click_id"], user["sc_cookie1"]) == (SCCID, SCID)
    custom = event["custom_data"]
    assert (custom["value"], custom["currency"], custom["order_id"]) == (65.5, "EUR", "order-1001")
    assert custom["content_ids"] == ["sku-1", "sku-2"]
    assert custom["contents"] == [
        {"id": "sku-1", "quantity": "2", "item_price": "20", "brand": "Acme"},
        {"id": "sku-2", "quantity": "1", "item_price": "25.5"},
    ]
    assert custom["num_items"] == 3
    [searched] = golden("search_with_query")["body"]["data"]
    assert (searched["event_name"], searched["custom_data"]) == (
        "SEARCH",
        {"search_string": "blue mugs"},
    )
    [page] = golden("page_view")["body"]["data"]
    assert page["event_name"] == "PAGE_VIEW"
    assert "sc_click_id" not in page["user_data"]
    [mapped] = golden("custom_event_mapped_to_custom_event_1")["body"]["data"]
    assert mapped["event_name"] == "CUSTOM_EVENT_1"
    assert "custom_data" not in mapped  # the properties may hold personal data
    hashed = golden("already_hashed_email")["body"]["data"][0]["user_data"]
    assert hashed["em"] == [sha256_hex("person@example.com")]
    assert golden("validate_only")["path"] == VALIDATE_PATH


# -- Snap's own normalization examples -------------------------------------------------------


def snap_hash(field: str, raw: str, default_phone_country: str | None = None) -> str | None:
    data = UserData(**{field: raw})
    prepared = prepare(data, "snapchat", default_phone_country=default_phone_country)
    return prepared.values.get(field)  # type: ignore[call-overload]


def test_snaps_published_examples() -> None:
    # Snap, Conversions API "Parameters" (developers.snap.com/api/marketing-api/
    # Conversions-API/Parameters): inputs and "Hashed Output" as printed there.
    assert snap_hash("email", "Person@Example.com") == (
        "542d240129883c019e106e3b1b2d3f3cb3537c43c425364de8e951d5a3083345"
    )
    assert snap_hash("phone", "+44 844 412 4653") == (
        "dc008fda46e2e64002cf2f82a4906236282d431c4f75e5b60bfe79fc48546383"
    )
    assert snap_hash("first_name", "John") == (
        "96d9632f363564cc3032521409cf22a852f2032eec099ed5967c0d000cec607a"
    )
    assert snap_hash("first_name", "Raphaël") == (
        "e74bb89e718fe1e19c422a48382870399f8bf7ca8dfa008739e75b0be76627b7"
    )


def test_snaps_business_sdk_examples() -> None:
    # Snapchat/business-sdk-go, capi_hash_test.go: every way of writing one US number (its
    # SDK assumes +1) normalizes to 14472342344, pinned there as this hash.
    us = "34053b331d29734f081bf74160cd33bc2f621b3b6f8ec991500bebf49f14e014"
    for raw in ("447-234-2344", "4472342344", "(447)-234-2344", "447 234-2344"):
        assert snap_hash("phone", raw, "US") == us
    for raw in ("+1-447-234-2344", "+1-(447) 234 2344"):
        assert snap_hash("phone", raw) == us
    # Its email example, trimmed and lowercased (NormAndHashStr).
    assert snap_hash("email", "    test123@example.com  ") == (
        "20b82517b67108ed3a171539dc5dd1da605660249b02f38dd70f572a545c7d18"
    )
    # Its UK vectors show the leading 00 and the national 0 removed; their digits
    # (+44 447 ...) are no UK number, which the layer never sends, so the same rules are
    # checked here on the valid number of Snap's page.
    page = "dc008fda46e2e64002cf2f82a4906236282d431c4f75e5b60bfe79fc48546383"
    for raw in ("0044-844-412-4653", "+44-0844-412-4653", "+44 0844 412 4653"):
        assert snap_hash("phone", raw) == page
    assert snap_hash("phone", "+44-447-234-2344") is None


# -- what is sent and what is not ------------------------------------------------------------


def test_what_is_not_sent_is_counted() -> None:
    fwd = offline()
    backend: Event = {
        "type": "track",
        "event": "Signed Up",
        "messageId": "m-1",
        "userId": "u-1",
        "timestamp": WHEN,
        "context": {"consent": GRANTED},
    }
    old = purchase("m-2")
    old["timestamp"] = (NOW - timedelta(days=38)).isoformat()
    identify: Event = {"type": "identify", "messageId": "m-3", "traits": {"email": "a@b.co"}}
    unmapped = custom_event()
    plan = fwd.plan([denied_event(), backend, old, identify, unmapped], NOW)
    assert plan.requests == []
    assert dict(plan.drops) == {
        "no_user_data": 2,  # no email, phone or IP + user agent: Snap cannot match them
        "too_old": 1,
        "not_a_conversion": 1,
        "unmapped_event": 1,  # Snap takes only its own event names
    }
    recent = purchase("m-4")
    recent["timestamp"] = (NOW - timedelta(days=36)).isoformat()
    assert [p.indices for p in fwd.plan([recent], NOW).requests] == [(0,)]


def test_without_ad_user_data_an_event_with_an_email_still_carries_no_identifier() -> None:
    """``ad_user_data`` denied: no hashed identifier and no IP leave, whatever the event
    holds; Snap then has nothing to match on, so the event is not sent at all."""
    fwd = offline(ad_user_data_denied="send_without")
    event = denied_event()
    event["context"]["traits"] = {"email": "person@example.com", "phone": "+16505551212"}
    plan = fwd.plan([event], NOW)
    assert (plan.requests, dict(plan.drops)) == ([], {"no_user_data": 1})
    skip = offline(ad_user_data_denied="skip").plan([event], NOW)
    assert dict(skip.drops) == {"ad_user_data_denied": 1}


def test_snap_event_names_pass_and_events_map_the_rest() -> None:
    fwd = offline(events={"Demo Booked": "CUSTOM_EVENT_2"})
    names = [
        track_named("SAVE"),
        track_named("demo booked"),
        track_named("Trial Started"),
        track_named("Form Submitted"),
    ]
    plan = fwd.plan(names, NOW)
    [planned] = plan.requests
    sent = [e["event_name"] for e in orjson.loads(planned.request.body)["data"]]
    assert sent == ["SAVE", "CUSTOM_EVENT_2", "START_TRIAL"]
    assert dict(plan.drops) == {"unmapped_event": 1}  # a lead: Snap has no such event


def track_named(name: str) -> Event:
    return {**custom_event(), "event": name, "messageId": f"m-{name}"}


def test_at_most_2000_events_per_request() -> None:
    events = [{**page_view(), "messageId": f"m-{i}"} for i in range(4001)]
    plan = offline().plan(events, NOW)
    assert [len(p.indices) for p in plan.requests] == [2000, 2000, 1]


# -- Snap's answers --------------------------------------------------------------------------


def snap_answer(status: str, reason: str = "", **fields: Any) -> bytes:
    return orjson.dumps({"status": status, "reason": reason, **fields})


INVALID = snap_answer(
    "INVALID",
    "Invalid request",
    errors={"codes": ["E0201"], "error_msgs": ["event_time is too old"]},
    event=1,
)


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (200, VALID, Delivered, None),
        (200, b"", Delivered, None),
        (200, INVALID, Dead, "snapchat_invalid"),
        (400, INVALID, Dead, "snapchat_invalid"),
        (401, snap_answer("INVALID", "Unauthorized"), Dead, "snapchat_invalid_token"),
        (403, snap_answer("INVALID", "Forbidden"), Dead, "snapchat_permission"),
        (404, snap_answer("INVALID", "Unknown pixel"), Dead, "snapchat_invalid"),
        (429, snap_answer("INVALID", "Rate limited"), Retry, "status_429"),
        (500, snap_answer("INVALID", "Internal"), Retry, "status_5xx"),
        (502, b"<html>bad gateway</html>", Retry, "status_5xx"),
        (400, b"not json", Dead, "status_4xx"),
    ],
)
def test_answer_classification(status: int, body: bytes, kind: type, reason: str | None) -> None:
    outcome = classify_snap_response(HttpResponse(status, {}, body), 2)
    assert isinstance(outcome, kind)
    if reason is not None:
        assert outcome.reason == reason  # type: ignore[union-attr]


def test_a_dead_letter_carries_snaps_words() -> None:
    outcome = classify_snap_response(HttpResponse(400, {}, INVALID), 2)
    assert outcome == Dead(
        "snapchat_invalid",
        "HTTP 400: Snap INVALID: Invalid request; E0201: event_time is too old; event 1",
    )


def test_a_rate_limit_waits_for_retry_after() -> None:
    answer = snap_answer("INVALID", "Too many requests")
    outcome = classify_snap_response(HttpResponse(429, {"Retry-After": "12"}, answer), 1)
    assert outcome == Retry("status_429", "HTTP 429: Snap INVALID: Too many requests", 12.0)


def validate_logs(*statuses: str) -> bytes:
    logs = []
    for i, status in enumerate(statuses):
        log: dict[str, Any] = {"event": i, "status": status, "warnings": []}
        if status == "INVALID":
            log["errors"] = {"codes": ["E1001"], "error_msgs": [f"event {i}: bad event_name"]}
        logs.append(log)
    overall = "INVALID" if "INVALID" in statuses else "VALID"
    return orjson.dumps({"status": overall, "test_event": True, "event_logs": logs})


def test_the_validate_endpoint_names_the_invalid_events() -> None:
    body = validate_logs("VALID", "INVALID", "VALID")
    outcome = classify_snap_response(HttpResponse(200, {}, body), 3)
    assert outcome == Delivered(rejected={1: "snapchat_invalid: E1001: event 1: bad event_name"})
    # Logs that do not line up with the request's events name none of them.
    assert isinstance(classify_snap_response(HttpResponse(200, {}, body), 4), Dead)


async def test_a_refused_token_dead_letters_the_batch_without_the_token(
    snap: FakeSnap, context: ForwarderContext
) -> None:
    wrong = "snap-revoked/token+x"
    fwd = SnapForwarder(config(base_url=snap.url, access_token=wrong), context)
    outcome = await fwd.deliver([{**page_view(), "timestamp": datetime.now(UTC).isoformat()}])
    assert isinstance(outcome, Dead)
    assert outcome.reason == "snapchat_invalid_token"
    assert wrong not in outcome.detail
    assert outcome.detail == "HTTP 401: Snap INVALID: Invalid access token: ***"


async def test_a_rate_limit_is_retried_and_the_retry_is_sent_again(
    snap: FakeSnap, context: ForwarderContext
) -> None:
    fwd = SnapForwarder(config(base_url=snap.url), context)
    events = [{**page_view(), "timestamp": datetime.now(UTC).isoformat()}]
    snap.script = [(429, {"Retry-After": "30"}, snap_answer("INVALID", "Rate limited"))]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs) == ("status_429", 30.0)
    assert await fwd.deliver(events) == Delivered()
    first, second = snap.requests
    assert first["body"] == second["body"]


async def test_validate_only_dead_letters_only_the_events_snap_finds_invalid(
    snap: FakeSnap, context: ForwarderContext
) -> None:
    fwd = SnapForwarder(config(base_url=snap.url, validate_only=True), context)
    now = datetime.now(UTC).isoformat()
    events = [{**page_view(), "messageId": f"m-{i}", "timestamp": now} for i in range(3)]
    snap.script = [(200, {}, validate_logs("VALID", "INVALID", "VALID"))]
    outcome = await fwd.deliver(events)
    assert outcome == Delivered(rejected={1: "snapchat_invalid: E1001: event 1: bad event_name"})
    [request] = snap.requests
    assert request["path"] == VALIDATE_PATH


# -- match keys ------------------------------------------------------------------------------


def keys_counted(metrics: Metrics, key: str) -> float:
    labels = {"forwarder": "snapchat", "key": key}
    return metrics.registry.get_sample_value("tagrelay_forwarder_match_keys_total", labels) or 0.0


async def test_match_keys_of_the_sent_events_are_counted(
    snap: FakeSnap, context: ForwarderContext
) -> None:
    fwd = SnapForwarder(config(base_url=snap.url), context)
    now = datetime.now(UTC).isoformat()
    events = [{**purchase(), "timestamp": now}, {**page_view(), "timestamp": now}]
    assert await fwd.deliver(events) == Delivered()
    expected = {
        "email": 1,
        "phone": 1,
        "name": 1,
        "address": 1,
        "external_id": 1,
        "ip": 2,
        "user_agent": 2,
        "click_id": 1,  # the purchase's ScCid (the page view has none)
        "browser_id": 2,  # both carry the _scid cookie (an fbp is not Snap's)
        "none": 0,
    }
    assert {key: keys_counted(context.metrics, key) for key in expected} == expected


# -- registry and config ---------------------------------------------------------------------


def test_snapchat_is_registered_and_configured_from_yaml_keys() -> None:
    assert FORWARDERS["snapchat"] is SnapForwarder
    cfg = config()
    assert cfg.requires_consent == ["ads"]
    assert (cfg.base_url, cfg.api_version) == ("https://tr.snapchat.com", "v3")
    assert (cfg.unmapped, cfg.validate_only) == ("skip", False)
    assert TOKEN not in repr(cfg)
    assert config(pixel_id=f"  {PIXEL} ").pixel_id == PIXEL
    for bad in (
        {"pixel_id": "../events"},
        {"pixel_id": "short"},
        {"api_version": "3"},
        {"unmapped": "custom"},
        {"access_token": ""},
        {"base_url": "https://tr.snapchat.com/"},
        {"default_phone_country": "XX"},
        {"max_retries": 3},  # unknown keys are refused
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            config(**bad)


def test_a_yaml_config_with_snapchat_validates() -> None:
    raw = {
        "keys": [{"id": "backend", "kind": "server", "key": "k"}],
        "forwarders": [
            {
                "id": "snapchat",
                "type": "snapchat",
                "pixel_id": PIXEL,
                "access_token": TOKEN,
                "events": {"Demo Booked": "CUSTOM_EVENT_1"},
                "validate_only": True,
            }
        ],
    }
    [fwd] = Config.model_validate(raw).forwarders
    assert isinstance(fwd, SnapConfig)
    assert (fwd.events, fwd.validate_only) == ({"Demo Booked": "CUSTOM_EVENT_1"}, True)


# -- end to end through the relay ------------------------------------------------------------


def snap_forwarder(url: str, **options: Any) -> dict[str, Any]:
    return {
        "id": "snapchat",
        "type": "snapchat",
        "pixel_id": PIXEL,
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
            "page": {"url": f"https://www.shop.test/thanks?ScCid={SCCID}"},
        },
    }


async def test_a_script_purchase_carries_the_click_id_and_the_scid_cookie(
    relay: Any, snap: FakeSnap
) -> None:
    """The tracking script's path: ``_scid`` (set by the Snap Pixel on the site's domain)
    comes with the request as a cookie; the ``ScCid`` of the landing URL is kept by the
    relay and attached to the later purchase, sent with ``event_id`` = its messageId."""
    client = await relay(forwarders=[snap_forwarder(snap.url)])
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
            "page": {"url": f"https://www.shop.test/?ScCid={SCCID}", "path": "/"},
            "traits": {"email": "buyer@example.com"},
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
    cookies = {"_scid": SCID}
    for event in (landing, order):
        body = orjson.dumps({"writeKey": BROWSER_KEY, "batch": [event]})
        jar = "; ".join(f"{name}={value}" for name, value in cookies.items())
        resp = await client.post("/d", data=body, headers={**headers, "Cookie": jar})
        assert resp.status == 200
        for header in resp.headers.getall("Set-Cookie", []):
            name, _, rest = header.partition("=")
            cookies[name] = rest.split(";", 1)[0]
    assert "tr_clk" in cookies  # the relay keeps the landing's ScCid
    await wait_idle(client.app)
    assert snap.problems == []
    sent = [e for r in snap.requests for e in orjson.loads(r["body"])["data"]]
    by_id = {e["event_id"]: e for e in sent}
    assert by_id["m-order"]["event_name"] == "PURCHASE"
    assert by_id["m-order"]["user_data"]["sc_click_id"] == SCCID
    assert by_id["m-order"]["user_data"]["sc_cookie1"] == SCID
    assert by_id["m-order"]["user_data"]["em"] == [sha256_hex("buyer@example.com")]
    assert by_id["m-order"]["custom_data"] == {"value": 10, "currency": "USD", "order_id": "o-9"}
    assert by_id["m-landing"]["event_name"] == "PAGE_VIEW"
    assert all(r["query"] == {"access_token": TOKEN} for r in snap.requests)


async def test_consent_ads_denied_is_not_sent_and_ad_user_data_denied_carries_nothing(
    relay: Any, snap: FakeSnap
) -> None:
    client = await relay(forwarders=[snap_forwarder(snap.url)])
    auth = basic(SERVER_KEY)
    orders = [
        segment_order("order-ads-denied", {"ads": "denied"}),
        segment_order("order-user-data-denied", {**GRANTED, "ad_user_data": "denied"}),
        segment_order("order-1", GRANTED),
    ]
    for order in orders:
        assert (await client.post("/v1/track", json=order, headers=auth)).status == 200
    await wait_idle(client.app)
    [request] = snap.requests
    [event] = orjson.loads(request["body"])["data"]
    assert event["event_id"] == "order-1"
    assert event["user_data"]["sc_click_id"] == SCCID
    assert b"order-user-data-denied" not in request["body"]
    app = client.app
    for reason in ("consent_denied", "no_user_data"):
        labels = {"forwarder": "snapchat", "reason": reason}
        assert metric_value(app, "tagrelay_forwarder_dropped_total", labels) == 1, reason
    delivered = {"forwarder": "snapchat", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 1


async def test_a_rate_limit_is_retried_then_delivered_through_the_relay(
    relay: Any, snap: FakeSnap
) -> None:
    client = await relay(forwarders=[snap_forwarder(snap.url)])
    snap.script = [(429, {"Retry-After": "0"}, snap_answer("INVALID", "Rate limited"))]
    sent = await client.post(
        "/v1/track", json=segment_order("order-2", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    first, second = snap.requests
    assert first["body"] == second["body"]
    app = client.app
    retried = {"forwarder": "snapchat", "reason": "status_429"}
    assert metric_value(app, "tagrelay_forwarder_retries_total", retried) == 1
    delivered = {"forwarder": "snapchat", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 1
    assert await app[SPOOL].dead_letters("snapchat") == []


async def test_a_refused_token_is_dead_lettered_with_snaps_message_and_no_token(
    relay: Any, snap: FakeSnap, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "snap-expired/token+y"
    client = await relay(forwarders=[snap_forwarder(snap.url, access_token=wrong)])
    sent = await client.post(
        "/v1/track", json=segment_order("order-3", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    assert len(snap.requests) == 1  # not retried
    app = client.app
    [dead] = await app[SPOOL].dead_letters("snapchat")
    assert dead.reason == "snapchat_invalid_token"
    assert "Invalid access token: ***" in dead.detail
    assert wrong not in dead.detail
    assert wrong not in caplog.text
    labels = {"forwarder": "snapchat", "reason": "snapchat_invalid_token"}
    assert metric_value(app, "tagrelay_dead_letters_total", labels) == 1


async def test_validate_only_goes_to_the_validate_endpoint_through_the_relay(
    relay: Any, snap: FakeSnap
) -> None:
    client = await relay(forwarders=[snap_forwarder(snap.url, validate_only=True)])
    sent = await client.post(
        "/v1/track", json=segment_order("order-4", GRANTED), headers=basic(SERVER_KEY)
    )
    assert sent.status == 200
    await wait_idle(client.app)
    [request] = snap.requests
    assert request["path"] == VALIDATE_PATH
    assert snap.problems == []
