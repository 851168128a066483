"""``snapchat``: Snap's Conversions API v3, on the shared conversions layer (``_conversions``).

``POST {base_url}/{api_version}/{pixel_id}/events?access_token=...`` with a JSON body
``{"data": [...]}`` of at most 2,000 events (destinations.md §6); with ``validate_only`` the
same request goes to ``.../events/validate``, Snap's test endpoint, which checks each event
and records no conversion. Which events go, under which name, with which user data and when
they are too old is the layer's; this module lays out Snap's event and reads Snap's answers.

Each event::

    event_name        Snap's standard event (PURCHASE, ADD_CART, PAGE_VIEW, SIGN_UP, ...;
                      destinations.md §11), or the one the events option names (such as
                      CUSTOM_EVENT_1..5). Snap takes no other names, so a track event with
                      none is not sent (unmapped_event)
    event_time        Unix seconds (the layer drops events older than 37 days: Snap reports
                      none older, S1)
    event_id          the event's messageId: the Snap Pixel's client_dedup_id for the same
                      action (transaction_id for a purchase), so that Snap counts it once
    action_source     WEB
    event_source_url  context.page.url
    user_data         em, ph, fn, ln, ge, db, ct, st, zp, country, external_id: lists of one
                      SHA-256 hex each, normalized by Snap's row of ``_user_data.RULES``
                      (ph: digits with the country code, no "+"); client_ip_address,
                      client_user_agent, sc_click_id (the ScCid click id the relay kept from
                      the landing URL) and sc_cookie1 (the Snap Pixel's _scid cookie) as
                      they are
    custom_data       value, currency, content_ids, contents [{id, quantity, item_price,
                      brand}] (quantity and price as text, as Snap's v3 spec types them),
                      num_items, order_id; search_string for searches (unless it looks like
                      an email address). Nothing else of the properties (they may hold
                      personal data).

Snap's own drop (whole events, counted): ``no_user_data``: an event without a hashed email,
a hashed phone or the IP address with the user agent, at least one of which Snap requires
to match it (S2 "Required Parameters"); without ``ad_user_data`` consent an event has none.

Answers (Snap's v3 spec, from its Business SDK: ``{"status": "VALID" | "INVALID", "reason",
"errors": {"codes", "error_msgs"}}``, and from the validate endpoint ``event_logs``, one per
event; Snap documents no error codes, destinations.md §6 and §12):

========================================  ===============================================
answer                                    outcome
========================================  ===============================================
HTTP 408, 429, 5xx (any body)             the shared table: ``Retry`` (``Retry-After``
                                          honoured), Snap's reason in the detail
``event_logs`` on a 2xx or a 400          ``Delivered``: the events logged INVALID are
(validate_only)                           rejected one by one with Snap's messages
2xx, ``status`` not INVALID               ``Delivered``
2xx or 4xx, ``status`` INVALID            ``Dead(snapchat_invalid)``: Snap refused the
                                          request; the other events of the request
                                          cannot be told apart from the one it names
HTTP 401                                  ``Dead(snapchat_invalid_token)``
HTTP 403                                  ``Dead(snapchat_permission)``
other 4xx                                 ``Dead(snapchat_invalid)`` with Snap's words, or
                                          the shared table without a JSON answer
========================================  ===============================================

A dead batch's detail is ``HTTP <status>: Snap <status>: <reason>; <codes>: <messages>``
with the access token scrubbed (``secrets``): the token travels in the URL, which an error
could echo.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final, Literal
from urllib.parse import urlencode

import orjson
from pydantic import Field, SecretStr, field_validator

from tagrelay.forwarders._batched import PlannedRequest
from tagrelay.forwarders._conversions import (
    Conversion,
    ConversionsConfig,
    ConversionsForwarder,
    epoch_seconds,
    meta_style_user_data,
)
from tagrelay.forwarders._ecommerce import decimal_text
from tagrelay.forwarders._http import HttpRequest, HttpResponse, classify_status
from tagrelay.forwarders._user_data import looks_like_email
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry

__all__ = ["SnapConfig", "SnapForwarder", "classify_snap_response"]

BASE_URL: Final = "https://tr.snapchat.com"
API_VERSION: Final = "v3"
MAX_EVENTS_PER_REQUEST: Final = 2000
"""Snap's spec as RudderStack's transformer and the published JSON schema give it (S6)."""
MAX_EVENT_AGE_SECS: Final = 37 * 86_400.0
"""Snap reports events dated at most 37 days back (S1). (RudderStack enforces 7 days for v3;
Snap's own pages say 37.)"""

ACTION_SOURCE: Final = "WEB"

STANDARD_EVENTS: Final = frozenset(
    {
        # Snap's v3 event names (destinations.md §6, S6/S7).
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
        "CUSTOM_EVENT_1",
        "CUSTOM_EVENT_2",
        "CUSTOM_EVENT_3",
        "CUSTOM_EVENT_4",
        "CUSTOM_EVENT_5",
    }
)
"""Snap's event names: a track event so named (or mapped to one) is sent as it is."""

INVALID_STATUSES: Final = frozenset({"INVALID", "FAILURE"})

_SEARCHES: Final = frozenset({"search", "view_search_results"})


class SnapConfig(ConversionsConfig):
    """Snap Conversions API (v3): conversions and page views reported from the server to a
    Snap Pixel, deduplicated against the browser pixel by event id."""

    type: Literal["snapchat"] = Field(description="Forwarder type.", examples=["snapchat"])
    pixel_id: str = Field(
        pattern=r"^[0-9A-Za-z][0-9A-Za-z-]{7,63}$",
        description="The Snap Pixel's id (Ads Manager > Events Manager > the pixel).",
        examples=["5d8e3f1a-2b4c-4d6e-8f90-1a2b3c4d5e6f"],
    )
    access_token: SecretStr = Field(
        min_length=1,
        description=(
            "Conversions API token (Ads Manager > Business Details > Conversions API Tokens "
            "> Generate Token), sent as the access_token query parameter. Never logged."
        ),
        examples=["${SNAP_CAPI_TOKEN}"],
    )
    base_url: str = Field(
        BASE_URL,
        description="The Conversions API's scheme and host (no trailing slash).",
        examples=[BASE_URL],
    )
    api_version: str = Field(
        API_VERSION,
        pattern=r"^v[0-9]+$",
        description="Conversions API version in the path (/<version>/<pixel_id>/events).",
        examples=[API_VERSION],
    )
    validate_only: bool = Field(
        False,
        description=(
            "Send to Snap's validate endpoint (/events/validate): Snap checks every event "
            "and records no conversion (test events show in Events Manager); events it "
            "finds invalid become dead letters with its messages. Remove in production."
        ),
        examples=[True],
    )
    unmapped: Literal["skip"] = Field(
        "skip",
        description=(
            "Always skip for snapchat: Snap takes only its own event names, so a track "
            "event with no standard event and not in events is not sent (counted as "
            "unmapped_event); map others to CUSTOM_EVENT_1..5 with events."
        ),
        examples=["skip"],
    )

    @field_validator("pixel_id", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value


def _answer(body: bytes) -> dict[str, Any] | None:
    """Snap's JSON answer, when it is an object."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str) and item]
    return []


def _errors(answer: dict[str, Any]) -> str:
    """``codes: messages`` of an answer's (or an event log's) ``errors``."""
    errors = answer.get("errors")
    if not isinstance(errors, dict):
        return "; ".join(_texts(errors))
    codes, messages = _texts(errors.get("codes")), _texts(errors.get("error_msgs"))
    said = "; ".join(messages)
    if codes:
        said = ", ".join(codes) + (f": {said}" if said else "")
    return said


def _detail(status: int, answer: dict[str, Any]) -> str:
    parts = [f"HTTP {status}: Snap"]
    snap_status = answer.get("status")
    if isinstance(snap_status, str) and snap_status:
        parts[0] += f" {snap_status}"
    reason = answer.get("reason")
    if isinstance(reason, str) and reason:
        parts[0] += f": {reason}"
    errors = _errors(answer)
    if errors:
        parts.append(errors)
    event = answer.get("event")
    if isinstance(event, int) and not isinstance(event, bool):
        parts.append(f"event {event}")
    return "; ".join(parts)


def _per_event(logs: list[Any], events: int) -> dict[int, str] | None:
    """Position -> Snap's words for each event the validate endpoint logged INVALID; None
    when the logs do not line up with the request's events."""
    if len(logs) != events:
        return None
    rejected: dict[int, str] = {}
    for position, log in enumerate(logs):
        if not isinstance(log, dict):
            return None
        status = log.get("status")
        if isinstance(status, str) and status.upper() in INVALID_STATUSES:
            said = _errors(log) or "; ".join(_texts(log.get("warnings")))
            rejected[position] = "snapchat_invalid: " + (said or status)
    return rejected


def classify_snap_response(response: HttpResponse, events: int) -> Outcome:
    """The outcome of one answer to a request of ``events`` events (see the module
    docstring's table)."""
    status = response.status
    answer = _answer(response.body)
    shared = classify_status(response)
    if isinstance(shared, Retry):
        detail = _detail(status, answer) if answer is not None else shared.detail
        return Retry(shared.reason, detail, shared.after_secs)
    if answer is None:
        return shared
    logs = answer.get("event_logs")
    if isinstance(logs, list) and (200 <= status < 300 or status == 400):
        rejected = _per_event(logs, events)
        if rejected is not None:
            return Delivered(rejected=rejected)
    snap_status = answer.get("status")
    invalid = isinstance(snap_status, str) and snap_status.upper() in INVALID_STATUSES
    detail = _detail(status, answer)
    if 200 <= status < 300:
        return Dead("snapchat_invalid", detail) if invalid else Delivered()
    if status == 401:
        return Dead("snapchat_invalid_token", detail)
    if status == 403:
        return Dead("snapchat_permission", detail)
    return Dead("snapchat_invalid", detail)


class SnapForwarder(ConversionsForwarder[SnapConfig]):
    config_model = SnapConfig
    platform = "snapchat"
    standard_events = "snap"
    extra_standard_events = STANDARD_EVENTS
    max_events_per_request = MAX_EVENTS_PER_REQUEST
    max_event_age_secs = MAX_EVENT_AGE_SECS
    platform_event_drop_reasons = frozenset({"no_user_data"})

    def convert(
        self, index: int, event: Event, now: datetime, drops: Counter[str]
    ) -> Conversion | None:
        conversion = super().convert(index, event, now, drops)
        if conversion is None:
            return None
        values, user = conversion.prepared.values, conversion.user
        if not ("email" in values or "phone" in values or (user.ip and user.user_agent)):
            drops["no_user_data"] += 1
            return None
        return conversion

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        config = self.config
        path = f"/{config.api_version}/{config.pixel_id}/events"
        if config.validate_only:
            path += "/validate"
        token = config.access_token.get_secret_value()
        return HttpRequest(
            "POST",
            config.base_url + path + "?" + urlencode({"access_token": token}),
            {"Content-Type": "application/json"},
            orjson.dumps({"data": [self._event(c) for c in conversions]}),
        )

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome:
        return classify_snap_response(response, len(planned.indices))

    def secrets(self) -> Iterable[str]:
        return (self.config.access_token.get_secret_value(),)

    # -- one event -----------------------------------------------------------------------

    def _event(self, c: Conversion) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event_name": c.name,
            "event_time": epoch_seconds(c.time),
            "event_id": c.event_id,
            "action_source": ACTION_SOURCE,
        }
        if c.page_url:
            event["event_source_url"] = c.page_url
        event["user_data"] = self._user_data(c)
        custom = self._custom_data(c)
        if custom:
            event["custom_data"] = custom
        return event

    @staticmethod
    def _user_data(c: Conversion) -> dict[str, Any]:
        user = meta_style_user_data(c)
        data = c.user
        click_id = data.click_ids.get("ScCid")
        if click_id:
            user["sc_click_id"] = click_id
        cookie = data.browser_ids.get("_scid")
        if cookie:
            user["sc_cookie1"] = cookie
        return user

    @staticmethod
    def _custom_data(c: Conversion) -> dict[str, Any]:
        facts = c.commerce
        custom: dict[str, Any] = {}
        if facts.value is not None and math.isfinite(facts.value):
            custom["value"] = facts.value
        if facts.currency is not None:
            custom["currency"] = facts.currency
        contents = []
        for item in facts.items:
            if item.id is None:
                continue  # contents are matched to the catalog by id
            content: dict[str, Any] = {"id": item.id}
            if item.quantity is not None:
                content["quantity"] = str(item.quantity)
            if item.price is not None and (price := decimal_text(item.price)) is not None:
                content["item_price"] = price
            if item.brand is not None:
                content["brand"] = item.brand
            contents.append(content)
        if contents:
            custom["content_ids"] = [content["id"] for content in contents]
            custom["contents"] = contents
        if facts.num_items is not None:
            custom["num_items"] = facts.num_items
        if facts.order_id is not None:
            custom["order_id"] = facts.order_id
        if c.canonical in _SEARCHES:
            query = c.properties.get("query") or c.properties.get("search_term")
            if isinstance(query, str) and query.strip() and not looks_like_email(query):
                custom["search_string"] = query.strip()
        return custom
