"""``reddit``: Reddit's Conversions API, on the shared conversions layer (``_conversions``).

``POST {base_url}/api/v3/pixels/{pixel_id}/conversion_events`` with ``Authorization: Bearer
<conversion access token>`` and a JSON body ``{"data": {"events": [...], "test_id": ...}}``
of at most 1,000 events (destinations.md §8; Reddit's v3 docs as captured in the destination
Reddit maintains in segmentio/action-destinations, ``reddit-conversions-api/
V3-API-REFERENCE.md``). ``api_version: v2.0`` keeps the deprecated v2 API for accounts not
yet moved: ``POST {base_url}/api/v2.0/conversions/events/{pixel_id}`` with ``{"events":
[...], "test_mode": true?}``, the same events in v2's shape (below). Requests carry
``User-Agent: tagrelay``: Reddit throttles clients that send a library's default one.

Each event (v3; v2 in parentheses)::

    event_at          epoch milliseconds (v2: ISO 8601 with milliseconds, UTC); the layer
                      drops events older than 168 hours, Reddit's limit
    action_source     the action_source option (default WEBSITE) (v2: none)
    type              {tracking_type}: the standard event, UPPER_SNAKE_CASE (PURCHASE,
                      PAGE_VISIT, ...; v2 event_type with PascalCase: Purchase, PageVisit),
                      or {tracking_type: CUSTOM, custom_event_name} (v2: Custom) with the
                      event's own name, cut to Reddit's 64 characters. A configured or
                      sent name may be either spelling (LEAD or Lead): each version gets its
                      own.
    event_source_url  context.page.url, for WEBSITE events (v2: none)
    click_id          the rdt_cid click id (kept by the relay from the landing URL)
    user              email, phone_number, external_id: SHA-256 hex by Reddit's rules
                      (``_user_data``: email without dots and +alias in the local part,
                      phone E.164 with "+"), only under ad_user_data consent like
                      ip_address; user_agent, uuid (Reddit's _rdt_uuid cookie) and
                      screen_dimensions {width, height} (context.screen) as they are;
                      data_processing_options {modes: ["LDU"], country, region} with
                      limited_data_use
    metadata          (v2 event_metadata) conversion_id: the event's messageId, which the
                      pixel sends as conversionId for the same action so that Reddit keeps
                      one of the two; currency and value (v2 value_decimal) for ADD_TO_CART,
                      ADD_TO_WISHLIST, PURCHASE, LEAD, SIGN_UP and custom events, item_count
                      for the first three and custom events (Reddit's "about event metadata":
                      the other types take neither); products [{id, name, category,
                      quantity, item_price}] (v2: id, name, category), products without an id
                      left out. Nothing else of the properties.

Test mode: ``test_id`` (Events Manager > Event Testing) goes in ``data`` and every event in
a request of its own, since Event Testing shows one event per request (v2: ``test_mode:
true``, which Reddit validates without recording).

Answers (Reddit's v3 error table; RudderStack's recorded answers for the bodies):

=======================================  ===============================================
answer                                   outcome
=======================================  ===============================================
2xx                                      ``Delivered``
400 naming invalid events                Reddit took *none* of the request: the events
(``invalid_events``: [{error_message,    it names (found by their conversion_id) become
event}])                                 dead letters with Reddit's words, and the others
                                         are sent again at once (``_batched.Refused``).
                                         When Reddit names an invalid event that cannot be
                                         told apart (no conversion id of the request), the
                                         request's events are sent again one per request
                                         (``Retry(reddit_invalid_events)``, ``after_secs``
                                         0), each invalid one then refused alone
401                                      ``Dead(reddit_unauthorized)``: the conversion
                                         access token does not exist or was revoked
403                                      ``Dead(reddit_forbidden)``: the token may not post
                                         to this pixel
408, 429, 5xx                            the shared table: ``Retry``, ``Retry-After``
                                         honoured
other 400                                ``Dead(reddit_invalid_request)``
other status                             ``Dead(reddit_error)``
=======================================  ===============================================

A dead letter's detail is ``HTTP <status>: Reddit: <message>`` and the invalid events'
messages (never the events Reddit echoes), the access token scrubbed (``secrets``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import orjson
from pydantic import Field, SecretStr, field_validator

from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import PlannedRequest, Refused
from tagrelay.forwarders._conversions import (
    Conversion,
    ConversionsConfig,
    ConversionsForwarder,
    epoch_millis,
)
from tagrelay.forwarders._http import HttpRequest, HttpResponse, classify_status, json_object
from tagrelay.forwarders._user_data import Field as UserDataField
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry, iso

__all__ = ["RedditConfig", "RedditForwarder", "classify_reddit_response"]

BASE_URL: Final = "https://ads-api.reddit.com"
API_VERSION: Final = "v3"
MAX_EVENTS_PER_REQUEST: Final = 1000
MAX_EVENT_AGE_SECS: Final = 168 * 3600.0
"""Reddit refuses events 168 hours old or older ("event_at timestamp must be less than
168h0m0s old"), and with one such event the whole request."""
MAX_CUSTOM_EVENT_NAME: Final = 64
USER_AGENT: Final = "tagrelay"

TRACKING_TYPES: Final[Mapping[str, str]] = {
    "PAGE_VISIT": "PageVisit",
    "VIEW_CONTENT": "ViewContent",
    "SEARCH": "Search",
    "ADD_TO_CART": "AddToCart",
    "ADD_TO_WISHLIST": "AddToWishlist",
    "PURCHASE": "Purchase",
    "LEAD": "Lead",
    "SIGN_UP": "SignUp",
}
"""Reddit's standard events: v3 name -> v2 name (Reddit's migration guide)."""
CUSTOM: Final = {"v3": "CUSTOM", "v2.0": "Custom"}

_V3_NAME: Final = {
    **{name: name for name in TRACKING_TYPES},
    **{v2: v3 for v3, v2 in TRACKING_TYPES.items()},
}
VALUE_TYPES: Final = frozenset({"ADD_TO_CART", "ADD_TO_WISHLIST", "PURCHASE", "LEAD", "SIGN_UP"})
"""Standard events that take currency and value (and custom events)."""
ITEM_COUNT_TYPES: Final = frozenset({"ADD_TO_CART", "ADD_TO_WISHLIST", "PURCHASE"})
"""Standard events that take item_count (and custom events)."""

ApiVersion = Literal["v3", "v2.0"]
ActionSource = Literal["WEBSITE", "APP", "OTHER"]

# user keys of the hashed fields (``_user_data`` field -> Reddit's key).
_HASHED_KEYS: Final[tuple[tuple[UserDataField, str], ...]] = (
    ("email", "email"),
    ("phone", "phone_number"),
    ("external_id", "external_id"),
)


class RedditConfig(ConversionsConfig):
    """Reddit Conversions API: conversions and page visits reported from the server to a
    Reddit pixel, deduplicated against the browser pixel by conversion id."""

    type: Literal["reddit"] = Field(description="Forwarder type.", examples=["reddit"])
    pixel_id: str = Field(
        pattern=r"^[A-Za-z0-9_-]{3,64}$",
        description=(
            "The pixel's id (Reddit Ads > Events Manager: the Pixel ID, a2_... or t2_...); "
            "v2.0 takes the same id in its path."
        ),
        examples=["a2_gu5a8gq2hzbq"],
    )
    access_token: SecretStr = Field(
        min_length=1,
        description=(
            "Conversion access token (Events Manager > Conversions API > Generate access "
            "token; it does not expire), sent as a Bearer token. Never logged."
        ),
        examples=["${REDDIT_CONVERSIONS_TOKEN}"],
    )
    base_url: str = Field(
        BASE_URL,
        description="The Reddit Ads API's scheme and host (no trailing slash).",
        examples=[BASE_URL],
    )
    api_version: ApiVersion = Field(
        API_VERSION,
        description=(
            "Conversions API version: v3, or v2.0 (deprecated, not yet sunset) for an "
            "account not yet moved; never send the same events through both."
        ),
        examples=["v3"],
    )
    test_id: str | None = Field(
        None,
        min_length=1,
        description=(
            "Sends every event to Events Manager > Event Testing (the test id shown there), "
            "one event per request, as Event Testing shows them; with v2.0, test_mode: true "
            "(validated, not recorded). Remove in production."
        ),
        examples=["t2_abc123"],
    )
    action_source: ActionSource = Field(
        "WEBSITE",
        description=(
            "v3's action_source of every event: WEBSITE (Reddit deduplicates pixel events "
            "against these only), APP or OTHER."
        ),
        examples=["WEBSITE"],
    )
    limited_data_use: bool = Field(
        False,
        description=(
            'Flag every event for Limited Data Use (user.data_processing_options {"modes": '
            '["LDU"]}), for US state privacy laws.'
        ),
        examples=[True],
    )
    limited_data_use_country: str | None = Field(
        None,
        pattern=r"^[A-Z]{2}$",
        description=(
            "data_processing_options.country with limited_data_use (ISO 3166-1 alpha-2); "
            "unset: Reddit geolocates each event."
        ),
        examples=["US"],
    )
    limited_data_use_region: str | None = Field(
        None,
        pattern=r"^[A-Z]{2}-[A-Z0-9]{1,3}$",
        description=(
            "data_processing_options.region with limited_data_use (ISO 3166-2); unset: "
            "Reddit geolocates each event."
        ),
        examples=["US-CA"],
    )

    @field_validator("pixel_id")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()


# -- Reddit's answers ----------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _message(answer: Mapping[str, Any]) -> str | None:
    """Reddit's words, wherever its answer puts them (v3 ``{"error": {"code", "message"}}``,
    v2 ``{"message"}`` or ``{"error": {"reason", "explanation"}}``, v3 ``{"data":
    {"message"}}``)."""
    error, data = _dict(answer.get("error")), _dict(answer.get("data"))
    parts = []
    for source, key in (
        (answer, "message"),
        (data, "message"),
        (error, "reason"),
        (error, "message"),
        (error, "explanation"),
    ):
        text = source.get(key)
        if isinstance(text, str) and text.strip() and text.strip() not in parts:
            parts.append(text.strip())
    return ": ".join(parts) if parts else None


def invalid_events(answer: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """``(conversion id, Reddit's message)`` of each event a 400 answer names as invalid
    (``invalid_events``, at the top, under ``data`` or under ``error``); the conversion id
    is read from the event Reddit echoes, None when it carries none."""
    found: Any = None
    for source in (answer, _dict(answer.get("data")), _dict(answer.get("error"))):
        if isinstance(source.get("invalid_events"), list):
            found = source["invalid_events"]
            break
    invalid: list[tuple[str | None, str]] = []
    for entry in found or ():
        entry = _dict(entry)
        message = entry.get("error_message")
        text = message.strip() if isinstance(message, str) and message.strip() else "invalid"
        echoed = _dict(entry.get("event"))
        metadata = _dict(echoed.get("metadata")) or _dict(echoed.get("event_metadata"))
        conversion_id = metadata.get("conversion_id")
        invalid.append((conversion_id if isinstance(conversion_id, str) else None, text))
    return invalid


def _detail(response: HttpResponse, answer: Mapping[str, Any]) -> str:
    message = _message(answer) if answer else None
    detail = f"HTTP {response.status}: Reddit: {message or response.text}"
    named = [text for _, text in invalid_events(answer)][:5]
    if named:
        detail += "; " + "; ".join(named)
    return detail


def classify_reddit_response(response: HttpResponse) -> Outcome:
    """The outcome of one answer, as a whole request (see the module docstring's table; a
    400 naming invalid events is ``Dead(reddit_invalid_events)`` here:
    :class:`RedditForwarder` sorts out which events it names)."""
    status = response.status
    if 200 <= status < 300:
        return Delivered()
    answer = json_object(response.body)
    detail = _detail(response, answer)
    if status == 400 and invalid_events(answer):
        return Dead("reddit_invalid_events", detail)
    if status == 401:
        return Dead("reddit_unauthorized", detail)
    if status == 403:
        return Dead("reddit_forbidden", detail)
    shared = classify_status(response)
    if isinstance(shared, Retry):
        return Retry(shared.reason, detail, shared.after_secs)
    return Dead("reddit_invalid_request" if status == 400 else "reddit_error", detail)


# -- the forwarder -------------------------------------------------------------------------


class RedditForwarder(ConversionsForwarder[RedditConfig]):
    config_model = RedditConfig
    platform = "reddit"
    standard_events = "reddit"
    extra_standard_events = frozenset(_V3_NAME)
    """Both spellings of Reddit's standard events (LEAD, Lead)."""
    max_events_per_request = MAX_EVENTS_PER_REQUEST
    max_event_age_secs = MAX_EVENT_AGE_SECS

    def __init__(self, config: RedditConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        if config.api_version == "v3":
            self._url = f"{config.base_url}/api/v3/pixels/{config.pixel_id}/conversion_events"
        else:
            self._url = f"{config.base_url}/api/v2.0/conversions/events/{config.pixel_id}"
        self._batch = b""
        self._alone: set[int] = set()
        """Events of the batch in flight to send one per request (Reddit refused a request
        of them without saying which event was the bad one)."""

    # -- requests ------------------------------------------------------------------------

    def requests(self, conversions: Sequence[Conversion]) -> Iterable[PlannedRequest]:
        """Chunks of 1,000 in batch order (one event each with ``test_id``); the events to
        send alone one per request."""
        size = 1 if self.config.test_id else self.max_events_per_request
        for start in range(0, len(conversions), size):
            chunk = conversions[start : start + size]
            together = [c for c in chunk if c.index not in self._alone]
            if together:
                yield PlannedRequest(self.request(together), tuple(c.index for c in together))
            for c in chunk:
                if c.index in self._alone:
                    yield PlannedRequest(self.request([c]), (c.index,))

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        config = self.config
        events = [self._event(c) for c in conversions]
        body: dict[str, Any]
        if config.api_version == "v3":
            data: dict[str, Any] = {"events": events}
            if config.test_id:
                data["test_id"] = config.test_id
            body = {"data": data}
        else:
            body = {"events": events}
            if config.test_id:
                body["test_mode"] = True
        headers = {
            "Authorization": f"Bearer {config.access_token.get_secret_value()}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        return HttpRequest("POST", self._url, headers, orjson.dumps(body))

    def secrets(self) -> Iterable[str]:
        return (self.config.access_token.get_secret_value(),)

    # -- answers -------------------------------------------------------------------------

    async def deliver(self, events: list[Event]) -> Outcome:
        batch = hashlib.sha256(orjson.dumps([e.get("messageId") for e in events])).digest()
        if batch != self._batch:
            self._batch, self._alone = batch, set()
        outcome = await super().deliver(events)
        if not isinstance(outcome, Retry):  # a retry brings the same batch back
            self._batch, self._alone = b"", set()
        return outcome

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome | Refused:
        """Reddit's answer (``classify_reddit_response``); a 400 naming invalid events is
        ``Refused`` for those of the request it names (the base sends the others again at
        once), or, when it names none that can be told apart, a ``Retry`` at once with the
        request's events to be sent one per request."""
        outcome = classify_reddit_response(response)
        if not (isinstance(outcome, Dead) and outcome.reason == "reddit_invalid_events"):
            return outcome
        named = invalid_events(json_object(response.body))
        if len(planned.indices) == 1:
            return Refused(outcome.reason, outcome.detail, {0: f"Reddit: {named[0][1]}"})
        positions: dict[str, list[int]] = {}
        for at, conversion_id in enumerate(_conversion_ids(planned.request.body)):
            if conversion_id is not None:
                positions.setdefault(conversion_id, []).append(at)
        rejected: dict[int, str] = {}
        for conversion_id, text in named:
            for at in positions.get(conversion_id, []) if conversion_id is not None else []:
                rejected.setdefault(at, f"Reddit: {text}")
        if rejected:
            # An invalid event named without a conversion id of this request is still
            # there: the request without these is refused again, naming only that one.
            return Refused(outcome.reason, outcome.detail, rejected)
        self._alone.update(planned.indices)
        return Retry("reddit_invalid_events", outcome.detail, 0.0)

    # -- one event -----------------------------------------------------------------------

    def _event(self, c: Conversion) -> dict[str, Any]:
        config = self.config
        v3 = config.api_version == "v3"
        tracking = _V3_NAME.get(c.name) if c.standard else None
        if tracking is None:
            kind: dict[str, str] = {
                "tracking_type": CUSTOM[config.api_version],
                "custom_event_name": c.name[:MAX_CUSTOM_EVENT_NAME],
            }
        else:
            kind = {"tracking_type": tracking if v3 else TRACKING_TYPES[tracking]}
        event: dict[str, Any]
        if v3:
            event = {
                "event_at": epoch_millis(c.time),
                "action_source": config.action_source,
                "type": kind,
            }
            if c.page_url and config.action_source == "WEBSITE":
                event["event_source_url"] = c.page_url
        else:
            event = {"event_at": iso(c.time), "event_type": kind}
        click_id = c.user.click_ids.get("rdt_cid")
        if click_id:
            event["click_id"] = click_id
        user = self._user(c)
        if user:
            event["user"] = user
        event["metadata" if v3 else "event_metadata"] = self._metadata(c, tracking, v3)
        return event

    def _user(self, c: Conversion) -> dict[str, Any]:
        values = c.prepared.values
        user: dict[str, Any] = {key: values[name] for name, key in _HASHED_KEYS if name in values}
        data = c.user
        if data.ip:
            user["ip_address"] = data.ip
        if data.user_agent:
            user["user_agent"] = data.user_agent
        uuid = data.browser_ids.get("_rdt_uuid")
        if uuid:
            user["uuid"] = uuid
        screen = _screen(c.event)
        if screen is not None:
            user["screen_dimensions"] = screen
        config = self.config
        if config.limited_data_use:
            options: dict[str, Any] = {"modes": ["LDU"]}
            if config.limited_data_use_country:
                options["country"] = config.limited_data_use_country
            if config.limited_data_use_region:
                options["region"] = config.limited_data_use_region
            user["data_processing_options"] = options
        return user

    @staticmethod
    def _metadata(c: Conversion, tracking: str | None, v3: bool) -> dict[str, Any]:
        facts = c.commerce
        metadata: dict[str, Any] = {}
        if c.event_id:
            metadata["conversion_id"] = c.event_id
        if tracking is None or tracking in VALUE_TYPES:
            if facts.currency is not None:
                metadata["currency"] = facts.currency
            if facts.value is not None:
                metadata["value" if v3 else "value_decimal"] = facts.value
        if (tracking is None or tracking in ITEM_COUNT_TYPES) and facts.num_items is not None:
            metadata["item_count"] = facts.num_items
        products = []
        for item in facts.items:
            if item.id is None:
                continue
            product: dict[str, Any] = {"id": item.id}
            if item.name is not None:
                product["name"] = item.name
            if item.category is not None:
                product["category"] = item.category
            if v3 and item.quantity is not None:
                product["quantity"] = item.quantity
            if v3 and item.price is not None:
                product["item_price"] = item.price
            products.append(product)
        if products:
            metadata["products"] = products
        return metadata


def _conversion_ids(body: bytes) -> list[str | None]:
    """The conversion id of each event of one of our requests, in order."""
    sent = json_object(body)
    events = _dict(sent.get("data")).get("events", sent.get("events"))
    ids: list[str | None] = []
    for event in events if isinstance(events, list) else ():
        event = _dict(event)
        metadata = _dict(event.get("metadata")) or _dict(event.get("event_metadata"))
        conversion_id = metadata.get("conversion_id")
        ids.append(conversion_id if isinstance(conversion_id, str) else None)
    return ids


def _screen(event: Event) -> dict[str, int] | None:
    """context.screen's width and height, when both are positive whole numbers."""
    screen = _dict(_dict(event.get("context")).get("screen"))
    width, height = screen.get("width"), screen.get("height")
    sizes = []
    for size in (width, height):
        if isinstance(size, bool) or not isinstance(size, int | float):
            return None
        if size <= 0 or size != int(size) or size > 100_000:
            return None
        sizes.append(int(size))
    return {"width": sizes[0], "height": sizes[1]}
