"""``x``: X's Conversion API (web conversions), on the shared conversions layer
(``_conversions``).

``POST {base_url}/{api_version}/measurement/conversions/{pixel_id}`` with a JSON body
``{"conversions": [...]}`` of at most 500 conversions (destinations.md §9), signed with
OAuth 1.0a: an ``Authorization: OAuth ...`` header computed for each attempt from the app's
consumer key and secret and a user's access token and secret (RFC 5849, HMAC-SHA1; the JSON
body is not part of the signature, only form bodies are: :func:`oauth1_authorization`).

**Which events, as which event.** X's conversions name no event by name: each names an
*event* of the pixel created in Events Manager, by its id. ``conversions: [{event,
event_id}]`` says which events go as which, matched by ``_conversions.ConfiguredEvents``
(exactly, then ignoring case and spaces, then by meaning: an entry for ``purchase`` also
takes Segment's ``Order Completed``; page and screen calls are ``page_view``). Other events
are not sent (``no_conversion_event``). The layer does the rest as for every ad platform:
``ads`` consent, user data only under ``ad_user_data``, the age window, user data normalized
by X's row of ``_user_data.RULES``.

Each conversion::

    conversion_time   the event time, ISO 8601 in UTC with milliseconds
                      (2026-12-05T11:50:00.000Z)
    event_id          the configured event's id (o87ne, or tw-<pixel_id>-<event id>)
    identifiers       one object per identifier: {"twclid"} (the click id, kept by the relay
                      from the landing URL), {"hashed_email"} (SHA-256 of the trimmed,
                      lowercased email), {"hashed_phone_number"} (SHA-256 of the number in
                      E.164, with "+"); the IP address and user agent join the first object
                      (X matches on them only beside another identifier)
    conversion_id     the event's messageId: the pixel's conversion_id for the same action,
                      so that X keeps one of the two
    value, price_currency, number_items   from the commerce fields
    contents          [{content_id, content_name, content_price, num_items}]

An event with neither a twclid, an email nor a phone number cannot be matched (X refuses a
conversion without one, and with it the whole request): not sent (``no_match_key``).
Events older than 90 days (X's longest click-through attribution window; X documents no
limit of its own) are ``too_old``.

X's answers (``{"errors": [{"code", "message"}], "request": ...}``; a request is taken only
if every conversion in it is valid, destinations.md §9 and §12):

=====================================  ==================================================
the answer                             outcome
=====================================  ==================================================
2xx                                    ``Delivered``
400                                    ``Dead(x_invalid_request)``: X names no conversion
                                       in its errors, so the request's events all become
                                       dead letters with X's messages
401                                    ``Dead(x_unauthorized)`` (the credentials, or a
                                       clock too far off for the signature's timestamp)
403                                    ``Dead(x_forbidden)``: the user lacks AD_MANAGER or
                                       ACCOUNT_ADMIN access on the ad account
404                                    ``Dead(x_not_found)``: no such pixel
429                                    ``Retry(x_rate_limited)`` after ``Retry-After``, or
                                       else X's ``x-rate-limit-reset`` (Unix seconds)
408, 5xx                               the shared table: ``Retry``, X's words in the detail
other 4xx                              ``Dead(x_error)``
=====================================  ==================================================

A detail carries X's status, codes and messages; the consumer key and secret, the access
token and its secret are scrubbed (``secrets``).

There is no test mode: to try a setup, map the events to an event made for the purpose in
Events Manager, and remove it from ``conversions`` afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets as random_secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, quote, urlsplit

import orjson
from pydantic import Field, SecretStr, field_validator, model_validator

from tagrelay.config.common import ConfigModel
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import PlannedRequest
from tagrelay.forwarders._conversions import (
    ConfiguredEvents,
    Conversion,
    ConversionsConfig,
    ConversionsForwarder,
    named_event,
)
from tagrelay.forwarders._http import (
    HttpRequest,
    HttpResponse,
    classify_status,
    parse_retry_after,
)
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry

__all__ = [
    "OAuth1Credentials",
    "OAuth1Signer",
    "XConfig",
    "XConversionEventConfig",
    "XForwarder",
    "classify_x_response",
    "oauth1_authorization",
    "oauth1_signature",
    "percent_encode",
    "signature_base_string",
    "x_conversion_time",
]

BASE_URL: Final = "https://ads-api.x.com"
API_VERSION: Final = "12"
MAX_CONVERSIONS_PER_REQUEST: Final = 500
MAX_EVENT_AGE_SECS: Final = 90 * 86_400.0
MAX_DETAIL_CHARS: Final = 1500

_PIXEL_ID = re.compile(r"[0-9a-z]{1,16}")
_EVENT_ID = re.compile(r"(?:tw-[0-9a-z]{1,16}-)?[0-9a-z]{1,16}")
_EMAIL_LIKE = re.compile(r"[^@\s\"'<>(),;:]+@[^@\s\"'<>(),;:]+\.[A-Za-z]{2,}")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

_SENT_MATCH_KEYS: Final = frozenset({"email", "phone", "ip", "user_agent", "click_id"})


# -- OAuth 1.0a (RFC 5849) -----------------------------------------------------------------


def percent_encode(text: str) -> str:
    """RFC 5849 §3.6: UTF-8, every byte but ALPHA, DIGIT, ``-``, ``.``, ``_``, ``~`` as
    ``%XX`` in upper case."""
    return quote(text, safe="-._~")


def signature_base_string(
    method: str,
    url: str,
    oauth_params: Mapping[str, str],
    form: Iterable[tuple[str, str]] = (),
) -> str:
    """RFC 5849 §3.4.1: the method in upper case, the base string URI (scheme and host in
    lower case, the port only when it is not the scheme's default, the path) and the
    normalized parameters (the URL's query, ``form``: the decoded fields of an
    ``application/x-www-form-urlencoded`` body, and the ``oauth_*`` parameters but
    ``oauth_signature`` and ``realm``; each name and value encoded, sorted by name then
    value, joined with ``=`` and ``&``), each encoded and joined with ``&``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{parts.port}"
    base_uri = f"{scheme}://{host}{parts.path or '/'}"
    params = [
        *parse_qsl(parts.query, keep_blank_values=True),
        *form,
        *((k, v) for k, v in oauth_params.items() if k not in ("oauth_signature", "realm")),
    ]
    normalized = "&".join(
        f"{name}={value}"
        for name, value in sorted((percent_encode(k), percent_encode(v)) for k, v in params)
    )
    return "&".join((method.upper(), percent_encode(base_uri), percent_encode(normalized)))


def oauth1_signature(base_string: str, consumer_secret: str, token_secret: str) -> str:
    """RFC 5849 §3.4.2, HMAC-SHA1: base64 of the HMAC-SHA1 of the base string, keyed by the
    encoded consumer secret and token secret joined with ``&``."""
    key = f"{percent_encode(consumer_secret)}&{percent_encode(token_secret)}"
    digest = hmac.new(key.encode(), base_string.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class OAuth1Credentials:
    """An app's consumer key and secret and a user's access token and secret. Prints none."""

    consumer_key: str = field(repr=False)
    consumer_secret: str = field(repr=False)
    token: str = field(repr=False)
    token_secret: str = field(repr=False)


def oauth1_authorization(
    credentials: OAuth1Credentials,
    method: str,
    url: str,
    *,
    timestamp: int,
    nonce: str,
    form: Iterable[tuple[str, str]] = (),
) -> str:
    """The ``Authorization`` header of a request signed with HMAC-SHA1 (RFC 5849 §3.5.1):
    ``OAuth`` and the ``oauth_*`` parameters, signature included, each ``name="value"``
    encoded, joined with ``, ``."""
    params = {
        "oauth_consumer_key": credentials.consumer_key,
        "oauth_nonce": nonce,
        "oauth_signature_method": "HMAC-SHA1",
        "oauth_timestamp": str(timestamp),
        "oauth_token": credentials.token,
        "oauth_version": "1.0",
    }
    base = signature_base_string(method, url, params, form)
    params["oauth_signature"] = oauth1_signature(
        base, credentials.consumer_secret, credentials.token_secret
    )
    return "OAuth " + ", ".join(
        f'{percent_encode(k)}="{percent_encode(v)}"' for k, v in sorted(params.items())
    )


def _nonce() -> str:
    return random_secrets.token_hex(16)


@dataclass(frozen=True)
class OAuth1Signer:
    """Signs requests with one set of credentials, a fresh nonce and the current time each
    (``clock`` and ``nonce`` are replaceable for tests)."""

    credentials: OAuth1Credentials
    clock: Callable[[], float] = time.time
    nonce: Callable[[], str] = _nonce

    def authorization(self, method: str, url: str) -> str:
        return oauth1_authorization(
            self.credentials, method, url, timestamp=int(self.clock()), nonce=self.nonce()
        )


# -- configuration -------------------------------------------------------------------------


class XConversionEventConfig(ConfigModel):
    """An event name and the X event its events are reported as."""

    event: str = Field(
        min_length=1,
        description=(
            "The event's name: a track event (Segment's or GA4's name, matched exactly, then "
            "ignoring case and spaces, then by meaning: purchase also takes Order Completed), "
            "or page_view for page and screen calls."
        ),
        examples=["Order Completed"],
    )
    event_id: str = Field(
        description=(
            "The id of the event in X Events Manager (the pixel > the event > ID): its "
            "base-36 id (o87ne) or the full tw-<pixel_id>-<event id>."
        ),
        examples=["tw-o8z6j-o87ne"],
    )

    @field_validator("event")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("an event name must not be blank")
        return value

    @field_validator("event_id")
    @classmethod
    def _event_id(cls, value: str) -> str:
        value = value.strip()
        if not _EVENT_ID.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an X event id: expected its base-36 id (o87ne) or "
                "tw-<pixel id>-<event id> (tw-o8z6j-o87ne), as Events Manager shows it"
            )
        return value


class XConfig(ConversionsConfig):
    """X Conversion API: web conversions reported from the server to events of an X pixel,
    matched by the twclid click id and hashed email and phone, deduplicated against the
    pixel by conversion id."""

    type: Literal["x"] = Field(description="Forwarder type.", examples=["x"])
    pixel_id: str = Field(
        description=(
            "The pixel's (Base Tag's) id in X Events Manager, base-36 (o8z6j), as in "
            "twq('config', 'o8z6j')."
        ),
        examples=["o8z6j"],
    )
    consumer_key: SecretStr = Field(
        min_length=1,
        description=(
            "The Ads API app's API key (consumer key), from the developer portal > "
            "Projects & Apps > the app > Keys and tokens. Never logged."
        ),
        examples=["${X_CONSUMER_KEY}"],
    )
    consumer_secret: SecretStr = Field(
        min_length=1,
        description="The app's API key secret (consumer secret). Never logged.",
        examples=["${X_CONSUMER_SECRET}"],
    )
    access_token: SecretStr = Field(
        min_length=1,
        description=(
            "The access token of a user with AD_MANAGER or ACCOUNT_ADMIN access to the ad "
            "account (the app owner's, from the developer portal, or one made with 3-legged "
            "OAuth). Never logged."
        ),
        examples=["${X_ACCESS_TOKEN}"],
    )
    access_token_secret: SecretStr = Field(
        min_length=1,
        description="The access token's secret. Never logged.",
        examples=["${X_ACCESS_TOKEN_SECRET}"],
    )
    conversions: list[XConversionEventConfig] = Field(
        min_length=1,
        description=(
            "Which events are reported, as which X event; each event name once. Events "
            "without an entry are not sent (counted as no_conversion_event)."
        ),
        examples=[
            [
                {"event": "Order Completed", "event_id": "tw-o8z6j-o87ne"},
                {"event": "Signed Up", "event_id": "tw-o8z6j-o87nf"},
            ]
        ],
    )
    events: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Not used by x (its conversions name no event): map event names to X events "
            "under conversions. Must stay empty."
        ),
        examples=[{}],
    )
    unmapped: Literal["skip"] = Field(
        "skip",
        description=(
            "Always skip for x: an event without an X event in conversions is not sent "
            "(counted as no_conversion_event)."
        ),
        examples=["skip"],
    )
    base_url: str = Field(
        BASE_URL,
        description="The X Ads API's scheme and host (no trailing slash).",
        examples=[BASE_URL],
    )
    api_version: str = Field(
        API_VERSION,
        pattern=r"^[0-9]{1,3}$",
        description="The X Ads API version in the path.",
        examples=[API_VERSION],
    )

    @field_validator("pixel_id")
    @classmethod
    def _pixel_id(cls, value: str) -> str:
        value = value.strip()
        if not _PIXEL_ID.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an X pixel id: expected the base-36 Base Tag id (o8z6j) "
                "shown in Events Manager"
            )
        return value

    @field_validator("events")
    @classmethod
    def _no_events(cls, value: dict[str, str]) -> dict[str, str]:
        if value:
            raise ValueError(
                "x conversions name no events: list each event under conversions with its "
                "event_id instead"
            )
        return value

    @model_validator(mode="after")
    def _each_event_once(self) -> XConfig:
        repeated = ConfiguredEvents.repeated(entry.event for entry in self.conversions)
        if repeated:
            raise ValueError(
                "conversions lists an event more than once (names match ignoring case and "
                "spaces): " + ", ".join(repeated) + "; keep one entry per event"
            )
        return self


# -- X's answers -----------------------------------------------------------------------------


def x_conversion_time(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds: ``2026-12-05T11:50:00.000Z``."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _said(response: HttpResponse) -> str:
    """``HTTP 400: X INVALID_PARAMETER: <message>; ...`` (or the body as it came)."""
    try:
        parsed = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        parsed = None
    errors = parsed.get("errors") if isinstance(parsed, dict) else None
    said = []
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict):
            continue
        code, message = error.get("code"), error.get("message")
        text = str(code) if isinstance(code, str | int) and not isinstance(code, bool) else ""
        if isinstance(message, str) and message.strip():
            text = f"{text}: {message.strip()}" if text else message.strip()
        if text:
            said.append(text)
    words = "X " + "; ".join(said) if said else response.text
    return _EMAIL_LIKE.sub("<email>", f"HTTP {response.status}: {words}")[:MAX_DETAIL_CHARS]


def _rate_limit_reset(headers: Mapping[str, str], now: float) -> float | None:
    for name, value in headers.items():
        if name.lower() == "x-rate-limit-reset":
            try:
                return max(0.0, float(value) - now)
            except ValueError:
                return None
    return None


def classify_x_response(response: HttpResponse, now: float | None = None) -> Outcome:
    """The outcome of one Conversion API answer (see the module docstring's table);
    ``now`` (Unix seconds) dates ``x-rate-limit-reset``."""
    status = response.status
    if 200 <= status < 300:
        return Delivered()
    detail = _said(response)
    if status == 429:
        after = parse_retry_after(response.headers.get("Retry-After"))
        if after is None:
            after = _rate_limit_reset(response.headers, time.time() if now is None else now)
        return Retry("x_rate_limited", detail, after)
    dead = {400: "x_invalid_request", 401: "x_unauthorized", 403: "x_forbidden", 404: "x_not_found"}
    if status in dead:
        return Dead(dead[status], detail)
    shared = classify_status(response)
    if isinstance(shared, Retry):
        return Retry(shared.reason, detail, shared.after_secs)
    return Dead("x_error", detail)


# -- the forwarder ---------------------------------------------------------------------------


class XForwarder(ConversionsForwarder[XConfig]):
    config_model = XConfig
    platform = "x"
    standard_events = None
    max_events_per_request = MAX_CONVERSIONS_PER_REQUEST
    max_event_age_secs = MAX_EVENT_AGE_SECS
    """X's longest click-through attribution window (see the module docstring)."""
    payload_match_keys = _SENT_MATCH_KEYS
    platform_event_drop_reasons = frozenset({"no_conversion_event", "no_match_key"})

    def __init__(self, config: XConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self.signer = OAuth1Signer(
            OAuth1Credentials(
                config.consumer_key.get_secret_value(),
                config.consumer_secret.get_secret_value(),
                config.access_token.get_secret_value(),
                config.access_token_secret.get_secret_value(),
            )
        )
        self.event_ids = ConfiguredEvents((e.event, e.event_id) for e in config.conversions)
        self._url = (
            f"{config.base_url}/{config.api_version}/measurement/conversions/{config.pixel_id}"
        )

    # -- which events, as which X event ------------------------------------------------

    def event_name(self, event: Event) -> tuple[str, bool, str | None] | str:
        """The X event's id stands for the event name."""
        named = named_event(event)
        if isinstance(named, str):
            return named
        name, canonical = named
        event_id = self.event_ids.target(name, canonical)
        if event_id is None:
            return "no_conversion_event"
        return event_id, True, canonical

    def convert(
        self, index: int, event: Event, now: datetime, drops: Counter[str]
    ) -> Conversion | None:
        conversion = super().convert(index, event, now, drops)
        if conversion is None:
            return None
        if not _matching(conversion):
            drops["no_match_key"] += 1
            return None
        return conversion

    # -- the request -------------------------------------------------------------------

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        body = {"conversions": [_conversion(c) for c in conversions]}
        headers = {"Content-Type": "application/json"}
        return HttpRequest("POST", self._url, headers, orjson.dumps(body))

    async def authorize(
        self, request: HttpRequest, *, refresh: bool = False
    ) -> HttpRequest | Retry | Dead:
        # Signed per attempt: X refuses a nonce it has seen.
        authorization = self.signer.authorization(request.method, request.url)
        return replace(request, headers={**request.headers, "Authorization": authorization})

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome:
        return classify_x_response(response)

    def secrets(self) -> Iterable[str]:
        config = self.config
        return (
            config.consumer_key.get_secret_value(),
            config.consumer_secret.get_secret_value(),
            config.access_token.get_secret_value(),
            config.access_token_secret.get_secret_value(),
        )


def _matching(c: Conversion) -> list[dict[str, str]]:
    """The identifiers X matches a conversion on by themselves (IP and user agent only go
    beside one of them)."""
    identifiers = []
    twclid = c.user.click_ids.get("twclid")
    if twclid:
        identifiers.append({"twclid": twclid})
    values = c.prepared.values
    if "email" in values:
        identifiers.append({"hashed_email": values["email"]})
    if "phone" in values:
        identifiers.append({"hashed_phone_number": values["phone"]})
    return identifiers


def _conversion(c: Conversion) -> dict[str, Any]:
    identifiers = _matching(c)
    first = identifiers[0]
    if c.user.ip:
        first["ip_address"] = c.user.ip
    if c.user.user_agent:
        first["user_agent"] = c.user.user_agent
    conversion: dict[str, Any] = {
        "conversion_time": x_conversion_time(c.time),
        "event_id": c.name,
        "identifiers": identifiers,
        "conversion_id": c.event_id,
    }
    facts = c.commerce
    if facts.value is not None:
        conversion["value"] = facts.value
    if facts.currency is not None:
        conversion["price_currency"] = facts.currency
    if facts.num_items:
        conversion["number_items"] = facts.num_items
    contents = []
    for item in facts.items:
        content: dict[str, Any] = {}
        if item.id is not None:
            content["content_id"] = item.id
        if item.name is not None:
            content["content_name"] = item.name
        if item.price is not None:
            content["content_price"] = item.price
        if item.quantity:
            content["num_items"] = item.quantity
        if content:
            contents.append(content)
    if contents:
        conversion["contents"] = contents
    return conversion
