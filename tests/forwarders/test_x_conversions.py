"""The x forwarder (Conversion API): OAuth 1.0a signatures against the published examples
(RFC 5849's and X's own), the exact requests a fake X receives (golden files under
``golden/x_conversions/``, one per behaviour; the fake checks every signature with the same
secrets, by its own computation), X's answers classified, and end to end through the relay:
a Segment ``Order Completed`` after a click with a ``twclid`` reaches the fake X as its
configured event with ``conversion_id`` = its ``messageId``; an event denying ``ads`` does
not; one denying ``ad_user_data`` goes without its hashed email and phone.

X has no test mode (destinations.md §9): the README says to map events to an event made
for trying the setup.

Regenerate the golden files after an intended change with ``TAGRELAY_UPDATE_GOLDEN=1``
(and read the diff)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import orjson
import pytest
from aiohttp import web
from pydantic import ValidationError

from tagrelay.appkeys import SPOOL
from tagrelay.config.models import Config
from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._http import HttpResponse, send
from tagrelay.forwarders._user_data import sha256_hex
from tagrelay.forwarders.x_conversions import (
    OAuth1Credentials,
    OAuth1Signer,
    XConfig,
    XForwarder,
    classify_x_response,
    oauth1_authorization,
    oauth1_signature,
    percent_encode,
    signature_base_string,
    x_conversion_time,
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

GOLDEN = Path(__file__).parent / "golden" / "x_conversions"
UPDATE = os.environ.get("TAGRELAY_UPDATE_GOLDEN") == "1"

PIXEL = "o8z6j"
PATH = f"/12/measurement/conversions/{PIXEL}"
PURCHASE_EVENT = "tw-o8z6j-o87ne"
SIGNUP_EVENT = "o87nf"
PAGE_EVENT = "tw-o8z6j-o87ng"
CONSUMER_KEY = "xvz1evFS4wEEPTGEFPHBog-test"
CONSUMER_SECRET = "kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3Wp/odd+secret="
ACCESS_TOKEN = "370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb"
ACCESS_TOKEN_SECRET = "LswwdoUaIvS8ltyTt5jkRh4J50vU/odd+token=secret"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WHEN = (NOW - timedelta(minutes=10)).isoformat()
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Safari"
TWCLID = "23opevjt88psuo13lu8d020qkn"


# -- OAuth 1.0a against the published examples ------------------------------------------------


def test_rfc_5849_section_1_2_signature() -> None:
    """RFC 5849 §1.2: printer.example.com's request for Jane's photo (no oauth_version)."""
    params = {
        "oauth_consumer_key": "dpf43f3p2l4k3l03",
        "oauth_token": "nnch734d00sl2jdk",
        "oauth_signature_method": "HMAC-SHA1",
        "oauth_timestamp": "137131202",
        "oauth_nonce": "chapoH",
        "realm": "Photos",
    }
    url = "http://photos.example.net/photos?file=vacation.jpg&size=original"
    base = signature_base_string("get", url, params)
    assert base == (
        "GET&http%3A%2F%2Fphotos.example.net%2Fphotos&file%3Dvacation.jpg%26"
        "oauth_consumer_key%3Ddpf43f3p2l4k3l03%26oauth_nonce%3DchapoH%26"
        "oauth_signature_method%3DHMAC-SHA1%26oauth_timestamp%3D137131202%26"
        "oauth_token%3Dnnch734d00sl2jdk%26size%3Doriginal"
    )
    signature = oauth1_signature(base, "kd94hf93k423kf44", "pfkkdhi9sl3r4s00")
    assert signature == "MdpQcU8iPSUjWoN/UDMsK2sui9I="
    assert percent_encode(signature) == "MdpQcU8iPSUjWoN%2FUDMsK2sui9I%3D"


def test_rfc_5849_section_3_4_1_base_string() -> None:
    """RFC 5849 §3.4.1.1: query and form parameters decoded, encoded again, sorted (a
    repeated name by value), the realm and signature left out."""
    params = {
        "realm": "Example",
        "oauth_consumer_key": "9djdj82h48djs9d2",
        "oauth_token": "kkk9d7dh3k39sjv7",
        "oauth_signature_method": "HMAC-SHA1",
        "oauth_timestamp": "137131201",
        "oauth_nonce": "7d8f3e4a",
        "oauth_signature": "bYT5CMsGcbgUdFHObYMEfcx6bsw%3D",
    }
    url = "http://EXAMPLE.COM:80/request?b5=%3D%253D&a3=a&c%40=&a2=r%20b"
    form = parse_qsl("c2&a3=2+q", keep_blank_values=True)
    assert signature_base_string("POST", url, params, form) == (
        "POST&http%3A%2F%2Fexample.com%2Frequest&a2%3Dr%2520b%26a3%3D2%2520q%26a3%3Da%26"
        "b5%3D%253D%25253D%26c%2540%3D%26c2%3D%26oauth_consumer_key%3D9djdj82h48djs9d2%26"
        "oauth_nonce%3D7d8f3e4a%26oauth_signature_method%3DHMAC-SHA1%26oauth_timestamp%3D"
        "137131201%26oauth_token%3Dkkk9d7dh3k39sjv7"
    )
    # §3.4.1.2: a port that is not the scheme's default stays
    assert signature_base_string("GET", "https://www.example.net:8080/?q=1", {}).startswith(
        "GET&https%3A%2F%2Fwww.example.net%3A8080%2F&"
    )


def test_xs_own_signature_example() -> None:
    """X's "Creating a signature" guide: the header of a signed form POST, oauth_version
    1.0 included, parameters in order, values encoded."""
    credentials = OAuth1Credentials(
        "xvz1evFS4wEEPTGEFPHBog",
        "kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw",
        "370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb",
        "LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE",
    )
    header = oauth1_authorization(
        credentials,
        "POST",
        "https://api.twitter.com/1.1/statuses/update.json?include_entities=true",
        timestamp=1318622958,
        nonce="kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg",
        form=[("status", "Hello Ladies + Gentlemen, a signed OAuth request!")],
    )
    assert header == (
        'OAuth oauth_consumer_key="xvz1evFS4wEEPTGEFPHBog", '
        'oauth_nonce="kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg", '
        'oauth_signature="hCtSmYh%2BiHYCEqBWrE7C7hYmtUk%3D", '
        'oauth_signature_method="HMAC-SHA1", oauth_timestamp="1318622958", '
        'oauth_token="370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb", '
        'oauth_version="1.0"'
    )
    assert "LswwdoUa" not in repr(credentials) and "kAcSOq" not in repr(credentials)


def test_percent_encoding_is_rfc_5849s() -> None:
    assert percent_encode("Ladies + Gentlemen") == "Ladies%20%2B%20Gentlemen"
    assert percent_encode("An encoded string!") == "An%20encoded%20string%21"
    assert percent_encode("Dogs, Cats & Mice") == "Dogs%2C%20Cats%20%26%20Mice"
    assert percent_encode("☃ é/~-._") == "%E2%98%83%20%C3%A9%2F~-._"


# -- the fake X --------------------------------------------------------------------------------


def rfc3986(text: str) -> str:
    return quote(text, safe="")


def expected_signature(
    request: web.Request, params: dict[str, str], consumer_secret: str, token_secret: str
) -> str:
    """The signature of ``request`` as X computes it: written here again, apart from the
    forwarder's, so that both would have to be wrong the same way to agree."""
    pairs = [(k, v) for k, v in params.items() if k != "oauth_signature"]
    pairs += list(request.query.items())
    normalized = "&".join(sorted(f"{rfc3986(k)}={rfc3986(v)}" for k, v in pairs))
    uri = f"{request.scheme}://{request.host.lower()}{request.path}"
    base = f"{request.method}&{rfc3986(uri)}&{rfc3986(normalized)}"
    key = f"{rfc3986(consumer_secret)}&{rfc3986(token_secret)}"
    digest = hmac.new(key.encode(), base.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@dataclass
class FakeX:
    """X's Conversion API: checks each request's OAuth 1.0a signature with the secrets it
    knows (401 with X's error when it does not match, or a nonce comes twice), records the
    request, and answers from ``script``, then 200 with ``conversions_processed``."""

    consumer_secret: str = CONSUMER_SECRET
    token_secret: str = ACCESS_TOKEN_SECRET
    requests: list[dict[str, Any]] = field(default_factory=list)
    script: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    nonces: set[str] = field(default_factory=set)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get("Authorization", "")
        params = {k: unquote(v) for k, v in re.findall(r'(\w+)="([^"]*)"', header)}
        valid = (
            header.startswith("OAuth ")
            and params.get("oauth_consumer_key") == CONSUMER_KEY
            and params.get("oauth_token") == ACCESS_TOKEN
            and params.get("oauth_signature_method") == "HMAC-SHA1"
            and params.get("oauth_version") == "1.0"
            and params.get("oauth_nonce", "") not in self.nonces
            and params.get("oauth_signature")
            == expected_signature(request, params, self.consumer_secret, self.token_secret)
        )
        self.nonces.add(params.get("oauth_nonce", ""))
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "oauth": params,
                "signed": valid,
                "body": body,
            }
        )
        if not valid:
            error = {"errors": [{"code": 32, "message": "Could not authenticate you."}]}
            return web.json_response(error, status=401)
        if self.script:
            status, headers, text = self.script.pop(0)
            return web.Response(status=status, headers=headers, body=text)
        count = len(orjson.loads(body)["conversions"])
        answer = {
            "request": {"params": {"account_id": "18ce54d4x5t"}},
            "data": {"conversions_processed": count, "debug_id": "dbg-1"},
        }
        return web.json_response(answer)


@pytest.fixture
async def x_api() -> AsyncIterator[FakeX]:
    fake = FakeX()
    async with fake_server("X", {PATH: fake.handle}) as server:
        fake.url = str(server.make_url("/"))
        yield fake


CONVERSIONS = [
    {"event": "Order Completed", "event_id": PURCHASE_EVENT},
    {"event": "sign_up", "event_id": SIGNUP_EVENT},
    {"event": "page_view", "event_id": PAGE_EVENT},
]


def raw_config(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "x",
        "type": "x",
        "pixel_id": PIXEL,
        "consumer_key": CONSUMER_KEY,
        "consumer_secret": CONSUMER_SECRET,
        "access_token": ACCESS_TOKEN,
        "access_token_secret": ACCESS_TOKEN_SECRET,
        "conversions": CONVERSIONS,
    }
    return {**raw, **overrides}


def config(**overrides: Any) -> XConfig:
    return XConfig.model_validate(raw_config(**overrides))


def forwarder(context: ForwarderContext, x_api: FakeX, **overrides: Any) -> XForwarder:
    return XForwarder(config(base_url=x_api.url.rstrip("/"), **overrides), context)


def offline(**overrides: Any) -> XForwarder:
    """For plans only (no network)."""
    return XForwarder(
        config(**overrides),
        ForwarderContext(Path("."), None, Metrics()),  # type: ignore[arg-type]
    )


# -- events ------------------------------------------------------------------------------------


def purchase(message_id: str = "msg-purchase-1", **context: Any) -> Event:
    ctx: dict[str, Any] = {
        "consent": dict(GRANTED),
        "ip": "203.0.113.7",
        "userAgent": UA,
        "page": {"url": f"https://www.shop.test/checkout/done?twclid={TWCLID}"},
        "traits": {"email": " Jane.Doe@Example.com ", "phone": "(650) 555-1212"},
    }
    ctx.update(context)
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": message_id,
        "userId": "user-42",
        "timestamp": WHEN,
        "properties": {
            "order_id": "order-1001",
            "total": 65.5,
            "currency": "eur",
            "products": [
                {"product_id": "sku-1", "price": 20, "quantity": 2, "name": "Mug"},
                {"sku": "sku-2", "price": 25.5},
            ],
        },
        "context": ctx,
    }


def signup() -> Event:
    return {
        "type": "track",
        "event": "Signed Up",
        "messageId": "msg-signup-1",
        "userId": "user-7",
        "timestamp": WHEN,
        "context": {"consent": dict(GRANTED), "traits": {"email": "new.user@example.com"}},
    }


def page_view() -> Event:
    return {
        "type": "page",
        "messageId": "msg-page-1",
        "anonymousId": "anon-1",
        "timestamp": WHEN,
        "context": {
            "consent": dict(GRANTED),
            "userAgent": UA,
            "ip": "203.0.113.9",
            "page": {"url": "https://www.shop.test/pricing"},
            "clickIds": {"twclid": TWCLID},
        },
    }


def denied() -> Event:
    return purchase("msg-denied-1", consent={**GRANTED, "ad_user_data": "denied"})


def hashed_email() -> Event:
    event = purchase("msg-hashed-1", page={})
    event["context"]["traits"] = {"email": sha256_hex("jane.doe@example.com").upper()}
    return event


CASES: dict[str, tuple[dict[str, Any], list[Event]]] = {
    "purchase_with_click_id_email_phone_and_contents": (
        {"default_phone_country": "US"},
        [purchase()],
    ),
    "sign_up_by_email_without_a_click_id": ({}, [signup()]),
    "page_view_with_click_id": ({}, [page_view()]),
    "ad_user_data_denied": ({}, [denied()]),
    "already_hashed_email": ({}, [hashed_email()]),
    "events_of_a_batch_in_one_request": ({}, [page_view(), signup()]),
}


def fixed_signer(fwd: XForwarder) -> None:
    """The same time and a new nonce per request, so that golden files hold still."""
    count = iter(range(1, 1000))
    fwd.signer = OAuth1Signer(
        fwd.signer.credentials,
        clock=lambda: NOW.timestamp(),
        nonce=lambda: f"nonce-{next(count)}",
    )


def received(request: dict[str, Any]) -> dict[str, Any]:
    """What the fake X got, without what the HTTP client adds by itself; the signature
    (which covers the fake's port) as the fake found it."""
    assert request["signed"], "the fake X refused the signature"
    oauth = dict(request["oauth"], oauth_signature="<checked by the fake X>")
    return {
        "method": request["method"],
        "path": request["path"],
        "query": request["query"],
        "headers": {
            "Authorization (OAuth)": oauth,
            "Content-Type": request["headers"].get("Content-Type"),
        },
        "body": orjson.loads(request["body"]),
    }


def golden(case: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((GOLDEN / f"{case}.json").read_bytes())
    return loaded


@pytest.mark.parametrize("case", sorted(CASES))
async def test_golden_requests(case: str, x_api: FakeX, context: ForwarderContext) -> None:
    overrides, events = CASES[case]
    fwd = forwarder(context, x_api, **overrides)
    fixed_signer(fwd)
    plan = fwd.plan(events, NOW)
    assert dict(plan.drops) == {}
    for planned in plan.requests:
        authorized = await fwd.authorize(planned.request)
        assert not isinstance(authorized, Retry | Dead)
        response = await send(context.http, authorized, 5.0)
        assert isinstance(response, HttpResponse) and response.status == 200
    [request] = [received(r) for r in x_api.requests]
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(request, option=orjson.OPT_INDENT_2) + b"\n")
    assert request == orjson.loads(path.read_bytes())


def test_golden_files_pin_the_rules() -> None:
    """What the golden files show, said once more in words."""
    request = golden("purchase_with_click_id_email_phone_and_contents")
    assert (request["method"], request["path"], request["query"]) == ("POST", PATH, {})
    assert request["headers"]["Authorization (OAuth)"] == {
        "oauth_consumer_key": CONSUMER_KEY,
        "oauth_nonce": "nonce-1",
        "oauth_signature": "<checked by the fake X>",
        "oauth_signature_method": "HMAC-SHA1",
        "oauth_timestamp": str(int(NOW.timestamp())),
        "oauth_token": ACCESS_TOKEN,
        "oauth_version": "1.0",
    }
    [conversion] = request["body"]["conversions"]
    assert conversion == {
        "conversion_time": "2026-12-05T11:50:00.000Z",
        "event_id": PURCHASE_EVENT,
        "identifiers": [
            {"twclid": TWCLID, "ip_address": "203.0.113.7", "user_agent": UA},
            {"hashed_email": sha256_hex("jane.doe@example.com")},
            # X: "Phone Number: E164 Standard", SHA-256 (destinations.md §9)
            {"hashed_phone_number": sha256_hex("+16505551212")},
        ],
        "conversion_id": "msg-purchase-1",
        "value": 65.5,
        "price_currency": "EUR",
        "number_items": 3,
        "contents": [
            {"content_id": "sku-1", "content_name": "Mug", "content_price": 20, "num_items": 2},
            {"content_id": "sku-2", "content_price": 25.5},
        ],
    }
    [sign_up] = golden("sign_up_by_email_without_a_click_id")["body"]["conversions"]
    assert sign_up["event_id"] == SIGNUP_EVENT  # "Signed Up" by meaning: sign_up
    assert sign_up["identifiers"] == [{"hashed_email": sha256_hex("new.user@example.com")}]
    # ad_user_data denied: the click id and user agent stay; email, phone and IP do not.
    [conversion] = golden("ad_user_data_denied")["body"]["conversions"]
    assert conversion["identifiers"] == [{"twclid": TWCLID, "user_agent": UA}]
    [conversion] = golden("already_hashed_email")["body"]["conversions"]
    assert conversion["identifiers"][0]["hashed_email"] == sha256_hex("jane.doe@example.com")


def test_each_attempt_is_signed_anew() -> None:
    credentials = OAuth1Credentials("ck", "cs", "at", "ats")
    signer = OAuth1Signer(credentials)
    first = signer.authorization("POST", "https://ads-api.x.com/12/measurement/conversions/o8z6j")
    again = signer.authorization("POST", "https://ads-api.x.com/12/measurement/conversions/o8z6j")
    nonces = [re.findall(r'oauth_nonce="([^"]+)"', h)[0] for h in (first, again)]
    assert nonces[0] != nonces[1] and all(len(n) == 32 for n in nonces)


def test_the_conversion_time_is_iso_8601_in_utc_with_milliseconds() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert x_conversion_time(moment) == "2026-01-02T03:04:05.678Z"
    paris = datetime.fromisoformat("2026-01-02T04:04:05+01:00")
    assert x_conversion_time(paris) == "2026-01-02T03:04:05.000Z"


def test_events_without_an_x_event_or_a_match_key_are_dropped_and_counted() -> None:
    fwd = offline(default_phone_country="US")
    video: Event = {**purchase("m-1"), "event": "Video Played"}
    identify: Event = {"type": "identify", "messageId": "m-2", "traits": {"email": "a@b.co"}}
    ip_and_agent_only = purchase("m-3", page={"url": "https://www.shop.test/"}, traits={})
    denied_no_click = purchase("m-4", page={}, consent={**GRANTED, "ad_user_data": "denied"})
    old = purchase("m-5")
    old["timestamp"] = (NOW - timedelta(days=91)).isoformat()
    plan = fwd.plan([video, identify, ip_and_agent_only, denied_no_click, old, purchase()], NOW)
    assert dict(plan.drops) == {
        "no_conversion_event": 1,
        "not_a_conversion": 1,
        "no_match_key": 2,
        "too_old": 1,
    }
    [planned] = plan.requests
    assert planned.indices == (5,)


def test_at_most_500_conversions_per_request() -> None:
    fwd = offline()
    events = [{**page_view(), "messageId": f"m-{i}"} for i in range(1001)]
    assert [len(p.indices) for p in fwd.plan(events, NOW).requests] == [500, 500, 1]


# -- X's answers -------------------------------------------------------------------------------


def x_error(code: str | int, message: str) -> bytes:
    return orjson.dumps({"errors": [{"code": code, "message": message}], "request": {}})


@pytest.mark.parametrize(
    ("status", "headers", "body", "kind", "reason"),
    [
        (200, {}, b'{"data":{"conversions_processed":1}}', Delivered, None),
        (400, {}, x_error("INVALID_PARAMETER", "Count limit is 500"), Dead, "x_invalid_request"),
        (401, {}, x_error(32, "Could not authenticate you."), Dead, "x_unauthorized"),
        (403, {}, x_error("UNAUTHORIZED_ACCESS", "no access"), Dead, "x_forbidden"),
        (404, {}, x_error("NOT_FOUND", "Not found"), Dead, "x_not_found"),
        (429, {"Retry-After": "120"}, x_error(88, "Rate limit"), Retry, "x_rate_limited"),
        (503, {}, x_error("SERVICE_UNAVAILABLE", "Over capacity"), Retry, "status_5xx"),
        (500, {}, b"<html>oops</html>", Retry, "status_5xx"),
        (408, {}, b"", Retry, "status_408"),
        (422, {}, b"not json", Dead, "x_error"),
    ],
)
def test_error_classification(
    status: int, headers: dict[str, str], body: bytes, kind: type, reason: str | None
) -> None:
    outcome = classify_x_response(HttpResponse(status, headers, body))
    assert isinstance(outcome, kind)
    if reason is not None:
        assert outcome.reason == reason  # type: ignore[union-attr]


def test_a_dead_letter_carries_xs_words_and_a_rate_limit_its_wait() -> None:
    invalid = "INVALID_PARAMETER"
    errors = [
        {"code": invalid, "message": "Hashed_email is not a valid SHA-256 hash"},
        {"code": invalid, "message": "Event ID was not found"},
    ]
    body = orjson.dumps({"errors": errors})
    assert classify_x_response(HttpResponse(400, {}, body)) == Dead(
        "x_invalid_request",
        "HTTP 400: X INVALID_PARAMETER: Hashed_email is not a valid SHA-256 hash; "
        "INVALID_PARAMETER: Event ID was not found",
    )
    limited = HttpResponse(429, {"x-rate-limit-reset": "1000090"}, x_error(88, "Rate limit"))
    assert classify_x_response(limited, now=1000000.0) == Retry(
        "x_rate_limited", "HTTP 429: X 88: Rate limit", 90.0
    )


async def test_a_wrong_secret_is_refused_by_x_and_dead_without_the_secrets(
    x_api: FakeX, context: ForwarderContext
) -> None:
    fwd = forwarder(context, x_api, access_token_secret="not-the-secret/+=")
    outcome = await fwd.deliver([{**purchase(), "timestamp": datetime.now(UTC).isoformat()}])
    assert outcome == Dead("x_unauthorized", "HTTP 401: X 32: Could not authenticate you.")
    [request] = x_api.requests
    assert not request["signed"]


async def test_secrets_never_reach_a_dead_letter(x_api: FakeX, context: ForwarderContext) -> None:
    fwd = forwarder(context, x_api)
    echo = f"token {ACCESS_TOKEN} with secret {ACCESS_TOKEN_SECRET} of app {CONSUMER_SECRET}"
    x_api.script = [(403, {"Content-Type": "application/json"}, x_error("UNAUTHORIZED", echo))]
    outcome = await fwd.deliver([{**purchase(), "timestamp": datetime.now(UTC).isoformat()}])
    assert outcome == Dead(
        "x_forbidden", "HTTP 403: X UNAUTHORIZED: token *** with secret *** of app ***"
    )


async def test_a_rate_limit_is_retried_and_the_retry_signed_anew(
    x_api: FakeX, context: ForwarderContext
) -> None:
    fwd = forwarder(context, x_api)
    events = [{**purchase(), "timestamp": datetime.now(UTC).isoformat()}]
    x_api.script = [(429, {"Retry-After": "30"}, x_error(88, "Rate limit exceeded"))]
    outcome = await fwd.deliver(events)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs) == ("x_rate_limited", 30.0)
    assert await fwd.deliver(events) == Delivered()
    # the fake refuses a nonce it has seen: both attempts were signed, each its own way
    assert [r["signed"] for r in x_api.requests] == [True, True]
    assert x_api.requests[0]["body"] == x_api.requests[1]["body"]


# -- match keys --------------------------------------------------------------------------------


async def test_only_the_keys_x_takes_are_counted(x_api: FakeX, context: ForwarderContext) -> None:
    fwd = forwarder(context, x_api, default_phone_country="US")
    now = datetime.now(UTC).isoformat()
    events = [
        {**purchase(), "timestamp": now},
        {**signup(), "timestamp": now},
        {**denied(), "timestamp": now},
    ]
    assert await fwd.deliver(events) == Delivered()

    def counted(key: str) -> float:
        labels = {"forwarder": "x", "key": key}
        value = context.metrics.registry.get_sample_value(
            "tagrelay_forwarder_match_keys_total", labels
        )
        return value or 0.0

    expected = {
        "email": 2,
        "phone": 1,
        "ip": 1,
        "user_agent": 2,
        "click_id": 2,
        "external_id": 0,
        "name": 0,
        "address": 0,
        "none": 0,
    }
    assert {key: counted(key) for key in expected} == expected


# -- registry and config -----------------------------------------------------------------------


def test_x_is_registered_and_configured_from_yaml_keys() -> None:
    assert FORWARDERS["x"] is XForwarder
    cfg = config()
    assert cfg.requires_consent == ["ads"]
    assert (cfg.base_url, cfg.api_version) == ("https://ads-api.x.com", "12")
    text = repr(cfg)
    assert CONSUMER_SECRET not in text and ACCESS_TOKEN_SECRET not in text
    assert ACCESS_TOKEN not in text and CONSUMER_KEY not in text
    assert offline().event_ids.target("purchase", "purchase") == PURCHASE_EVENT


def problems(**overrides: Any) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        config(**overrides)
    return [
        ".".join(str(p) for p in e["loc"]) + ": " + e["msg"].removeprefix("Value error, ")
        for e in caught.value.errors()
    ]


def test_bad_ids_and_repeated_events_are_configuration_errors() -> None:
    assert problems(
        pixel_id="O8Z-6J",
        conversions=[{"event": "Order Completed", "event_id": "purchase event"}],
    ) == [
        "pixel_id: 'O8Z-6J' is not an X pixel id: expected the base-36 Base Tag id (o8z6j) "
        "shown in Events Manager",
        "conversions.0.event_id: 'purchase event' is not an X event id: expected its base-36 "
        "id (o87ne) or tw-<pixel id>-<event id> (tw-o8z6j-o87ne), as Events Manager shows it",
    ]
    assert problems(
        conversions=[
            {"event": "Signed Up", "event_id": "o1"},
            {"event": "signed up", "event_id": "o2"},
        ]
    ) == [
        ": conversions lists an event more than once (names match ignoring case and spaces): "
        "'signed up' (also 'Signed Up'); keep one entry per event"
    ]
    assert problems(events={"Order Completed": "Purchase"}) == [
        "events: x conversions name no events: list each event under conversions with its "
        "event_id instead"
    ]
    assert problems(consumer_secret="")[0].startswith("consumer_secret: Value should have")
    assert problems(api_version="v12")[0].startswith("api_version: String should match")
    assert problems(unmapped="custom")[0].startswith("unmapped: Input should be 'skip'")
    # No test mode: another platform's option is refused, not taken for one.
    assert problems(validate_only=True) == ["validate_only: Extra inputs are not permitted"]
    assert problems(test_event_code="T1") == ["test_event_code: Extra inputs are not permitted"]


def test_a_yaml_config_with_x_validates() -> None:
    raw = {
        "keys": [{"id": "backend", "kind": "server", "key": "k"}],
        "forwarders": [raw_config(default_phone_country="US")],
    }
    [fwd] = Config.model_validate(raw).forwarders
    assert isinstance(fwd, XConfig)
    assert [c.event_id for c in fwd.conversions] == [PURCHASE_EVENT, SIGNUP_EVENT, PAGE_EVENT]


# -- end to end through the relay --------------------------------------------------------------


def relay_forwarder(x_api: FakeX) -> dict[str, Any]:
    return raw_config(
        base_url=x_api.url.rstrip("/"), batch={"max_events": 10, "max_wait_secs": 0.05}
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
            "traits": {"email": "buyer@example.com", "phone": "+44 20 7946 0958"},
            "userAgent": UA,
            "ip": "198.51.100.4",
            "clickIds": {"twclid": TWCLID},
            **context,
        },
    }


async def test_orders_reach_x_signed_as_their_event_under_consent(relay: Any, x_api: FakeX) -> None:
    client = await relay(forwarders=[relay_forwarder(x_api)])
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
    assert all(r["signed"] for r in x_api.requests)
    conversions = [c for r in x_api.requests for c in orjson.loads(r["body"])["conversions"]]
    assert [c["conversion_id"] for c in conversions] == ["order-1", "order-data-denied"]
    granted, data_denied = conversions
    assert granted["event_id"] == PURCHASE_EVENT
    assert (granted["value"], granted["price_currency"]) == (42.0, "USD")
    assert granted["identifiers"] == [
        {"twclid": TWCLID, "ip_address": "198.51.100.4", "user_agent": UA},
        {"hashed_email": sha256_hex("buyer@example.com")},
        {"hashed_phone_number": sha256_hex("+442079460958")},
    ]
    assert data_denied["identifiers"] == [{"twclid": TWCLID, "user_agent": UA}]
    app = client.app
    for reason in ("consent_denied", "no_conversion_event"):
        labels = {"forwarder": "x", "reason": reason}
        assert metric_value(app, "tagrelay_forwarder_dropped_total", labels) == 1, reason
    delivered = {"forwarder": "x", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 2


async def test_a_twclid_from_the_landing_page_reaches_a_later_order(
    relay: Any, x_api: FakeX
) -> None:
    client = await relay(forwarders=[relay_forwarder(x_api)])
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
            "page": {"url": f"https://www.shop.test/?twclid={TWCLID}", "path": "/"},
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
    conversions = [c for r in x_api.requests for c in orjson.loads(r["body"])["conversions"]]
    assert [(c["conversion_id"], c["event_id"]) for c in conversions] == [
        ("page-1", PAGE_EVENT),
        ("order-1", PURCHASE_EVENT),
    ]
    assert conversions[1]["identifiers"][0]["twclid"] == TWCLID


async def test_a_refused_request_dead_letters_its_events_with_xs_words(
    relay: Any, x_api: FakeX
) -> None:
    refused = x_error("INVALID_PARAMETER", "Event ID was not found")
    x_api.script = [(400, {"Content-Type": "application/json"}, refused)]
    client = await relay(forwarders=[relay_forwarder(x_api)])
    batch = [segment_order(f"order-{i}", GRANTED) for i in range(2)]
    response = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
    assert response.status == 200
    await wait_idle(client.app)
    dead = await client.app[SPOOL].dead_letters("x")
    assert [(d.reason, d.detail) for d in dead] == [
        ("x_invalid_request", "HTTP 400: X INVALID_PARAMETER: Event ID was not found")
    ] * 2
    labels = {"forwarder": "x", "reason": "x_invalid_request"}
    assert metric_value(client.app, "tagrelay_dead_letters_total", labels) == 2
