"""The linkedin forwarder (Conversions API): the exact requests a fake LinkedIn receives
(golden files under ``golden/linkedin_conversions/``, one per behaviour, with the bearer
token from a fake token endpoint), LinkedIn's answers classified, a 422 that names elements
dead-lettering only those (the others sent again without them), the token refreshed once on
a 401, and end to end through the relay: a Segment ``Order Completed`` after a click with an
``li_fat_id`` reaches the fake LinkedIn as its conversion rule with ``eventId`` = its
``messageId``; an event denying ``ads`` does not; one denying ``ad_user_data`` goes without
its hashed email and names.

LinkedIn has no test mode (destinations.md §5): the README says to map events to a rule made
for trying the setup.

Regenerate the golden files after an intended change with ``TAGRELAY_UPDATE_GOLDEN=1``
(and read the diff)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
import pytest
from aiohttp import web
from pydantic import ValidationError

from tagrelay.appkeys import SPOOL
from tagrelay.config.models import Config
from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import Refused
from tagrelay.forwarders._http import HttpResponse, send
from tagrelay.forwarders._user_data import sha256_hex
from tagrelay.forwarders.linkedin_conversions import (
    LinkedInConfig,
    LinkedInForwarder,
    classify_linkedin_response,
    conversion_amount,
    refused_elements,
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

GOLDEN = Path(__file__).parent / "golden" / "linkedin_conversions"
UPDATE = os.environ.get("TAGRELAY_UPDATE_GOLDEN") == "1"

PATH = "/rest/conversionEvents"
PURCHASE_RULE = "12345678"
LEAD_RULE = "12345679"
PAGE_RULE = "12345680"
CLIENT_ID = "86abcdefgh1234"
CLIENT_SECRET = "WPL_AP1.client/secret+odd="
REFRESH_TOKEN = "AQX-refresh/token+with=odd&chars"
STATIC_TOKEN = "AQV-static/token+with=odd&chars"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WHEN = (NOW - timedelta(minutes=10)).isoformat()
WHEN_MS = int((NOW - timedelta(minutes=10)).timestamp()) * 1000
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari"
LI_FAT_ID = "df5gf5-gh6t7-ph4j7h-fgf6n1"


# -- fakes -----------------------------------------------------------------------------------


@dataclass
class FakeTokenEndpoint:
    """LinkedIn's token endpoint: records each form it receives and answers from ``answers``
    in order, then with a fresh access token per request (``AQV-token-<n>``, 60 days)."""

    answers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    forms: list[dict[str, list[str]]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.forms.append(parse_qs((await request.read()).decode()))
        if self.answers:
            status, body = self.answers.pop(0)
        else:
            status, body = (
                200,
                {"access_token": f"AQV-token-{len(self.forms)}", "expires_in": 5184000},
            )
        return web.json_response(body, status=status)


@pytest.fixture
async def token_endpoint() -> AsyncIterator[FakeTokenEndpoint]:
    fake = FakeTokenEndpoint()
    async with fake_server(
        "LinkedIn token endpoint", {"/oauth/v2/accessToken": fake.handle}
    ) as server:
        fake.url = str(server.make_url("/oauth/v2/accessToken"))
        yield fake


@pytest.fixture
async def linkedin() -> AsyncIterator[Recorder]:
    async with recording_server("LinkedIn", [PATH]) as rec:
        yield rec


OAUTH = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "refresh_token": REFRESH_TOKEN}
CONVERSIONS = [
    {"event": "Order Completed", "conversion_rule_id": PURCHASE_RULE},
    {"event": "Demo Requested", "conversion_rule_id": f"urn:lla:llaPartnerConversion:{LEAD_RULE}"},
    {"event": "page_view", "conversion_rule_id": PAGE_RULE},
]


def raw_config(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "linkedin",
        "type": "linkedin",
        "oauth": OAUTH,
        "conversions": CONVERSIONS,
    }
    return {**raw, **overrides}


def config(**overrides: Any) -> LinkedInConfig:
    return LinkedInConfig.model_validate(raw_config(**overrides))


def forwarder(
    context: ForwarderContext, linkedin: Recorder, token: FakeTokenEndpoint, **overrides: Any
) -> LinkedInForwarder:
    cfg = config(base_url=linkedin.url.rstrip("/"), token_url=token.url, **overrides)
    return LinkedInForwarder(cfg, context)


def offline(**overrides: Any) -> LinkedInForwarder:
    """For plans only (no network)."""
    return LinkedInForwarder(
        config(**overrides),
        ForwarderContext(Path("."), None, Metrics()),  # type: ignore[arg-type]
    )


# -- events ----------------------------------------------------------------------------------


def traits() -> dict[str, Any]:
    return {
        "email": " Jane.Doe@Example.com ",
        "phone": "+1 (650) 555-1212",
        "firstName": "Jane",
        "lastName": "Doe",
        "title": "Head of  Growth",
        "company": {"name": "Acme Corp", "industry": "retail"},
        "address": {"city": "Menlo Park", "country": "us"},
    }


def purchase(message_id: str = "msg-purchase-1", **context: Any) -> Event:
    ctx: dict[str, Any] = {
        "consent": dict(GRANTED),
        "ip": "203.0.113.7",
        "userAgent": UA,
        "page": {"url": f"https://www.shop.test/checkout/done?li_fat_id={LI_FAT_ID}"},
        "traits": traits(),
    }
    ctx.update(context)
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": message_id,
        "userId": "user-42",
        "timestamp": WHEN,
        "properties": {"order_id": "order-1001", "revenue": 65.5, "currency": "eur"},
        "context": ctx,
    }


def demo_by_name() -> Event:
    """A B2B lead known by name and company only (a form without an email field)."""
    return {
        "type": "track",
        "event": "demo requested",
        "messageId": "msg-demo-1",
        "timestamp": WHEN,
        "properties": {"plan": "enterprise"},
        "context": {
            "consent": dict(GRANTED),
            "userAgent": UA,
            "traits": {"name": "Mary Ann Smith", "company": "Initech", "country": "DE"},
        },
    }


def page_view() -> Event:
    return {
        "type": "page",
        "messageId": "msg-page-1",
        "anonymousId": "anon-1",
        "timestamp": WHEN,
        "properties": {"url": "https://www.shop.test/pricing"},
        "context": {
            "consent": dict(GRANTED),
            "userAgent": UA,
            "page": {"url": "https://www.shop.test/pricing"},
            "clickIds": {"li_fat_id": LI_FAT_ID},
        },
    }


def denied() -> Event:
    return purchase("msg-denied-1", consent={**GRANTED, "ad_user_data": "denied"})


def hashed_email() -> Event:
    event = purchase("msg-hashed-1")
    event["context"]["traits"] = {"email": sha256_hex("jane.doe@example.com").upper()}
    return event


CASES: dict[str, tuple[dict[str, Any], list[Event]]] = {
    "purchase_with_email_click_id_and_value": ({}, [purchase()]),
    "lead_matched_by_name_and_company": ({}, [demo_by_name()]),
    "page_view_with_click_id": ({}, [page_view()]),
    "ad_user_data_denied": ({}, [denied()]),
    "already_hashed_email": ({}, [hashed_email()]),
    "static_access_token": ({"oauth": None, "access_token": STATIC_TOKEN}, [page_view()]),
    "events_of_a_batch_in_one_request": ({}, [page_view(), purchase()]),
}


def received(request: dict[str, Any]) -> dict[str, Any]:
    """What the fake LinkedIn got, without what the HTTP client adds by itself."""
    keep = (
        "Authorization",
        "Content-Type",
        "LinkedIn-Version",
        "X-Restli-Protocol-Version",
        "X-RestLi-Method",
    )
    headers = {name: request["headers"][name] for name in keep if name in request["headers"]}
    return {
        "method": request["method"],
        "path": request["path"],
        "query": request["query"],
        "headers": headers,
        "body": orjson.loads(request["body"]),
    }


def golden(case: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((GOLDEN / f"{case}.json").read_bytes())
    return loaded


@pytest.mark.parametrize("case", sorted(CASES))
async def test_golden_requests(
    case: str, linkedin: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    overrides, events = CASES[case]
    fwd = forwarder(context, linkedin, token_endpoint, **overrides)
    plan = fwd.plan(events, NOW)
    assert dict(plan.drops) == {}
    for planned in plan.requests:
        authorized = await fwd.authorize(planned.request)
        assert not isinstance(authorized, Retry | Dead)
        assert isinstance(await send(context.http, authorized, 5.0), HttpResponse)
    [request] = [received(r) for r in linkedin.requests]
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(request, option=orjson.OPT_INDENT_2) + b"\n")
    assert request == orjson.loads(path.read_bytes())


def test_golden_files_pin_the_rules() -> None:
    """What the golden files show, said once more in words."""
    request = golden("purchase_with_email_click_id_and_value")
    assert (request["method"], request["path"], request["query"]) == ("POST", PATH, {})
    assert request["headers"] == {
        "Authorization": "Bearer AQV-token-1",
        "Content-Type": "application/json",
        "LinkedIn-Version": "202607",
        "X-Restli-Protocol-Version": "2.0.0",
        "X-RestLi-Method": "BATCH_CREATE",
    }
    [element] = request["body"]["elements"]
    assert element == {
        "conversion": f"urn:lla:llaPartnerConversion:{PURCHASE_RULE}",
        "conversionHappenedAt": WHEN_MS,
        "conversionValue": {"currencyCode": "EUR", "amount": "65.5"},
        "eventId": "msg-purchase-1",
        "user": {
            "userIds": [
                {"idType": "SHA256_EMAIL", "idValue": sha256_hex("jane.doe@example.com")},
                {"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "idValue": LI_FAT_ID},
            ],
            "userInfo": {
                "firstName": "Jane",
                "lastName": "Doe",
                "title": "Head of Growth",
                "companyName": "Acme Corp",
                "countryCode": "US",
            },
            "externalIds": ["user-42"],
        },
    }
    # A name split the way Segment does; the rule by its URN; userIds present, empty.
    [lead] = golden("lead_matched_by_name_and_company")["body"]["elements"]
    assert lead["conversion"] == f"urn:lla:llaPartnerConversion:{LEAD_RULE}"
    assert lead["user"] == {
        "userIds": [],
        "userInfo": {
            "firstName": "Mary",
            "lastName": "Ann Smith",
            "companyName": "Initech",
            "countryCode": "DE",
        },
    }
    assert "conversionValue" not in lead
    [page] = golden("page_view_with_click_id")["body"]["elements"]
    assert page["user"] == {
        "userIds": [{"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "idValue": LI_FAT_ID}]
    }
    # ad_user_data denied: the click id stays, nothing about the person goes.
    [element] = golden("ad_user_data_denied")["body"]["elements"]
    assert element["user"] == {
        "userIds": [{"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "idValue": LI_FAT_ID}]
    }
    [element] = golden("already_hashed_email")["body"]["elements"]
    assert element["user"]["userIds"][0]["idValue"] == sha256_hex("jane.doe@example.com")
    assert golden("static_access_token")["headers"]["Authorization"] == f"Bearer {STATIC_TOKEN}"
    batch = golden("events_of_a_batch_in_one_request")["body"]["elements"]
    assert [e["eventId"] for e in batch] == ["msg-page-1", "msg-purchase-1"]


def test_linkedins_own_sample_formats() -> None:
    """LinkedIn's sample request (destinations.md §5, L7): amount a decimal string
    ("1500.0"), countryCode upper case, names plain; the email a SHA-256 hex digest of the
    trimmed, lowercased address (L2)."""
    assert conversion_amount(1500.0) == "1500.0"
    assert conversion_amount(2000) == "2000"
    assert conversion_amount(0.00001) == "0.00001"
    event = purchase()
    event["context"]["traits"] = {
        "email": "  Mike.Smith@Example.COM",
        "firstName": " mike ",
        "lastName": "smith",
        "address": {"country": "us"},
    }
    [planned] = offline().plan([event], NOW).requests
    [element] = orjson.loads(planned.request.body)["elements"]
    assert element["user"]["userIds"][0]["idValue"] == sha256_hex("mike.smith@example.com")
    assert element["user"]["userInfo"] == {
        "firstName": "mike",
        "lastName": "smith",
        "countryCode": "US",
    }


def test_events_without_a_rule_or_a_match_key_are_dropped_and_counted() -> None:
    fwd = offline()
    video: Event = {**purchase("m-1"), "event": "Video Played"}
    identify: Event = {"type": "identify", "messageId": "m-2", "traits": {"email": "a@b.co"}}
    anonymous = purchase("m-3", page={"url": "https://www.shop.test/"}, traits={})
    one_name = purchase("m-4", page={}, traits={"firstName": "Jane", "phone": "+16505551212"})
    denied_no_click = purchase("m-5", page={}, consent={**GRANTED, "ad_user_data": "denied"})
    old = purchase("m-6")
    old["timestamp"] = (NOW - timedelta(days=91)).isoformat()
    unnamed: Event = {"type": "track", "messageId": "m-7", "timestamp": WHEN}
    plan = fwd.plan(
        [video, identify, anonymous, one_name, denied_no_click, old, unnamed, purchase()], NOW
    )
    assert dict(plan.drops) == {
        "no_conversion_rule": 1,
        "not_a_conversion": 1,
        "no_match_key": 3,
        "too_old": 1,
        "no_event_name": 1,
    }
    [planned] = plan.requests
    assert planned.indices == (7,)
    # An event 89 days old still goes (LinkedIn takes 90).
    recent = purchase("m-8")
    recent["timestamp"] = (NOW - timedelta(days=89)).isoformat()
    assert fwd.plan([recent], NOW).requests


def test_rules_match_exactly_then_loosely_then_by_meaning() -> None:
    fwd = offline()
    urn = "urn:lla:llaPartnerConversion:"
    assert fwd.rules.target("Order Completed", "purchase") == urn + PURCHASE_RULE
    assert fwd.rules.target("purchase", "purchase") == urn + PURCHASE_RULE
    assert fwd.rules.target("DEMO  requested", None) == urn + LEAD_RULE
    assert fwd.rules.target("page_view", "page_view") == urn + PAGE_RULE
    assert fwd.rules.target("Product Added", "add_to_cart") is None


def test_at_most_5000_events_per_request() -> None:
    fwd = offline()
    events = [{**page_view(), "messageId": f"m-{i}"} for i in range(5001)]
    assert [len(p.indices) for p in fwd.plan(events, NOW).requests] == [5000, 1]


# -- LinkedIn's answers --------------------------------------------------------------------------


def linkedin_error(status: int, code: str | None, message: str, service: int = 100) -> bytes:
    error: dict[str, Any] = {"status": status, "message": message}
    if code is not None:
        error |= {"serviceErrorCode": service, "code": code}
    return orjson.dumps(error)


INVALID = (
    "Index: 1, ERROR :: /conversionValue/amount :: 19.9 cannot be coerced to String\n"
    "ERROR :: /user/userInfo/lastName :: field is required but not found and has no default "
    "value\n"
    "Index: 7, ERROR :: /conversion :: Invalid Urn format.\n"
    "Index: 2, ERROR :: /user/userIds :: field is required but not found\n"
)


def test_a_422_names_its_elements() -> None:
    assert refused_elements(INVALID, 3) == {
        1: "LinkedIn 422: /conversionValue/amount :: 19.9 cannot be coerced to String; "
        "/user/userInfo/lastName :: field is required but not found and has no default value",
        2: "LinkedIn 422: /user/userIds :: field is required but not found",
    }
    # RudderStack's recorded answer (destinations.md §5, L1)
    recorded = (
        "Index: 0, ERROR :: /conversionValue/amount :: field is required but not found and "
        "has no default value\nERROR :: /user/userInfo/firstName :: field is required but not "
        "found and has no default value\n"
    )
    assert list(refused_elements(recorded, 1)) == [0]
    # Without an index: the only element of a request of one, else nobody in particular.
    assert refused_elements("ERROR :: /conversion :: Invalid Urn format.", 1) == {
        0: "LinkedIn 422: /conversion :: Invalid Urn format."
    }
    assert refused_elements("ERROR :: /conversion :: Invalid Urn format.", 2) == {}


def error(status: int, code: str | None, message: str) -> bytes:
    return linkedin_error(status, code, message)


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (201, b"", Delivered, None),
        (200, b'{"elements":[{"status":201},{"status":201}]}', Delivered, None),
        (422, error(422, None, INVALID), Refused, "linkedin_invalid"),
        (422, error(422, None, "ERROR :: /conversion :: bad"), Dead, "linkedin_invalid"),
        (401, error(401, "EXPIRED_ACCESS_TOKEN", "expired"), Dead, "linkedin_unauthorized"),
        (401, error(401, "REVOKED_ACCESS_TOKEN", "revoked"), Dead, "linkedin_unauthorized"),
        (403, error(403, None, "No ad accounts found"), Dead, "linkedin_permission"),
        (426, error(426, "NONEXISTENT_VERSION", "not active"), Dead, "linkedin_version"),
        (
            400,
            error(400, "VERSION_MISSING", "A version must be present."),
            Dead,
            "linkedin_version",
        ),
        (400, error(400, "ILLEGAL_ARGUMENT", "bad"), Dead, "linkedin_error"),
        (429, error(429, "TOO_MANY_REQUESTS", "slow down"), Retry, "status_429"),
        (500, error(500, None, "Internal Server Error"), Retry, "status_5xx"),
        (503, b"<html>unavailable</html>", Retry, "status_5xx"),
        (404, b"not json", Dead, "linkedin_error"),
    ],
)
def test_error_classification(status: int, body: bytes, kind: type, reason: str | None) -> None:
    outcome = classify_linkedin_response(HttpResponse(status, {}, body), 3)
    assert isinstance(outcome, kind)
    if reason is not None:
        assert outcome.reason == reason  # type: ignore[union-attr]


def test_a_dead_letter_carries_linkedins_words() -> None:
    body = linkedin_error(
        401,
        "REVOKED_ACCESS_TOKEN",
        "The token used in the request has been revoked by the user",
        65601,
    )
    outcome = classify_linkedin_response(HttpResponse(401, {}, body), 1)
    assert outcome == Dead(
        "linkedin_unauthorized",
        "HTTP 401: LinkedIn REVOKED_ACCESS_TOKEN (serviceErrorCode 65601): The token used in "
        "the request has been revoked by the user",
    )
    retry = classify_linkedin_response(
        HttpResponse(429, {"Retry-After": "30"}, linkedin_error(429, None, "Too many")), 1
    )
    assert retry == Retry("status_429", "HTTP 429: LinkedIn: Too many", 30.0)


def test_elements_an_answer_lists_as_failed_are_rejected() -> None:
    body = orjson.dumps(
        {
            "elements": [
                {"status": 201},
                {"status": 400, "error": {"message": "Invalid eventId", "status": 400}},
                {"status": 201},
            ]
        }
    )
    outcome = classify_linkedin_response(HttpResponse(200, {}, body), 3)
    assert outcome == Delivered(rejected={1: "LinkedIn element status 400: Invalid eventId"})
    every = orjson.dumps({"elements": [{"status": 503}, {"status": 500}]})
    outcome = classify_linkedin_response(HttpResponse(200, {}, every), 2)
    assert isinstance(outcome, Retry) and outcome.reason == "linkedin_transient"


async def test_a_422_dead_letters_the_elements_it_names_and_sends_the_others_again(
    linkedin: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, linkedin, token_endpoint)
    now = datetime.now(UTC).isoformat()
    events = [{**purchase(f"m-{i}"), "timestamp": now} for i in range(3)]
    message = "Index: 1, ERROR :: /user/userIds/0/idValue :: jane.doe@example.com is invalid\n"
    linkedin.script = [(422, {}, linkedin_error(422, None, message))]
    outcome = await fwd.deliver(events)
    assert outcome == Delivered(
        rejected={1: "LinkedIn 422: /user/userIds/0/idValue :: <email> is invalid"}
    )
    sent = [[e["eventId"] for e in orjson.loads(r["body"])["elements"]] for r in linkedin.requests]
    assert sent == [["m-0", "m-1", "m-2"], ["m-0", "m-2"]]
    assert len(token_endpoint.forms) == 1


# -- credentials -------------------------------------------------------------------------------


async def test_the_refresh_token_is_exchanged_at_token_url(
    linkedin: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, linkedin, token_endpoint)
    now = datetime.now(UTC).isoformat()
    assert await fwd.deliver([{**page_view(), "timestamp": now}]) == Delivered()
    assert await fwd.deliver([{**purchase(), "timestamp": now}]) == Delivered()
    # one exchange (the token is cached), RFC 6749's refresh grant with the app's client
    assert token_endpoint.forms == [
        {
            "grant_type": ["refresh_token"],
            "client_id": [CLIENT_ID],
            "client_secret": [CLIENT_SECRET],
            "refresh_token": [REFRESH_TOKEN],
        }
    ]
    assert {r["headers"]["Authorization"] for r in linkedin.requests} == {"Bearer AQV-token-1"}


async def test_a_401_refreshes_the_token_once_and_resends(
    linkedin: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, linkedin, token_endpoint)
    expired = linkedin_error(
        401, "EXPIRED_ACCESS_TOKEN", "The token used in the request has expired", 65602
    )
    linkedin.script = [(401, {}, expired)]
    now = datetime.now(UTC).isoformat()
    assert await fwd.deliver([{**purchase(), "timestamp": now}]) == Delivered()
    assert [r["headers"]["Authorization"] for r in linkedin.requests] == [
        "Bearer AQV-token-1",
        "Bearer AQV-token-2",
    ]
    assert linkedin.requests[0]["body"] == linkedin.requests[1]["body"]
    # A second refusal after the refresh is LinkedIn's answer: dead, with its words.
    linkedin.script = [(401, {}, expired), (401, {}, expired)]
    outcome = await fwd.deliver([{**purchase("m-2"), "timestamp": now}])
    assert isinstance(outcome, Dead) and outcome.reason == "linkedin_unauthorized"
    assert "EXPIRED_ACCESS_TOKEN" in outcome.detail
    assert len(token_endpoint.forms) == 3


async def test_a_configured_token_refused_is_dead_at_once_without_the_token(
    linkedin: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, linkedin, token_endpoint, oauth=None, access_token=STATIC_TOKEN)
    echo = f"Invalid access token {STATIC_TOKEN}"
    linkedin.script = [(401, {}, linkedin_error(401, "INVALID_ACCESS_TOKEN", echo, 65600))]
    outcome = await fwd.deliver([{**purchase(), "timestamp": datetime.now(UTC).isoformat()}])
    assert outcome == Dead(
        "linkedin_unauthorized",
        "HTTP 401: LinkedIn INVALID_ACCESS_TOKEN (serviceErrorCode 65600): Invalid access "
        "token ***",
    )
    assert (len(linkedin.requests), token_endpoint.forms) == (1, [])


async def test_secrets_never_reach_a_dead_letter(
    linkedin: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, linkedin, token_endpoint)
    echo = f"member of token AQV-token-1 (client secret {CLIENT_SECRET}) has no access"
    linkedin.script = [(403, {}, linkedin_error(403, "ACCESS_DENIED", echo))]
    outcome = await fwd.deliver([{**purchase(), "timestamp": datetime.now(UTC).isoformat()}])
    assert isinstance(outcome, Dead) and outcome.reason == "linkedin_permission"
    assert "AQV-token-1" not in outcome.detail and CLIENT_SECRET not in outcome.detail
    assert "member of token *** (client secret ***) has no access" in outcome.detail


async def test_a_rate_limit_is_retried_after_its_retry_after(
    linkedin: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, linkedin, token_endpoint)
    events = [{**purchase(), "timestamp": datetime.now(UTC).isoformat()}]
    linkedin.script = [(429, {"Retry-After": "60"}, linkedin_error(429, None, "Too Many Requests"))]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs) == ("status_429", 60.0)
    assert await fwd.deliver(events) == Delivered()
    assert len(linkedin.requests) == 2


# -- match keys ---------------------------------------------------------------------------------


async def test_only_the_keys_linkedin_takes_are_counted(
    linkedin: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, linkedin, token_endpoint)
    now = datetime.now(UTC).isoformat()
    events = [
        {**purchase(), "timestamp": now},
        {**demo_by_name(), "timestamp": now},
        {**denied(), "timestamp": now},
        # one name only: no userInfo, so neither name nor country counts
        {
            **purchase("m-4", traits={"email": "a@b.co", "firstName": "Al", "country": "US"}),
            "timestamp": now,
        },
    ]
    assert await fwd.deliver(events) == Delivered()

    def counted(key: str) -> float:
        labels = {"forwarder": "linkedin", "key": key}
        value = context.metrics.registry.get_sample_value(
            "tagrelay_forwarder_match_keys_total", labels
        )
        return value or 0.0

    expected = {
        "email": 2,
        "name": 2,
        "address": 2,
        "external_id": 2,
        "click_id": 3,
        "phone": 0,
        "ip": 0,
        "user_agent": 0,
        "none": 0,
    }
    assert {key: counted(key) for key in expected} == expected


# -- registry and config ------------------------------------------------------------------------


def test_linkedin_is_registered_and_configured_from_yaml_keys() -> None:
    assert FORWARDERS["linkedin"] is LinkedInForwarder
    cfg = config()
    assert cfg.requires_consent == ["ads"]
    assert (cfg.base_url, cfg.api_version) == ("https://api.linkedin.com", "202607")
    assert cfg.token_url == "https://www.linkedin.com/oauth/v2/accessToken"
    assert [c.conversion_rule_id for c in cfg.conversions] == [PURCHASE_RULE, LEAD_RULE, PAGE_RULE]
    assert REFRESH_TOKEN not in repr(cfg) and CLIENT_SECRET not in repr(cfg)
    static = config(oauth=None, access_token=STATIC_TOKEN)
    assert STATIC_TOKEN not in repr(static)


def problems(**overrides: Any) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        config(**overrides)
    return [
        ".".join(str(p) for p in e["loc"]) + ": " + e["msg"].removeprefix("Value error, ")
        for e in caught.value.errors()
    ]


def test_bad_credentials_rules_and_versions_are_configuration_errors() -> None:
    assert problems(oauth=None) == [
        ": no credentials: set oauth (client_id, client_secret, refresh_token) or access_token"
    ]
    assert problems(access_token=STATIC_TOKEN) == [
        ": access_token and oauth are both set; keep one (oauth renews the token)"
    ]
    assert problems(conversions=[{"event": "Order Completed", "conversion_rule_id": "abc"}]) == [
        "conversions.0.conversion_rule_id: 'abc' is not a conversion rule id: expected its "
        "digits (12345678) or its URN (urn:lla:llaPartnerConversion:12345678)"
    ]
    assert problems(
        conversions=[
            {"event": "Order Completed", "conversion_rule_id": "1"},
            {"event": "order  completed", "conversion_rule_id": "2"},
        ]
    ) == [
        ": conversions lists an event more than once (names match ignoring case and spaces): "
        "'order  completed' (also 'Order Completed'); keep one entry per event"
    ]
    assert problems(events={"Order Completed": "PURCHASE"}) == [
        "events: linkedin conversions name no events: list each event under conversions with "
        "its conversion_rule_id instead"
    ]
    assert problems(api_version="2026-07")[0].startswith("api_version: String should match")
    assert problems(unmapped="custom")[0].startswith("unmapped: Input should be 'skip'")
    assert problems(conversions=[])[0].startswith("conversions: List should have at least 1 item")
    # No test mode: another platform's option is refused, not taken for one.
    assert problems(validate_only=True) == ["validate_only: Extra inputs are not permitted"]
    assert problems(test_event_code="T1") == ["test_event_code: Extra inputs are not permitted"]


def test_a_yaml_config_with_linkedin_validates() -> None:
    raw = {
        "keys": [{"id": "backend", "kind": "server", "key": "k"}],
        "forwarders": [raw_config(default_phone_country="US", api_version="202609")],
    }
    [fwd] = Config.model_validate(raw).forwarders
    assert isinstance(fwd, LinkedInConfig)
    assert fwd.api_version == "202609"
    assert fwd.conversions[1].conversion_rule_id == LEAD_RULE


# -- end to end through the relay ------------------------------------------------------------------


def relay_forwarder(linkedin: Recorder, token: FakeTokenEndpoint) -> dict[str, Any]:
    return raw_config(
        base_url=linkedin.url.rstrip("/"),
        token_url=token.url,
        batch={"max_events": 10, "max_wait_secs": 0.05},
    )


def segment_order(message_id: str, consent: dict[str, str], **context: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "user-42",
        "event": "Order Completed",
        "messageId": message_id,
        "properties": {"order_id": f"o-{message_id}", "revenue": 42.0, "currency": "USD"},
        "context": {
            "consent": consent,
            "traits": {"email": "buyer@example.com", "firstName": "Bo", "lastName": "Buyer"},
            "userAgent": UA,
            "ip": "198.51.100.4",
            "clickIds": {"li_fat_id": LI_FAT_ID},
            **context,
        },
    }


async def test_orders_reach_linkedin_as_their_rule_under_consent(
    relay: Any, linkedin: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    client = await relay(forwarders=[relay_forwarder(linkedin, token_endpoint)])
    auth = basic(SERVER_KEY)
    for body in (
        segment_order("order-1", GRANTED),
        segment_order("order-ads-denied", {"ads": "denied"}),
        segment_order("order-data-denied", {**GRANTED, "ad_user_data": "denied"}),
        {**segment_order("video-1", GRANTED), "event": "Video Played"},
    ):
        response = await client.post("/v1/track", json=body, headers=auth)
        assert response.status == 200
    await wait_idle(client.app)
    elements = [e for r in linkedin.requests for e in orjson.loads(r["body"])["elements"]]
    assert [e["eventId"] for e in elements] == ["order-1", "order-data-denied"]
    granted, data_denied = elements
    assert granted["conversion"] == f"urn:lla:llaPartnerConversion:{PURCHASE_RULE}"
    assert granted["conversionValue"] == {"currencyCode": "USD", "amount": "42.0"}
    assert granted["user"]["userIds"][0] == {
        "idType": "SHA256_EMAIL",
        "idValue": sha256_hex("buyer@example.com"),
    }
    assert granted["user"]["userInfo"] == {"firstName": "Bo", "lastName": "Buyer"}
    assert data_denied["user"] == {
        "userIds": [{"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "idValue": LI_FAT_ID}]
    }
    assert linkedin.requests[0]["headers"]["Authorization"] == "Bearer AQV-token-1"
    app = client.app
    for reason in ("consent_denied", "no_conversion_rule"):
        labels = {"forwarder": "linkedin", "reason": reason}
        assert metric_value(app, "tagrelay_forwarder_dropped_total", labels) == 1, reason
    delivered = {"forwarder": "linkedin", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 2


async def test_an_li_fat_id_from_the_landing_page_reaches_a_later_order(
    relay: Any, linkedin: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    client = await relay(forwarders=[relay_forwarder(linkedin, token_endpoint)])
    browser = {
        "Origin": "https://www.shop.test",
        "Host": "data.shop.test",
        "Content-Type": "text/plain",
    }

    def script_body(event: dict[str, Any]) -> bytes:
        return orjson.dumps({"writeKey": BROWSER_KEY, "batch": [event]})

    landing = {
        "type": "page",
        "anonymousId": "visitor-1",
        "messageId": "page-1",
        "context": {
            "consent": GRANTED,
            "page": {"url": f"https://www.shop.test/?li_fat_id={LI_FAT_ID}", "path": "/"},
        },
    }
    resp = await client.post("/d", data=script_body(landing), headers=browser)
    assert resp.status == 200
    cookie = "; ".join(f"{m.key}={m.value}" for m in resp.cookies.values() if m.value)
    order = {
        "type": "track",
        "event": "Order Completed",
        "anonymousId": "visitor-1",
        "messageId": "order-1",
        "properties": {"order_id": "o-1", "revenue": 10, "currency": "usd"},
        "context": {"consent": GRANTED, "page": {"url": "https://www.shop.test/thanks"}},
    }
    resp = await client.post("/d", data=script_body(order), headers={**browser, "Cookie": cookie})
    assert resp.status == 200
    await wait_idle(client.app)
    elements = [e for r in linkedin.requests for e in orjson.loads(r["body"])["elements"]]
    assert [(e["eventId"], e["user"]["userIds"]) for e in elements] == [
        ("page-1", [{"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "idValue": LI_FAT_ID}]),
        ("order-1", [{"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "idValue": LI_FAT_ID}]),
    ]


async def test_a_422_through_the_relay_dead_letters_only_the_element_it_names(
    relay: Any, linkedin: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    message = "Index: 1, ERROR :: /conversionValue/currencyCode :: invalid currency\n"
    linkedin.script = [
        (422, {"Content-Type": "application/json"}, linkedin_error(422, None, message))
    ]
    client = await relay(forwarders=[relay_forwarder(linkedin, token_endpoint)])
    batch = [segment_order(f"order-{i}", GRANTED) for i in range(3)]
    response = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
    assert response.status == 200
    await wait_idle(client.app)
    sent = [[e["eventId"] for e in orjson.loads(r["body"])["elements"]] for r in linkedin.requests]
    assert sent == [["order-0", "order-1", "order-2"], ["order-0", "order-2"]]
    dead = await client.app[SPOOL].dead_letters("linkedin")
    assert [(d.reason, d.detail) for d in dead] == [
        (
            "rejected_by_destination",
            "LinkedIn 422: /conversionValue/currencyCode :: invalid currency",
        )
    ]
    app = client.app
    labels = {"forwarder": "linkedin", "reason": "rejected_by_destination"}
    assert metric_value(app, "tagrelay_dead_letters_total", labels) == 1
    delivered = {"forwarder": "linkedin", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 2


async def test_a_401_through_the_relay_refreshes_the_token_and_the_order_arrives(
    relay: Any, linkedin: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    expired = linkedin_error(401, "EXPIRED_ACCESS_TOKEN", "expired", 65602)
    linkedin.script = [(401, {}, expired)]
    client = await relay(forwarders=[relay_forwarder(linkedin, token_endpoint)])
    response = await client.post(
        "/v1/track", json=segment_order("order-1", GRANTED), headers=basic(SERVER_KEY)
    )
    assert response.status == 200
    await wait_idle(client.app)
    assert [r["headers"]["Authorization"] for r in linkedin.requests] == [
        "Bearer AQV-token-1",
        "Bearer AQV-token-2",
    ]
    assert await client.app[SPOOL].dead_letters("linkedin") == []
    delivered = {"forwarder": "linkedin", "outcome": "delivered"}
    assert metric_value(client.app, "tagrelay_forwarder_events_total", delivered) == 1


async def test_a_revoked_refresh_token_dead_letters_the_batch_with_linkedins_words(
    relay: Any, linkedin: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    token_endpoint.answers = [
        (
            400,
            {
                "error": "invalid_grant",
                "error_description": (
                    "The provided authorization grant or refresh token is invalid, expired "
                    "or revoked."
                ),
            },
        )
    ]
    client = await relay(forwarders=[relay_forwarder(linkedin, token_endpoint)])
    response = await client.post(
        "/v1/track", json=segment_order("order-1", GRANTED), headers=basic(SERVER_KEY)
    )
    assert response.status == 200
    await wait_idle(client.app)
    assert linkedin.requests == []
    [dead] = await client.app[SPOOL].dead_letters("linkedin")
    assert dead.reason == "token_invalid_grant"
    assert dead.detail == (
        "token endpoint answered HTTP 400: invalid_grant: The provided authorization grant or "
        "refresh token is invalid, expired or revoked."
    )
    assert REFRESH_TOKEN not in dead.detail
