"""``tiktok``: TikTok's Events API 2.0, on the shared conversions layer (``_conversions``).

``POST {base_url}/open_api/{api_version}/event/track/`` with the ``Access-Token`` header and
a JSON body ``{"event_source": "web", "event_source_id": <pixel code>, "data": [...],
"test_event_code": ...}`` of at most 1,000 events (destinations.md §4). Which events go,
under which name, with which user data and when they are too old is the layer's; this
module lays out TikTok's event and reads TikTok's answers.

Each event::

    event             the standard event (Purchase, ViewContent, ...) or the event's own
                      name (TikTok takes custom events). Order Completed is Purchase,
                      TikTok's current name for an order paid at once (its 2025 list);
                      the legacy CompletePayment is still taken: a site whose pixel sends
                      it maps events: {"Order Completed": "CompletePayment"}, since
                      TikTok deduplicates only the same event name with the same id.
                      Page views are Pageview, the pixel's own name for them
                      (``_ecommerce.STANDARD_EVENTS``).
    event_time        Unix seconds (the layer drops events older than 28 days, see
                      ``MAX_EVENT_AGE_SECS``)
    event_id          the event's messageId: the pixel's event_id for the same action, so
                      that TikTok keeps one of the two (same event, within 48 h)
    user              email, phone, external_id, first_name, last_name, zip_code: SHA-256
                      hex, normalized by TikTok's row of ``_user_data.RULES`` (phone in
                      E.164 with "+"); ttclid (the click id), ttp (the _ttp cookie), ip,
                      user_agent as they are; locale (context.locale, a BCP 47 tag)
    properties        contents [{content_id, content_type "product", content_name,
                      content_category, price, quantity, brand}], content_type "product",
                      currency, value, order_id; query for searches (unless it looks like
                      an email address). Nothing else of the properties (they may hold
                      personal data).
    page              url, referrer (context.page)
    limited_data_use  true, with the limited_data_use option

Answers: TikTok replies HTTP 200 with ``{"code", "message", "request_id", "data"}`` even
for most failures, so the code decides (destinations.md §4 and §12; the codes below are the
ones our sources show, the rest of TikTok's list was not available to us):

=======================================  ===============================================
answer                                   outcome
=======================================  ===============================================
HTTP 408, 429, 5xx (any body)            the shared table: ``Retry`` (``Retry-After``
                                         honoured), TikTok's message in the detail
code 0 on a 2xx                          ``Delivered``
code 20001 on a 2xx (partial success)    ``Delivered``: TikTok took the request, and a
                                         retry would count the accepted events twice;
                                         which events failed is not documented in a
                                         form we could read, so TikTok's message is
                                         logged (WARNING, once a minute per forwarder)
code 40100 (too many requests)           ``Retry(tiktok_throttled)``: the runtime's
                                         backoff (or ``Retry-After`` if TikTok sends it)
code 40001 (no permission on the pixel)  ``Dead(tiktok_permission)``
code 40002 (invalid field)               ``Dead(tiktok_invalid)``
any other code from 50000 up             ``Retry(tiktok_internal)``: the Business API
                                         numbers its server-side failures 5xxxx (as
                                         HTTP does 5xx); retrying one costs a delay,
                                         dead-lettering it loses the batch
any other code (0 on an error status     ``Dead(tiktok_error)``: a code nobody classified
too)                                     is not retried blindly (it would be retried
                                         until max_age); the dead letter carries the
                                         code and message, to be replayed once fixed
HTTP 2xx without a numeric code          ``Delivered`` (nothing says it failed; sending
                                         it again could count it twice)
other HTTP status without a code         the shared table (``Dead(status_4xx)``)
=======================================  ===============================================

A dead batch's detail is ``HTTP <status>: TikTok code <code>: <message>; request_id <id>``
with the access token scrubbed (``secrets``). TikTok's messages name fields
(``Batch.0.properties.contents.0.content_id: Not a valid string``); what they could echo
of the person is hashed already, except the IP address and user agent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal

import orjson
from pydantic import Field, SecretStr

from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import PlannedRequest
from tagrelay.forwarders._conversions import (
    Conversion,
    ConversionsConfig,
    ConversionsForwarder,
    epoch_seconds,
)
from tagrelay.forwarders._http import (
    HttpRequest,
    HttpResponse,
    classify_status,
    parse_retry_after,
)
from tagrelay.forwarders._user_data import Field as UserDataField
from tagrelay.forwarders._user_data import looks_like_email
from tagrelay.logthrottle import LogThrottle
from tagrelay.model import Dead, Delivered, Outcome, Retry

__all__ = ["TikTokConfig", "TikTokForwarder", "classify_tiktok_response"]

log = logging.getLogger(__name__)

BASE_URL: Final = "https://business-api.tiktok.com"
API_VERSION: Final = "v1.3"
MAX_EVENTS_PER_REQUEST: Final = 1000
MAX_EVENT_AGE_SECS: Final = 28 * 86_400.0
"""TikTok's own limit is not in the sources we have (destinations.md §4, §13); TikTok
matches events to ads only within its longest attribution window, 28 days (click-through;
Amperity's TikTok guide: "events must have occurred within the previous 28 days"). An
older event is worthless to TikTok and, if TikTok refused it, would fail its whole
request (one bad row fails a batch), so it is dropped (``too_old``)."""

PARTIAL_LOG_INTERVAL_SECS: Final = 60.0

STANDARD_EVENTS: Final = frozenset(
    {
        # TikTok's supported standard events (2025 list, destinations.md §4, T3).
        "AddPaymentInfo",
        "AddToCart",
        "AddToWishlist",
        "ApplicationApproval",
        "CompleteRegistration",
        "Contact",
        "CustomizeProduct",
        "Download",
        "FindLocation",
        "InitiateCheckout",
        "Lead",
        "Purchase",
        "Schedule",
        "Search",
        "StartTrial",
        "SubmitApplication",
        "Subscribe",
        "ViewContent",
        # Legacy names TikTok still takes (T1, T2).
        "SubmitForm",
        "CompletePayment",
        "PlaceAnOrder",
        "ClickButton",
        "Pageview",
    }
)
"""TikTok's standard events: a track event so named (or mapped to one) is sent as it is."""

OK: Final = 0
PARTIAL_SUCCESS: Final = 20001
PERMISSION: Final = 40001
INVALID: Final = 40002
TOO_MANY_REQUESTS: Final = 40100
INTERNAL_FROM: Final = 50000

# user keys of the hashed fields (``_user_data`` field -> TikTok's key), in TikTok's order.
# Only the fields of TikTok's row of ``_user_data.RULES`` are ever prepared.
_HASHED_KEYS: Final[tuple[tuple[UserDataField, str], ...]] = (
    ("email", "email"),
    ("phone", "phone"),
    ("external_id", "external_id"),
    ("first_name", "first_name"),
    ("last_name", "last_name"),
    ("zip", "zip_code"),
)

_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,3}")
_SEARCHES: Final = frozenset({"search", "view_search_results"})


class TikTokConfig(ConversionsConfig):
    """TikTok Events API: conversions and page views reported from the server to a TikTok
    pixel, deduplicated against the browser pixel by event id."""

    type: Literal["tiktok"] = Field(description="Forwarder type.", examples=["tiktok"])
    pixel_code: str = Field(
        pattern=r"^[A-Za-z0-9]{8,40}$",
        description=(
            "The pixel's code (Events Manager > Web events > the pixel: the ID under its "
            "name), sent as event_source_id."
        ),
        examples=["CQ1A2B3C4D5E6F7G8H9J"],
    )
    access_token: SecretStr = Field(
        min_length=1,
        description=(
            "Events API access token (Events Manager > the pixel > Settings > Events API > "
            "Generate access token), sent in the Access-Token header. Never logged."
        ),
        examples=["${TIKTOK_EVENTS_TOKEN}"],
    )
    base_url: str = Field(
        BASE_URL,
        description="The TikTok Business API's scheme and host (no trailing slash).",
        examples=[BASE_URL],
    )
    api_version: str = Field(
        API_VERSION,
        pattern=r"^v[0-9]+\.[0-9]+$",
        description="Business API version in the path (/open_api/<version>/event/track/).",
        examples=[API_VERSION],
    )
    test_event_code: str | None = Field(
        None,
        min_length=1,
        description=(
            "Sends every event as a test event, shown in Events Manager > the pixel > Test "
            "events and left out of reporting and optimization (the code shown there, "
            "TEST12345). Remove in production."
        ),
        examples=["TEST12345"],
    )
    limited_data_use: bool = Field(
        False,
        description=(
            "Flag every event for Limited Data Use (limited_data_use: true): TikTok uses "
            "it only in the restricted ways US state privacy laws allow."
        ),
        examples=[True],
    )


def _tiktok_answer(body: bytes) -> dict[str, Any] | None:
    """The answer's JSON object when it carries an integer ``code``."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    code = parsed.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        return None
    return parsed


def _detail(status: int, answer: dict[str, Any]) -> str:
    parts = [f"HTTP {status}: TikTok code {answer['code']}"]
    message = answer.get("message")
    if isinstance(message, str) and message:
        parts[0] += f": {message}"
    request_id = answer.get("request_id")
    if isinstance(request_id, str) and request_id:
        parts.append(f"request_id {request_id}")
    return "; ".join(parts)


def classify_tiktok_response(response: HttpResponse) -> Outcome:
    """The outcome of one ``/event/track/`` answer (see the module docstring's table)."""
    status = response.status
    answer = _tiktok_answer(response.body)
    shared = classify_status(response)
    if isinstance(shared, Retry):
        detail = _detail(status, answer) if answer is not None else shared.detail
        return Retry(shared.reason, detail, shared.after_secs)
    if answer is None:
        return shared
    code: int = answer["code"]
    detail = _detail(status, answer)
    ok = 200 <= status < 300
    if code == OK and ok:
        return Delivered()
    if code == PARTIAL_SUCCESS and ok:
        return Delivered()
    if code == TOO_MANY_REQUESTS:
        return Retry(
            "tiktok_throttled", detail, parse_retry_after(response.headers.get("Retry-After"))
        )
    if code == PERMISSION:
        return Dead("tiktok_permission", detail)
    if code == INVALID:
        return Dead("tiktok_invalid", detail)
    if code >= INTERNAL_FROM:
        return Retry(
            "tiktok_internal", detail, parse_retry_after(response.headers.get("Retry-After"))
        )
    return Dead("tiktok_error", detail)


class TikTokForwarder(ConversionsForwarder[TikTokConfig]):
    config_model = TikTokConfig
    platform = "tiktok"
    standard_events = "tiktok"
    extra_standard_events = STANDARD_EVENTS
    max_events_per_request = MAX_EVENTS_PER_REQUEST
    max_event_age_secs = MAX_EVENT_AGE_SECS

    def __init__(self, config: TikTokConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self._partial_log = LogThrottle(log, PARTIAL_LOG_INTERVAL_SECS)

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        config = self.config
        body: dict[str, Any] = {
            "event_source": "web",
            "event_source_id": config.pixel_code,
            "data": [self._event(c) for c in conversions],
        }
        if config.test_event_code:
            body["test_event_code"] = config.test_event_code
        return HttpRequest(
            "POST",
            f"{config.base_url}/open_api/{config.api_version}/event/track/",
            {
                "Access-Token": config.access_token.get_secret_value(),
                "Content-Type": "application/json",
            },
            orjson.dumps(body),
        )

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome:
        outcome = classify_tiktok_response(response)
        if isinstance(outcome, Delivered):
            answer = _tiktok_answer(response.body)
            if answer is not None and answer["code"] == PARTIAL_SUCCESS:
                self._partial_log.log(
                    logging.WARNING,
                    self.id,
                    "tiktok took a request only in part; events it refused are not known "
                    "one by one and are not retried",
                    {
                        "forwarder": self.id,
                        "events": len(planned.indices),
                        "detail": self.scrub(_detail(response.status, answer)),
                    },
                )
        return outcome

    def secrets(self) -> Iterable[str]:
        return (self.config.access_token.get_secret_value(),)

    # -- one event -----------------------------------------------------------------------

    def _event(self, c: Conversion) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event": c.name,
            "event_time": epoch_seconds(c.time),
            "event_id": c.event_id,
            "user": self._user(c),
        }
        properties = self._properties(c)
        if properties:
            event["properties"] = properties
        page: dict[str, str] = {}
        if c.page_url:
            page["url"] = c.page_url
        if c.referrer:
            page["referrer"] = c.referrer
        if page:
            event["page"] = page
        if self.config.limited_data_use:
            event["limited_data_use"] = True
        return event

    @staticmethod
    def _user(c: Conversion) -> dict[str, Any]:
        values = c.prepared.values
        user: dict[str, Any] = {key: values[name] for name, key in _HASHED_KEYS if name in values}
        data = c.user
        ttclid = data.click_ids.get("ttclid")
        if ttclid:
            user["ttclid"] = ttclid
        if data.ttp:
            user["ttp"] = data.ttp
        if data.ip:
            user["ip"] = data.ip
        if data.user_agent:
            user["user_agent"] = data.user_agent
        locale = _dict(c.event.get("context")).get("locale")
        if isinstance(locale, str) and _LOCALE.fullmatch(locale.strip()):
            user["locale"] = locale.strip()
        return user

    @staticmethod
    def _properties(c: Conversion) -> dict[str, Any]:
        facts = c.commerce
        properties: dict[str, Any] = {}
        contents = []
        for item in facts.items:
            if item.id is None:
                continue  # contents are matched to the catalog by content_id
            content: dict[str, Any] = {"content_id": item.id, "content_type": "product"}
            if item.name is not None:
                content["content_name"] = item.name
            if item.category is not None:
                content["content_category"] = item.category
            if item.price is not None:
                content["price"] = item.price
            if item.quantity is not None:
                content["quantity"] = item.quantity
            if item.brand is not None:
                content["brand"] = item.brand
            contents.append(content)
        if contents:
            properties["contents"] = contents
            properties["content_type"] = "product"
        if facts.currency is not None:
            properties["currency"] = facts.currency
        if facts.value is not None:
            properties["value"] = facts.value
        if facts.order_id is not None:
            properties["order_id"] = facts.order_id
        if c.canonical in _SEARCHES:
            query = c.properties.get("query") or c.properties.get("search_term")
            if isinstance(query, str) and query.strip() and not looks_like_email(query):
                properties["query"] = query.strip()
        return properties


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
