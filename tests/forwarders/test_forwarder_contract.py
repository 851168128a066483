"""What every forwarder type in the registry promises, checked the same way for each: a new
forwarder is held to it without anyone writing a new test. It only needs its rows in the
tables below (``CONFIGS``, ``VALIDATORS``, ``REFUSALS``, ``THROTTLES``), and the first tests
fail until it has them.

- It never changes the events it is given: in the delivery process every forwarder is handed
  the same decoded event objects (``_process.SpanCache``).
- Each of ``contract_events()`` (a page view, a purchase with items and every kind of user
  data, one denying ``ads``, one denying ``ad_user_data``, one 8 days old) is either sent, in
  a request that passes the platform's own checks (``VALIDATORS``, written from
  destinations.md: fields, types, time units, hashing, event id, value and currency), or
  dropped and counted with one of the forwarder's bounded reasons (``Delivered.dropped``,
  which the runtime counts in ``tagrelay_forwarder_dropped_total``). The purchase is always
  sent: each configuration maps it.
- ``ads`` denied: the runtime's ``requires_consent`` (in the delivery process) keeps the
  event from every ad platform, checked through a real relay; every ad platform requires
  ``ads`` by default.
- ``ad_user_data`` denied: nothing an ad platform receives for the event carries a hashed
  identifier of the person, their IP address, or their email, phone, name or user id in
  plain text.
- The 8-day-old event goes only to platforms whose window (``max_event_age_secs``) takes
  it; the others drop it as ``too_old``.
- Secrets (every ``SecretStr`` of the configuration, a webhook's headers, the access token a
  token endpoint issued) never show in a dead letter's or a retry's detail nor in a log
  record, even when the destination echoes the request back; credentials refused (401,
  403, and each platform's own way of saying so) are dead letters; a rate limit (429, and
  each platform's own way) is retried after its ``Retry-After``.

The forwarders run alone here (the ``context`` fixture and a recording fake), one event per
delivery so that each request is known to carry that event; consent to ``ads`` is the
runtime's, so that case goes through a relay.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn
from urllib.parse import quote, quote_plus, unquote

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from pydantic import BaseModel, SecretStr
from yarl import URL

from tagrelay.forwarders import FORWARDERS, ForwarderContext
from tagrelay.forwarders._conversions import ConversionsForwarder
from tagrelay.model import Dead, Delivered, Outcome, Retry
from tests.support import SERVER_KEY, basic, fake_server, metric_value, wait_idle

NOW = datetime.now(UTC)

ISSUED_TOKEN = "issued-access-token-7f3a"
"""The access token the fake's token endpoint issues (a secret too)."""

CONFIGS: dict[str, dict[str, Any]] = {
    "ga4": {
        "measurement_id": "G-CONTRACT1",
        "api_secret": "ga4-secret/value+1",
        "mp_url": "{url}/mp/collect",
        "collect_url": "{url}/g/collect",
        "send_user_data": True,
    },
    "google_ads": {
        "customer_id": "123-456-7890",
        "developer_token": "gads-developer-secret",
        "oauth": {
            "client_id": "client.apps.googleusercontent.com",
            "client_secret": "gads-client-secret",
            "refresh_token": "gads-refresh-secret",
        },
        "token_url": "{url}/token",
        "base_url": "{url}",
        "conversions": [
            {
                "event": "Order Completed",
                "conversion_action": "customers/1234567890/conversionActions/1",
            }
        ],
    },
    "linkedin": {
        "access_token": "linkedin-secret-token",
        "base_url": "{url}",
        "conversions": [{"event": "Order Completed", "conversion_rule_id": "104"}],
    },
    "meta": {
        "pixel_id": "1234567890",
        "access_token": "meta-secret+token/1",
        "base_url": "{url}",
    },
    "microsoft": {
        "uet_tag_id": "187012345",
        "access_token": "microsoft-secret-token",
        "base_url": "{url}",
    },
    "pinterest": {
        "ad_account_id": "549755885175",
        "access_token": "pinterest-secret-token",
        "base_url": "{url}",
    },
    "reddit": {
        "pixel_id": "a2_gu5a8gq2hzbq",
        "access_token": "reddit-secret-token",
        "base_url": "{url}",
    },
    "snapchat": {
        "pixel_id": "5d8e3f1a-2b4c-4d6e-8f90-1a2b3c4d5e6f",
        "access_token": "snap-secret/token=",
        "base_url": "{url}",
    },
    "tiktok": {
        "pixel_code": "CQ1A2B3C4D5E6F7G8H9J",
        "access_token": "tiktok-secret-token",
        "base_url": "{url}",
    },
    "webhook": {
        "endpoint": "{url}/hook",
        "headers": {"Authorization": "Bearer webhook-secret-token"},
    },
    "x": {
        "pixel_id": "o8z6j",
        "consumer_key": "x-consumer-key",
        "consumer_secret": "x-consumer-secret",
        "access_token": "x-access-token",
        "access_token_secret": "x-access-token-secret",
        "base_url": "{url}",
        "conversions": [{"event": "Order Completed", "event_id": "tw-o8z6j-o87ne"}],
    },
}
"""A working configuration of each HTTP forwarder type, pointed at the fake (``{url}``).
Some secrets hold ``/``, ``+`` and ``=``, which a URL carries encoded (and re-quoted)."""

HTTP_TYPES = sorted(t for t, cls in FORWARDERS.items() if cls.in_delivery_process)

NOT_AD_PLATFORMS: dict[str, str] = {
    "ga4": (
        "analytics: needs no ads consent; withholds user_data without ad_user_data and tells "
        "Google the consent state in the request (the IP stays for geolocation, as on "
        "Google's own tags' hits)"
    ),
    "webhook": (
        "the site's own endpoint: events go as they are stored, consent states included; "
        "requires_consent and filter decide what goes there"
    ),
}
"""HTTP types the ad-platform consent rules do not apply to, and why. Every other type is an
ad platform: a new one is held to them without being listed."""

GRANTED = {
    "analytics": "granted",
    "ads": "granted",
    "ad_user_data": "granted",
    "ad_personalization": "granted",
}
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
IP = "203.0.113.9"
EMAIL = "Buyer.Contract@Example.com"
PHONE = "+1 (650) 555-1212"
USER_ID = "user-contract"
FIRST_NAME = "Zoë"
LAST_NAME = "Müller"
VALUE = 99.5
CURRENCY = "USD"


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def contract_events() -> list[dict[str, Any]]:
    """A page view, a purchase with items and every kind of user data, one without ``ads``
    consent, one without ``ad_user_data``, and one 8 days old."""
    context = {
        "consent": GRANTED,
        "ip": IP,
        "userAgent": UA,
        "locale": "en-US",
        "page": {
            "url": "https://www.shop.test/thanks?gclid=Cj0KCQ-contract&fbclid=IwAR-contract",
            "referrer": "https://www.google.com/",
            "path": "/thanks",
            "title": "Thanks",
        },
        "traits": {
            "email": EMAIL,
            "phone": PHONE,
            "firstName": FIRST_NAME,
            "lastName": LAST_NAME,
            "address": {
                "city": "San Francisco",
                "state": "CA",
                "postalCode": "94107",
                "country": "US",
            },
        },
        "clickIds": {
            "gclid": "Cj0KCQ-contract",
            "fbclid": "IwAR-contract",
            "ttclid": "E.C.P.contract",
            "li_fat_id": "contract-li-fat-id",
            "ScCid": "contract-sc-cid",
            "epik": "contract-epik",
            "rdt_cid": "contract-rdt-cid",
            "twclid": "contract-twclid",
            "msclkid": "0f8fad5bd9cb469fa16570867728950e",
        },
        "clientIds": {"fbp": "fb.1.1700000000000.123", "_ttp": "contract-ttp"},
    }
    page = {
        "type": "page",
        "anonymousId": "anon-1",
        "messageId": "contract-page",
        "timestamp": iso(NOW),
        "receivedAt": iso(NOW),
        "properties": {"url": context["page"]["url"], "path": "/thanks"},
        "context": context,
    }
    purchase = {
        "type": "track",
        "event": "Order Completed",
        "anonymousId": "anon-1",
        "userId": USER_ID,
        "messageId": "contract-purchase",
        "timestamp": iso(NOW),
        "receivedAt": iso(NOW),
        "properties": {
            "order_id": "o-contract",
            "revenue": VALUE,
            "currency": "usd",
            "products": [
                {"product_id": "p-1", "sku": "SKU-1", "name": "Mug", "price": 12.5, "quantity": 2},
                {"product_id": "p-2", "name": "Tee", "price": 74.5, "quantity": 1},
            ],
        },
        "context": context,
    }
    no_ads = copy.deepcopy(purchase)
    no_ads["messageId"] = "contract-no-ads"
    no_ads["context"]["consent"] = {**GRANTED, "ads": "denied"}
    no_user_data = copy.deepcopy(purchase)
    no_user_data["messageId"] = "contract-no-user-data"
    no_user_data["context"]["consent"] = {**GRANTED, "ad_user_data": "denied"}
    old = copy.deepcopy(purchase)
    old["messageId"] = "contract-old"
    old["timestamp"] = old["receivedAt"] = iso(NOW - timedelta(days=8))
    return [page, purchase, no_ads, no_user_data, old]


PURCHASES = frozenset(
    {"contract-purchase", "contract-no-ads", "contract-no-user-data", "contract-old"}
)
OLD_AGE = timedelta(days=8)


# -- the fake destination ------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    path_qs: str
    query: Mapping[str, str]
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise AssertionError(f"{self.path}: the body is not JSON: {self.body[:200]!r}") from exc

    def strings(self, *, credentials: bool = True) -> list[str]:
        """Every text the destination got: the URL (raw and decoded), the header values (but
        ``Authorization`` unless ``credentials``), and the body's strings (each string and
        key of its JSON, or the body as text)."""
        headers = [
            value
            for name, value in self.headers.items()
            if credentials or name.lower() != "authorization"
        ]
        found = [self.path_qs, unquote(self.path_qs), *self.query.values(), *headers]
        try:
            parsed = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            found.append(self.body.decode("utf-8", "replace"))
        else:
            found.extend(_leaves(parsed))
        return found


def _leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [text for k, v in value.items() for text in (str(k), *_leaves(v))]
    if isinstance(value, list):
        return [text for item in value for text in _leaves(item)]
    return [str(value)]


ECHO = "<the request's secrets>"
"""Stands, in an answer's JSON, for the echo of the request: its URL, query and headers."""


@dataclass(frozen=True)
class Answer:
    """What the fake answers: ``body`` is JSON in which ``ECHO`` is replaced by the echo of
    the request, or None for the echo as plain text."""

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


def _echo_of(request: web.Request) -> str:
    lines = [f"{request.method} {request.path_qs}", request.query_string]
    lines += [f"{name}={value}" for name, value in request.query.items()]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    return "\n".join(lines)


def _with_echo(value: Any, echo: str) -> Any:
    if value == ECHO:
        return echo
    if isinstance(value, dict):
        return {k: _with_echo(v, echo) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_echo(v, echo) for v in value]
    return value


@dataclass
class Fake:
    """Records every request (but the token endpoint's) and answers ``answer``, or 200 with
    a JSON success when it is None. ``/token`` issues ``ISSUED_TOKEN``."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    answer: Answer | None = None

    async def record(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                request.raw_path,
                dict(request.query),
                CIMultiDict(request.headers),
                body,
            )
        )
        answer = self.answer
        if answer is None:
            return web.json_response({"ok": True})
        echo = _echo_of(request)
        if answer.body is None:
            payload = echo.encode()
            content_type = "text/plain"
        else:
            payload = orjson.dumps(_with_echo(answer.body, echo))
            content_type = "application/json"
        return web.Response(
            status=answer.status,
            headers={**answer.headers, "Content-Type": content_type},
            body=payload,
        )

    async def token(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"access_token": ISSUED_TOKEN, "expires_in": 3600, "token_type": "Bearer"}
        )


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    destination = Fake()
    routes = {"/token": destination.token, "/{tail:.*}": destination.record}
    async with fake_server("any destination", routes) as server:
        destination.url = str(server.make_url("")).rstrip("/")
        yield destination


def raw_config(kind: str, url: str) -> dict[str, Any]:
    return {
        k: (v.replace("{url}", url) if isinstance(v, str) else v) for k, v in CONFIGS[kind].items()
    }


def make(kind: str, url: str, context: ForwarderContext) -> Any:
    cls = FORWARDERS[kind]
    config = cls.config_model.model_validate(
        {"id": f"contract-{kind}", "type": kind, **raw_config(kind, url)}
    )
    return cls(config, context)


# -- the platforms' own checks (destinations.md) ---------------------------------------


@dataclass(frozen=True)
class Sent:
    """One event as a platform's request carries it, read by the platform's validator."""

    time: datetime
    """The event time the request states, in whatever unit the platform takes."""
    event_id: str | None
    """The platform's deduplication key where it is the event's messageId; None where the
    platform takes none (GA4) or another (Google Ads: the order id)."""
    value: float | None = None
    currency: str | None = None


Validator = Callable[[Recorded], list[Sent]]

HEX64 = re.compile(r"[0-9a-f]{64}")
CURRENCY_CODE = re.compile(r"[A-Z]{3}")
DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


EMAIL_HASH = sha256("buyer.contract@example.com")
"""Trimmed and lowercased: every platform's rule for this address (not a gmail one)."""
PHONE_DIGITS_HASH = sha256("16505551212")
"""Digits with the country code, no "+": Meta, Snap, Pinterest."""
PHONE_E164_HASH = sha256("+16505551212")
"""E.164 with "+": Google (Ads, GA4), X."""
EMAIL_LOCAL_PART_HASH = sha256("buyercontract@example.com")
"""Reddit's rule (§8: the local part without "+alias" and anything but letters and digits,
every domain) and Microsoft's (§10: without dots and "+suffix")."""


def fail(where: str, expected: str, value: Any) -> NoReturn:
    raise AssertionError(f"{where}: expected {expected}, got {value!r}")


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        fail(where, "an object", value)
    return value


def array(value: Any, where: str, at_most: int | None = None) -> list[Any]:
    if not isinstance(value, list) or not value:
        fail(where, "a non-empty array", value)
    if at_most is not None and len(value) > at_most:
        fail(where, f"at most {at_most} entries", len(value))
    return value


def text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        fail(where, "a non-empty string", value)
    return value


def integer(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        fail(where, "an integer", value)
    return value


def number(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        fail(where, "a number", value)
    return float(value)


def decimal_text(value: Any, where: str) -> float:
    if not isinstance(value, str) or not DECIMAL.fullmatch(value):
        fail(where, "a decimal number as a string", value)
    return float(value)


def currency(value: Any, where: str) -> str:
    if not isinstance(value, str) or not CURRENCY_CODE.fullmatch(value):
        fail(where, "an ISO 4217 code (three capitals)", value)
    return value


def hashed(value: Any, where: str, expected: str | None = None) -> str:
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        fail(where, "a SHA-256 as 64 lowercase hex digits", value)
    if expected is not None and value != expected:
        fail(where, f"the hash of the platform's normalized value ({expected})", value)
    return value


def hashes(value: Any, where: str, expected: str | None = None) -> list[str]:
    """An array of hashes (each checked)."""
    return [hashed(v, f"{where}[{i}]", expected) for i, v in enumerate(array(value, where))]


def hash_or_hashes(value: Any, where: str, expected: str | None = None) -> None:
    if isinstance(value, list):
        hashes(value, where, expected)
    else:
        hashed(value, where, expected)


def _plausible(moment: datetime, where: str, raw: Any, unit: str) -> datetime:
    if not datetime(2020, 1, 1, tzinfo=UTC) <= moment <= datetime(2100, 1, 1, tzinfo=UTC):
        fail(where, f"a time in {unit}", raw)
    return moment


def _epoch(value: Any, where: str, per_second: int, unit: str) -> datetime:
    raw = integer(value, where)
    try:
        moment = datetime.fromtimestamp(raw / per_second, UTC)
    except (OverflowError, ValueError, OSError):
        fail(where, f"a time in {unit}", raw)
    return _plausible(moment, where, raw, unit)


def seconds(value: Any, where: str) -> datetime:
    return _epoch(value, where, 1, "Unix seconds")


def millis(value: Any, where: str) -> datetime:
    return _epoch(value, where, 1000, "Unix milliseconds")


def micros(value: Any, where: str) -> datetime:
    return _epoch(value, where, 1_000_000, "Unix microseconds")


def iso_time(value: Any, where: str) -> datetime:
    raw = text(value, where)
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        fail(where, "an ISO 8601 time", raw)
    if moment.tzinfo is None:
        fail(where, "an ISO 8601 time with its offset", raw)
    return _plausible(moment, where, raw, "ISO 8601")


def json_body(request: Recorded, where: str) -> dict[str, Any]:
    content_type = request.headers.get("Content-Type", "")
    if not content_type.startswith("application/json"):
        fail(where + " Content-Type", "application/json", content_type)
    return obj(request.json(), where + " body")


def expect(actual: Any, expected: Any, where: str) -> None:
    if actual != expected:
        fail(where, repr(expected), actual)


def path(request: Recorded, pattern: str, where: str) -> None:
    expect(request.method, "POST", where + " method")
    if not re.fullmatch(pattern, request.path):
        fail(where + " path", pattern, request.path)


def ga4(request: Recorded) -> list[Sent]:
    """Measurement Protocol (§1): measurement_id and api_secret in the query, client_id,
    at most 25 events with valid names, timestamp_micros, user_data as Google hashes it."""
    config = CONFIGS["ga4"]
    path(request, r"/mp/collect", "ga4")
    expect(request.query.get("measurement_id"), config["measurement_id"], "ga4 measurement_id")
    expect(request.query.get("api_secret"), config["api_secret"], "ga4 api_secret")
    if len(request.body) > 130_000:
        fail("ga4 body", "at most 130 kB", len(request.body))
    body = json_body(request, "ga4")
    text(body.get("client_id"), "ga4 client_id")
    if "user_id" in body:
        text(body["user_id"], "ga4 user_id")
    for key, state in obj(body.get("consent", {}), "ga4 consent").items():
        if state not in ("GRANTED", "DENIED"):
            fail(f"ga4 consent.{key}", "GRANTED or DENIED", state)
    if "user_data" in body:
        user = obj(body["user_data"], "ga4 user_data")
        if "sha256_email_address" in user:
            hashes(user["sha256_email_address"], "ga4 sha256_email_address", EMAIL_HASH)
        if "sha256_phone_number" in user:
            hashes(user["sha256_phone_number"], "ga4 sha256_phone_number", PHONE_E164_HASH)
        for i, address in enumerate(array(user.get("address", [{}]), "ga4 address")):
            for key in ("sha256_first_name", "sha256_last_name", "sha256_street"):
                if key in obj(address, f"ga4 address[{i}]"):
                    hashed(address[key], f"ga4 address[{i}].{key}")
    sent = []
    for i, event in enumerate(array(body.get("events"), "ga4 events", 25)):
        where = f"ga4 events[{i}]"
        event = obj(event, where)
        name = text(event.get("name"), where + ".name")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,39}", name) or name in (
            "session_start",
            "first_visit",
            "user_engagement",
            "screen_view",
        ):
            fail(where + ".name", "a GA4 event name that is not reserved", name)
        params = obj(event.get("params"), where + ".params")
        if len(params) > 25:
            fail(where + ".params", "at most 25 params", len(params))
        integer(params.get("engagement_time_msec"), where + ".params.engagement_time_msec")
        value = number(params["value"], where + ".value") if "value" in params else None
        code = currency(params["currency"], where + ".currency") if "currency" in params else None
        for j, item in enumerate(params.get("items", [])):
            item = obj(item, f"{where}.items[{j}]")
            text(item.get("item_id"), f"{where}.items[{j}].item_id")
            number(item.get("price"), f"{where}.items[{j}].price")
            integer(item.get("quantity"), f"{where}.items[{j}].quantity")
        moment = micros(event.get("timestamp_micros"), where + ".timestamp_micros")
        sent.append(Sent(moment, None, value, code))
    return sent


def google_ads(request: Recorded) -> list[Sent]:
    """uploadClickConversions (§3): OAuth bearer and developer-token, partialFailure true,
    at most 2,000 conversions, one click id or hashed identifiers (one per object),
    conversionDateTime "yyyy-mm-dd hh:mm:ss+hh:mm"."""
    config = CONFIGS["google_ads"]
    customer = config["customer_id"].replace("-", "")
    path(request, rf"/v[0-9]+/customers/{customer}:uploadClickConversions", "google_ads")
    expect(request.headers.get("Authorization"), f"Bearer {ISSUED_TOKEN}", "google_ads auth")
    expect(request.headers.get("developer-token"), config["developer_token"], "developer-token")
    body = json_body(request, "google_ads")
    expect(body.get("partialFailure"), True, "google_ads partialFailure")
    sent = []
    for i, row in enumerate(array(body.get("conversions"), "google_ads conversions", 2000)):
        where = f"google_ads conversions[{i}]"
        row = obj(row, where)
        clicks = [key for key in ("gclid", "gbraid", "wbraid") if key in row]
        if len(clicks) > 1:
            fail(where, "one click id at most", clicks)
        for key in clicks:
            text(row[key], f"{where}.{key}")
        identifiers = row.get("userIdentifiers", [])
        if not clicks and not identifiers:
            fail(where, "a click id or user identifiers", row)
        if len(identifiers) > 5:
            fail(where + ".userIdentifiers", "at most 5", len(identifiers))
        for j, identifier in enumerate(identifiers):
            at = f"{where}.userIdentifiers[{j}]"
            kinds = [
                k
                for k in ("hashedEmail", "hashedPhoneNumber", "addressInfo")
                if k in obj(identifier, at)
            ]
            if len(kinds) != 1:
                fail(at, "exactly one identifier", identifier)
            if "hashedEmail" in identifier:
                hashed(identifier["hashedEmail"], at + ".hashedEmail", EMAIL_HASH)
            if "hashedPhoneNumber" in identifier:
                hashed(identifier["hashedPhoneNumber"], at + ".hashedPhoneNumber", PHONE_E164_HASH)
        action = text(row.get("conversionAction"), where + ".conversionAction")
        if not re.fullmatch(r"customers/[0-9]+/conversionActions/[0-9]+", action):
            fail(where + ".conversionAction", "a conversion action's resource name", action)
        raw = text(row.get("conversionDateTime"), where + ".conversionDateTime")
        if not re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d", raw):
            fail(where + ".conversionDateTime", "yyyy-mm-dd hh:mm:ss+hh:mm", raw)
        moment = datetime.strptime(raw, "%Y-%m-%d %H:%M:%S%z")
        value = number(row["conversionValue"], where) if "conversionValue" in row else None
        code = currency(row["currencyCode"], where) if "currencyCode" in row else None
        for key, state in obj(row.get("consent", {}), where + ".consent").items():
            if state not in ("GRANTED", "DENIED"):
                fail(f"{where}.consent.{key}", "GRANTED or DENIED", state)
        sent.append(Sent(moment, None, value, code))
    return sent


LINKEDIN_ID_TYPES = frozenset(
    {
        "SHA256_EMAIL",
        "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID",
        "ACXIOM_ID",
        "ORACLE_MOAT_ID",
    }
)


def linkedin(request: Recorded) -> list[Sent]:
    """conversionEvents (§5): Bearer, LinkedIn-Version YYYYMM, Rest.li 2.0.0 BATCH_CREATE,
    at most 5,000 elements; conversion URN, conversionHappenedAt in milliseconds, eventId,
    the amount as a string, userIds always present, userInfo with both names."""
    config = CONFIGS["linkedin"]
    path(request, r"/rest/conversionEvents", "linkedin")
    headers = request.headers
    expect(headers.get("Authorization"), f"Bearer {config['access_token']}", "linkedin auth")
    if not re.fullmatch(r"[0-9]{6}", headers.get("LinkedIn-Version", "")):
        fail("linkedin LinkedIn-Version", "YYYYMM", headers.get("LinkedIn-Version"))
    expect(headers.get("X-Restli-Protocol-Version"), "2.0.0", "X-Restli-Protocol-Version")
    expect(headers.get("X-RestLi-Method"), "BATCH_CREATE", "X-RestLi-Method")
    body = json_body(request, "linkedin")
    sent = []
    for i, element in enumerate(array(body.get("elements"), "linkedin elements", 5000)):
        where = f"linkedin elements[{i}]"
        element = obj(element, where)
        rule = config["conversions"][0]["conversion_rule_id"]
        expect(element.get("conversion"), f"urn:lla:llaPartnerConversion:{rule}", where)
        moment = millis(element.get("conversionHappenedAt"), where + ".conversionHappenedAt")
        event_id = text(element.get("eventId"), where + ".eventId")
        value = code = None
        if "conversionValue" in element:
            amount = obj(element["conversionValue"], where + ".conversionValue")
            code = currency(amount.get("currencyCode"), where + ".currencyCode")
            value = decimal_text(amount.get("amount"), where + ".amount")
        user = obj(element.get("user"), where + ".user")
        if not isinstance(user.get("userIds"), list):
            fail(where + ".user.userIds", "an array (empty if need be)", user.get("userIds"))
        for j, entry in enumerate(user["userIds"]):
            at = f"{where}.user.userIds[{j}]"
            entry = obj(entry, at)
            if entry.get("idType") not in LINKEDIN_ID_TYPES:
                fail(at + ".idType", f"one of {sorted(LINKEDIN_ID_TYPES)}", entry.get("idType"))
            if entry["idType"] == "SHA256_EMAIL":
                hashed(entry.get("idValue"), at + ".idValue", EMAIL_HASH)
            else:
                text(entry.get("idValue"), at + ".idValue")
        if "userInfo" in user:
            info = obj(user["userInfo"], where + ".userInfo")
            text(info.get("firstName"), where + ".userInfo.firstName")
            text(info.get("lastName"), where + ".userInfo.lastName")
        if not user["userIds"] and "userInfo" not in user:
            fail(where + ".user", "a user id or userInfo", user)
        sent.append(Sent(moment, event_id, value, code))
    return sent


META_ACTION_SOURCES = frozenset(
    {
        "email",
        "website",
        "app",
        "phone_call",
        "chat",
        "physical_store",
        "system_generated",
        "business_messaging",
        "other",
    }
)
META_HASHED = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id")


def meta(request: Recorded) -> list[Sent]:
    """Conversions API (§2): access_token in the query, at most 1,000 events; event_time in
    seconds, event_id, action_source (website: user agent and source URL), user_data hashed
    but IP, user agent, fbc (fb.1.<ms>.<fbclid>) and fbp; a Purchase has value and currency."""
    config = CONFIGS["meta"]
    path(request, rf"/v[0-9]+\.[0-9]+/{config['pixel_id']}/events", "meta")
    expect(request.query.get("access_token"), config["access_token"], "meta access_token")
    body = json_body(request, "meta")
    sent = []
    for i, event in enumerate(array(body.get("data"), "meta data", 1000)):
        where = f"meta data[{i}]"
        event = obj(event, where)
        name = text(event.get("event_name"), where + ".event_name")
        moment = seconds(event.get("event_time"), where + ".event_time")
        event_id = text(event.get("event_id"), where + ".event_id")
        source = event.get("action_source")
        if source not in META_ACTION_SOURCES:
            fail(where + ".action_source", f"one of {sorted(META_ACTION_SOURCES)}", source)
        user = obj(event.get("user_data"), where + ".user_data")
        if not user:
            fail(where + ".user_data", "user data", user)
        for key in META_HASHED:
            if key in user:
                expected = {"em": EMAIL_HASH, "ph": PHONE_DIGITS_HASH}.get(key)
                hashes(user[key], f"{where}.user_data.{key}", expected)
        for key in ("client_ip_address", "client_user_agent", "fbp"):
            if key in user:
                text(user[key], f"{where}.user_data.{key}")
        if "fbc" in user and not re.fullmatch(r"fb\.[0-9]\.[0-9]{13}\..+", str(user["fbc"])):
            fail(where + ".user_data.fbc", "fb.<index>.<time in ms>.<fbclid>", user["fbc"])
        if source == "website":
            text(user.get("client_user_agent"), where + ".user_data.client_user_agent")
            text(event.get("event_source_url"), where + ".event_source_url")
        custom = obj(event.get("custom_data", {}), where + ".custom_data")
        value = number(custom["value"], where + ".value") if "value" in custom else None
        code = currency(custom["currency"], where + ".currency") if "currency" in custom else None
        if name == "Purchase" and (value is None or code is None):
            fail(where, "a Purchase with value and currency", custom)
        for j, content in enumerate(custom.get("contents", [])):
            at = f"{where}.contents[{j}]"
            text(obj(content, at).get("id"), at + ".id")
            integer(content.get("quantity", 1), at + ".quantity")
            number(content.get("item_price", 0), at + ".item_price")
        sent.append(Sent(moment, event_id, value, code))
    return sent


MICROSOFT_IDENTIFIERS = ("em", "ph", "externalId", "msclkid", "anonymousId")


def microsoft(request: Recorded) -> list[Sent]:
    """UET Conversions API (§10): Bearer token; eventType pageLoad or custom (with
    eventName), eventId, eventTime in seconds, userData with em, ph, externalId hashed
    (email without dots and +suffix) and at least one identifier."""
    config = CONFIGS["microsoft"]
    path(request, rf"/v[0-9]+/{config['uet_tag_id']}/events", "microsoft")
    expect(request.headers.get("Authorization"), f"Bearer {config['access_token']}", "auth")
    body = json_body(request, "microsoft")
    sent = []
    for i, event in enumerate(array(body.get("data"), "microsoft data", 1000)):
        where = f"microsoft data[{i}]"
        event = obj(event, where)
        kind = event.get("eventType")
        if kind not in ("pageLoad", "custom"):
            fail(where + ".eventType", "pageLoad or custom", kind)
        if kind == "custom":
            text(event.get("eventName"), where + ".eventName")
        event_id = text(event.get("eventId"), where + ".eventId")
        moment = seconds(event.get("eventTime"), where + ".eventTime")
        if "adStorageConsent" in event and event["adStorageConsent"] not in ("G", "D"):
            fail(where + ".adStorageConsent", "G or D", event["adStorageConsent"])
        user = obj(event.get("userData"), where + ".userData")
        for key in ("em", "ph", "externalId"):
            if key in user:
                expected = EMAIL_LOCAL_PART_HASH if key == "em" else None
                hashed(user[key], f"{where}.userData.{key}", expected)
        for key in ("msclkid", "anonymousId", "clientIpAddress", "clientUserAgent"):
            if key in user:
                text(user[key], f"{where}.userData.{key}")
        if not any(key in user for key in MICROSOFT_IDENTIFIERS):
            fail(where + ".userData", f"one of {MICROSOFT_IDENTIFIERS}", user)
        custom = obj(event.get("customData", {}), where + ".customData")
        value = number(custom["value"], where + ".value") if "value" in custom else None
        code = currency(custom["currency"], where + ".currency") if "currency" in custom else None
        for j, item in enumerate(custom.get("items", [])):
            at = f"{where}.items[{j}]"
            text(obj(item, at).get("id"), at + ".id")
            if "price" in item:
                number(item["price"], at + ".price")
            if "quantity" in item:
                integer(item["quantity"], at + ".quantity")
        sent.append(Sent(moment, event_id, value, code))
    return sent


PINTEREST_ACTION_SOURCES = frozenset({"app_android", "app_ios", "web", "offline"})
PINTEREST_HASHED = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id")


def pinterest(request: Recorded) -> list[Sent]:
    """Conversions API v5 (§7): Bearer conversion token, at most 1,000 events; event_time in
    seconds, event_id, user_data hashes as arrays (em or IP and user agent required),
    value and item prices as strings."""
    config = CONFIGS["pinterest"]
    account = config["ad_account_id"]
    path(request, rf"/v[0-9]+/ad_accounts/{account}/events", "pinterest")
    expect(request.headers.get("Authorization"), f"Bearer {config['access_token']}", "auth")
    body = json_body(request, "pinterest")
    sent = []
    for i, event in enumerate(array(body.get("data"), "pinterest data", 1000)):
        where = f"pinterest data[{i}]"
        event = obj(event, where)
        text(event.get("event_name"), where + ".event_name")
        if event.get("action_source") not in PINTEREST_ACTION_SOURCES:
            fail(where + ".action_source", "app_android, app_ios, web or offline", event)
        moment = seconds(event.get("event_time"), where + ".event_time")
        event_id = text(event.get("event_id"), where + ".event_id")
        user = obj(event.get("user_data"), where + ".user_data")
        for key in PINTEREST_HASHED:
            if key in user:
                expected = {"em": EMAIL_HASH, "ph": PHONE_DIGITS_HASH}.get(key)
                hashes(user[key], f"{where}.user_data.{key}", expected)
        for key in ("client_ip_address", "client_user_agent", "click_id"):
            if key in user:
                text(user[key], f"{where}.user_data.{key}")
        if not (
            "em" in user
            or "hashed_maids" in user
            or ("client_ip_address" in user and "client_user_agent" in user)
        ):
            fail(where + ".user_data", "em, hashed_maids, or IP and user agent", user)
        custom = obj(event.get("custom_data", {}), where + ".custom_data")
        value = decimal_text(custom["value"], where + ".value") if "value" in custom else None
        code = currency(custom["currency"], where + ".currency") if "currency" in custom else None
        for j, content in enumerate(custom.get("contents", [])):
            at = f"{where}.contents[{j}]"
            obj(content, at)
            if "item_price" in content:
                decimal_text(content["item_price"], at + ".item_price")
            integer(content.get("quantity", 1), at + ".quantity")
        if "num_items" in custom:
            integer(custom["num_items"], where + ".num_items")
        sent.append(Sent(moment, event_id, value, code))
    return sent


REDDIT_TRACKING_TYPES = frozenset(
    {
        "PAGE_VISIT",
        "VIEW_CONTENT",
        "SEARCH",
        "ADD_TO_CART",
        "ADD_TO_WISHLIST",
        "PURCHASE",
        "LEAD",
        "SIGN_UP",
        "CUSTOM",
    }
)


def reddit(request: Recorded) -> list[Sent]:
    """Conversions API v3 (§8): Bearer token, ``{"data": {"events": [...]}}`` of at most
    1,000; event_at in milliseconds, type.tracking_type (CUSTOM with custom_event_name),
    metadata.conversion_id, user email hashed by Reddit's rule, value and currency."""
    config = CONFIGS["reddit"]
    path(request, rf"/api/v3/pixels/{config['pixel_id']}/conversion_events", "reddit")
    expect(request.headers.get("Authorization"), f"Bearer {config['access_token']}", "auth")
    data = obj(json_body(request, "reddit").get("data"), "reddit data")
    sent = []
    for i, event in enumerate(array(data.get("events"), "reddit events", 1000)):
        where = f"reddit events[{i}]"
        event = obj(event, where)
        moment = millis(event.get("event_at"), where + ".event_at")
        if event.get("action_source") not in ("WEBSITE", "APP", "OFFLINE", "OTHER"):
            fail(where + ".action_source", "WEBSITE, APP, ...", event.get("action_source"))
        kind = obj(event.get("type"), where + ".type")
        if kind.get("tracking_type") not in REDDIT_TRACKING_TYPES:
            fail(where + ".tracking_type", f"one of {sorted(REDDIT_TRACKING_TYPES)}", kind)
        if kind["tracking_type"] == "CUSTOM":
            text(kind.get("custom_event_name"), where + ".custom_event_name")
        if "click_id" in event:
            text(event["click_id"], where + ".click_id")
        user = obj(event.get("user", {}), where + ".user")
        for key in ("email", "phone_number", "external_id"):
            if key in user:
                expected = EMAIL_LOCAL_PART_HASH if key == "email" else None
                hashed(user[key], f"{where}.user.{key}", expected)
        for key in ("ip_address", "user_agent", "uuid"):
            if key in user:
                text(user[key], f"{where}.user.{key}")
        metadata = obj(event.get("metadata"), where + ".metadata")
        event_id = text(metadata.get("conversion_id"), where + ".conversion_id")
        value = number(metadata["value"], where + ".value") if "value" in metadata else None
        code = (
            currency(metadata["currency"], where + ".currency") if "currency" in metadata else None
        )
        if "item_count" in metadata:
            integer(metadata["item_count"], where + ".item_count")
        for j, product in enumerate(metadata.get("products", [])):
            at = f"{where}.products[{j}]"
            text(obj(product, at).get("id"), at + ".id")
            if "item_price" in product:
                number(product["item_price"], at + ".item_price")
            if "quantity" in product:
                integer(product["quantity"], at + ".quantity")
        sent.append(Sent(moment, event_id, value, code))
    return sent


SNAP_EVENTS = frozenset(
    {
        "PAGE_VIEW",
        "VIEW_CONTENT",
        "LIST_VIEW",
        "SEARCH",
        "ADD_CART",
        "ADD_TO_WISHLIST",
        "START_CHECKOUT",
        "ADD_BILLING",
        "PURCHASE",
        "SIGN_UP",
        "SUBSCRIBE",
        "START_TRIAL",
        "LOGIN",
        "SAVE",
        "SHARE",
        "INVITE",
        "RESERVE",
        "RATE",
        "COMPLETE_TUTORIAL",
        "LEVEL_COMPLETE",
        "ACHIEVEMENT_UNLOCKED",
        "SPENT_CREDITS",
        "APP_OPEN",
        "APP_INSTALL",
        "AD_VIEW",
        "AD_CLICK",
        *(f"CUSTOM_EVENT_{n}" for n in range(1, 6)),
    }
)
SNAP_HASHED = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id")


def snapchat(request: Recorded) -> list[Sent]:
    """Conversions API v3 (§6): access_token in the query, at most 2,000 events; Snap's event
    names, event_time in seconds, event_id, action_source (WEB with event_source_url),
    hashed user data (em, ph digits only), em or ph or IP and user agent."""
    config = CONFIGS["snapchat"]
    path(request, rf"/v3/{config['pixel_id']}/events(?:/validate)?", "snapchat")
    expect(request.query.get("access_token"), config["access_token"], "snapchat access_token")
    body = json_body(request, "snapchat")
    sent = []
    for i, event in enumerate(array(body.get("data"), "snapchat data", 2000)):
        where = f"snapchat data[{i}]"
        event = obj(event, where)
        if event.get("event_name") not in SNAP_EVENTS:
            fail(where + ".event_name", "one of Snap's event names", event.get("event_name"))
        moment = seconds(event.get("event_time"), where + ".event_time")
        event_id = text(event.get("event_id"), where + ".event_id")
        source = event.get("action_source")
        if source not in ("WEB", "MOBILE_APP", "OFFLINE"):
            fail(where + ".action_source", "WEB, MOBILE_APP or OFFLINE", source)
        if source == "WEB":
            text(event.get("event_source_url"), where + ".event_source_url")
        user = obj(event.get("user_data"), where + ".user_data")
        for key in SNAP_HASHED:
            if key in user:
                expected = {"em": EMAIL_HASH, "ph": PHONE_DIGITS_HASH}.get(key)
                hash_or_hashes(user[key], f"{where}.user_data.{key}", expected)
        for key in ("client_ip_address", "client_user_agent", "sc_click_id", "sc_cookie1"):
            if key in user:
                text(user[key], f"{where}.user_data.{key}")
        if not (
            "em" in user
            or "ph" in user
            or ("client_ip_address" in user and "client_user_agent" in user)
        ):
            fail(where + ".user_data", "em, ph, or IP and user agent", user)
        custom = obj(event.get("custom_data", {}), where + ".custom_data")
        value = number(custom["value"], where + ".value") if "value" in custom else None
        code = currency(custom["currency"], where + ".currency") if "currency" in custom else None
        for j, content in enumerate(custom.get("contents", [])):
            at = f"{where}.contents[{j}]"
            text(obj(content, at).get("id"), at + ".id")
        sent.append(Sent(moment, event_id, value, code))
    return sent


TIKTOK_HASHED = ("email", "phone", "external_id", "first_name", "last_name", "zip_code")


def tiktok(request: Recorded) -> list[Sent]:
    """Events API 2.0 (§4): Access-Token header, event_source and the pixel code, at most
    1,000 events; event_time in seconds, event_id, user identifiers hashed but IP, user
    agent, ttclid and ttp; contents with content_id."""
    config = CONFIGS["tiktok"]
    path(request, r"/open_api/v[0-9]+\.[0-9]+/event/track/", "tiktok")
    expect(request.headers.get("Access-Token"), config["access_token"], "tiktok Access-Token")
    body = json_body(request, "tiktok")
    if body.get("event_source") not in ("web", "app", "offline", "crm"):
        fail("tiktok event_source", "web, app, offline or crm", body.get("event_source"))
    expect(body.get("event_source_id"), config["pixel_code"], "tiktok event_source_id")
    sent = []
    for i, event in enumerate(array(body.get("data"), "tiktok data", 1000)):
        where = f"tiktok data[{i}]"
        event = obj(event, where)
        text(event.get("event"), where + ".event")
        moment = seconds(event.get("event_time"), where + ".event_time")
        event_id = text(event.get("event_id"), where + ".event_id")
        user = obj(event.get("user", {}), where + ".user")
        for key in TIKTOK_HASHED:
            if key in user:
                hashed(user[key], f"{where}.user.{key}", EMAIL_HASH if key == "email" else None)
        for key in ("ip", "user_agent", "ttclid", "ttp", "locale"):
            if key in user:
                text(user[key], f"{where}.user.{key}")
        properties = obj(event.get("properties", {}), where + ".properties")
        value = number(properties["value"], where + ".value") if "value" in properties else None
        code = (
            currency(properties["currency"], where + ".currency")
            if "currency" in properties
            else None
        )
        for j, content in enumerate(properties.get("contents", [])):
            at = f"{where}.contents[{j}]"
            text(obj(content, at).get("content_id"), at + ".content_id")
            if "price" in content:
                number(content["price"], at + ".price")
            if "quantity" in content:
                integer(content["quantity"], at + ".quantity")
        sent.append(Sent(moment, event_id, value, code))
    return sent


def webhook(request: Recorded) -> list[Sent]:
    """The webhook's own shape: ``{"batch": [event, ...], "sentAt": <ISO>}`` with the
    configured headers; events as they are."""
    config = CONFIGS["webhook"]
    path(request, r"/hook", "webhook")
    for name, value in config["headers"].items():
        expect(request.headers.get(name), value, f"webhook {name}")
    body = json_body(request, "webhook")
    iso_time(body.get("sentAt"), "webhook sentAt")
    sent = []
    for i, event in enumerate(array(body.get("batch"), "webhook batch")):
        where = f"webhook batch[{i}]"
        event = obj(event, where)
        text(event.get("type"), where + ".type")
        moment = iso_time(event.get("timestamp"), where + ".timestamp")
        properties = obj(event.get("properties", {}), where + ".properties")
        value = number(properties["revenue"], where) if "revenue" in properties else None
        sent.append(Sent(moment, text(event.get("messageId"), where + ".messageId"), value))
    return sent


X_IDENTIFIERS = frozenset({"twclid", "hashed_email", "hashed_phone_number"})


def x(request: Recorded) -> list[Sent]:
    """Conversion API (§9): signed with OAuth 1.0a (HMAC-SHA1), at most 500 conversions;
    conversion_time ISO 8601, the configured event_id, identifiers (twclid, hashed email,
    hashed E.164 phone; IP and user agent only beside another), conversion_id."""
    config = CONFIGS["x"]
    path(request, rf"/[0-9]+/measurement/conversions/{config['pixel_id']}", "x")
    authorization = request.headers.get("Authorization", "")
    if not authorization.startswith("OAuth "):
        fail("x Authorization", "OAuth ...", authorization)
    params = dict(re.findall(r'(\w+)="([^"]*)"', authorization))
    expect(unquote(params.get("oauth_consumer_key", "")), config["consumer_key"], "x key")
    expect(unquote(params.get("oauth_token", "")), config["access_token"], "x oauth_token")
    expect(params.get("oauth_signature_method"), "HMAC-SHA1", "x oauth_signature_method")
    expect(params.get("oauth_version"), "1.0", "x oauth_version")
    for key in ("oauth_signature", "oauth_nonce", "oauth_timestamp"):
        text(params.get(key), f"x {key}")
    body = json_body(request, "x")
    sent = []
    for i, conversion in enumerate(array(body.get("conversions"), "x conversions", 500)):
        where = f"x conversions[{i}]"
        conversion = obj(conversion, where)
        moment = iso_time(conversion.get("conversion_time"), where + ".conversion_time")
        expect(conversion.get("event_id"), config["conversions"][0]["event_id"], where)
        identifiers = [
            obj(entry, f"{where}.identifiers[{j}]")
            for j, entry in enumerate(array(conversion.get("identifiers"), where + ".identifiers"))
        ]
        keys = {key for entry in identifiers for key in entry}
        if not keys & X_IDENTIFIERS:
            fail(where + ".identifiers", "a twclid, hashed_email or hashed_phone_number", keys)
        if keys - X_IDENTIFIERS - {"ip_address", "user_agent"}:
            fail(where + ".identifiers", "X's identifier keys", keys)
        for entry in identifiers:
            if "hashed_email" in entry:
                hashed(entry["hashed_email"], where + ".hashed_email", EMAIL_HASH)
            if "hashed_phone_number" in entry:
                hashed(entry["hashed_phone_number"], where + ".hashed_phone", PHONE_E164_HASH)
        event_id = text(conversion.get("conversion_id"), where + ".conversion_id")
        value = number(conversion["value"], where + ".value") if "value" in conversion else None
        code = (
            currency(conversion["price_currency"], where + ".price_currency")
            if "price_currency" in conversion
            else None
        )
        if "number_items" in conversion:
            integer(conversion["number_items"], where + ".number_items")
        for j, content in enumerate(conversion.get("contents", [])):
            at = f"{where}.contents[{j}]"
            obj(content, at)
            if "content_price" in content:
                number(content["content_price"], at + ".content_price")
            if "num_items" in content:
                integer(content["num_items"], at + ".num_items")
        sent.append(Sent(moment, event_id, value, code))
    return sent


VALIDATORS: dict[str, Validator] = {
    "ga4": ga4,
    "google_ads": google_ads,
    "linkedin": linkedin,
    "meta": meta,
    "microsoft": microsoft,
    "pinterest": pinterest,
    "reddit": reddit,
    "snapchat": snapchat,
    "tiktok": tiktok,
    "webhook": webhook,
    "x": x,
}
"""Each HTTP type's checks of a request it sends: the events it carries, or an
AssertionError naming what is wrong."""


# -- how each platform refuses credentials and limits rates (destinations.md) ------------

RETRY_AFTER = {"Retry-After": "7"}

REFUSALS: dict[str, list[Answer]] = {
    # /mp/collect reports nothing but HTTP statuses (§1).
    "ga4": [],
    "google_ads": [
        Answer(401, {"error": {"code": 401, "message": ECHO, "status": "UNAUTHENTICATED"}}),
        Answer(
            401,
            {
                "error": {
                    "code": 401,
                    "status": "UNAUTHENTICATED",
                    "message": ECHO,
                    "details": [
                        {
                            "errors": [
                                {
                                    "errorCode": {"authenticationError": "DEVELOPER_TOKEN_INVALID"},
                                    "message": ECHO,
                                }
                            ]
                        }
                    ],
                }
            },
        ),
        Answer(403, {"error": {"code": 403, "message": ECHO, "status": "PERMISSION_DENIED"}}),
    ],
    "linkedin": [
        Answer(
            401,
            {
                "status": 401,
                "serviceErrorCode": 65600,
                "code": "INVALID_ACCESS_TOKEN",
                "message": ECHO,
            },
        ),
        Answer(
            403, {"status": 403, "serviceErrorCode": 100, "code": "ACCESS_DENIED", "message": ECHO}
        ),
    ],
    # Graph errors: 190 the token, 200 a permission (§2, §12).
    "meta": [
        Answer(
            400,
            {"error": {"message": ECHO, "type": "OAuthException", "code": 190, "fbtrace_id": "A1"}},
        ),
        Answer(
            403,
            {"error": {"message": ECHO, "type": "OAuthException", "code": 200, "fbtrace_id": "A2"}},
        ),
    ],
    # Microsoft's error shape ({"error": {"code", "message", "details"}}); its codes are not
    # in our sources (§10).
    "microsoft": [
        Answer(401, {"error": {"code": "Unauthorized", "message": ECHO}}),
        Answer(403, {"error": {"code": "Forbidden", "message": ECHO}}),
    ],
    "pinterest": [
        Answer(401, {"code": 2, "message": ECHO}),
        Answer(403, {"code": 29, "message": ECHO}),
    ],
    # 401 {"error": {"reason": "UNAUTHORIZED", "explanation"}}: replace the token; 403 (§8).
    "reddit": [
        Answer(401, {"error": {"reason": "UNAUTHORIZED", "explanation": ECHO}}),
        Answer(403, {"error": {"code": 403, "message": ECHO}}),
    ],
    # Snap documents no error codes (§6): its answer shape.
    "snapchat": [
        Answer(401, {"status": "INVALID", "reason": ECHO}),
        Answer(403, {"status": "INVALID", "reason": ECHO}),
    ],
    # TikTok answers HTTP 200 with a code: 40001 no permission on the pixel (§4).
    "tiktok": [Answer(200, {"code": 40001, "message": ECHO, "request_id": "r-1"})],
    "webhook": [],
    "x": [
        Answer(401, {"errors": [{"code": "UNAUTHORIZED_ACCESS", "message": ECHO}]}),
        Answer(403, {"errors": [{"code": "UNAUTHORIZED_CLIENT_APPLICATION", "message": ECHO}]}),
    ],
}
"""Each platform's own answers refusing the credentials (besides a plain 401 and 403, which
every type gets): all dead letters."""

THROTTLES: dict[str, list[Answer]] = {
    "ga4": [],
    "google_ads": [
        Answer(
            429,
            {"error": {"code": 429, "message": ECHO, "status": "RESOURCE_EXHAUSTED"}},
            RETRY_AFTER,
        )
    ],
    "linkedin": [Answer(429, {"status": 429, "message": ECHO}, RETRY_AFTER)],
    # Graph throttling codes 4, 17, 80003, with HTTP 400 (§2, §12).
    "meta": [
        Answer(400, {"error": {"message": ECHO, "code": 17, "fbtrace_id": "A3"}}, RETRY_AFTER),
        Answer(400, {"error": {"message": ECHO, "code": 80003, "fbtrace_id": "A4"}}),
    ],
    "microsoft": [
        Answer(429, {"error": {"code": "TooManyRequests", "message": ECHO}}, RETRY_AFTER)
    ],
    "pinterest": [Answer(429, {"code": 8, "message": ECHO}, RETRY_AFTER)],
    "reddit": [Answer(429, {"error": {"code": 429, "message": ECHO}}, RETRY_AFTER)],
    "snapchat": [Answer(429, {"status": "INVALID", "reason": ECHO}, RETRY_AFTER)],
    # TikTok: HTTP 200 with code 40100, "Too many requests" (§4).
    "tiktok": [Answer(200, {"code": 40100, "message": ECHO, "request_id": "r-2"}, RETRY_AFTER)],
    "webhook": [],
    "x": [
        Answer(429, {"errors": [{"code": "TOO_MANY_REQUESTS", "message": ECHO}]}, RETRY_AFTER),
    ],
}
"""Each platform's own rate-limit answers (besides a plain 429 with Retry-After, which every
type gets): retried, after Retry-After when the answer has one."""

EVERY_REFUSAL = (Answer(401), Answer(403))
EVERY_THROTTLE = (Answer(429, None, RETRY_AFTER),)


# -- secrets -----------------------------------------------------------------------------

CREDENTIAL = re.compile(r"(?:^|_)(?:secret|token|password|key)$")


def _fields(model: BaseModel) -> list[tuple[str, Any]]:
    """Every (field name, value) of a config, nested models and lists included."""
    found: list[tuple[str, Any]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        found.append((name, value))
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, BaseModel):
                found.extend(_fields(item))
    return found


def config_secrets(kind: str, url: str) -> list[str]:
    """The configuration's secrets: its ``SecretStr`` values and header values."""
    config = make_config(kind, url)
    secrets = []
    for name, value in _fields(config):
        if isinstance(value, SecretStr):
            secrets.append(value.get_secret_value())
        elif name == "headers" and isinstance(value, dict):
            secrets.extend(str(v) for v in value.values())
    return secrets


def make_config(kind: str, url: str) -> BaseModel:
    cls = FORWARDERS[kind]
    return cls.config_model.model_validate(
        {"id": f"contract-{kind}", "type": kind, **raw_config(kind, url)}
    )


def forms(secret: str) -> set[str]:
    """A secret as it may show: raw, percent-encoded (also as urlencode and the HTTP client
    put it in a URL), and as an OAuth header value."""
    found = {secret, quote(secret, safe=""), quote_plus(secret), quote(secret, safe="-._~")}
    for encoded in (quote(secret, safe=""), quote_plus(secret)):
        found.add(URL("http://h/?k=" + encoded).raw_query_string.partition("=")[2])
    return found


def leaks(secrets: list[str], *texts: str) -> list[str]:
    return sorted({s for s in secrets for form in forms(s) for t in texts if form in t})


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every log record of the relay's code, message and extra fields (the fake's own
    server access lines are the fake's, not the relay's)."""
    return [
        record.getMessage() + " " + repr(vars(record))
        for record in caplog.records
        if not record.name.startswith("aiohttp.")
    ]


# -- the contract ------------------------------------------------------------------------


def test_every_http_forwarder_type_has_a_contract_configuration() -> None:
    assert sorted(CONFIGS) == HTTP_TYPES


def test_every_http_forwarder_type_has_a_validator() -> None:
    assert sorted(VALIDATORS) == HTTP_TYPES


def test_every_http_forwarder_type_says_how_it_refuses_and_limits() -> None:
    assert sorted(REFUSALS) == HTTP_TYPES
    assert sorted(THROTTLES) == HTTP_TYPES


def test_every_conversions_forwarder_is_an_ad_platform() -> None:
    assert set(NOT_AD_PLATFORMS) <= set(HTTP_TYPES)
    for kind in NOT_AD_PLATFORMS:
        assert not issubclass(FORWARDERS[kind], ConversionsForwarder), kind


@pytest.mark.parametrize("kind", HTTP_TYPES)
def test_credentials_are_secrets(kind: str) -> None:
    """Every credential of the configuration is a ``SecretStr`` (never printed, and
    scrubbed), and the contract configuration has at least one."""
    config = make_config(kind, "http://127.0.0.1:9")
    plain = [
        name
        for name, value in _fields(config)
        if CREDENTIAL.search(name) and value is not None and not isinstance(value, SecretStr)
    ]
    assert plain == []
    assert config_secrets(kind, "http://127.0.0.1:9")


@pytest.mark.parametrize("kind", sorted(set(HTTP_TYPES) - set(NOT_AD_PLATFORMS)))
def test_every_ad_platform_requires_ads_consent_by_default(kind: str) -> None:
    field_info = FORWARDERS[kind].config_model.model_fields["requires_consent"]
    assert "ads" in field_info.get_default(call_default_factory=True)
    assert "ads" in make_config(kind, "http://127.0.0.1:9").requires_consent  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_a_forwarder_never_changes_the_events_it_is_given(
    kind: str, fake: Fake, context: ForwarderContext
) -> None:
    forwarder = make(kind, fake.url, context)
    events = contract_events()
    before = copy.deepcopy(events)
    await forwarder.start()
    try:
        await forwarder.deliver(events)
        await forwarder.deliver(events)  # twice: a retry is given the same objects
    finally:
        await forwarder.close()
    assert events == before


@dataclass
class Delivery:
    """What delivering one event alone came to."""

    outcome: Outcome
    requests: list[Recorded]
    sent: list[Sent]


async def deliver_each(kind: str, fake: Fake, context: ForwarderContext) -> dict[str, Delivery]:
    """Each contract event delivered alone (so each request the fake gets is that event's),
    by messageId; every request checked by the platform's validator."""
    validate = VALIDATORS[kind]
    forwarder = make(kind, fake.url, context)
    results = {}
    await forwarder.start()
    try:
        for event in contract_events():
            first = len(fake.requests)
            outcome = await forwarder.deliver([event])
            requests = fake.requests[first:]
            sent = [s for request in requests for s in validate(request)]
            results[event["messageId"]] = Delivery(outcome, requests, sent)
    finally:
        await forwarder.close()
    return results


def event_time(event: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"])


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_each_event_is_sent_valid_or_dropped_and_counted(
    kind: str, fake: Fake, context: ForwarderContext
) -> None:
    """Each contract event: delivered, in requests the platform's checks pass, carrying it
    once with its time (in the platform's unit), its messageId as event id where the
    platform takes one, and the purchase's value and currency; or not sent, dropped with one
    of the forwarder's declared reasons."""
    results = await deliver_each(kind, fake, context)
    reasons = getattr(FORWARDERS[kind], "event_drop_reasons", frozenset())
    for event in contract_events():
        mid = event["messageId"]
        result = results[mid]
        outcome = result.outcome
        assert isinstance(outcome, Delivered), f"{kind} {mid}: {outcome}"
        assert not outcome.rejected, f"{kind} {mid}: {outcome}"
        if result.requests:
            assert not outcome.dropped, f"{kind} {mid}: sent and dropped: {outcome}"
            [sent] = result.sent
            assert abs(sent.time - event_time(event)) < timedelta(seconds=1), (kind, mid, sent)
            assert sent.event_id in (None, mid), (kind, mid, sent)
            if mid in PURCHASES:
                assert sent.value == VALUE, (kind, mid, sent)
                assert sent.currency in (None, CURRENCY), (kind, mid, sent)
        else:
            assert sum(outcome.dropped.values()) == 1, f"{kind} {mid}: neither sent nor dropped"
            [reason] = outcome.dropped
            assert reason in reasons, f"{kind} {mid}: undeclared drop reason {reason!r}"
    assert results["contract-purchase"].requests, f"{kind}: the purchase was not sent"


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_a_batch_is_the_sum_of_its_events(
    kind: str, fake: Fake, context: ForwarderContext
) -> None:
    """Delivered together, the contract events go out as they do one by one: as many
    events in valid requests, the same drops."""
    alone = await deliver_each(kind, fake, context)
    forwarder = make(kind, fake.url, context)
    first = len(fake.requests)
    await forwarder.start()
    try:
        outcome = await forwarder.deliver(contract_events())
    finally:
        await forwarder.close()
    assert isinstance(outcome, Delivered), outcome
    assert not outcome.rejected
    sent = [s for request in fake.requests[first:] for s in VALIDATORS[kind](request)]
    assert len(sent) == sum(len(d.sent) for d in alone.values())
    drops: Counter[str] = Counter()
    for delivery in alone.values():
        if isinstance(delivery.outcome, Delivered):
            drops.update(delivery.outcome.dropped)
    assert Counter(outcome.dropped) == drops


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_the_old_event_goes_only_where_the_window_takes_it(
    kind: str, fake: Fake, context: ForwarderContext
) -> None:
    results = await deliver_each(kind, fake, context)
    old = results["contract-old"]
    window = FORWARDERS[kind].max_event_age_secs
    if window is not None and window < OLD_AGE.total_seconds():
        assert old.requests == []
        assert isinstance(old.outcome, Delivered)
        assert old.outcome.dropped == {"too_old": 1}
    else:
        assert len(old.sent) == 1, f"{kind} takes events {window}s old, and did not send it"
        assert abs(old.sent[0].time - (NOW - OLD_AGE)) < timedelta(seconds=1)


PERSON_IN_PLAIN_TEXT = re.compile(
    "|".join(
        [
            re.escape(IP.rsplit(".", 1)[0]) + r"\.",  # the IP, also truncated
            re.escape(EMAIL.lower()),
            r"(?<![0-9])1?6505551212(?![0-9])",
            re.escape(USER_ID),
            re.escape(FIRST_NAME.lower()),
            re.escape(LAST_NAME.lower()),
            r"\bzoe\b",
            r"\bmuller\b",
            "san francisco",
            r"(?<![0-9])94107(?![0-9])",
        ]
    )
)
"""The person's data in plain text, as a platform could send it (matched in lowercase)."""


def _person_hashes() -> set[str]:
    values = [EMAIL, PHONE, USER_ID, FIRST_NAME, LAST_NAME, "San Francisco", "CA", "94107", "US"]
    variants = set()
    for value in values:
        digits = re.sub(r"[^0-9]", "", value)
        for variant in (value, value.strip(), value.lower(), value.upper(), digits, "+" + digits):
            if variant and variant != "+":
                variants.add(variant)
    variants |= {"buyercontract@example.com", "zoe", "muller", "sanfrancisco"}
    return {sha256(v) for v in variants}


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_without_ad_user_data_no_person_data_leaves(
    kind: str, fake: Fake, context: ForwarderContext
) -> None:
    """``ad_user_data`` denied: an ad platform gets no hash of the person's identifiers
    (none of those it sends for the same event granted, nor of their usual
    normalizations), no IP address, and no email, phone, name or user id in plain text;
    or the event is dropped. GA4 withholds user_data and says DENIED."""
    results = await deliver_each(kind, fake, context)
    denied = results["contract-no-user-data"]
    if kind == "webhook":
        # The site's own endpoint gets the event as stored, consent states included.
        [request] = denied.requests
        [event] = request.json()["batch"]
        assert event["context"]["consent"]["ad_user_data"] == "denied"
        return
    granted_hashes = {
        found
        for request in results["contract-purchase"].requests
        for string in request.strings()
        for found in HEX64.findall(string)
    }
    forbidden = granted_hashes | _person_hashes()
    for request in denied.requests:
        strings = request.strings()
        found = {h for s in strings for h in HEX64.findall(s)}
        assert not found & forbidden, f"{kind}: hashed user data without ad_user_data"
        if kind == "ga4":
            body = request.json()
            assert "user_data" not in body
            assert body["consent"]["ad_user_data"] == "DENIED"
            continue
        # Credentials (an OAuth signature, say) are not the person's data.
        plain = [s.lower() for s in request.strings(credentials=False)]
        shown = [m.group(0) for s in plain for m in PERSON_IN_PLAIN_TEXT.finditer(s)]
        assert shown == [], f"{kind}: the person's data without ad_user_data"
    if not denied.requests:
        assert isinstance(denied.outcome, Delivered)
        assert sum(denied.outcome.dropped.values()) == 1


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_refused_credentials_are_dead_letters_without_secrets(
    kind: str, fake: Fake, context: ForwarderContext, caplog: pytest.LogCaptureFixture
) -> None:
    """The destination refuses the credentials and echoes the request back (URL, query,
    headers): the batch is dead-lettered, and no secret shows in the detail or the logs."""
    caplog.set_level(logging.DEBUG)
    secrets = [*config_secrets(kind, fake.url), ISSUED_TOKEN]
    [purchase] = [e for e in contract_events() if e["messageId"] == "contract-purchase"]
    for answer in (*EVERY_REFUSAL, *REFUSALS[kind]):
        fake.answer = answer
        first = len(fake.requests)
        forwarder = make(kind, fake.url, context)
        await forwarder.start()
        try:
            outcome = await forwarder.deliver([purchase])
        finally:
            await forwarder.close()
        assert fake.requests[first:], f"{kind}: nothing sent"
        assert isinstance(outcome, Dead), f"{kind} {answer}: {outcome}"
        assert leaks(secrets, outcome.reason, outcome.detail) == [], f"{kind} {answer}"
    assert leaks(secrets, *logged(caplog)) == []


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_a_rate_limit_is_retried_after_its_delay_without_secrets(
    kind: str, fake: Fake, context: ForwarderContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [*config_secrets(kind, fake.url), ISSUED_TOKEN]
    [purchase] = [e for e in contract_events() if e["messageId"] == "contract-purchase"]
    for answer in (*EVERY_THROTTLE, *THROTTLES[kind]):
        fake.answer = answer
        forwarder = make(kind, fake.url, context)
        await forwarder.start()
        try:
            outcome = await forwarder.deliver([purchase])
        finally:
            await forwarder.close()
        assert isinstance(outcome, Retry), f"{kind} {answer}: {outcome}"
        if "Retry-After" in answer.headers:
            assert outcome.after_secs == float(answer.headers["Retry-After"]), f"{kind} {answer}"
        assert leaks(secrets, outcome.reason, outcome.detail) == [], f"{kind} {answer}"
    assert leaks(secrets, *logged(caplog)) == []


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_an_unreachable_destination_is_retried_without_secrets(
    kind: str, context: ForwarderContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with fake_server("closed", {}) as server:
        url = str(server.make_url("")).rstrip("/")
    secrets = config_secrets(kind, url)
    forwarder = make(kind, url, context)
    [purchase] = [e for e in contract_events() if e["messageId"] == "contract-purchase"]
    await forwarder.start()
    try:
        outcome = await forwarder.deliver([purchase])
    finally:
        await forwarder.close()
    assert isinstance(outcome, Retry), outcome
    assert leaks(secrets, outcome.reason, outcome.detail) == []
    assert leaks(secrets, *logged(caplog)) == []


# -- consent to ads: the runtime's, through a relay -------------------------------------


@pytest.mark.parametrize("kind", HTTP_TYPES)
async def test_without_ads_consent_no_ad_platform_gets_the_event(
    kind: str, fake: Fake, relay: Any
) -> None:
    """Through a real relay (delivery process and all, as configured by default): the event
    denying ``ads`` reaches no ad platform and is counted as ``consent_denied``; the same
    event granting it is delivered (so the fake is reachable). GA4 and the webhook take it."""
    forwarder = {
        "id": f"contract-{kind}",
        "type": kind,
        **raw_config(kind, fake.url),
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
    }
    client = await relay(forwarders=[forwarder])
    auth = basic(SERVER_KEY)
    events = {e["messageId"]: e for e in contract_events()}
    response = await client.post(
        "/v1/batch", json={"batch": [events["contract-no-ads"]]}, headers=auth
    )
    assert response.status == 200, await response.text()
    await wait_idle(client.app)
    dropped = metric_value(
        client.app,
        "tagrelay_forwarder_dropped_total",
        {"forwarder": f"contract-{kind}", "reason": "consent_denied"},
    )
    if kind in NOT_AD_PLATFORMS:
        assert dropped == 0
        assert fake.requests, f"{kind} did not get the event"
        return
    assert fake.requests == [], f"{kind} got an event that denies ads"
    assert dropped == 1
    response = await client.post(
        "/v1/batch", json={"batch": [events["contract-purchase"]]}, headers=auth
    )
    assert response.status == 200
    await wait_idle(client.app)
    assert fake.requests, f"{kind} did not get the event that grants ads"
    sent = [s for request in fake.requests for s in VALIDATORS[kind](request)]
    assert [s.event_id for s in sent] in ([None], ["contract-purchase"])


# -- enrichment from the identity store -------------------------------------------------


def thin(purchase: Mapping[str, Any], consent: Mapping[str, str]) -> dict[str, Any]:
    """The purchase as a backend reports it: its ids, what was bought, nothing else."""
    return {
        "type": "track",
        "event": purchase["event"],
        "userId": USER_ID,
        "messageId": f"thin-{consent['ad_user_data']}",
        "timestamp": purchase["timestamp"],
        "receivedAt": purchase["receivedAt"],
        "properties": purchase["properties"],
        "context": {"consent": dict(consent)},
    }


@pytest.mark.parametrize("kind", sorted(set(HTTP_TYPES) - set(NOT_AD_PLATFORMS)))
async def test_with_enrich_a_thin_event_goes_with_what_the_store_remembers(
    kind: str, fake: Fake, context: ForwarderContext
) -> None:
    """``enrich: true`` (a conversions-layer option, so every ad platform has it): a
    purchase that carries only its userId is sent with the person's hashed identifiers and
    the click ids the platform takes, as the full purchase was, from the identity store's
    record of an earlier event; the email counted as filled in. Not when the purchase
    denies ``ad_user_data``."""
    from tagrelay.identity_store import IdentityStoreConfig, StoreSettings
    from tagrelay.identity_store.record import observe

    events = contract_events()
    purchase = next(e for e in events if e["messageId"] == "contract-purchase")
    settings = StoreSettings(IdentityStoreConfig(enabled=True))
    writer = settings.open_backend(context.data_dir, writer=True)
    seen = observe(purchase, int(NOW.timestamp() * 1000))
    assert seen is not None
    writer.record([seen], int(NOW.timestamp() * 1000))
    writer.close()

    full = make(kind, fake.url, context)
    await full.start()
    try:
        await full.deliver([purchase])
    finally:
        await full.close()
    baseline = [s for request in fake.requests for s in request.strings(credentials=False)]
    person = {h for s in baseline for h in HEX64.findall(s)} & _person_hashes()
    # Click ids the platform takes as such (not inside the page's URL, which a thin event
    # has none of).
    as_such = [s for s in baseline if "shop.test" not in s]
    clicks = [v for v in purchase["context"]["clickIds"].values() if any(v in s for s in as_such)]
    assert person, f"{kind}: the full purchase carries no hashed identifier"

    enriching_context = ForwarderContext(
        data_dir=context.data_dir, http=context.http, metrics=context.metrics, identity=settings
    )
    cls = FORWARDERS[kind]
    config = cls.config_model.model_validate(
        {"id": f"contract-{kind}", "type": kind, "enrich": True, **raw_config(kind, fake.url)}
    )
    forwarder = cls(config, enriching_context)
    await forwarder.start()
    try:
        first = len(fake.requests)
        await forwarder.deliver([thin(purchase, GRANTED)])
        granted = [
            s for request in fake.requests[first:] for s in request.strings(credentials=False)
        ]
        first = len(fake.requests)
        await forwarder.deliver([thin(purchase, {**GRANTED, "ad_user_data": "denied"})])
        denied = [
            s for request in fake.requests[first:] for s in request.strings(credentials=False)
        ]
    finally:
        await forwarder.close()
    sent = {h for s in granted for h in HEX64.findall(s)}
    assert person <= sent, f"{kind}: identifiers not filled in: {sorted(person - sent)}"
    assert [c for c in clicks if not any(c in s for s in granted)] == [], kind
    labels = {"forwarder": f"contract-{kind}", "key": "email"}
    value = context.metrics.registry.get_sample_value("tagrelay_forwarder_enriched_total", labels)
    assert value == 1, kind
    assert not {h for s in denied for h in HEX64.findall(s)} & _person_hashes(), kind
    assert [c for c in clicks if any(c in s for s in denied)] == [], kind
