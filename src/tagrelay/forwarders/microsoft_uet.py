"""``microsoft``: Microsoft Advertising's UET Conversions API, on the shared conversions
layer (``_conversions``).

``POST {base_url}/{api_version}/{uet_tag_id}/events`` with ``Authorization: Bearer <the UET
tag's Conversions API token>`` and a JSON body ``{"data": [...], "continueOnValidationError":
true, "dataProvider": "tagrelay"}`` of at most 1,000 events (Microsoft's guide,
learn.microsoft.com/advertising/guides/uet-conversion-api-integration; destinations.md §10).
``continueOnValidationError`` makes Microsoft take the valid events of a request and name the
invalid ones, which become dead letters alone.

UET names events the way gtag does: a page view is a ``pageLoad`` event; anything else is a
``custom`` event whose ``eventName`` (UET's event action, what custom conversion goals
match) is the ``events`` option's name for it, else its canonical (GA4 recommended) name
(``Order Completed`` and ``purchase`` -> ``purchase``, ``Product Viewed`` -> ``view_item``),
else its own name (``unmapped: skip`` drops those instead). Each event::

    eventType         pageLoad for page and screen calls (and events named page_view), else
                      custom
    eventId           the event's messageId: the UET tag's event_id for the same action
                      (with the same eventName), so that Microsoft counts one of the two
    eventName         custom events' name (above)
    eventTime         Unix seconds; the layer drops events 7 days old (Microsoft's window)
    eventSourceUrl    context.page.url (a page load without one is not sent: no_page_url)
    pageLoadId        page loads: a UUID made from the messageId
    referrerUrl, pageTitle   context.page (page calls: their properties too)
    adStorageConsent  G or D from context.consent.ads, when the event states it
    userData          em, ph, externalId: SHA-256 hex by Microsoft's rules (``_user_data``:
                      email without dots and +alias in the local part, phone E.164 with "+",
                      the userId hashed as Microsoft asks for "anonymized" ids), only under
                      ad_user_data consent like clientIpAddress; clientUserAgent; msclkid
                      (the click id, which Microsoft takes as a UUID: another value is left
                      out, counted as invalid_click_id); anonymousId: the UET tag's _uetvid
                      cookie, else the event's anonymousId (the vid of Microsoft's ID sync
                      pixel must be the same). An event with none of em, ph, externalId,
                      msclkid and anonymousId cannot be matched: not sent (no_user_data).
    customData        custom events: value, currency, transactionId (order_id), items
                      [{id, name, quantity, price}] and itemIds (items with an id),
                      pageType (product, category, searchresults, cart, purchase from the
                      canonical name), ecommTotalValue (the value, with a pageType),
                      searchTerm (searches, unless it looks like an email address),
                      eventCategory and eventLabel (properties.category, .label). Nothing
                      else of the properties.

Answers (the guide's "API error handling"):

=======================================  ===============================================
answer                                   outcome
=======================================  ===============================================
2xx                                      ``Delivered``; events ``error.details`` names by
                                         ``index`` with ``isWarning: false`` (skipped as
                                         invalid) are rejected, with Microsoft's words;
                                         warnings (a field Microsoft removed) and events
                                         skipped beyond the 10 details Microsoft lists are
                                         logged (WARNING, once a minute per forwarder)
400 with event errors                    no event of the request was valid: each is
                                         rejected, with its own error when listed
other 400                                ``Dead(microsoft_invalid_request)``
401                                      ``Dead(microsoft_unauthorized)``: the token is
                                         wrong, or not the UET tag's
403                                      ``Dead(microsoft_forbidden)``
408, 429, 5xx                            the shared table: ``Retry``, ``Retry-After``
                                         honoured
other status                             ``Dead(microsoft_error)``
=======================================  ===============================================

Microsoft's guide gives no test mode: use a UET tag of its own for tests. A dead letter's
detail is ``HTTP <status>: Microsoft <code>: <message>`` and the listed errors (field, rule,
message; never the ``attemptedValue``), the token scrubbed (``secrets``).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final, Literal

import orjson
from pydantic import Field, SecretStr, field_validator

from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import PlannedRequest
from tagrelay.forwarders._conversions import (
    CANONICAL_EVENT_NAMES,
    Conversion,
    ConversionsConfig,
    ConversionsForwarder,
    epoch_seconds,
)
from tagrelay.forwarders._ecommerce import event_name_key
from tagrelay.forwarders._http import HttpRequest, HttpResponse, classify_status, json_object
from tagrelay.forwarders._user_data import Field as UserDataField
from tagrelay.forwarders._user_data import looks_like_email
from tagrelay.logthrottle import LogThrottle
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry

__all__ = [
    "MicrosoftConfig",
    "MicrosoftForwarder",
    "ValidationIssue",
    "classify_microsoft_response",
    "validation_issues",
]

log = logging.getLogger(__name__)

BASE_URL: Final = "https://capi.uet.microsoft.com"
API_VERSION: Final = "v1"
MAX_EVENTS_PER_REQUEST: Final = 1000
MAX_EVENT_AGE_SECS: Final = 7 * 86_400.0
"""eventTime "must be within the last 7 days" (Microsoft's guide)."""
USER_AGENT: Final = "tagrelay"
PAGE_VIEW: Final = "page_view"
MAX_DETAILS_IN_TEXT: Final = 5

PAGE_TYPES: Final[Mapping[str, str]] = {
    "view_item": "product",
    "view_item_list": "category",
    "search": "searchresults",
    "view_search_results": "searchresults",
    "add_to_cart": "cart",
    "view_cart": "cart",
    "begin_checkout": "cart",
    "purchase": "purchase",
}
"""Canonical event -> UET's pageType (one of cart, category, home, other, product,
purchase, searchresults), for dynamic remarketing."""

_SEARCHES: Final = frozenset({"search", "view_search_results"})
# userData keys of the hashed fields (``_user_data`` field -> Microsoft's key).
_HASHED_KEYS: Final[tuple[tuple[UserDataField, str], ...]] = (
    ("email", "em"),
    ("phone", "ph"),
    ("external_id", "externalId"),
)
_MAX_ANONYMOUS_ID: Final = 100


class MicrosoftConfig(ConversionsConfig):
    """Microsoft Advertising UET Conversions API: conversions and page loads reported from
    the server to a UET tag, deduplicated against the UET tag in the browser by event id."""

    type: Literal["microsoft"] = Field(description="Forwarder type.", examples=["microsoft"])
    uet_tag_id: str = Field(
        pattern=r"^[0-9]{4,20}$",
        description="The UET tag's id (Microsoft Advertising > Tools > UET tag).",
        examples=["187012345"],
    )
    access_token: SecretStr = Field(
        min_length=1,
        description=(
            "The UET tag's Conversions API token (edit the UET tag > Set up tagging > Use "
            "Conversions API > Copy token), sent as a Bearer token. Never logged."
        ),
        examples=["${MICROSOFT_CAPI_TOKEN}"],
    )
    base_url: str = Field(
        BASE_URL,
        description="The UET Conversions API's scheme and host (no trailing slash).",
        examples=[BASE_URL],
    )
    api_version: str = Field(
        API_VERSION,
        pattern=r"^v[0-9]+$",
        description="Conversions API version in the path (/<version>/<uet_tag_id>/events).",
        examples=[API_VERSION],
    )
    data_provider: str = Field(
        "tagrelay",
        min_length=1,
        max_length=100,
        description=(
            "dataProvider of every request: Microsoft asks third-party senders to name "
            "themselves (for its analysis and debugging)."
        ),
        examples=["tagrelay"],
    )

    @field_validator("uet_tag_id")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()


# -- Microsoft's answers -------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationIssue:
    """One entry of an answer's ``error.details``."""

    index: int | None
    """The event's position in the request, when Microsoft names one."""
    warning: bool
    """A field Microsoft removed; the event was taken."""
    text: str
    """``propertyName: errorMessage (errorCode)``."""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def validation_issues(answer: Mapping[str, Any]) -> list[ValidationIssue]:
    """The answer's ``error.details``, in order (``attemptedValue`` left out: it may be a
    person's data)."""
    details = _dict(answer.get("error")).get("details")
    issues = []
    for entry in details if isinstance(details, list) else ():
        entry = _dict(entry)
        index = entry.get("index")
        parts = [p for p in (_str(entry.get("propertyName")), _str(entry.get("errorMessage"))) if p]
        text = ": ".join(parts) or "invalid"
        code = _str(entry.get("errorCode"))
        if code:
            text += f" ({code})"
        issues.append(
            ValidationIssue(
                index if isinstance(index, int) and not isinstance(index, bool) else None,
                entry.get("isWarning") is True,
                text,
            )
        )
    return issues


def _detail(response: HttpResponse, answer: Mapping[str, Any]) -> str:
    error = _dict(answer.get("error"))
    code, message = _str(error.get("code")), _str(error.get("message"))
    if code is None and message is None:
        return f"HTTP {response.status}: Microsoft: {response.text}"
    detail = f"HTTP {response.status}: Microsoft {code or 'error'}: {message or ''}".rstrip(": ")
    listed = [issue.text for issue in validation_issues(answer)[:MAX_DETAILS_IN_TEXT]]
    return "; ".join([detail, *listed])


def classify_microsoft_response(response: HttpResponse, events: int) -> Outcome:
    """The outcome of one answer to a request of ``events`` events (see the module
    docstring's table; warnings are :class:`MicrosoftForwarder`'s to log)."""
    status = response.status
    answer = json_object(response.body)
    located: dict[int, str] = {}
    for issue in validation_issues(answer):
        if not issue.warning and issue.index is not None and 0 <= issue.index < events:
            located.setdefault(issue.index, f"Microsoft: {issue.text}")
    if 200 <= status < 300:
        return Delivered(rejected=located)
    detail = _detail(response, answer)
    if status == 400 and located:
        # With continueOnValidationError, a 400 means no event was valid; Microsoft lists
        # only the first 10 errors.
        general = f"Microsoft: {_str(_dict(answer.get('error')).get('message')) or 'invalid'}"
        return Delivered(rejected={at: located.get(at, general) for at in range(events)})
    if status == 400:
        return Dead("microsoft_invalid_request", detail)
    if status == 401:
        return Dead("microsoft_unauthorized", detail)
    if status == 403:
        return Dead("microsoft_forbidden", detail)
    shared = classify_status(response)
    if isinstance(shared, Retry):
        return Retry(shared.reason, detail, shared.after_secs)
    return Dead("microsoft_error", detail)


# -- the forwarder -------------------------------------------------------------------------


class MicrosoftForwarder(ConversionsForwarder[MicrosoftConfig]):
    config_model = MicrosoftConfig
    platform = "microsoft"
    standard_events = None
    max_events_per_request = MAX_EVENTS_PER_REQUEST
    max_event_age_secs = MAX_EVENT_AGE_SECS
    payload_match_keys = frozenset(
        {"email", "phone", "external_id", "ip", "user_agent", "click_id", "browser_id"}
    )
    platform_event_drop_reasons = frozenset({"no_page_url", "no_user_data"})
    platform_field_drop_reasons = frozenset({"invalid_click_id"})

    def __init__(self, config: MicrosoftConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self._names_exact = dict(config.events)
        self._names = {event_name_key(k): v for k, v in config.events.items()}
        self._url = f"{config.base_url}/{config.api_version}/{config.uet_tag_id}/events"
        self._throttle = LogThrottle(log)

    # -- which events, under which name ------------------------------------------------

    def event_name(self, event: Event) -> tuple[str, bool, str | None] | str:
        """The UET event name: configured, else canonical, else the event's own (see the
        module docstring); ``page_view`` is a page load."""
        etype = event.get("type")
        canonical: str | None
        if etype in ("page", "screen"):
            raw, canonical = PAGE_VIEW, PAGE_VIEW
        elif etype == "track":
            name = event.get("event")
            if not isinstance(name, str) or not name.strip():
                return "no_event_name"
            raw, canonical = name, CANONICAL_EVENT_NAMES.get(event_name_key(name))
        else:
            return "not_a_conversion"
        configured = self._names_exact.get(raw) or self._names.get(event_name_key(raw))
        if configured is not None:
            return configured, configured == PAGE_VIEW, canonical
        if canonical is not None:
            return canonical, True, canonical
        if self.config.unmapped == "skip":
            return "unmapped_event"
        return raw.strip(), False, None

    def convert(
        self, index: int, event: Event, now: datetime, drops: Counter[str]
    ) -> Conversion | None:
        conversion = super().convert(index, event, now, drops)
        if conversion is None:
            return None
        if conversion.name == PAGE_VIEW and not conversion.page_url:
            drops["no_page_url"] += 1
            return None
        keys, field_drops = set(conversion.match_keys), Counter(conversion.field_drops)
        if conversion.user.click_ids.get("msclkid") and _msclkid(conversion) is None:
            keys.discard("click_id")
            field_drops["invalid_click_id"] += 1
        if _anonymous_id(conversion) is not None:
            keys.add("browser_id")
        if not keys & {"email", "phone", "external_id", "click_id", "browser_id"}:
            drops["no_user_data"] += 1
            return None
        return replace(conversion, match_keys=frozenset(keys), field_drops=field_drops)

    # -- the request and its answer ------------------------------------------------------

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        config = self.config
        body = {
            "data": [self._event(c) for c in conversions],
            "continueOnValidationError": True,
            "dataProvider": config.data_provider,
        }
        headers = {
            "Authorization": f"Bearer {config.access_token.get_secret_value()}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        return HttpRequest("POST", self._url, headers, orjson.dumps(body))

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome:
        events = len(planned.indices)
        outcome = classify_microsoft_response(response, events)
        if isinstance(outcome, Delivered) and 200 <= response.status < 300:
            answer = json_object(response.body)
            warnings = [i.text for i in validation_issues(answer) if i.warning]
            received = answer.get("eventsReceived")
            unlisted = (
                events - len(outcome.rejected) - received
                if isinstance(received, int) and not isinstance(received, bool)
                else 0
            )
            if warnings or unlisted > 0:
                self._throttle.log(
                    logging.WARNING,
                    (self.id, "validation"),
                    "microsoft took a request with validation issues: fields it removed, "
                    "or events it skipped without naming them",
                    {
                        "forwarder": self.id,
                        "events": events,
                        "skipped_unnamed": max(unlisted, 0),
                        "warnings": self.scrub("; ".join(warnings[:MAX_DETAILS_IN_TEXT])),
                    },
                )
        return outcome

    def secrets(self) -> Iterable[str]:
        return (self.config.access_token.get_secret_value(),)

    # -- one event -----------------------------------------------------------------------

    def _event(self, c: Conversion) -> dict[str, Any]:
        page_load = c.name == PAGE_VIEW
        event: dict[str, Any] = {"eventType": "pageLoad" if page_load else "custom"}
        if c.event_id:
            event["eventId"] = c.event_id
        if not page_load:
            event["eventName"] = c.name
        event["eventTime"] = epoch_seconds(c.time)
        if c.page_url:
            event["eventSourceUrl"] = c.page_url
        if page_load and c.event_id:
            event["pageLoadId"] = _page_load_id(c.event_id)
        if c.referrer:
            event["referrerUrl"] = c.referrer
        title = _title(c)
        if title:
            event["pageTitle"] = title
        ads = c.consent.get("ads")
        if ads in ("granted", "denied"):
            event["adStorageConsent"] = "G" if ads == "granted" else "D"
        event["userData"] = self._user_data(c)
        if not page_load:
            custom = self._custom_data(c)
            if custom:
                event["customData"] = custom
        return event

    @staticmethod
    def _user_data(c: Conversion) -> dict[str, Any]:
        values, data = c.prepared.values, c.user
        user: dict[str, Any] = {}
        for name, key in _HASHED_KEYS:
            if name in values:
                user[key] = values[name]
        anonymous_id = _anonymous_id(c)
        if anonymous_id is not None:
            user["anonymousId"] = anonymous_id
        msclkid = _msclkid(c)
        if msclkid is not None:
            user["msclkid"] = msclkid
        if data.ip:
            user["clientIpAddress"] = data.ip
        if data.user_agent:
            user["clientUserAgent"] = data.user_agent
        return user

    @staticmethod
    def _custom_data(c: Conversion) -> dict[str, Any]:
        facts = c.commerce
        custom: dict[str, Any] = {}
        if facts.value is not None:
            custom["value"] = facts.value
        if facts.currency is not None:
            custom["currency"] = facts.currency
        if facts.order_id is not None:
            custom["transactionId"] = facts.order_id
        items = []
        for item in facts.items:
            if item.id is None:
                continue  # matched to the product feed by id
            entry: dict[str, Any] = {"id": item.id}
            if item.name is not None:
                entry["name"] = item.name
            if item.quantity is not None:
                entry["quantity"] = item.quantity
            if item.price is not None:
                entry["price"] = item.price
            items.append(entry)
        if items:
            custom["items"] = items
            custom["itemIds"] = [item["id"] for item in items]
        page_type = PAGE_TYPES.get(c.canonical or "")
        if page_type is not None:
            custom["pageType"] = page_type
            if facts.value is not None:
                custom["ecommTotalValue"] = facts.value
        if c.canonical in _SEARCHES:
            query = c.properties.get("query") or c.properties.get("search_term")
            if isinstance(query, str) and query.strip() and not looks_like_email(query):
                custom["searchTerm"] = query.strip()
        for key, name in (("category", "eventCategory"), ("label", "eventLabel")):
            text = c.properties.get(key)
            if isinstance(text, str) and text.strip() and not looks_like_email(text):
                custom[name] = text.strip()
        return custom


def _msclkid(c: Conversion) -> str | None:
    """The click id as the UUID Microsoft takes (dashed, lowercase), or None."""
    value = c.user.click_ids.get("msclkid")
    if not value:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _anonymous_id(c: Conversion) -> str | None:
    """The UET tag's visitor id, else the event's anonymousId."""
    uetvid = c.user.browser_ids.get("_uetvid")
    if uetvid:
        return uetvid
    anonymous = c.event.get("anonymousId")
    if isinstance(anonymous, str) and 0 < len(anonymous.strip()) <= _MAX_ANONYMOUS_ID:
        return anonymous.strip()
    return None


def _page_load_id(message_id: str) -> str:
    """A version 4 UUID (the format Microsoft asks for) made from the page view's messageId,
    the same on every retry."""
    digest = bytearray(hashlib.sha256(message_id.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(digest)))


def _title(c: Conversion) -> str | None:
    page = _dict(_dict(c.event.get("context")).get("page"))
    title = page.get("title")
    if not isinstance(title, str) and c.event.get("type") == "page":
        title = c.properties.get("title")
    return (title.strip() or None) if isinstance(title, str) else None
