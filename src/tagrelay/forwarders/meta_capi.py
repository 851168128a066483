"""``meta``: Meta's Conversions API, on the shared conversions layer (``_conversions``).

``POST {base_url}/{api_version}/{pixel_id}/events?access_token=...`` with a JSON body
``{"data": [...], "test_event_code": ...}`` of at most 1,000 server events
(destinations.md §2). Which events go, under which name, with which user data and when they
are too old is the layer's; this module lays out Meta's event and reads Meta's errors.

Each event::

    event_name        the standard event (PageView, Purchase, ...) or the event's own name
    event_time        Unix seconds (the layer never sends one older than 7 days: Meta
                      refuses the whole request for one such event)
    event_id          the event's messageId: the pixel's eventID for the same action, so
                      that Meta keeps one of the two (same event_name, within 48 h)
    action_source     action_source (default website) for events from a browser (a user
                      agent and a page URL: Meta requires both on website events), else
                      server_action_source (default system_generated)
    event_source_url  context.page.url;  referrer_url: context.page.referrer
    user_data         em, ph, fn, ln, ge, db, ct, st, zp, country, external_id: lists of
                      one SHA-256 hex each, normalized by Meta's rules (``_user_data``);
                      client_ip_address, client_user_agent, fbc, fbp as they are. fbc is
                      the _fbc cookie's (context.clientIds.fbc), else built from an fbclid
                      click id as fb.1.<event time in ms>.<fbclid> (Meta's ClickID format).
    custom_data       value, currency, content_ids, contents [{id, quantity, item_price}],
                      content_type "product", num_items, order_id; search_string for
                      searches (unless it looks like an email address). Nothing else of the
                      properties (they may hold personal data).
    data_processing_options, _country, _state   with limited_data_use: ["LDU"] and the
                      configured country and state (0, 0: Meta geolocates the event)

Meta's own drops (whole events, counted): ``purchase_without_value`` (Meta refuses a
Purchase without value and currency, and with it the whole request) and ``no_user_data``
(nothing to match the event on: Meta requires user data).

Errors (Graph API ``{"error": {"code", "error_subcode", "message", "is_transient", ...}}``,
classified by code as destinations.md §2 and §12 give them):

==================================================  ======================================
code                                                outcome
==================================================  ======================================
4, 17, 32, 613, 80003 (throttling)                  ``Retry(meta_throttled)``
1, 2, 341, 368, 5000, 21009 (transient)             ``Retry(meta_transient)``
190 (token invalid or expired)                      ``Dead(meta_invalid_token)``
10, 200-299 (permission)                            ``Dead(meta_permission)``
100 (invalid parameter, subcodes 2804xxx, 33)       ``Dead(meta_invalid_parameter)``
other, ``is_transient: true``                       ``Retry(meta_transient)``
other                                               the shared status table (5xx retry,
                                                    other 4xx ``Dead(meta_error)``)
==================================================  ======================================

A dead batch's detail is Meta's message (code, subcode, message, user message, trace id),
with the access token scrubbed (``secrets``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final, Literal
from urllib.parse import urlencode

import orjson
from pydantic import Field, SecretStr, field_validator

from tagrelay.forwarders._batched import PlannedRequest
from tagrelay.forwarders._conversions import (
    META_STYLE_KEYS,
    Conversion,
    ConversionsConfig,
    ConversionsForwarder,
    epoch_millis,
    epoch_seconds,
    meta_style_user_data,
)
from tagrelay.forwarders._http import (
    HttpRequest,
    HttpResponse,
    classify_status,
    parse_retry_after,
)
from tagrelay.forwarders._user_data import looks_like_email
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry

__all__ = ["MetaConfig", "MetaForwarder", "classify_meta_response"]

BASE_URL: Final = "https://graph.facebook.com"
API_VERSION: Final = "v25.0"
MAX_EVENTS_PER_REQUEST: Final = 1000
MAX_EVENT_AGE_SECS: Final = 7 * 86_400.0

ActionSource = Literal[
    "website",
    "app",
    "email",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "business_messaging",
    "other",
]

STANDARD_EVENTS: Final = frozenset(
    {
        "PageView",
        "ViewContent",
        "Search",
        "AddToCart",
        "AddToWishlist",
        "InitiateCheckout",
        "AddPaymentInfo",
        "Purchase",
        "Lead",
        "CompleteRegistration",
        "Contact",
        "CustomizeProduct",
        "Donate",
        "FindLocation",
        "Schedule",
        "StartTrial",
        "SubmitApplication",
        "Subscribe",
    }
)
"""Meta's standard events (destinations.md §2, M11)."""

THROTTLE_CODES: Final = frozenset({4, 17, 32, 613, 80003})
TRANSIENT_CODES: Final = frozenset({1, 2, 341, 368, 5000, 21009})
TOKEN_CODES: Final = frozenset({190})
INVALID_PARAMETER_CODES: Final = frozenset({100})

_HASHED_FIELDS: Final = frozenset(name for name, _ in META_STYLE_KEYS)


class MetaConfig(ConversionsConfig):
    """Meta Conversions API: conversions and page views reported from the server to a Meta
    pixel (dataset), deduplicated against the browser pixel by event id."""

    type: Literal["meta"] = Field(description="Forwarder type.", examples=["meta"])
    pixel_id: str = Field(
        pattern=r"^[0-9]{5,20}$",
        description="The pixel's (dataset's) id, from Events Manager > Data sources.",
        examples=["123456789012345"],
    )
    access_token: SecretStr = Field(
        min_length=1,
        description=(
            "Conversions API access token (Events Manager > the dataset > Settings > "
            "Conversions API > Generate access token). Never logged."
        ),
        examples=["${META_CAPI_TOKEN}"],
    )
    base_url: str = Field(
        BASE_URL,
        description="The Graph API's scheme and host (no trailing slash).",
        examples=[BASE_URL],
    )
    api_version: str = Field(
        API_VERSION,
        pattern=r"^v[0-9]+\.[0-9]+$",
        description="Graph API version in the path (Meta supports each for two years).",
        examples=[API_VERSION],
    )
    test_event_code: str | None = Field(
        None,
        min_length=1,
        description=(
            "Sends every event as a test event, shown in Events Manager > Test events and "
            "not used for ads (the code shown there, TEST12345). Remove in production."
        ),
        examples=["TEST12345"],
    )
    action_source: ActionSource = Field(
        "website",
        description=(
            "action_source of events from a browser (they carry a user agent and a page URL)."
        ),
        examples=["website"],
    )
    server_action_source: ActionSource = Field(
        "system_generated",
        description=(
            "action_source of the other events (sent by a backend without the visitor's "
            "user agent or page): Meta refuses website events without them."
        ),
        examples=["system_generated"],
    )
    limited_data_use: bool = Field(
        False,
        description=(
            'Flag every event for Limited Data Use (data_processing_options ["LDU"]), for '
            "US state privacy laws."
        ),
        examples=[True],
    )
    limited_data_use_country: int = Field(
        0,
        ge=0,
        description=(
            "data_processing_options_country with limited_data_use: 1 for the United States, "
            "0 to let Meta geolocate each event."
        ),
        examples=[0],
    )
    limited_data_use_state: int = Field(
        0,
        ge=0,
        description=(
            "data_processing_options_state with limited_data_use: Meta's state code (1000 "
            "for California), 0 to let Meta geolocate each event."
        ),
        examples=[0],
    )

    @field_validator("pixel_id")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()


def _graph_error(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def classify_meta_response(response: HttpResponse) -> Outcome:
    """The outcome of one Conversions API response (see the module docstring's table)."""
    status = response.status
    if 200 <= status < 300:
        return Delivered()
    error = _graph_error(response.body)
    if error is None:
        return classify_status(response)
    code, subcode = _int(error.get("code")), _int(error.get("error_subcode"))
    parts = [f"HTTP {status}: Meta error {code}" + (f"/{subcode}" if subcode else "")]
    for key in ("message", "error_user_title", "error_user_msg"):
        text = error.get(key)
        if isinstance(text, str) and text:
            parts.append(text)
    trace = error.get("fbtrace_id")
    if isinstance(trace, str) and trace:
        parts.append(f"fbtrace_id {trace}")
    detail = "; ".join(parts)
    after = parse_retry_after(response.headers.get("Retry-After"))
    if code in THROTTLE_CODES:
        return Retry("meta_throttled", detail, after)
    if code in TRANSIENT_CODES:
        return Retry("meta_transient", detail, after)
    if code in TOKEN_CODES:
        return Dead("meta_invalid_token", detail)
    if code is not None and (code == 10 or 200 <= code < 300):
        return Dead("meta_permission", detail)
    if code in INVALID_PARAMETER_CODES:
        return Dead("meta_invalid_parameter", detail)
    if error.get("is_transient") is True:
        return Retry("meta_transient", detail, after)
    shared = classify_status(response)
    if isinstance(shared, Retry):
        return Retry(shared.reason, detail, shared.after_secs)
    return Dead("meta_error", detail)


class MetaForwarder(ConversionsForwarder[MetaConfig]):
    config_model = MetaConfig
    platform = "meta"
    standard_events = "meta"
    extra_standard_events = STANDARD_EVENTS
    max_events_per_request = MAX_EVENTS_PER_REQUEST
    max_event_age_secs = MAX_EVENT_AGE_SECS
    """Meta takes events up to 7 days old (and refuses a whole request for an older one)."""
    platform_event_drop_reasons = frozenset({"purchase_without_value", "no_user_data"})

    def convert(
        self, index: int, event: Event, now: datetime, drops: Counter[str]
    ) -> Conversion | None:
        conversion = super().convert(index, event, now, drops)
        if conversion is None:
            return None
        facts = conversion.commerce
        if conversion.name == "Purchase" and (facts.value is None or facts.currency is None):
            drops["purchase_without_value"] += 1
            return None
        if not self._has_user_data(conversion):
            drops["no_user_data"] += 1
            return None
        return conversion

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        config = self.config
        body: dict[str, Any] = {"data": [self._event(c) for c in conversions]}
        if config.test_event_code:
            body["test_event_code"] = config.test_event_code
        url = f"{config.base_url}/{config.api_version}/{config.pixel_id}/events"
        token = config.access_token.get_secret_value()
        return HttpRequest(
            "POST",
            url + "?" + urlencode({"access_token": token}),
            {"Content-Type": "application/json"},
            orjson.dumps(body),
        )

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome:
        return classify_meta_response(response)

    def secrets(self) -> Iterable[str]:
        return (self.config.access_token.get_secret_value(),)

    # -- one event -----------------------------------------------------------------------

    def _event(self, c: Conversion) -> dict[str, Any]:
        config = self.config
        event: dict[str, Any] = {
            "event_name": c.name,
            "event_time": epoch_seconds(c.time),
            "event_id": c.event_id,
            "action_source": config.action_source if c.browser else config.server_action_source,
        }
        if c.page_url:
            event["event_source_url"] = c.page_url
        if c.referrer:
            event["referrer_url"] = c.referrer
        event["user_data"] = self._user_data(c)
        custom = self._custom_data(c)
        if custom:
            event["custom_data"] = custom
        if config.limited_data_use:
            event["data_processing_options"] = ["LDU"]
            event["data_processing_options_country"] = config.limited_data_use_country
            event["data_processing_options_state"] = config.limited_data_use_state
        return event

    @staticmethod
    def _has_user_data(c: Conversion) -> bool:
        """``_user_data(c)`` would not be empty (without building it)."""
        data = c.user
        return bool(
            not _HASHED_FIELDS.isdisjoint(c.prepared.values)
            or data.ip
            or data.user_agent
            or data.fbc
            or data.click_ids.get("fbclid")
            or data.fbp
        )

    @staticmethod
    def _user_data(c: Conversion) -> dict[str, Any]:
        user = meta_style_user_data(c)
        data = c.user
        fbclid = data.click_ids.get("fbclid")
        if data.fbc:
            user["fbc"] = data.fbc
        elif fbclid:
            user["fbc"] = f"fb.1.{epoch_millis(c.time)}.{fbclid}"
        if data.fbp:
            user["fbp"] = data.fbp
        return user

    @staticmethod
    def _custom_data(c: Conversion) -> dict[str, Any]:
        facts = c.commerce
        custom: dict[str, Any] = {}
        if facts.value is not None:
            custom["value"] = facts.value
        if facts.currency is not None:
            custom["currency"] = facts.currency
        ids = [item.id for item in facts.items if item.id is not None]
        if ids:
            custom["content_ids"] = ids
            contents = []
            for item in facts.items:
                if item.id is None:
                    continue
                content: dict[str, Any] = {"id": item.id}
                if item.quantity is not None:
                    content["quantity"] = item.quantity
                if item.price is not None:
                    content["item_price"] = item.price
                contents.append(content)
            custom["contents"] = contents
            custom["content_type"] = "product"
        if facts.num_items is not None:
            custom["num_items"] = facts.num_items
        if facts.order_id is not None:
            custom["order_id"] = facts.order_id
        if c.canonical in ("search", "view_search_results"):
            query = c.properties.get("query") or c.properties.get("search_term")
            if isinstance(query, str) and query.strip() and not looks_like_email(query):
                custom["search_string"] = query.strip()
        return custom
