"""``ga4``: Google Analytics 4, by the path each event came in on.

**gtag hits** (events decoded from ``/g/collect``) carry ``context.ga4.request`` (the shared
query string as received) and ``context.ga4.event`` (the event's body line as received,
``""`` for a query-only hit). They are re-sent to Google's own collection endpoint
(``collect_url``) as gtag sent them: ``POST <collect_url>?<request>&_uip=<visitor ip>``
with the lines of the events that shared the request, joined by ``\\n``, as a
``text/plain;charset=UTF-8`` body. ``_uip`` is the IP override Google honours on
server-to-server hits (the relay has already truncated the IP when configured to); a
``_uip`` in the received query is replaced. A query-only hit is re-sent as a POST with no
body and no ``Content-Type``, the way gtag itself sends single-event hits (a beacon with
the event in the URL); a POST keeps one method for both shapes. The headers carry the
visitor's ``User-Agent`` and, when ``context.userAgentData`` is known, its client hints
(``Sec-CH-UA``, ``Sec-CH-UA-Mobile``, ...) as structured-field strings. Google stamps a
hit with the time it arrives (the protocol has no event time): a backlog shifts gtag hits
in time, so they obey the same 72-hour limit as the Measurement Protocol below.

**Every other event** (Segment, Jitsu, RudderStack, tagrelay.js, backends) goes through the
Measurement Protocol: ``POST <mp_url>?measurement_id=..&api_secret=..`` with a JSON body of
at most 25 events that share one ``client_id`` / ``user_id`` (and the other request-level
fields: consent, user properties, user data, IP), split further if the body would pass
130 kB:

- ``client_id``: ``context.clientIds.ga4.clientId`` when known (the ``_ga`` cookie's, so
  the events join the visitor's gtag sessions, or a Measurement Protocol sender's); else
  derived from ``anonymousId`` (or ``userId``): the first two big-endian uint32 of
  ``sha256("tagrelay.ga4:" + id)`` in GA's ``<uint32>.<uint32>`` shape. The same visitor
  always gets the same id.
- ``params.session_id``: ``context.clientIds.ga4.sessionIds[measurement_id]`` when known,
  else the start of the event's UTC day in Unix seconds (GA's session ids are session-start
  seconds; sessions are per client, so one session per visitor and day).
  ``params.engagement_time_msec``: the property when sent, else 1 (Realtime needs both).
- ``timestamp_micros`` on each event (GA's hierarchy: event, then request, then arrival)
  and on the request (the first event's, for the user properties). Events older than 72 h
  are not sent: GA refuses them.
- names: ``page`` and ``screen`` -> ``page_view`` (``screen_view`` is reserved on MP, and
  web streams report screens as pages, ``page_title`` = the screen's name); ``track`` ->
  ``event_names`` (this config) or Segment's e-commerce spec table
  (``_ecommerce.SEGMENT_EVENT_NAMES``), matched case-insensitively, else snake_cased; ``identify``,
  ``group`` and ``alias`` are not sent (MP has no event for them; their traits reach GA as
  user properties of the visitor's later events that carry ``context.traits``).
- params: page context (``page_location``, ``page_referrer``, ``page_title``,
  ``language``, ``screen_resolution``), Segment's e-commerce fields renamed to GA4's
  by the shared field tables of ``_ecommerce`` (``products[]`` -> ``items[]``; ``items[]``
  already in GA4's shape are kept; values as sent, numbers where GA4 takes numbers), then
  the other properties (flat scalars only). Names that are valid GA4 names are kept, others
  are snake_cased.
- ``user_properties`` from ``context.traits`` and ``traits``, without personal data (GA's
  terms forbid it): email, phone, names, address, birthday and any value that looks like an
  email address are left out.
- ``consent`` from ``context.consent.ad_user_data`` / ``ad_personalization``.
- ``user_data`` (``send_user_data``, only when ``ad_user_data`` is granted): email, phone,
  name and address of the event (``forwarders._user_data``: traits, then email and phone
  properties), normalized and SHA-256 hashed by Google's rules, phones in E.164 with
  ``default_phone_country`` for national numbers; 64-hex values are taken as already
  hashed; values that do not normalize are left out and counted (``invalid_email``, ...).
  Without any, the ``user_data`` a Measurement Protocol sender gave (already hashed).
- ``ip_override`` from ``context.ip`` when the relay kept one.

**Consent** (``analytics_denied``): an event whose ``context.consent.analytics`` is
``denied`` is either dropped (``skip``) or sent as a cookieless ping (``cookieless``, the
default). A gtag hit is then re-sent unchanged: gtag already put the consent state in it
(``gcs``/``gcd``) and Google treats it as a cookieless ping. An MP event gets a client id
of its own that links it to nothing (derived from its ``messageId``, one per event, so a
retry sends the same bytes), so each is a request of its own; the session id of its day; no
``user_id``, no user properties, no ``user_data``; ``consent`` denied for ``ad_user_data``
and ``ad_personalization``. The IP stays when the relay kept one (the relay's own consent
policy decides that), as it does on Google's own cookieless pings.

**Gateway copies** (``context.ga4.gateway: true``, hits copied by a Google tag gateway
route, ``web.gateway``) are never sent: Google had them through the gateway. Each is
counted as ``gateway_delivered``.

**Validation** (``validate_only``): MP requests go to ``/debug/mp/collect`` on the same host;
an empty ``validationMessages`` is ``Delivered``, anything else ``Dead(validation_failed)``
with the messages. There is no validation endpoint for gtag hits: they are skipped.

**Limits** (GA drops what exceeds them, silently): names are cut to 40 characters (user
properties 24), string values to 100 (``page_location`` 1000, ``page_referrer`` 420,
``page_title`` 300, user properties 36), at most 25 params per event, 25 user properties,
200 items; reserved event names are not sent, reserved param and user-property names are
left out. Every cut and every event not sent is counted through
:meth:`GA4Forwarder.dropped` with one of ``DROP_REASONS`` once its batch is done (not on
attempts that will be retried; not when the whole batch becomes dead letters, which then
holds those events too); those in ``EVENT_DROP_REASONS`` are whole events, the others parts
of an event that was sent.

**Outcomes**: GA answers 2xx (normally 204) on success, and never reports bad payloads on
``/mp/collect``; 429, 5xx and network errors are retried by the shared table of ``_http``.
Sending is ``_batched.BatchedHttpForwarder``'s: a batch that needs several requests is
retried as a whole, but requests that already succeeded are not sent again (GA has no
deduplication); a request that fails for good dead-letters its own events only; the API
secret is scrubbed from every detail.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final, Literal
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import orjson
from pydantic import Field, SecretStr, field_validator

from tagrelay.config.common import ForwarderConfigBase
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import BatchedHttpForwarder, Plan, PlannedRequest
from tagrelay.forwarders._ecommerce import (
    AMOUNT_KEYS,
    GA4_ITEM_NAMES,
    ITEM_SOURCE_KEYS,
    SEGMENT_EVENT_NAMES,
    SINGLE_PRODUCT_EVENTS,
    SINGLE_PRODUCT_KEYS,
    currency_code,
    event_name_key,
    item_fields,
    number,
)
from tagrelay.forwarders._http import MAX_DETAIL_CHARS, HttpRequest, HttpResponse, classify_status
from tagrelay.forwarders._user_data import DROP_REASONS as USER_DATA_DROP_REASONS
from tagrelay.forwarders._user_data import (
    RULES,
    PhoneCountry,
    UserData,
    extract_user_data,
    looks_like_email,
    prepare,
)
from tagrelay.forwarders._user_data import Field as UserDataField
from tagrelay.model import Dead, Delivered, Event, Outcome

__all__ = [
    "DROP_REASONS",
    "EVENT_DROP_REASONS",
    "GA4Config",
    "GA4Forwarder",
    "GA4Request",
    "RequestBuilder",
    "build_plan",
    "build_user_data",
    "client_hints",
    "derived_client_id",
    "snake_name",
]

COLLECT_URL: Final = "https://region1.google-analytics.com/g/collect"
MP_URL: Final = "https://region1.google-analytics.com/mp/collect"

MAX_EVENTS_PER_REQUEST: Final = 25
MAX_BODY_BYTES: Final = 130_000
MAX_EVENT_AGE: Final = timedelta(hours=72)
MAX_NAME: Final = 40
MAX_PARAMS: Final = 25
MAX_VALUE: Final = 100
MAX_ITEMS: Final = 200
MAX_USER_PROPERTIES: Final = 25
MAX_USER_PROPERTY_NAME: Final = 24
MAX_USER_PROPERTY_VALUE: Final = 36
MAX_USER_ID: Final = 256
PAGE_LIMITS: Final = {"page_location": 1000, "page_referrer": 420, "page_title": 300}

# Event names the Measurement Protocol reserves (GA drops such events); prefixes too.
RESERVED_EVENT_NAMES: Final = frozenset(
    {
        "ad_activeview",
        "ad_click",
        "ad_exposure",
        "ad_impression",
        "ad_query",
        "adunit_exposure",
        "app_clear_data",
        "app_install",
        "app_update",
        "app_remove",
        "error",
        "first_open",
        "first_visit",
        "in_app_purchase",
        "os_update",
        "screen_view",
        "session_start",
        "user_engagement",
    }
)
RESERVED_EVENT_PREFIXES: Final = ("_", "firebase_", "ga_", "google_", "gtag.", "notification_")
RESERVED_PARAM_PREFIXES: Final = ("_", "firebase_", "ga_", "google_", "gtag.")
RESERVED_USER_PROPERTIES: Final = frozenset(
    {
        "first_open_time",
        "first_visit_time",
        "last_deep_link_referrer",
        "user_id",
        "first_open_after_install",
    }
)
RESERVED_USER_PROPERTY_PREFIXES: Final = ("_", "firebase_", "ga_", "google_")

EVENT_DROP_REASONS: Final = frozenset(
    {
        "too_old",  # older than GA's 72 hours
        "consent_denied",  # analytics denied and analytics_denied: skip
        "unsupported_type",  # identify, group, alias: no GA4 event for them
        "reserved_name",  # the event name is reserved by GA4
        "invalid_name",  # nothing of the name is left after making it a GA4 name
        "validate_mode",  # a gtag hit while validate_only is on
        "other_measurement_id",  # a gtag hit for another GA4 property
        "gtag_hits_skipped",  # gtag_hits: skip
        "too_large",  # one event alone exceeds the 130 kB request limit
        "gateway_delivered",  # a gateway copy (context.ga4.gateway): Google has the hit
    }
)
"""Reasons for which a whole event is not sent."""

FIELD_DROP_REASONS: Final = frozenset(
    {
        "value_truncated",  # a string value cut to GA's length
        "name_truncated",  # a name cut to 40 (user properties: 24) characters
        "too_many_params",  # params beyond 25 per event
        "too_many_user_properties",  # user properties beyond 25
        "too_many_items",  # items beyond 200
        "reserved_param",  # a param or user property with a reserved name or prefix
        "invalid_param_name",  # a param or user property name with no usable character
        "nested_value",  # an object or array where GA takes a scalar
        "invalid_value",  # a numeric e-commerce field that is not a number
        "pii_removed",  # personal data kept out of params and user properties
        "unmapped_item_field",  # a product field GA4 items have no place for
        "invalid_user_id",  # a userId over 256 characters (sent without it)
        *USER_DATA_DROP_REASONS,  # invalid_email, invalid_phone, ...: left out of user_data
    }
)
"""Reasons for which part of a sent event was cut or left out."""

DROP_REASONS: Final = EVENT_DROP_REASONS | FIELD_DROP_REASONS

_GA4_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NOT_WORD = re.compile(r"[^A-Za-z0-9]+")
_LEADING_NON_LETTERS = re.compile(r"^[^a-z]+")
MAX_CLIENT_ID: Final = 256


class GA4Config(ForwarderConfigBase):
    """Google Analytics 4: gtag hits re-sent to Google's collection endpoint, every other
    event through the Measurement Protocol."""

    type: Literal["ga4"] = Field(description="Forwarder type.", examples=["ga4"])
    measurement_id: str = Field(
        pattern=r"^G-[A-Z0-9]{4,20}$",
        description="The web stream's measurement ID (Admin > Data streams), not its stream ID.",
        examples=["G-ABC123DEF4"],
    )
    api_secret: SecretStr = Field(
        min_length=1,
        description=(
            "Measurement Protocol API secret of the stream (Admin > Data streams > "
            "Measurement Protocol API secrets). Never logged."
        ),
        examples=["${GA4_API_SECRET}"],
    )
    mp_url: str = Field(
        MP_URL,
        pattern=r"^https?://",
        description=(
            "Measurement Protocol endpoint; www.google-analytics.com outside the EU "
            "data-processing region."
        ),
        examples=[MP_URL],
    )
    collect_url: str = Field(
        COLLECT_URL,
        pattern=r"^https?://",
        description="Where gtag hits (received on /g/collect) are re-sent.",
        examples=[COLLECT_URL],
    )
    gtag_hits: Literal["matching", "all", "skip"] = Field(
        "matching",
        description=(
            "Which gtag hits to re-send: those for measurement_id (matching), all of them, "
            "or none (skip). With one forwarder per GA4 property, matching sends each hit "
            "to its own property once."
        ),
        examples=["matching"],
    )
    event_names: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Track event name -> GA4 event name; extends and overrides the built-in "
            "Segment e-commerce table. Names not listed are snake_cased."
        ),
        examples=[{"My Event": "my_event", "Order Completed": "purchase"}],
    )
    send_user_data: bool = Field(
        False,
        description=(
            "Send user_data (email, phone, name, address from traits, email and phone also "
            "from properties; normalized and hashed by Google's rules) with events that "
            "grant ad_user_data."
        ),
        examples=[True],
    )
    default_phone_country: PhoneCountry = Field(
        None,
        pattern=r"^[A-Z]{2}$",
        description=(
            "ISO 3166-1 alpha-2 country (US, GB, ...) of user-data phone numbers written "
            "without a country code. Without it, a number must start with its country code "
            "(+ or 00 optional); one that does not is left out, counted as invalid_phone."
        ),
        examples=["US"],
    )
    analytics_denied: Literal["skip", "cookieless"] = Field(
        "cookieless",
        description=(
            "Events denying analytics consent: not sent (skip, counted as consent_denied), "
            "or sent as cookieless pings (gtag hits unchanged; Measurement Protocol events "
            "with a one-off client_id, no user_id, user properties or user_data)."
        ),
        examples=["cookieless"],
    )
    validate_only: bool = Field(
        False,
        description=(
            "Send Measurement Protocol requests to /debug/mp/collect (not recorded) and "
            "dead-letter those Google reports problems for; gtag hits are skipped."
        ),
        examples=[False],
    )
    timeout_secs: float = Field(
        10.0, gt=0, le=300, description="Per-request timeout.", examples=[10.0]
    )
    max_concurrent_requests: int = Field(
        32,
        ge=1,
        le=64,
        description=(
            "Requests in flight at once while delivering one batch. The Measurement "
            "Protocol takes one visitor per request, so a batch of mostly different visitors "
            "is about one request per event, and this bounds the rate at about this many "
            "events per round trip to Google (32 at a 30 ms round trip: ~1,000 events/s; 4, "
            "the default before, carried ~130). bench/fanout_bench.py measures it."
        ),
        examples=[32],
    )

    @field_validator("event_names")
    @classmethod
    def _valid_event_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [
            f"{source!r} -> {target!r}"
            for source, target in value.items()
            if not _valid_ga4_name(target, MAX_NAME) or _reserved_event_name(target)
        ]
        if bad:
            raise ValueError(
                "GA4 event names must be letters, digits and underscores, start with a letter, "
                "have at most 40 characters and not be reserved: " + ", ".join(bad)
            )
        return value


# -- names ---------------------------------------------------------------------------------


def _valid_ga4_name(name: str, max_len: int) -> bool:
    return len(name) <= max_len and _GA4_NAME.fullmatch(name) is not None


def _reserved_event_name(name: str) -> bool:
    return name in RESERVED_EVENT_NAMES or name.startswith(RESERVED_EVENT_PREFIXES)


def snake_name(raw: str) -> str:
    """``"Video Played"``, ``"videoPlayed"`` -> ``video_played``: ASCII letters, digits and
    single underscores, starting with a letter (``""`` when nothing is left)."""
    text = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode()
    text = _CAMEL_BOUNDARY.sub("_", text.strip())
    text = _NOT_WORD.sub("_", text).lower()
    return _LEADING_NON_LETTERS.sub("", text).strip("_")


# -- client hints --------------------------------------------------------------------------


def _sf_string(value: Any) -> str | None:
    """A structured-field string (RFC 8941): printable ASCII, ``\\`` and ``"`` escaped."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return None
    text = str(value)
    if any(not (0x20 <= ord(ch) <= 0x7E) for ch in text):
        return None
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sf_brands(value: Any) -> str | None:
    """``[{"brand": "Chromium", "version": "124"}]`` -> ``"Chromium";v="124"``."""
    if not isinstance(value, list):
        return None
    parts = []
    for entry in value:
        if not isinstance(entry, dict):
            continue
        brand, version = _sf_string(entry.get("brand")), _sf_string(entry.get("version"))
        if brand is not None and version is not None:
            parts.append(f"{brand};v={version}")
    return ", ".join(parts) or None


def client_hints(user_agent_data: Any) -> dict[str, str]:
    """The ``Sec-CH-UA*`` request headers a browser would send, from the
    ``navigator.userAgentData`` values SDKs report as ``context.userAgentData``
    (``brands``, ``mobile``, ``platform`` and the high-entropy ones when present)."""
    if not isinstance(user_agent_data, dict):
        return {}
    headers: dict[str, str] = {}
    brands = _sf_brands(user_agent_data.get("brands"))
    if brands is not None:
        headers["Sec-CH-UA"] = brands
    for key, header in (("mobile", "Sec-CH-UA-Mobile"), ("wow64", "Sec-CH-UA-WoW64")):
        flag = user_agent_data.get(key)
        if isinstance(flag, bool):
            headers[header] = "?1" if flag else "?0"
    for key, header in (
        ("platform", "Sec-CH-UA-Platform"),
        ("platformVersion", "Sec-CH-UA-Platform-Version"),
        ("architecture", "Sec-CH-UA-Arch"),
        ("bitness", "Sec-CH-UA-Bitness"),
        ("model", "Sec-CH-UA-Model"),
        ("uaFullVersion", "Sec-CH-UA-Full-Version"),
    ):
        text = _sf_string(user_agent_data.get(key))
        if text is not None:
            headers[header] = text
    full = _sf_brands(user_agent_data.get("fullVersionList"))
    if full is not None:
        headers["Sec-CH-UA-Full-Version-List"] = full
    return headers


# -- identity ------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def derived_client_id(seed: str) -> str:
    """A GA-shaped client id (``<uint32>.<uint32>``) that is a function of ``seed``.
    Cached: a visitor's events give the same seed (anonymousId, userId)."""
    digest = hashlib.sha256(("tagrelay.ga4:" + seed).encode()).digest()
    return f"{int.from_bytes(digest[:4], 'big')}.{int.from_bytes(digest[4:8], 'big')}"


_ADDRESS_FIELDS: Final[tuple[tuple[UserDataField, str], ...]] = (
    ("first_name", "sha256_first_name"),
    ("last_name", "sha256_last_name"),
    ("street", "sha256_street"),
    ("city", "city"),
    ("state", "region"),
    ("zip", "postal_code"),
    ("country", "country"),
)


def build_user_data(
    data: UserData, default_phone_country: str | None = None
) -> tuple[dict[str, Any] | None, Mapping[str, int]]:
    """GA4's ``user_data`` (``sha256_email_address``, ``sha256_phone_number``, ``address``)
    from the event's user data, normalized and hashed by Google's rules
    (``forwarders._user_data``), and the counts of values left out (``invalid_email``, ...)."""
    prepared = prepare(data, "google", default_phone_country=default_phone_country)
    values = prepared.values
    user_data: dict[str, Any] = {}
    if "email" in values:
        user_data["sha256_email_address"] = [values["email"]]
    if "phone" in values:
        user_data["sha256_phone_number"] = [values["phone"]]
    address = {target: values[name] for name, target in _ADDRESS_FIELDS if name in values}
    if address:
        user_data["address"] = [address]
    return user_data or None, prepared.drops


# -- the plan: requests built from a batch (pure) -----------------------------------------


@dataclass(frozen=True)
class GA4Request(PlannedRequest):
    validation: bool = False
    """Sent to the MP validation endpoint: its answer says whether the events are valid."""


@dataclass
class _Group:
    indices: list[int] = field(default_factory=list)
    payloads: list[Any] = field(default_factory=list)
    """gtag: body lines; MP: (event dict, timestamp_micros or None)."""
    envelope: dict[str, Any] = field(default_factory=dict)
    """gtag: ``url`` and ``headers``; MP: the request-level fields."""


def _timestamp(event: Event) -> datetime | None:
    for key in ("timestamp", "receivedAt"):
        value = event.get(key)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# Personal data GA's terms forbid in params and user properties. A property called "name"
# names a thing (a video, a plan); a trait called "name" names the person.
_PII_PARAMS: Final = frozenset(
    {
        "email",
        "phone",
        "first_name",
        "firstname",
        "last_name",
        "lastname",
        "address",
        "street",
        "birthday",
        "ip",
    }
)
_PII_TRAITS: Final = _PII_PARAMS | {"name", "username", "id"}

_NUMERIC_PARAMS: Final = ("value", "price", "quantity", "tax", "shipping", "discount")

# GA4's item fields, kept as they are on items that already use them (gtag.js, MP senders).
_GA4_ITEM_FIELDS: Final = frozenset(
    {
        "item_id",
        "item_name",
        "affiliation",
        "coupon",
        "discount",
        "index",
        "item_brand",
        "item_category",
        "item_category2",
        "item_category3",
        "item_category4",
        "item_category5",
        "item_list_id",
        "item_list_name",
        "item_variant",
        "location_id",
        "price",
        "quantity",
        "promotion_id",
        "promotion_name",
        "creative_name",
        "creative_slot",
    }
)
_PAGE_PROPERTY_KEYS: Final = frozenset({"url", "title", "referrer", "path", "search", "name"})
# A product's fields that have a place in a GA4 item (the rest are counted as unmapped).
_KNOWN_PRODUCT_FIELDS: Final = ITEM_SOURCE_KEYS | _GA4_ITEM_FIELDS
_KNOWN_SINGLE_PRODUCT_FIELDS: Final = SINGLE_PRODUCT_KEYS | _GA4_ITEM_FIELDS

# What property and trait names become as GA4 param and user property names, and the drop
# reasons counted on the way, are pure functions of the name: cached, since every event of
# a site names its properties and traits alike (LRUs of 2,048 names; longer names than
# _MAX_CACHED_KEY are made each time, so that a cache holds at most 2,048 x 100 characters).
_MAX_CACHED_KEY: Final = 100


def _ga4_name(key: str, reserved_prefixes: tuple[str, ...]) -> tuple[str | None, str | None]:
    """``key`` as a GA4 name (snake_cased unless it already fits), or None and the reason
    when it is reserved or nothing of it is left."""
    if key.startswith(reserved_prefixes):
        return None, "reserved_param"
    name = key if _GA4_NAME.fullmatch(key) else snake_name(key)
    if not name:
        return None, "invalid_param_name"
    return name, None


def _param_name(key: str) -> tuple[str | None, tuple[str, ...]]:
    """What a property named ``key`` is called as a GA4 param (None: it is left out) and
    the drop reasons counted on the way (see ``RequestBuilder._param``)."""
    if len(key) > _MAX_CACHED_KEY:
        return _make_param_name(key)
    return _cached_param_name(key)


def _make_param_name(key: str) -> tuple[str | None, tuple[str, ...]]:
    name, reason = _ga4_name(key, RESERVED_PARAM_PREFIXES)
    if name is None:
        return None, (reason,) if reason else ()
    if name.lower() in _PII_PARAMS:
        return None, ("pii_removed",)
    if name.startswith(RESERVED_PARAM_PREFIXES):
        return None, ("reserved_param",)
    if len(name) > MAX_NAME:
        return name[:MAX_NAME].rstrip("_"), ("name_truncated",)
    return name, ()


_cached_param_name = lru_cache(maxsize=2048)(_make_param_name)


def _user_property_name(key: str) -> tuple[str | None, tuple[str, ...], bool]:
    """What a trait named ``key`` is called as a GA4 user property (None: it is left out),
    the drop reasons counted before its value is looked at, and whether the name was cut
    (counted only for a value that is kept; see ``RequestBuilder._user_properties``)."""
    if len(key) > _MAX_CACHED_KEY:
        return _make_user_property_name(key)
    return _cached_user_property_name(key)


def _make_user_property_name(key: str) -> tuple[str | None, tuple[str, ...], bool]:
    name, reason = _ga4_name(key, RESERVED_USER_PROPERTY_PREFIXES)
    if name is None:
        return None, (reason,) if reason else (), False
    lowered = name.lower()
    if lowered in _PII_TRAITS:
        return None, ("pii_removed",), False
    if lowered in RESERVED_USER_PROPERTIES or lowered.startswith(RESERVED_USER_PROPERTY_PREFIXES):
        return None, ("reserved_param",), False
    if len(name) > MAX_USER_PROPERTY_NAME:
        return name[:MAX_USER_PROPERTY_NAME].rstrip("_"), (), True
    return name, (), False


_cached_user_property_name = lru_cache(maxsize=2048)(_make_user_property_name)


class RequestBuilder:
    """Builds the requests for a batch: a pure function of the config, the events and the
    time (used only for the 72-hour limit). Tables are prepared once per forwarder."""

    def __init__(self, config: GA4Config) -> None:
        self.config = config
        names = {event_name_key(k): v for k, v in SEGMENT_EVENT_NAMES.items()}
        names.update({event_name_key(k): v for k, v in config.event_names.items()})
        self._event_names = names
        self._exact_names = dict(config.event_names)
        query = urlencode(
            {
                "measurement_id": config.measurement_id,
                "api_secret": config.api_secret.get_secret_value(),
            }
        )
        mp_url = config.mp_url
        if config.validate_only:
            parts = urlsplit(mp_url)
            path = parts.path if parts.path.startswith("/") else "/" + parts.path
            mp_url = urlunsplit(parts._replace(path="/debug" + path))
        self._mp_url = mp_url + ("&" if "?" in mp_url else "?") + query
        self._collect_url = config.collect_url + ("&" if "?" in config.collect_url else "?")

    def build(self, events: list[Event], now: datetime) -> Plan:
        plan = Plan()
        drops = plan.drops
        groups: dict[tuple[str, bytes], _Group] = {}
        oldest = now - MAX_EVENT_AGE
        for index, event in enumerate(events):
            context = _dict(event.get("context"))
            ga4 = context.get("ga4")
            if isinstance(ga4, dict) and ga4.get("gateway") is True:
                # Copied from a Google tag gateway route (web.gateway): the hit reached
                # Google there; sending it again would count it twice.
                drops["gateway_delivered"] += 1
                continue
            moment = _timestamp(event)
            if moment is not None and moment < oldest:
                drops["too_old"] += 1
                continue
            denied = _dict(context.get("consent")).get("analytics") == "denied"
            if denied and self.config.analytics_denied == "skip":
                drops["consent_denied"] += 1
                continue
            if isinstance(ga4, dict) and isinstance(ga4.get("request"), str):
                self._gtag(index, event, context, ga4, groups, drops)
            else:
                self._mp(index, event, context, moment, denied, groups, drops)
        for (kind, _), group in groups.items():
            if kind == "gtag":
                plan.requests.append(self._gtag_request(group))
            else:
                plan.requests.extend(self._mp_requests(group, drops))
        return plan

    # -- gtag ------------------------------------------------------------------------------

    def _gtag(
        self,
        index: int,
        event: Event,
        context: dict[str, Any],
        ga4: dict[str, Any],
        groups: dict[tuple[str, bytes], _Group],
        drops: Counter[str],
    ) -> None:
        mode = self.config.gtag_hits
        if mode == "skip":
            drops["gtag_hits_skipped"] += 1
            return
        if mode == "matching" and ga4.get("measurementId") != self.config.measurement_id:
            drops["other_measurement_id"] += 1
            return
        if self.config.validate_only:
            drops["validate_mode"] += 1
            return
        request: str = ga4["request"].lstrip("?")
        ip = context.get("ip")
        user_agent = context.get("userAgent")
        key = orjson.dumps(
            [request, ip, user_agent, context.get("userAgentData")], option=orjson.OPT_SORT_KEYS
        )
        group = groups.get(("gtag", key))
        if group is None:
            parts = [p for p in request.split("&") if p and p.split("=", 1)[0] != "_uip"]
            if isinstance(ip, str) and ip:
                parts.append("_uip=" + quote(ip, safe=""))
            headers: dict[str, str] = {}
            if isinstance(user_agent, str) and user_agent:
                headers["User-Agent"] = user_agent
            headers.update(client_hints(context.get("userAgentData")))
            group = groups[("gtag", key)] = _Group(
                envelope={"url": self._collect_url + "&".join(parts), "headers": headers}
            )
        group.indices.append(index)
        line = ga4.get("event")
        if isinstance(line, str) and line:
            group.payloads.append(line)

    def _gtag_request(self, group: _Group) -> PlannedRequest:
        headers = dict(group.envelope["headers"])
        body = "\n".join(group.payloads).encode()
        if body:
            headers["Content-Type"] = "text/plain;charset=UTF-8"
        request = HttpRequest("POST", group.envelope["url"], headers, body, url_encoded=True)
        return PlannedRequest(request, tuple(group.indices))

    # -- Measurement Protocol --------------------------------------------------------------

    def _mp(
        self,
        index: int,
        event: Event,
        context: dict[str, Any],
        moment: datetime | None,
        denied: bool,
        groups: dict[tuple[str, bytes], _Group],
        drops: Counter[str],
    ) -> None:
        etype = event.get("type")
        if etype not in ("page", "screen", "track"):
            drops["unsupported_type"] += 1
            return
        name = self._event_name(event, drops)
        if name is None:
            return
        ga_ids = _dict(_dict(context.get("clientIds")).get("ga4"))
        ga4_context = _dict(context.get("ga4"))
        envelope: dict[str, Any] = {}
        if denied:
            seed = event.get("messageId")
            client_id = derived_client_id("cookieless:" + str(seed))
            session_id = None
        else:
            client_id, session_id = self._client_and_session(event, ga_ids)
        envelope["client_id"] = client_id
        user_id = event.get("userId")
        if not denied and isinstance(user_id, str | int) and not isinstance(user_id, bool):
            if len(str(user_id)) <= MAX_USER_ID:
                envelope["user_id"] = str(user_id)
            else:
                drops["invalid_user_id"] += 1
        consent = self._consent(context, denied)
        if consent:
            envelope["consent"] = consent
        ip = context.get("ip")
        if isinstance(ip, str) and ip:
            envelope["ip_override"] = ip
        traits = {**_dict(context.get("traits")), **_dict(event.get("traits"))}
        if not denied:
            user_properties = self._user_properties(traits, drops)
            if user_properties:
                envelope["user_properties"] = user_properties
            if self.config.send_user_data and consent.get("ad_user_data") == "GRANTED":
                # From the event, else as a Measurement Protocol sender gave it (hashed).
                user_data, user_data_drops = build_user_data(
                    extract_user_data(event), self.config.default_phone_country
                )
                drops.update(user_data_drops)
                user_data = user_data or _dict(ga4_context.get("userData"))
                if user_data:
                    envelope["user_data"] = user_data

        if session_id is None:
            day = (moment or datetime.now(UTC)).replace(hour=0, minute=0, second=0, microsecond=0)
            session_id = str(int(day.timestamp()))
        params = self._params(event, context, name, session_id, drops)
        ga_event: dict[str, Any] = {"name": name, "params": params}
        micros = _micros(moment) if moment is not None else None
        if micros is not None:
            ga_event["timestamp_micros"] = micros

        key = orjson.dumps(envelope, option=orjson.OPT_SORT_KEYS)
        group = groups.get(("mp", key))
        if group is None:
            group = groups[("mp", key)] = _Group(envelope=envelope)
        group.indices.append(index)
        group.payloads.append((ga_event, micros))

    def _client_and_session(self, event: Event, ga_ids: dict[str, Any]) -> tuple[str, str | None]:
        cookie_client = ga_ids.get("clientId")
        session = _dict(ga_ids.get("sessionIds")).get(self.config.measurement_id)
        valid_session = isinstance(session, str | int) and not isinstance(session, bool)
        session_id = str(session) if valid_session and str(session) else None
        # The _ga cookie's id (already checked by the identity step), or the client_id a
        # Measurement Protocol sender gave: GA takes any string there.
        if isinstance(cookie_client, str) and 0 < len(cookie_client) <= MAX_CLIENT_ID:
            return cookie_client, session_id
        for key in ("anonymousId", "userId", "messageId"):
            seed = event.get(key)
            if isinstance(seed, str | int) and not isinstance(seed, bool) and str(seed):
                # A session of the cookie's does not belong to a client id of our making.
                return derived_client_id(str(seed)), None
        return derived_client_id(""), None

    @staticmethod
    def _consent(context: dict[str, Any], denied: bool) -> dict[str, str]:
        if denied:
            return {"ad_user_data": "DENIED", "ad_personalization": "DENIED"}
        stated = _dict(context.get("consent"))
        consent: dict[str, str] = {}
        for category in ("ad_user_data", "ad_personalization"):
            state = stated.get(category)
            if state in ("granted", "denied"):
                consent[category] = state.upper()
        return consent

    def _event_name(self, event: Event, drops: Counter[str]) -> str | None:
        if event.get("type") != "track":
            return "page_view"
        raw = event.get("event")
        raw = raw if isinstance(raw, str) else ""
        mapped = self._exact_names.get(raw) or self._event_names.get(event_name_key(raw))
        if mapped is not None:
            return mapped  # validated by the config, or one of ours
        name = snake_name(raw)
        if not name:
            drops["invalid_name"] += 1
            return None
        if len(name) > MAX_NAME:
            drops["name_truncated"] += 1
            name = name[:MAX_NAME].rstrip("_")
        if _reserved_event_name(name):
            drops["reserved_name"] += 1
            return None
        return name

    def _params(
        self,
        event: Event,
        context: dict[str, Any],
        name: str,
        session_id: str,
        drops: Counter[str],
    ) -> dict[str, Any]:
        properties = dict(_dict(event.get("properties")))
        engagement = number(properties.pop("engagement_time_msec", None))
        params: dict[str, Any] = {
            "session_id": session_id,
            "engagement_time_msec": engagement if engagement is not None else 1,
        }
        page = _dict(context.get("page"))
        is_page = event.get("type") in ("page", "screen")
        own = (
            {k: properties.pop(k) for k in _PAGE_PROPERTY_KEYS & properties.keys()}
            if is_page
            else {}
        )
        title = own.get("title") or page.get("title") or (own.get("name") if is_page else None)
        if is_page and not title:
            title = event.get("name")
        for param, value in (
            ("page_location", own.get("url") or page.get("url")),
            ("page_referrer", own.get("referrer") or page.get("referrer")),
            ("page_title", title),
        ):
            if isinstance(value, str) and value:
                params[param] = self._text(value, PAGE_LIMITS[param], drops)
        locale = context.get("locale")
        if isinstance(locale, str) and locale:
            params["language"] = self._text(locale.lower(), MAX_VALUE, drops)
        screen = _dict(context.get("screen"))
        width, height = number(screen.get("width")), number(screen.get("height"))
        if width is not None and height is not None:
            params["screen_resolution"] = f"{int(width)}x{int(height)}"
        if name != "page_view":
            self._ecommerce(name, properties, params, drops)
        for key, value in properties.items():
            self._param(params, key, value, drops)
        if len(params) > MAX_PARAMS:
            drops["too_many_params"] += len(params) - MAX_PARAMS
            params = dict(list(params.items())[:MAX_PARAMS])
        return params

    def _ecommerce(
        self, name: str, properties: dict[str, Any], params: dict[str, Any], drops: Counter[str]
    ) -> None:
        """Segment's e-commerce fields renamed to GA4's, taken out of ``properties``."""
        # value wins, then total (what the customer paid), then revenue; all three are used up.
        amounts = [properties.pop(k) for k in AMOUNT_KEYS if k in properties]
        if amounts:
            self._numeric(params, "value", amounts[0], drops)
        currency = currency_code(properties.pop("currency", None))
        if currency is not None:
            params["currency"] = currency[:MAX_VALUE]
        if "order_id" in properties:
            self._param(params, "transaction_id", properties.pop("order_id"), drops)
        renames: tuple[tuple[str, str], ...] = ()
        if name == "search":
            renames = (("query", "search_term"),)
        elif name == "view_item_list":
            renames = (("list_id", "item_list_id"), ("category", "item_list_name"))
        elif name in ("view_promotion", "select_promotion"):
            renames = (
                ("promotion_id", "promotion_id"),
                ("name", "promotion_name"),
                ("creative", "creative_name"),
                ("position", "creative_slot"),
            )
        elif name == "share":
            renames = (("share_via", "method"), ("product_id", "item_id"))
        elif name == "select_item":
            renames = (("list_id", "item_list_id"),)
        for source, target in renames:
            if source in properties:
                self._param(params, target, properties.pop(source), drops)
        for key in ("tax", "shipping"):
            if key in properties:
                self._numeric(params, key, properties.pop(key), drops)
        products = properties.pop("products", None)
        native = properties.pop("items", None)  # GA4's own shape (events from gtag.js or MP)
        if products is None and isinstance(native, list):
            products = native
        elif native is not None:
            drops["nested_value"] += 1
        if isinstance(products, list):
            items = [
                self._item(p, _KNOWN_PRODUCT_FIELDS, drops) for p in products if isinstance(p, dict)
            ]
            if len(items) > MAX_ITEMS:
                drops["too_many_items"] += len(items) - MAX_ITEMS
                items = items[:MAX_ITEMS]
            params["items"] = items
        elif products is not None:
            drops["nested_value"] += 1
        elif name in SINGLE_PRODUCT_EVENTS:
            product = {k: properties.pop(k) for k in SINGLE_PRODUCT_KEYS & properties.keys()}
            if product:
                item = self._item(product, _KNOWN_SINGLE_PRODUCT_FIELDS, drops)
                params["items"] = [item]
                price, quantity = item.get("price"), item.get("quantity", 1)
                if "value" not in params and isinstance(price, int | float):
                    params["value"] = price * quantity

    def _item(
        self, product: dict[str, Any], known: frozenset[str], drops: Counter[str]
    ) -> dict[str, Any]:
        """``product`` as a GA4 item; ``known``: its fields that have a place in one."""
        item: dict[str, Any] = {}
        for key, value in product.items():
            if key in _GA4_ITEM_FIELDS:  # already GA4's names (gtag.js, MP senders): kept
                self._param(item, key, value, drops)
        for field_name, value in item_fields(product).items():
            self._param(item, GA4_ITEM_NAMES[field_name], value, drops)
        unmapped = 0
        for key, value in product.items():
            if value is not None and key not in known:
                unmapped += 1
        if unmapped:
            drops["unmapped_item_field"] += unmapped
        return item

    def _numeric(self, params: dict[str, Any], name: str, value: Any, drops: Counter[str]) -> None:
        parsed = number(value)
        if parsed is None:
            drops["invalid_value"] += 1
        else:
            params[name] = parsed

    def _param(self, params: dict[str, Any], key: str, value: Any, drops: Counter[str]) -> None:
        """One property as a param: scalar values only, names fit for GA4, personal data out."""
        if value is None:
            return
        name, reasons = _param_name(key)
        for reason in reasons:
            drops[reason] += 1
        if name is None:
            return
        if isinstance(value, (dict, list)):
            drops["nested_value"] += 1
            return
        if name in _NUMERIC_PARAMS:
            self._numeric(params, name, value, drops)
            return
        value = self._scalar(value, PAGE_LIMITS.get(name, MAX_VALUE), drops)
        if value is not None:
            params[name] = value

    @classmethod
    def _scalar(cls, value: Any, limit: int, drops: Counter[str]) -> Any:
        """A scalar value as GA4 takes it: booleans as text, text cut to ``limit``; None for
        text that looks like an email address."""
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, str):
            if looks_like_email(value):
                drops["pii_removed"] += 1
                return None
            return cls._text(value, limit, drops)
        return value

    @staticmethod
    def _text(value: str, limit: int, drops: Counter[str]) -> str:
        if len(value) > limit:
            drops["value_truncated"] += 1
            return value[:limit]
        return value

    def _user_properties(
        self, traits: dict[str, Any], drops: Counter[str]
    ) -> dict[str, dict[str, Any]]:
        """``{name: {"value": v}}`` from traits, without personal data."""
        properties: dict[str, dict[str, Any]] = {}
        for key, value in traits.items():
            if value is None:
                continue
            name, reasons, truncated = _user_property_name(key)
            for reason in reasons:
                drops[reason] += 1
            if name is None:
                continue
            if isinstance(value, (dict, list)):
                drops["nested_value"] += 1
                continue
            if truncated:
                drops["name_truncated"] += 1
            value = self._scalar(value, MAX_USER_PROPERTY_VALUE, drops)
            if value is None:
                continue
            if len(properties) >= MAX_USER_PROPERTIES and name not in properties:
                drops["too_many_user_properties"] += 1
                continue
            properties[name] = {"value": value}
        return properties

    def _mp_requests(self, group: _Group, drops: Counter[str]) -> Iterable[PlannedRequest]:
        pairs = list(zip(group.indices, group.payloads, strict=True))
        for start in range(0, len(pairs), MAX_EVENTS_PER_REQUEST):
            yield from self._mp_chunk(
                group.envelope, pairs[start : start + MAX_EVENTS_PER_REQUEST], drops
            )

    def _mp_chunk(
        self,
        envelope: dict[str, Any],
        pairs: list[tuple[int, tuple[dict[str, Any], int | None]]],
        drops: Counter[str],
    ) -> Iterable[PlannedRequest]:
        body: dict[str, Any] = {"client_id": envelope["client_id"]}
        if "user_id" in envelope:
            body["user_id"] = envelope["user_id"]
        for _, (_, micros) in pairs:
            if micros is not None:
                body["timestamp_micros"] = micros
                break
        for key in ("consent", "ip_override", "user_properties", "user_data"):
            if key in envelope:
                body[key] = envelope[key]
        body["events"] = [ga_event for _, (ga_event, _) in pairs]
        encoded = orjson.dumps(body)
        if len(encoded) > MAX_BODY_BYTES:
            if len(pairs) == 1:
                drops["too_large"] += 1
                return
            half = len(pairs) // 2
            yield from self._mp_chunk(envelope, pairs[:half], drops)
            yield from self._mp_chunk(envelope, pairs[half:], drops)
            return
        headers = {"Content-Type": "application/json", "User-Agent": "tagrelay"}
        request = HttpRequest("POST", self._mp_url, headers, encoded)
        indices = tuple([i for i, _ in pairs])
        yield GA4Request(request, indices, validation=self.config.validate_only)


def build_plan(config: GA4Config, events: list[Event], now: datetime) -> Plan:
    """The requests for one batch and what was cut or left out (pure)."""
    return RequestBuilder(config).build(events, now)


# -- delivery ------------------------------------------------------------------------------


def _validation_outcome(response: HttpResponse) -> Outcome:
    """``/debug/mp/collect`` answers 200 with ``{"validationMessages": [...]}``; an empty
    list means the payload is valid."""
    outcome = classify_status(response)
    if not isinstance(outcome, Delivered):
        return outcome
    try:
        messages = orjson.loads(response.body)["validationMessages"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return Dead(reason="invalid_response", detail=f"HTTP {response.status}: {response.text}")
    if not messages:
        return Delivered()
    detail = orjson.dumps(messages).decode()[:MAX_DETAIL_CHARS]
    return Dead(reason="validation_failed", detail=detail)


class GA4Forwarder(BatchedHttpForwarder[GA4Config]):
    # One request per visitor: its time goes to HTTP requests, which get an event loop (a
    # delivery process) of their own rather than wait behind the ad platforms' planning.
    delivery_group = "ga4"
    config_model = GA4Config
    max_event_age_secs = MAX_EVENT_AGE.total_seconds()
    """GA refuses events older than 72 hours (gtag hits are stamped when they arrive, so
    a backlog shifts them in time: the same limit applies)."""
    event_drop_reasons = EVENT_DROP_REASONS
    field_drop_reasons = FIELD_DROP_REASONS

    @classmethod
    def personal_data(cls, config: GA4Config) -> dict[str, str]:
        """The visitor's ids, IP (``ip_override``), user agent and page URLs in clear; with
        ``send_user_data``, ``user_data`` by Google's row of ``_user_data.RULES``."""
        cookieless = " (analytics granted)" if config.analytics_denied == "cookieless" else ""
        fields = {
            "client_id": "plain" + cookieless,
            "user_id": "plain" + cookieless,
            "ip": "plain",
            "user_agent": "plain",
            "page_location": "plain",
        }
        if config.send_user_data:
            rules = RULES["google"]
            for name in ("email", "phone", *(field for field, _ in _ADDRESS_FIELDS)):
                how = "hashed" if rules[name].hashed else "plain"
                fields[name] = how + " (ad_user_data granted)"
        return fields

    def __init__(self, config: GA4Config, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self.builder = RequestBuilder(config)

    def plan(self, events: list[Event], now: datetime) -> Plan:
        return self.builder.build(events, now)

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome:
        if isinstance(planned, GA4Request) and planned.validation:
            return _validation_outcome(response)
        return classify_status(response)

    def secrets(self) -> Iterable[str]:
        return (self.config.api_secret.get_secret_value(),)
