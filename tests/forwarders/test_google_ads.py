"""The google_ads forwarder (click conversions, enhanced conversions for leads): the exact
requests a fake Google Ads API receives (golden files under ``golden/google_ads/``, one per
behaviour, with the bearer token from a fake token endpoint), Google's answers classified,
partial failures dead-lettering only the failed rows, the token refreshed once on a 401,
a revoked refresh token dead-lettering the batch, and end to end through the relay: a
Segment ``Order Completed`` with a gclid reaches the fake API as the configured conversion
action with its value and order id.

Regenerate the golden files after an intended change with ``TAGRELAY_UPDATE_GOLDEN=1``
(and read the diff)."""

from __future__ import annotations

import json
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
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from tagrelay.appkeys import SPOOL
from tagrelay.config.models import Config
from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._http import HttpResponse, send
from tagrelay.forwarders._user_data import sha256_hex
from tagrelay.forwarders.google_ads import (
    GoogleAdsConfig,
    GoogleAdsForwarder,
    RowError,
    classify_google_ads_response,
    cut_in_row_errors,
    google_date_time,
    scan_row_errors,
)
from tagrelay.metrics import Metrics
from tagrelay.model import Dead, Delivered, Event, Retry
from tests.forwarders.test_google_auth import key_file
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

GOLDEN = Path(__file__).parent / "golden" / "google_ads"
UPDATE = os.environ.get("TAGRELAY_UPDATE_GOLDEN") == "1"

CUSTOMER = "1234567890"
PATH = f"/v26/customers/{CUSTOMER}:uploadClickConversions"
PURCHASE_ACTION = f"customers/{CUSTOMER}/conversionActions/111"
LEAD_ACTION = f"customers/{CUSTOMER}/conversionActions/222"
DEVELOPER_TOKEN = "dev-token/with+odd=chars"
CLIENT_ID = "1234-abc.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-client/secret+odd"
REFRESH_TOKEN = "1//0refresh-token/with+odd=chars"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WHEN = (NOW - timedelta(minutes=10)).isoformat()
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Safari"
GCLID = "Cj0KCQiA-test_gclid.123"
FAILURE_TYPE = "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure"


# -- fakes -----------------------------------------------------------------------------------


@dataclass
class FakeTokenEndpoint:
    """Google's token endpoint: records each form it receives and answers from ``answers``
    in order, then with a fresh access token per request (``ya29.token-<n>``)."""

    answers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    forms: list[bytes] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.forms.append(await request.read())
        if self.answers:
            status, body = self.answers.pop(0)
        else:
            status, body = (
                200,
                {"access_token": f"ya29.token-{len(self.forms)}", "expires_in": 3599},
            )
        return web.json_response(body, status=status)


@pytest.fixture
async def token_endpoint() -> AsyncIterator[FakeTokenEndpoint]:
    fake = FakeTokenEndpoint()
    async with fake_server("token endpoint", {"/token": fake.handle}) as server:
        fake.url = str(server.make_url("/token"))
        yield fake


@pytest.fixture
async def ads() -> AsyncIterator[Recorder]:
    async with recording_server("Google Ads", [PATH]) as rec:
        yield rec


OAUTH = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "refresh_token": REFRESH_TOKEN}
CONVERSIONS = [
    {"event": "Order Completed", "conversion_action": PURCHASE_ACTION},
    {"event": "Lead Generated", "conversion_action": LEAD_ACTION},
]


def raw_config(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "gads",
        "type": "google_ads",
        "customer_id": "123-456-7890",
        "developer_token": DEVELOPER_TOKEN,
        "oauth": OAUTH,
        "conversions": CONVERSIONS,
    }
    return {**raw, **overrides}


def config(**overrides: Any) -> GoogleAdsConfig:
    return GoogleAdsConfig.model_validate(raw_config(**overrides))


def forwarder(
    context: ForwarderContext, ads: Recorder, token: FakeTokenEndpoint, **overrides: Any
) -> GoogleAdsForwarder:
    cfg = config(base_url=ads.url.rstrip("/"), token_url=token.url, **overrides)
    return GoogleAdsForwarder(cfg, context)


def offline() -> GoogleAdsForwarder:
    """For plans only (no network)."""
    return GoogleAdsForwarder(
        config(default_phone_country="US"),
        ForwarderContext(Path("."), None, Metrics()),  # type: ignore[arg-type]
    )


# -- events ----------------------------------------------------------------------------------


def purchase(message_id: str = "msg-purchase-1", **context: Any) -> Event:
    ctx: dict[str, Any] = {
        "consent": dict(GRANTED),
        "ip": "203.0.113.7",
        "userAgent": UA,
        "page": {"url": "https://www.shop.test/checkout/done"},
        "clickIds": {"gclid": GCLID},
        "traits": {
            "email": " Jane.Doe@Example.com ",
            "phone": "+1 (650) 555-1212",
            "firstName": "Jane",
            "address": {"city": "Menlo Park", "postalCode": "94025", "country": "US"},
        },
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


def lead() -> Event:
    return {
        "type": "track",
        "event": "Lead Generated",
        "messageId": "msg-lead-1",
        "timestamp": WHEN,
        "properties": {"form": "demo"},
        "context": {
            "consent": dict(GRANTED),
            "userAgent": UA,
            "page": {"url": "https://www.shop.test/contact"},
            "traits": {
                "email": "Cloudy.SanFrancisco+shopping@gmail.com",
                "phone": "(800)555-0100",
            },
        },
    }


def gbraid_purchase() -> Event:
    event = purchase("msg-gbraid-1", clickIds={})
    event["context"]["page"] = {"url": "https://www.shop.test/landing?gbraid=0AAAAA-gbraid_1"}
    event["context"]["traits"] = {}
    return event


def denied() -> Event:
    return purchase("msg-denied-1", consent={**GRANTED, "ad_user_data": "denied"})


CASES: dict[str, tuple[dict[str, Any], list[Event]]] = {
    "purchase_with_gclid_and_value": ({}, [purchase()]),
    "lead_without_click_id_by_email_and_phone": ({"default_phone_country": "US"}, [lead()]),
    "gbraid_from_the_landing_url": ({}, [gbraid_purchase()]),
    "ad_user_data_denied": ({}, [denied()]),
    "validate_only": ({"validate_only": True}, [purchase()]),
    "through_a_manager_account": ({"login_customer_id": "987-654-3210"}, [purchase()]),
}


def received(request: dict[str, Any]) -> dict[str, Any]:
    """What the fake API got, without what the HTTP client adds by itself."""
    keep = ("Authorization", "Content-Type", "developer-token", "login-customer-id")
    headers = {name: request["headers"][name] for name in keep if name in request["headers"]}
    return {
        "method": request["method"],
        "path": request["path"],
        "query": request["query"],
        "headers": headers,
        "body": orjson.loads(request["body"]),
    }


@pytest.mark.parametrize("case", sorted(CASES))
async def test_golden_requests(
    case: str, ads: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    overrides, events = CASES[case]
    fwd = forwarder(context, ads, token_endpoint, **overrides)
    plan = fwd.plan(events, NOW)
    assert dict(plan.drops) == {}
    for planned in plan.requests:
        authorized = await fwd.authorize(planned.request)
        assert not isinstance(authorized, Retry | Dead)
        assert isinstance(await send(context.http, authorized, 5.0), HttpResponse)
    [request] = [received(r) for r in ads.requests]
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(request, option=orjson.OPT_INDENT_2) + b"\n")
    assert request == orjson.loads(path.read_bytes())


def golden(case: str) -> dict[str, Any]:
    return orjson.loads((GOLDEN / f"{case}.json").read_bytes())  # type: ignore[no-any-return]


def test_golden_files_pin_the_rules() -> None:
    """What the golden files show, said once more in words."""
    request = golden("purchase_with_gclid_and_value")
    assert request["path"] == PATH
    assert request["headers"] == {
        "Authorization": "Bearer ya29.token-1",
        "Content-Type": "application/json",
        "developer-token": DEVELOPER_TOKEN,
    }
    body = request["body"]
    assert body["partialFailure"] is True and "validateOnly" not in body
    [row] = body["conversions"]
    assert row == {
        "gclid": GCLID,
        "conversionAction": PURCHASE_ACTION,
        "conversionDateTime": "2026-12-05 11:50:00+00:00",
        "conversionValue": 65.5,
        "currencyCode": "EUR",
        "orderId": "order-1001",
        "userIdentifiers": [
            {
                "hashedEmail": sha256_hex("jane.doe@example.com"),
                "userIdentifierSource": "FIRST_PARTY",
            },
            {
                "hashedPhoneNumber": sha256_hex("+16505551212"),
                "userIdentifierSource": "FIRST_PARTY",
            },
        ],
        "consent": {"adUserData": "GRANTED", "adPersonalization": "GRANTED"},
    }
    # Google's rules: gmail without dots and +suffix; E.164 with "+" (US by default).
    [lead_row] = golden("lead_without_click_id_by_email_and_phone")["body"]["conversions"]
    assert lead_row["conversionAction"] == LEAD_ACTION
    assert not {"gclid", "gbraid", "wbraid", "conversionValue"} & lead_row.keys()
    assert [next(iter(i.values())) for i in lead_row["userIdentifiers"]] == [
        sha256_hex("cloudysanfrancisco@gmail.com"),
        sha256_hex("+18005550100"),
    ]
    [gbraid_row] = golden("gbraid_from_the_landing_url")["body"]["conversions"]
    assert gbraid_row["gbraid"] == "0AAAAA-gbraid_1" and "userIdentifiers" not in gbraid_row
    [denied_row] = golden("ad_user_data_denied")["body"]["conversions"]
    assert "userIdentifiers" not in denied_row
    assert denied_row["consent"] == {"adUserData": "DENIED", "adPersonalization": "GRANTED"}
    assert denied_row["gclid"] == GCLID
    assert golden("validate_only")["body"]["validateOnly"] is True
    manager = golden("through_a_manager_account")["headers"]
    assert manager["login-customer-id"] == "9876543210"


def test_the_click_id_google_takes_is_gclid_then_wbraid_then_gbraid() -> None:
    fwd = offline()

    def sent(click_ids: dict[str, str]) -> dict[str, Any]:
        [planned] = fwd.plan([purchase(clickIds=click_ids)], NOW).requests
        [row] = orjson.loads(planned.request.body)["conversions"]
        return {k: row[k] for k in ("gclid", "wbraid", "gbraid") if k in row}

    assert sent({"gbraid": "g", "wbraid": "w", "gclid": "c"}) == {"gclid": "c"}
    assert sent({"gbraid": "g", "wbraid": "w"}) == {"wbraid": "w"}
    assert sent({"gbraid": "g"}) == {"gbraid": "g"}


def test_events_without_a_conversion_action_or_a_match_key_are_dropped_and_counted() -> None:
    fwd = offline()
    video: Event = {**purchase("m-1"), "event": "Video Played"}
    page: Event = {"type": "page", "messageId": "m-2", "timestamp": WHEN, "context": {}}
    identify: Event = {"type": "identify", "messageId": "m-3", "traits": {"email": "a@b.co"}}
    anonymous = purchase("m-4", clickIds={}, traits={})  # neither a click id nor an identifier
    denied_lead = lead()  # identifiers only, and ad_user_data denied: nothing to match on
    denied_lead["context"]["consent"] = {**GRANTED, "ad_user_data": "denied"}
    old = purchase("m-6")
    old["timestamp"] = (NOW - timedelta(days=91)).isoformat()
    kept = purchase("m-7")
    kept["timestamp"] = (NOW - timedelta(days=89)).isoformat()
    plan = fwd.plan([video, page, identify, anonymous, denied_lead, old, kept], NOW)
    assert dict(plan.drops) == {
        "no_conversion_action": 2,
        "not_a_conversion": 1,
        "no_match_key": 2,
        "too_old": 1,
    }
    [planned] = plan.requests
    assert planned.indices == (6,)


def test_event_names_match_exactly_then_loosely_then_by_meaning() -> None:
    fwd = GoogleAdsForwarder(
        config(
            conversions=[
                {"event": "purchase", "conversion_action": PURCHASE_ACTION},
                {"event": "Demo Booked", "conversion_action": LEAD_ACTION},
                {
                    "event": "page_view",
                    "conversion_action": f"customers/{CUSTOMER}/conversionActions/3",
                },
            ]
        ),
        ForwarderContext(Path("."), None, Metrics()),  # type: ignore[arg-type]
    )
    assert fwd.conversion_action("purchase", "purchase") == PURCHASE_ACTION
    assert fwd.conversion_action("Order Completed", "purchase") == PURCHASE_ACTION
    assert fwd.conversion_action("demo booked", None) == LEAD_ACTION
    assert fwd.conversion_action("Demo  Booked", None) == LEAD_ACTION
    assert fwd.conversion_action("Product Added", "add_to_cart") is None
    page: Event = {
        "type": "page",
        "messageId": "p-1",
        "timestamp": WHEN,
        "context": {"consent": GRANTED, "clickIds": {"gclid": GCLID}},
    }
    [planned] = fwd.plan([page], NOW).requests
    [row] = orjson.loads(planned.request.body)["conversions"]
    assert row["conversionAction"] == f"customers/{CUSTOMER}/conversionActions/3"


def test_at_most_2000_conversions_per_request() -> None:
    fwd = offline()
    events = [purchase(f"m-{i}") for i in range(4001)]
    plan = fwd.plan(events, NOW)
    assert [len(p.indices) for p in plan.requests] == [2000, 2000, 1]


def test_the_date_time_is_googles_format() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert google_date_time(moment) == "2026-01-02 03:04:05+00:00"


# -- Google's answers --------------------------------------------------------------------------


def google_error(
    status: int, rpc_status: str, kind: str, code: str, message: str = "msg", **error: Any
) -> bytes:
    ads_error: dict[str, Any] = {"errorCode": {kind: code}, "message": message, **error}
    return orjson.dumps(
        {
            "error": {
                "code": status,
                "message": "The caller does not have permission",
                "status": rpc_status,
                "details": [
                    {
                        "@type": FAILURE_TYPE,
                        "errors": [ads_error],
                        "requestId": "req-123",
                    }
                ],
            }
        }
    )


def row_error(index: int | None, code: str, message: str) -> dict[str, Any]:
    element: dict[str, Any] = {"fieldName": "conversions"}
    if index is not None:
        element["index"] = index
    return {
        "errorCode": {"conversionUploadError": code},
        "message": message,
        "trigger": {"stringValue": "abc"},
        "location": {"fieldPathElements": [element, {"fieldName": "gclid"}]},
    }


def partial_failure(*errors: dict[str, Any], results: list[Any] | None = None) -> bytes:
    return orjson.dumps(
        {
            "partialFailureError": {
                "code": 3,
                "message": "Multiple errors in 'details'. First error: ...",
                "details": [
                    {
                        "@type": FAILURE_TYPE,
                        "errors": list(errors),
                        "requestId": "req-9",
                    }
                ],
            },
            "results": results or [],
        }
    )


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (200, b'{"results": [{"gclid": "x"}]}', Delivered, None),
        (200, b"{}", Delivered, None),
        (200, b'{"partialFailureError": {}, "results": []}', Delivered, None),
        (
            429,
            google_error(429, "RESOURCE_EXHAUSTED", "quotaError", "RESOURCE_EXHAUSTED"),
            Retry,
            "google_ads_rate_limited",
        ),
        (
            400,
            google_error(400, "INVALID_ARGUMENT", "quotaError", "RESOURCE_TEMPORARILY_EXHAUSTED"),
            Retry,
            "google_ads_rate_limited",
        ),
        (
            500,
            google_error(500, "INTERNAL", "internalError", "INTERNAL_ERROR"),
            Retry,
            "google_ads_transient",
        ),
        (
            503,
            google_error(503, "UNAVAILABLE", "internalError", "TRANSIENT_ERROR"),
            Retry,
            "google_ads_transient",
        ),
        (
            504,
            google_error(504, "DEADLINE_EXCEEDED", "internalError", "DEADLINE_EXCEEDED"),
            Retry,
            "google_ads_transient",
        ),
        (
            400,
            google_error(400, "INVALID_ARGUMENT", "internalError", "TRANSIENT_ERROR"),
            Retry,
            "google_ads_transient",
        ),
        (
            401,
            google_error(401, "UNAUTHENTICATED", "authenticationError", "OAUTH_TOKEN_INVALID"),
            Dead,
            "google_ads_unauthenticated",
        ),
        (
            401,
            google_error(401, "UNAUTHENTICATED", "authenticationError", "DEVELOPER_TOKEN_INVALID"),
            Dead,
            "google_ads_developer_token",
        ),
        (
            403,
            google_error(
                403, "PERMISSION_DENIED", "authorizationError", "DEVELOPER_TOKEN_NOT_APPROVED"
            ),
            Dead,
            "google_ads_developer_token",
        ),
        (
            403,
            google_error(403, "PERMISSION_DENIED", "authorizationError", "USER_PERMISSION_DENIED"),
            Dead,
            "google_ads_permission_denied",
        ),
        (
            400,
            google_error(400, "INVALID_ARGUMENT", "requestError", "INVALID_CUSTOMER_ID"),
            Dead,
            "google_ads_request_error",
        ),
        (
            404,
            google_error(404, "NOT_FOUND", "requestError", "RESOURCE_NOT_FOUND"),
            Dead,
            "google_ads_request_error",
        ),
        (
            408,
            google_error(408, "DEADLINE_EXCEEDED", "requestError", "UNKNOWN"),
            Retry,
            "google_ads_transient",
        ),
        (502, b"<html>bad gateway</html>", Retry, "status_5xx"),
        (429, b"", Retry, "status_429"),
        (400, b"not json", Dead, "status_4xx"),
    ],
)
def test_error_classification(status: int, body: bytes, kind: type, reason: str | None) -> None:
    outcome = classify_google_ads_response(HttpResponse(status, {}, body), 1)
    assert isinstance(outcome, kind)
    if reason is not None:
        assert outcome.reason == reason  # type: ignore[union-attr]


def test_a_dead_letter_carries_googles_words() -> None:
    body = google_error(
        403,
        "PERMISSION_DENIED",
        "authorizationError",
        "USER_PERMISSION_DENIED",
        "User doesn't have permission to access customer. Note: If you're accessing a client "
        "customer, the manager's customer id must be set in the 'login-customer-id' header.",
    )
    assert classify_google_ads_response(HttpResponse(403, {}, body), 1) == Dead(
        "google_ads_permission_denied",
        "HTTP 403 PERMISSION_DENIED: authorizationError.USER_PERMISSION_DENIED: User doesn't "
        "have permission to access customer. Note: If you're accessing a client customer, the "
        "manager's customer id must be set in the 'login-customer-id' header. (request id "
        "req-123)",
    )


def test_a_quota_errors_retry_delay_is_honoured() -> None:
    body = google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "quotaError",
        "RESOURCE_EXHAUSTED",
        details={"quotaErrorDetails": {"rateScope": "DEVELOPER", "retryDelay": "37s"}},
    )
    outcome = classify_google_ads_response(HttpResponse(429, {}, body), 1)
    assert isinstance(outcome, Retry) and outcome.after_secs == 37.0
    plain = google_error(429, "RESOURCE_EXHAUSTED", "quotaError", "RESOURCE_EXHAUSTED")
    header = classify_google_ads_response(HttpResponse(429, {"Retry-After": "12"}, plain), 1)
    assert isinstance(header, Retry) and header.after_secs == 12.0


def test_row_errors_reject_their_rows_with_googles_words() -> None:
    body = partial_failure(
        row_error(1, "CLICK_NOT_FOUND", "The click for buyer@example.com can't be found."),
        row_error(None, "UNPARSEABLE_GCLID", "The imported gclid could not be decoded."),
        row_error(7, "EXPIRED_EVENT", "out of range: not in this request"),
    )
    outcome = classify_google_ads_response(HttpResponse(200, {}, body), 3)
    assert outcome == Delivered(
        rejected={
            0: "Google Ads conversionUploadError.UNPARSEABLE_GCLID: The imported gclid could "
            "not be decoded. (at conversions[0]; request id req-9)",
            1: "Google Ads conversionUploadError.CLICK_NOT_FOUND: The click for <email> can't "
            "be found. (at conversions[1]; request id req-9)",
        }
    )


def test_a_conversion_google_already_has_is_delivered() -> None:
    body = partial_failure(row_error(0, "CLICK_CONVERSION_ALREADY_EXISTS", "exists"))
    assert classify_google_ads_response(HttpResponse(200, {}, body), 2) == Delivered()


def test_every_row_failing_transiently_is_a_retry_and_errors_on_no_row_are_dead() -> None:
    transient = {
        "errorCode": {"internalError": "INTERNAL_ERROR"},
        "message": "An internal error has occurred.",
    }
    both = partial_failure(
        {
            **transient,
            "location": {"fieldPathElements": [{"fieldName": "conversions", "index": 0}]},
        },
        {
            **transient,
            "location": {"fieldPathElements": [{"fieldName": "conversions", "index": "1"}]},
        },
    )
    outcome = classify_google_ads_response(HttpResponse(200, {}, both), 2)
    assert isinstance(outcome, Retry) and outcome.reason == "google_ads_transient"
    one_of_two = classify_google_ads_response(HttpResponse(200, {}, both), 3)
    assert isinstance(one_of_two, Delivered) and set(one_of_two.rejected) == {0, 1}
    nowhere = classify_google_ads_response(HttpResponse(200, {}, partial_failure(transient)), 2)
    assert isinstance(nowhere, Dead) and nowhere.reason == "google_ads_partial_failure"


def test_errors_on_no_row_go_to_the_rows_whose_result_is_empty() -> None:
    unlocated = {"errorCode": {"conversionUploadError": "CLICK_NOT_FOUND"}, "message": "gone"}
    body = partial_failure(unlocated, results=[{"gclid": "a"}, {}, {"gclid": "c"}])
    outcome = classify_google_ads_response(HttpResponse(200, {}, body), 3)
    assert outcome == Delivered(
        rejected={
            1: "Google Ads conversionUploadError.CLICK_NOT_FOUND: gone (at conversions[1]; "
            "request id req-9)"
        }
    )
    taken = partial_failure(unlocated, results=[{"gclid": "a"}, {"gclid": "b"}])
    assert classify_google_ads_response(HttpResponse(200, {}, taken), 2) == Delivered()


def big_partial_failure(failed: list[int], rows: int) -> bytes:
    """Google's answer as it prints it (indented), large enough to be cut by the shared
    64 KiB limit: the row errors first, then a result per row."""
    errors = [
        row_error(i, "CLICK_NOT_FOUND", f"The click of row {i} can't be found.") for i in failed
    ]
    results = [
        {}
        if i in failed
        else {
            "gclid": f"gclid-{i:04d}-" + "x" * 80,
            "conversionAction": PURCHASE_ACTION,
            "conversionDateTime": "2026-12-05 11:50:00+00:00",
        }
        for i in range(rows)
    ]
    return json.dumps(json.loads(partial_failure(*errors, results=results)), indent=2).encode()


def test_a_cut_answer_is_scanned_for_its_row_errors() -> None:
    body = big_partial_failure([0, 5, 9], 2000)
    cut = body[: 64 * 1024].decode()
    assert scan_row_errors(cut) == [
        RowError(
            i, "conversionUploadError.CLICK_NOT_FOUND", f"The click of row {i} can't be found."
        )
        for i in (0, 5, 9)
    ]
    # Cut inside the errors: the ones received whole count, the one cut short does not.
    inside = body[: body.index(b"row 9")].decode()
    assert [e.row for e in scan_row_errors(inside) or []] == [0, 5]
    assert scan_row_errors('{"results": [{"gclid": "a"}, {"gcl') is None
    assert not cut_in_row_errors(HttpResponse(200, {}, body[: 64 * 1024]))
    assert cut_in_row_errors(HttpResponse(200, {}, inside.encode()))
    assert not cut_in_row_errors(HttpResponse(200, {}, body))


async def test_every_row_error_of_a_full_batch_is_read(
    ads: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    """1,200 conversions, 900 refused: Google's answer runs to hundreds of kilobytes, and
    every refused row must be named (an answer read up to 64 KiB named about 200)."""
    fwd = forwarder(context, ads, token_endpoint)
    now = datetime.now(UTC).isoformat()
    events = [{**purchase(f"m-{i}"), "timestamp": now} for i in range(1200)]
    refused = [i for i in range(1200) if i % 4 != 3]
    body = big_partial_failure(refused, 1200)
    assert len(body) > 256 * 1024
    ads.script = [(200, {"Content-Type": "application/json"}, body)]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Delivered)
    assert sorted(outcome.rejected) == sorted(refused)


async def test_a_partial_failure_in_a_large_answer_rejects_the_named_rows(
    ads: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, ads, token_endpoint)
    now = datetime.now(UTC).isoformat()
    events = [{**purchase(f"m-{i}"), "timestamp": now} for i in range(600)]
    body = big_partial_failure([3, 400], 600)
    assert len(body) > 64 * 1024
    ads.script = [(200, {"Content-Type": "application/json"}, body)]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Delivered)
    assert sorted(outcome.rejected) == [3, 400]


async def test_an_answer_cut_inside_its_row_errors_is_reported(
    ads: Recorder,
    token_endpoint: FakeTokenEndpoint,
    context: ForwarderContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fwd = forwarder(context, ads, token_endpoint)
    fwd.max_response_bytes = 64 * 1024  # type: ignore[misc]  # an answer past what is read
    now = datetime.now(UTC).isoformat()
    events = [{**purchase(f"m-{i}"), "timestamp": now} for i in range(600)]
    ads.script = [(200, {}, big_partial_failure(list(range(300)), 600))]
    with caplog.at_level("WARNING"):
        outcome = await fwd.deliver(events)
    assert isinstance(outcome, Delivered)
    named = sorted(outcome.rejected)
    assert 0 < len(named) < 300 and named == list(range(len(named)))
    [cut] = [r for r in caplog.records if r.name == "tagrelay.forwarders._batched"]
    assert cut.read_bytes == 64 * 1024  # type: ignore[attr-defined]
    [record] = [r for r in caplog.records if r.name == "tagrelay.forwarders.google_ads"]
    assert record.getMessage().startswith("Google Ads answer cut before the end of its row")
    assert (record.rows, record.rows_rejected) == (600, len(named))  # type: ignore[attr-defined]


# -- credentials -------------------------------------------------------------------------------


async def test_a_401_refreshes_the_token_once_and_resends(
    ads: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, ads, token_endpoint)
    expired = google_error(401, "UNAUTHENTICATED", "authenticationError", "OAUTH_TOKEN_EXPIRED")
    ads.script = [(401, {}, expired)]
    events = [{**purchase(), "timestamp": datetime.now(UTC).isoformat()}]
    assert await fwd.deliver(events) == Delivered()
    assert [r["headers"]["Authorization"] for r in ads.requests] == [
        "Bearer ya29.token-1",
        "Bearer ya29.token-2",
    ]
    assert len(token_endpoint.forms) == 2
    # A second refusal after the refresh is Google's answer: dead, with its words.
    ads.script = [(401, {}, expired), (401, {}, expired)]
    outcome = await fwd.deliver([{**purchase("m-2"), "timestamp": datetime.now(UTC).isoformat()}])
    assert isinstance(outcome, Dead) and outcome.reason == "google_ads_unauthenticated"
    assert "OAUTH_TOKEN_EXPIRED" in outcome.detail
    assert len(token_endpoint.forms) == 3


async def test_a_refused_developer_token_is_dead_without_a_token_refresh(
    ads: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, ads, token_endpoint)
    refused = google_error(
        401, "UNAUTHENTICATED", "authenticationError", "DEVELOPER_TOKEN_INVALID", "bad token"
    )
    ads.script = [(401, {}, refused)]
    outcome = await fwd.deliver([{**purchase(), "timestamp": datetime.now(UTC).isoformat()}])
    assert outcome == Dead(
        "google_ads_developer_token",
        "HTTP 401 UNAUTHENTICATED: authenticationError.DEVELOPER_TOKEN_INVALID: bad token "
        "(request id req-123)",
    )
    assert (len(ads.requests), len(token_endpoint.forms)) == (1, 1)


async def test_secrets_never_reach_a_dead_letter(
    ads: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, ads, token_endpoint)
    echo = f"bad developer-token {DEVELOPER_TOKEN} with Bearer ya29.token-1"
    ads.script = [
        (400, {}, google_error(400, "INVALID_ARGUMENT", "requestError", "BAD_INPUT", echo))
    ]
    outcome = await fwd.deliver([{**purchase(), "timestamp": datetime.now(UTC).isoformat()}])
    assert isinstance(outcome, Dead)
    assert DEVELOPER_TOKEN not in outcome.detail and "ya29.token-1" not in outcome.detail
    assert "bad developer-token *** with Bearer ***" in outcome.detail


# -- match keys ---------------------------------------------------------------------------------


async def test_only_the_keys_google_takes_are_counted(
    ads: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext
) -> None:
    fwd = forwarder(context, ads, token_endpoint, default_phone_country="US")
    now = datetime.now(UTC).isoformat()
    events = [
        {**purchase(), "timestamp": now},
        {**lead(), "timestamp": now},
        {**denied(), "timestamp": now},
    ]
    assert await fwd.deliver(events) == Delivered()

    def counted(key: str) -> float:
        labels = {"forwarder": "gads", "key": key}
        value = context.metrics.registry.get_sample_value(
            "tagrelay_forwarder_match_keys_total", labels
        )
        return value or 0.0

    expected = {
        "email": 2,
        "phone": 2,
        "click_id": 2,
        "name": 0,
        "address": 0,
        "ip": 0,
        "user_agent": 0,
        "external_id": 0,
        "none": 0,
    }
    assert {key: counted(key) for key in expected} == expected


# -- registry and config -------------------------------------------------------------------------


def test_google_ads_is_registered_and_configured_from_yaml_keys() -> None:
    assert FORWARDERS["google_ads"] is GoogleAdsForwarder
    cfg = config(login_customer_id="987-654-3210")
    assert cfg.requires_consent == ["ads"]
    assert (cfg.base_url, cfg.api_version) == ("https://googleads.googleapis.com", "v26")
    assert (cfg.customer_id, cfg.login_customer_id) == (CUSTOMER, "9876543210")
    assert cfg.token_url == "https://oauth2.googleapis.com/token"
    assert DEVELOPER_TOKEN not in repr(cfg) and REFRESH_TOKEN not in repr(cfg)


def problems(**overrides: Any) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        config(**overrides)
    return [
        ".".join(str(p) for p in e["loc"]) + ": " + e["msg"].removeprefix("Value error, ")
        for e in caught.value.errors()
    ]


def test_bad_ids_and_resource_names_are_configuration_errors() -> None:
    assert problems(
        customer_id="123-45-6789",
        conversions=[{"event": "Order Completed", "conversion_action": "conversionActions/456"}],
    ) == [
        "customer_id: '123-45-6789' is not a Google Ads customer id: expected 10 digits, with "
        "or without dashes (123-456-7890), as shown at the top of the Google Ads UI",
        "conversions.0.conversion_action: 'conversionActions/456' is not a conversion "
        "action's resource name: expected customers/<customer id, digits only>/"
        "conversionActions/<action id>, such as customers/1234567890/conversionActions/"
        "987654321",
    ]
    assert problems(
        conversions=[
            {"event": "Order Completed", "conversion_action": PURCHASE_ACTION},
            {"event": "order completed", "conversion_action": LEAD_ACTION},
        ]
    ) == [
        ": conversions lists an event more than once (names match ignoring case and spaces): "
        "'order completed' (also 'Order Completed'); keep one entry per event"
    ]
    assert problems(events={"Order Completed": "Purchase"}) == [
        "events: google_ads uploads name no events: list each event under conversions with "
        "its conversion_action instead"
    ]
    assert problems(conversions=[])[0].startswith("conversions: List should have at least 1 item")
    assert problems(unmapped="custom")[0].startswith("unmapped: Input should be 'skip'")
    assert problems(oauth=None) == [
        ": no credentials: set oauth (client_id, client_secret, refresh_token) or "
        "service_account_file (a service account's JSON key file)"
    ]


def test_a_yaml_config_with_google_ads_validates() -> None:
    raw = {
        "keys": [{"id": "backend", "kind": "server", "key": "k"}],
        "forwarders": [raw_config(validate_only=True, login_customer_id="9876543210")],
    }
    [fwd] = Config.model_validate(raw).forwarders
    assert isinstance(fwd, GoogleAdsConfig)
    assert fwd.validate_only is True
    assert [c.conversion_action for c in fwd.conversions] == [PURCHASE_ACTION, LEAD_ACTION]


# -- end to end through the relay ------------------------------------------------------------------


def relay_forwarder(ads: Recorder, token: FakeTokenEndpoint) -> dict[str, Any]:
    return raw_config(
        base_url=ads.url.rstrip("/"),
        token_url=token.url,
        batch={"max_events": 10, "max_wait_secs": 0.05},
    )


def segment_order(message_id: str, consent: dict[str, str], **context: Any) -> dict[str, Any]:
    return {
        "userId": "user-42",
        "event": "Order Completed",
        "messageId": message_id,
        "properties": {"order_id": f"o-{message_id}", "revenue": 42.0, "currency": "USD"},
        "context": {
            "consent": consent,
            "traits": {"email": "buyer@example.com"},
            "userAgent": UA,
            "ip": "198.51.100.4",
            "clickIds": {"gclid": GCLID},
            **context,
        },
    }


async def test_an_order_with_a_gclid_reaches_google_ads_as_its_conversion_action(
    relay: Any, ads: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    client = await relay(forwarders=[relay_forwarder(ads, token_endpoint)])
    auth = basic(SERVER_KEY)
    landing = segment_order(
        "order-2",
        GRANTED,
        clickIds={},
        page={"url": f"https://www.shop.test/?utm_source=google&gclid={GCLID}-landing"},
    )
    for body in (
        segment_order("order-1", GRANTED),
        landing,
        segment_order("order-denied", {"ads": "denied"}),
        {**segment_order("video-1", GRANTED), "event": "Video Played"},
    ):
        response = await client.post("/v1/track", json=body, headers=auth)
        assert response.status == 200
    await wait_idle(client.app)
    rows = [row for r in ads.requests for row in orjson.loads(r["body"])["conversions"]]
    assert [(row["orderId"], row["gclid"]) for row in rows] == [
        ("o-order-1", GCLID),
        ("o-order-2", f"{GCLID}-landing"),
    ]
    for row in rows:
        assert row["conversionAction"] == PURCHASE_ACTION
        assert (row["conversionValue"], row["currencyCode"]) == (42.0, "USD")
        assert row["userIdentifiers"][0]["hashedEmail"] == sha256_hex("buyer@example.com")
    assert ads.requests[0]["headers"]["developer-token"] == DEVELOPER_TOKEN
    assert ads.requests[0]["headers"]["Authorization"] == "Bearer ya29.token-1"
    app = client.app
    for reason in ("consent_denied", "no_conversion_action"):
        labels = {"forwarder": "gads", "reason": reason}
        assert metric_value(app, "tagrelay_forwarder_dropped_total", labels) == 1, reason
    delivered = {"forwarder": "gads", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 2


async def test_a_partial_failure_dead_letters_only_the_failed_row(
    relay: Any, ads: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    ads.script = [
        (
            200,
            {"Content-Type": "application/json"},
            partial_failure(
                row_error(1, "CLICK_NOT_FOUND", "The click can't be found."),
                results=[{"gclid": "a"}, {}, {"gclid": "c"}],
            ),
        )
    ]
    client = await relay(forwarders=[relay_forwarder(ads, token_endpoint)])
    batch = [segment_order(f"order-{i}", GRANTED) for i in range(3)]
    response = await client.post(
        "/v1/batch",
        json={"batch": [{**e, "type": "track"} for e in batch]},
        headers=basic(SERVER_KEY),
    )
    assert response.status == 200
    await wait_idle(client.app)
    [request] = ads.requests
    assert len(orjson.loads(request["body"])["conversions"]) == 3
    dead = await client.app[SPOOL].dead_letters("gads")
    assert [(d.reason, d.detail) for d in dead] == [
        (
            "rejected_by_destination",
            "Google Ads conversionUploadError.CLICK_NOT_FOUND: The click can't be found. "
            "(at conversions[1]; request id req-9)",
        )
    ]
    app = client.app
    labels = {"forwarder": "gads", "reason": "rejected_by_destination"}
    assert metric_value(app, "tagrelay_dead_letters_total", labels) == 1
    delivered = {"forwarder": "gads", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 2


async def test_a_revoked_refresh_token_dead_letters_the_batch_with_googles_words(
    relay: Any, ads: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    token_endpoint.answers = [
        (400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."})
    ]
    client = await relay(forwarders=[relay_forwarder(ads, token_endpoint)])
    response = await client.post(
        "/v1/track", json=segment_order("order-1", GRANTED), headers=basic(SERVER_KEY)
    )
    assert response.status == 200
    await wait_idle(client.app)
    assert ads.requests == []
    [dead] = await client.app[SPOOL].dead_letters("gads")
    assert dead.reason == "token_invalid_grant"
    assert dead.detail == (
        "token endpoint answered HTTP 400: invalid_grant: Token has been expired or revoked."
    )
    labels = {"forwarder": "gads", "reason": "token_invalid_grant"}
    assert metric_value(client.app, "tagrelay_dead_letters_total", labels) == 1


async def test_a_gclid_from_the_landing_page_reaches_a_later_order_through_the_cookie(
    relay: Any, ads: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    client = await relay(forwarders=[relay_forwarder(ads, token_endpoint)])
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
            "page": {"url": f"https://www.shop.test/?gclid={GCLID}", "path": "/"},
        },
    }
    resp = await client.post("/d", data=script_body(landing), headers=browser)
    assert resp.status == 200
    cookie = "; ".join(
        f"{morsel.key}={morsel.value}" for morsel in resp.cookies.values() if morsel.value
    )
    assert "tr_clk=" in cookie
    order = {
        "type": "track",
        "event": "Order Completed",
        "anonymousId": "visitor-1",
        "messageId": "order-1",
        "properties": {"order_id": "o-1", "revenue": 10, "currency": "usd"},
        "context": {
            "consent": GRANTED,
            "page": {"url": "https://www.shop.test/thanks", "path": "/thanks"},
        },
    }
    resp = await client.post("/d", data=script_body(order), headers={**browser, "Cookie": cookie})
    assert resp.status == 200
    await wait_idle(client.app)
    [request] = ads.requests  # the page view has no conversion action
    [row] = orjson.loads(request["body"])["conversions"]
    assert (row["gclid"], row["orderId"], row["conversionValue"]) == (GCLID, "o-1", 10)
    assert row["conversionAction"] == PURCHASE_ACTION


async def test_a_401_through_the_relay_refreshes_the_token_and_the_order_arrives(
    relay: Any, ads: Recorder, token_endpoint: FakeTokenEndpoint
) -> None:
    expired = google_error(401, "UNAUTHENTICATED", "authenticationError", "OAUTH_TOKEN_EXPIRED")
    ads.script = [(401, {}, expired)]
    client = await relay(forwarders=[relay_forwarder(ads, token_endpoint)])
    response = await client.post(
        "/v1/track", json=segment_order("order-1", GRANTED), headers=basic(SERVER_KEY)
    )
    assert response.status == 200
    await wait_idle(client.app)
    assert [r["headers"]["Authorization"] for r in ads.requests] == [
        "Bearer ya29.token-1",
        "Bearer ya29.token-2",
    ]
    assert ads.requests[0]["body"] == ads.requests[1]["body"]
    assert len(token_endpoint.forms) == 2
    assert await client.app[SPOOL].dead_letters("gads") == []
    delivered = {"forwarder": "gads", "outcome": "delivered"}
    assert metric_value(client.app, "tagrelay_forwarder_events_total", delivered) == 1


async def test_a_service_account_gets_the_token(
    ads: Recorder, token_endpoint: FakeTokenEndpoint, context: ForwarderContext, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = key_file(tmp_path, key)
    fwd = forwarder(context, ads, token_endpoint, oauth=None, service_account_file=str(path))
    assert await fwd.deliver([{**purchase(), "timestamp": datetime.now(UTC).isoformat()}]) == (
        Delivered()
    )
    [form] = [parse_qs(body.decode()) for body in token_endpoint.forms]
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    assert ads.requests[0]["headers"]["Authorization"] == "Bearer ya29.token-1"
