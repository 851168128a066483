"""``pinterest``: Pinterest's Conversions API (v5), on the shared conversions layer
(``_conversions``).

``POST {base_url}/{api_version}/ad_accounts/{ad_account_id}/events`` with
``Authorization: Bearer <conversion token>`` and a JSON body ``{"data": [...]}`` of at most
1,000 events (destinations.md §7); with ``test_mode``, ``?test=true``: Pinterest answers as
it would and records nothing. Which events go, under which name, with which user data and
when they are too old is the layer's; this module lays out Pinterest's event and reads
Pinterest's answers.

Each event::

    event_name        Pinterest's standard event (checkout, add_to_cart, page_visit, lead,
                      signup, search, view_category, initiate_checkout, ...; destinations.md
                      §11), or the event's own name: an advertiser-defined event, which
                      Pinterest tracks once it is mapped to a standard event in Ads Manager
    action_source     web
    event_time        Unix seconds (the layer drops events older than 60 days, see
                      ``MAX_EVENT_AGE_SECS``)
    event_id          the event's messageId: the Pinterest Tag's event_id for the same
                      action, so that Pinterest counts it once
    event_source_url  context.page.url
    opt_out           true when the event denies ad_personalization (the person opted out
                      of tracking for targeted advertising)
    language          the ISO 639-1 code of context.locale (``en`` of ``en-US``)
    user_data         em, ph, fn, ln, ge, db, ct, st, zp, country, external_id: arrays of one
                      SHA-256 hex each, normalized by Pinterest's row of
                      ``_user_data.RULES`` (ph: digits with the country code, no "+";
                      ge: f, m or n); client_ip_address, client_user_agent and click_id
                      (the epik click id the relay kept from the landing URL, else the
                      Pinterest Tag's _epik cookie) as they are
    custom_data       value (text, as Pinterest takes it), currency, content_ids, contents
                      [{id, item_price (text), quantity, item_name, item_category,
                      item_brand}], num_items, order_id; search_string for searches (unless
                      it looks like an email address); opt_out_type "LDP" with the
                      limited_data_processing option. Nothing else of the properties (they
                      may hold personal data).

Pinterest's own drop (whole events, counted): ``no_user_data``: an event without a hashed
email or the IP address with the user agent, one of which Pinterest requires (P1: "at
least one of em, hashed_maids or the pair client_ip_address + client_user_agent"); without
``ad_user_data`` consent an event has neither.

Answers (P1: ``{"num_events_received", "num_events_processed", "events": [{"status":
"processed" | "failed", "error_message", "warning_message"}]}`` in the request's order;
errors ``{"code", "message"}``):

========================================  ===============================================
answer                                    outcome
========================================  ===============================================
HTTP 408, 429, 503 and other 5xx          the shared table: ``Retry`` (``Retry-After``
                                          honoured), Pinterest's message in the detail
2xx                                       ``Delivered``; the events whose ``status`` is
                                          ``failed`` are rejected one by one with
                                          Pinterest's ``error_message`` (dead letters);
                                          warnings are logged (WARNING, once a minute
                                          per forwarder)
2xx whose ``events`` do not line up       ``Delivered`` (Pinterest took the request;
with the request's                        which events failed cannot be told), logged
HTTP 400                                  ``Dead(pinterest_invalid)``
HTTP 401                                  ``Dead(pinterest_invalid_token)``
HTTP 403                                  ``Dead(pinterest_permission)``
other 4xx                                 ``Dead(pinterest_error)``, or the shared table
                                          without a JSON answer
========================================  ===============================================

A dead batch's detail is ``HTTP <status>: Pinterest code <code>: <message>`` with the
conversion token scrubbed (``secrets``).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final, Literal

import orjson
from pydantic import Field, SecretStr, field_validator

from tagrelay.forwarders._base import ForwarderContext
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
from tagrelay.logthrottle import LogThrottle
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry

__all__ = ["PinterestConfig", "PinterestForwarder", "classify_pinterest_response"]

log = logging.getLogger(__name__)

BASE_URL: Final = "https://api.pinterest.com"
API_VERSION: Final = "v5"
MAX_EVENTS_PER_REQUEST: Final = 1000
"""RudderStack's figure (P4, from Pinterest's v3 pages); the v5 one is not in our sources."""
MAX_EVENT_AGE_SECS: Final = 60 * 86_400.0
"""Pinterest's own limit is not in our sources (destinations.md §7, §13). Its longest click
attribution window is 60 days (its reporting API's click windows: 1, 7, 30 or 60 days): an
older conversion can be credited to no ad, so it is dropped (``too_old``). An event Pinterest
refuses fails alone (per-event ``status``), so a shorter limit of its own costs one dead
letter, not a batch."""

ACTION_SOURCE: Final = "web"
LIMITED_DATA_PROCESSING: Final = "LDP"
LOG_INTERVAL_SECS: Final = 60.0

STANDARD_EVENTS: Final = frozenset(
    {
        # Pinterest's event list (developers.pinterest.com/docs/api-features/
        # conversion-overview; the v5 spec's event_name enum, P1).
        "add_payment_info",
        "add_to_cart",
        "add_to_wishlist",
        "app_install",
        "app_open",
        "checkout",
        "contact",
        "custom",
        "customize_product",
        "find_location",
        "initiate_checkout",
        "lead",
        "page_visit",
        "schedule",
        "search",
        "signup",
        "start_trial",
        "submit_application",
        "subscribe",
        "view_category",
        "view_content",
        "watch_video",
    }
)
"""Pinterest's standard events: a track event so named (or mapped to one) is sent as it is."""

FAILED: Final = "failed"

_SEARCHES: Final = frozenset({"search", "view_search_results"})
_LANGUAGE = re.compile(r"([A-Za-z]{2})(?:[-_][A-Za-z0-9]{2,8})*")
# What a warning could echo of the person (Pinterest's messages name fields, and may quote
# a value): email and IP addresses are masked before the line is logged.
_PERSONAL = re.compile(
    r"[^@\s\"']+@[^@\s\"']+"  # an email address
    r"|\b\d{1,3}(?:\.\d{1,3}){3}\b"  # an IPv4 address
    r"|\b[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}\b"  # an IPv6 address
)
MAX_LOGGED_CHARS: Final = 300


class PinterestConfig(ConversionsConfig):
    """Pinterest Conversions API (v5): conversions and page views reported from the server
    to a Pinterest ad account, deduplicated against the Pinterest Tag by event id."""

    type: Literal["pinterest"] = Field(description="Forwarder type.", examples=["pinterest"])
    ad_account_id: str = Field(
        pattern=r"^[0-9]{1,20}$",
        description="The ad account's id (Ads Manager: the number in its URL and menu).",
        examples=["549755885175"],
    )
    access_token: SecretStr = Field(
        min_length=1,
        description=(
            "Conversion access token (Ads Manager > Conversions > Conversions API > Generate "
            "new token), sent as Authorization: Bearer. Never logged."
        ),
        examples=["${PINTEREST_CONVERSION_TOKEN}"],
    )
    base_url: str = Field(
        BASE_URL,
        description="The Pinterest API's scheme and host (no trailing slash).",
        examples=[BASE_URL],
    )
    api_version: str = Field(
        API_VERSION,
        pattern=r"^v[0-9]+$",
        description="Pinterest API version in the path (/<version>/ad_accounts/<id>/events).",
        examples=[API_VERSION],
    )
    test_mode: bool = Field(
        False,
        description=(
            "Mark every request as a test (?test=true): Pinterest checks the events and "
            "answers as it would, and records nothing. Remove in production."
        ),
        examples=[True],
    )
    limited_data_processing: bool = Field(
        False,
        description=(
            'Flag every event for Limited Data Processing (custom_data.opt_out_type "LDP"), '
            "for US state privacy laws."
        ),
        examples=[True],
    )

    @field_validator("ad_account_id", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value


def _answer(body: bytes) -> dict[str, Any] | None:
    """Pinterest's JSON answer, when it is an object."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _detail(status: int, answer: dict[str, Any]) -> str:
    detail = f"HTTP {status}: Pinterest"
    code = answer.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        detail += f" code {code}"
    message = answer.get("message")
    if isinstance(message, str) and message:
        detail += f": {message}"
    return detail


def _event_results(answer: dict[str, Any] | None, events: int) -> list[dict[str, Any]] | None:
    """The per-event results of a 2xx answer, when they line up with the request's
    ``events``; None otherwise."""
    results = answer.get("events") if answer is not None else None
    if not isinstance(results, list) or len(results) != events:
        return None
    if not all(isinstance(result, dict) for result in results):
        return None
    return results


def classify_pinterest_response(response: HttpResponse, events: int) -> Outcome:
    """The outcome of one answer to a request of ``events`` events (see the module
    docstring's table)."""
    status = response.status
    answer = _answer(response.body)
    shared = classify_status(response)
    if isinstance(shared, Retry):
        detail = _detail(status, answer) if answer is not None else shared.detail
        return Retry(shared.reason, detail, shared.after_secs)
    if 200 <= status < 300:
        results = _event_results(answer, events)
        if results is None:
            return Delivered()
        rejected = {}
        for position, result in enumerate(results):
            if result.get("status") == FAILED:
                message = result.get("error_message")
                said = message if isinstance(message, str) and message else "event failed"
                rejected[position] = f"pinterest_event_failed: {said}"
        return Delivered(rejected=rejected)
    if answer is None:
        return shared
    detail = _detail(status, answer)
    if status == 400:
        return Dead("pinterest_invalid", detail)
    if status == 401:
        return Dead("pinterest_invalid_token", detail)
    if status == 403:
        return Dead("pinterest_permission", detail)
    return Dead("pinterest_error", detail)


class PinterestForwarder(ConversionsForwarder[PinterestConfig]):
    config_model = PinterestConfig
    platform = "pinterest"
    standard_events = "pinterest"
    extra_standard_events = STANDARD_EVENTS
    max_events_per_request = MAX_EVENTS_PER_REQUEST
    max_event_age_secs = MAX_EVENT_AGE_SECS
    platform_event_drop_reasons = frozenset({"no_user_data"})

    def __init__(self, config: PinterestConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self._log = LogThrottle(log, LOG_INTERVAL_SECS)

    def convert(
        self, index: int, event: Event, now: datetime, drops: Counter[str]
    ) -> Conversion | None:
        conversion = super().convert(index, event, now, drops)
        if conversion is None:
            return None
        user = conversion.user
        if "email" not in conversion.prepared.values and not (user.ip and user.user_agent):
            drops["no_user_data"] += 1
            return None
        return conversion

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        config = self.config
        url = f"{config.base_url}/{config.api_version}/ad_accounts/{config.ad_account_id}/events"
        if config.test_mode:
            url += "?test=true"
        return HttpRequest(
            "POST",
            url,
            {
                "Authorization": "Bearer " + config.access_token.get_secret_value(),
                "Content-Type": "application/json",
            },
            orjson.dumps({"data": [self._event(c) for c in conversions]}),
        )

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome:
        events = len(planned.indices)
        outcome = classify_pinterest_response(response, events)
        if isinstance(outcome, Delivered):
            self._log_what_pinterest_said(response, events)
        return outcome

    def secrets(self) -> Iterable[str]:
        return (self.config.access_token.get_secret_value(),)

    def _log_what_pinterest_said(self, response: HttpResponse, events: int) -> None:
        """Warnings about events Pinterest took (fields that are not standard: a mapping to
        fix), and answers whose failures cannot be placed: an operator should look."""
        answer = _answer(response.body)
        results = _event_results(answer, events)
        if results is None:
            listed = answer.get("events") if answer is not None else None
            if isinstance(listed, list) and any(
                isinstance(r, dict) and r.get("status") == FAILED for r in listed
            ):
                self._log.log(
                    logging.WARNING,
                    self.id + ":unplaced",
                    "pinterest reported failed events that cannot be matched to the "
                    "request's events; they are not retried",
                    {"forwarder": self.id, "events": events, "results": len(listed)},
                )
            return
        warnings = [
            r["warning_message"]
            for r in results
            if isinstance(r.get("warning_message"), str) and r["warning_message"]
        ]
        if warnings:
            self._log.log(
                logging.WARNING,
                self.id + ":warning",
                "pinterest took events with warnings",
                {
                    "forwarder": self.id,
                    "events": len(warnings),
                    "detail": _PERSONAL.sub("***", self.scrub(warnings[0]))[:MAX_LOGGED_CHARS],
                },
            )

    # -- one event -----------------------------------------------------------------------

    def _event(self, c: Conversion) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event_name": c.name,
            "action_source": ACTION_SOURCE,
            "event_time": epoch_seconds(c.time),
            "event_id": c.event_id,
        }
        if c.page_url:
            event["event_source_url"] = c.page_url
        if c.consent.get("ad_personalization") == "denied":
            event["opt_out"] = True
        locale = _dict(c.event.get("context")).get("locale")
        if isinstance(locale, str) and (match := _LANGUAGE.fullmatch(locale.strip())):
            event["language"] = match.group(1).lower()
        event["user_data"] = self._user_data(c)
        custom = self._custom_data(c)
        if custom:
            event["custom_data"] = custom
        return event

    @staticmethod
    def _user_data(c: Conversion) -> dict[str, Any]:
        user = meta_style_user_data(c)
        data = c.user
        click_id = data.click_ids.get("epik") or data.browser_ids.get("_epik")
        if click_id:
            user["click_id"] = click_id
        return user

    def _custom_data(self, c: Conversion) -> dict[str, Any]:
        facts = c.commerce
        custom: dict[str, Any] = {}
        if facts.currency is not None:
            custom["currency"] = facts.currency
        if facts.value is not None and (value := decimal_text(facts.value)) is not None:
            custom["value"] = value
        contents = []
        for item in facts.items:
            if item.id is None:
                continue  # contents are matched to the catalog by id
            content: dict[str, Any] = {"id": item.id}
            if item.price is not None and math.isfinite(item.price):
                content["item_price"] = decimal_text(item.price)
            if item.quantity is not None:
                content["quantity"] = item.quantity
            if item.name is not None:
                content["item_name"] = item.name
            if item.category is not None:
                content["item_category"] = item.category
            if item.brand is not None:
                content["item_brand"] = item.brand
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
        if self.config.limited_data_processing:
            custom["opt_out_type"] = LIMITED_DATA_PROCESSING
        return custom


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
