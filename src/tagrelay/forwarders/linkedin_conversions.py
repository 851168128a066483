"""``linkedin``: LinkedIn's Conversions API, on the shared conversions layer (``_conversions``).

``POST {base_url}/rest/conversionEvents`` with a JSON body ``{"elements": [...]}`` of at
most 5,000 conversion events and the headers ``Authorization: Bearer <access token>``,
``LinkedIn-Version: <api_version>`` (a month, ``YYYYMM``: LinkedIn supports each for about a
year), ``X-Restli-Protocol-Version: 2.0.0`` and ``X-RestLi-Method: BATCH_CREATE``
(destinations.md §5).

**The access token** is either ``access_token`` as configured (LinkedIn's last 60 days), or
fetched with ``oauth`` (the app's client id and secret and a member's refresh token, which
lasts a year) at ``token_url`` (``_google_auth.TokenProvider.for_refresh_token``: cached
until a minute before it expires; a 401 drops it and fetches a new one once; a refused
refresh token dead-letters the batch with LinkedIn's words, ``token_invalid_grant``).

**Which events, as which conversion rule.** LinkedIn's conversion events name no event: each
names a *conversion rule* of the ad account whose conversion method is "Conversions API".
``conversions: [{event, conversion_rule_id}]`` says which events go to which rule, matched
by ``_conversions.ConfiguredEvents`` (exactly, then ignoring case and spaces, then by
meaning: an entry for ``purchase`` also takes Segment's ``Order Completed``; page and screen
calls are ``page_view``). Other events are not sent (``no_conversion_rule``). The layer does
the rest as for every ad platform: ``ads`` consent, user data only under ``ad_user_data``,
the age window (LinkedIn refuses events older than 90 days: ``too_old``), user data
normalized by LinkedIn's row of ``_user_data.RULES``.

Each element::

    conversion            urn:lla:llaPartnerConversion:<conversion_rule_id>
    conversionHappenedAt  the event time in epoch milliseconds
    conversionValue       {currencyCode, amount}: the amount as a decimal string ("65.5"),
                          sent when the event has both a value and a currency
    eventId               the event's messageId: the Insight Tag's event_id for the same
                          action, so that LinkedIn keeps one of the two
    user.userIds          SHA256_EMAIL (SHA-256 of the trimmed, lowercased email) and
                          LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID (the li_fat_id click id,
                          kept by the relay from the landing URL); always present, empty if
                          need be (LinkedIn refuses an element without it)
    user.userInfo         firstName, lastName (plain text), and title, companyName
                          (traits.title, traits.company.name or traits.company) and
                          countryCode (ISO 3166-1 alpha-2); only with both names, which
                          LinkedIn requires in userInfo, and only under ad_user_data
    user.externalIds      [userId] as it is (LinkedIn reads the first only)

An event with neither an email, an li_fat_id nor both names cannot be matched to a member:
not sent (``no_match_key``).

LinkedIn's answers (a Rest.li error is ``{"status", "serviceErrorCode", "code",
"message"}``; classified as destinations.md §12 gives them):

=============================================  =============================================
the answer                                     outcome
=============================================  =============================================
2xx                                            ``Delivered``; elements whose ``status`` in
                                               the answer's ``elements`` is an error are
                                               rejected (dead letters with LinkedIn's
                                               words), unless every one failed with a 429
                                               or 5xx: ``Retry(linkedin_transient)``
422 naming elements (``Index: N, ERROR ::      LinkedIn took none of the request: those
<field> :: <message>`` lines)                  elements become dead letters with their
                                               lines, and the others are sent again at once
                                               without them (``_batched.Refused``)
422 naming none                                ``Dead(linkedin_invalid)``
401 (after the one refresh ``oauth`` makes)    ``Dead(linkedin_unauthorized)``
403                                            ``Dead(linkedin_permission)``: also what
                                               LinkedIn answers for a conversion rule it
                                               does not find ("No ad accounts found")
426, or a ``*VERSION*`` code                   ``Dead(linkedin_version)``: api_version is
                                               not (or no longer) served
429, 5xx, 408                                  the shared table: ``Retry`` (Retry-After
                                               honoured), LinkedIn's words in the detail
other 4xx                                      ``Dead(linkedin_error)``
=============================================  =============================================

A detail carries LinkedIn's status, code and message; the access token, client secret and
refresh token are scrubbed (``secrets``), and so is anything shaped like an email address.
The forwarder reads up to 8 MiB of an answer (``max_response_bytes``): a BATCH_CREATE
answer lists every element's status, a 422 an error per refused element, for up to 5,000
elements. An answer cut all the same is not JSON any more; a 2xx one counts as delivered
(logged as cut).

There is no test mode: to try a setup, map the events to a conversion rule made for the
purpose, and remove it from ``conversions`` afterwards.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Literal

import orjson
from pydantic import Field, SecretStr, field_validator, model_validator

from tagrelay.config.common import ConfigModel
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import PlannedRequest, Refused
from tagrelay.forwarders._conversions import (
    ConfiguredEvents,
    Conversion,
    ConversionsConfig,
    ConversionsForwarder,
    epoch_millis,
    named_event,
)
from tagrelay.forwarders._google_auth import TokenProvider
from tagrelay.forwarders._http import (
    HttpRequest,
    HttpResponse,
    classify_status,
    json_object,
)
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry

__all__ = [
    "ConversionRuleConfig",
    "LinkedInConfig",
    "LinkedInForwarder",
    "LinkedInOAuthConfig",
    "classify_linkedin_response",
    "conversion_amount",
    "refused_elements",
]

BASE_URL: Final = "https://api.linkedin.com"
API_VERSION: Final = "202607"
"""A version LinkedIn's documentation serves today (it sunsets each about a year after its
release: 202510 on 2026-10-15, 202511 on 2026-11-16)."""
TOKEN_URL: Final = "https://www.linkedin.com/oauth/v2/accessToken"  # noqa: S105 (a URL)
MAX_EVENTS_PER_REQUEST: Final = 5000
MAX_EVENT_AGE_SECS: Final = 90 * 86_400.0
CONVERSION_URN: Final = "urn:lla:llaPartnerConversion:"
EMAIL_ID: Final = "SHA256_EMAIL"
CLICK_ID: Final = "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID"
MAX_DETAIL_CHARS: Final = 1500
MAX_TEXT_CHARS: Final = 256
"""A title or company name longer than this is not one (and is left out)."""

_RULE_ID = re.compile(r"(?:urn:lla:llaPartnerConversion:)?([0-9]{1,20})")
# One line of a 422's message: "Index: 3, ERROR :: /user/userIds :: field is required ...";
# the lines after it without an index are about the same element.
_INDEX_LINE = re.compile(r"^\s*Index:\s*([0-9]+)\s*,\s*(.*)$")
_EMAIL_LIKE = re.compile(r"[^@\s\"'<>(),;:]+@[^@\s\"'<>(),;:]+\.[A-Za-z]{2,}")

# What the layer counts that reaches LinkedIn: userInfo (names, country) only goes with both
# names; no phone, IP or user agent.
_SENT_MATCH_KEYS: Final = frozenset({"email", "name", "address", "external_id", "click_id"})
_USER_INFO_FIELD_DROPS: Final = frozenset(
    {"invalid_first_name", "invalid_last_name", "invalid_country"}
)


# -- configuration -------------------------------------------------------------------------


class LinkedInOAuthConfig(ConfigModel):
    """The LinkedIn app (developer portal > My apps > the app > Auth) and a refresh token of
    a member who can manage the ad account, with the rw_conversions scope."""

    client_id: str = Field(
        min_length=1, description="The app's client id.", examples=["86abcdefgh1234"]
    )
    client_secret: SecretStr = Field(
        min_length=1,
        description="The app's primary client secret. Never logged.",
        examples=["${LINKEDIN_CLIENT_SECRET}"],
    )
    refresh_token: SecretStr = Field(
        min_length=1,
        description=(
            "A refresh token issued to the app for a member of the ad account (LinkedIn "
            "issues them with programmatic refresh enabled; valid for a year). Never logged."
        ),
        examples=["${LINKEDIN_REFRESH_TOKEN}"],
    )


class ConversionRuleConfig(ConfigModel):
    """An event name and the conversion rule its events are reported as."""

    event: str = Field(
        min_length=1,
        description=(
            "The event's name: a track event (Segment's or GA4's name, matched exactly, then "
            "ignoring case and spaces, then by meaning: purchase also takes Order Completed), "
            "or page_view for page and screen calls."
        ),
        examples=["Order Completed"],
    )
    conversion_rule_id: str = Field(
        description=(
            "The conversion rule's id (Campaign Manager > Analyze > Conversion tracking > the "
            "rule, made with the Conversions API as its data source), or its URN "
            "urn:lla:llaPartnerConversion:<id>."
        ),
        examples=["12345678"],
    )

    @field_validator("event")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("an event name must not be blank")
        return value

    @field_validator("conversion_rule_id", mode="before")
    @classmethod
    def _rule_id(cls, value: Any) -> str:
        text = str(value).strip() if isinstance(value, str | int) else ""
        match = _RULE_ID.fullmatch(text)
        if match is None:
            raise ValueError(
                f"{value!r} is not a conversion rule id: expected its digits (12345678) or "
                "its URN (urn:lla:llaPartnerConversion:12345678)"
            )
        return match.group(1)


class LinkedInConfig(ConversionsConfig):
    """LinkedIn Conversions API: conversions reported from the server to conversion rules of
    a LinkedIn ad account, matched to members by hashed email, the li_fat_id click id and
    name, deduplicated against the Insight Tag by event id."""

    type: Literal["linkedin"] = Field(description="Forwarder type.", examples=["linkedin"])
    access_token: SecretStr | None = Field(
        None,
        min_length=1,
        description=(
            "A member's access token with the rw_conversions scope (LinkedIn's expire after "
            "60 days: prefer oauth, which renews them). Set this or oauth. Never logged."
        ),
        examples=["${LINKEDIN_ACCESS_TOKEN}"],
    )
    oauth: LinkedInOAuthConfig | None = Field(
        None,
        description=(
            "The app's client and a member's refresh token, exchanged at token_url for "
            "access tokens (renewed before they expire, and after a 401). Set this or "
            "access_token."
        ),
        examples=[
            {
                "client_id": "86abcdefgh1234",
                "client_secret": "${LINKEDIN_CLIENT_SECRET}",
                "refresh_token": "${LINKEDIN_REFRESH_TOKEN}",
            }
        ],
    )
    token_url: str = Field(
        TOKEN_URL,
        pattern=r"^https?://",
        description="LinkedIn's OAuth 2.0 token endpoint (for oauth).",
        examples=[TOKEN_URL],
    )
    conversions: list[ConversionRuleConfig] = Field(
        min_length=1,
        description=(
            "Which events are reported, as which conversion rule; each event name once. "
            "Events without an entry are not sent (counted as no_conversion_rule)."
        ),
        examples=[
            [
                {"event": "Order Completed", "conversion_rule_id": "12345678"},
                {"event": "Demo Requested", "conversion_rule_id": "12345679"},
            ]
        ],
    )
    events: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Not used by linkedin (its events name no event): map event names to conversion "
            "rules under conversions. Must stay empty."
        ),
        examples=[{}],
    )
    unmapped: Literal["skip"] = Field(
        "skip",
        description=(
            "Always skip for linkedin: an event without a conversion rule in conversions is "
            "not sent (counted as no_conversion_rule)."
        ),
        examples=["skip"],
    )
    base_url: str = Field(
        BASE_URL,
        description="The LinkedIn Marketing API's scheme and host (no trailing slash).",
        examples=[BASE_URL],
    )
    api_version: str = Field(
        API_VERSION,
        pattern=r"^[0-9]{6}$",
        description=(
            "The LinkedIn-Version header, a month as YYYYMM; LinkedIn sunsets each version "
            "about a year after its release (a sunset one is answered with HTTP 426)."
        ),
        examples=[API_VERSION],
    )

    @field_validator("events")
    @classmethod
    def _no_events(cls, value: dict[str, str]) -> dict[str, str]:
        if value:
            raise ValueError(
                "linkedin conversions name no events: list each event under conversions "
                "with its conversion_rule_id instead"
            )
        return value

    @model_validator(mode="after")
    def _credentials_and_events(self) -> LinkedInConfig:
        if self.access_token is not None and self.oauth is not None:
            raise ValueError(
                "access_token and oauth are both set; keep one (oauth renews the token)"
            )
        if self.access_token is None and self.oauth is None:
            raise ValueError(
                "no credentials: set oauth (client_id, client_secret, refresh_token) or "
                "access_token"
            )
        repeated = ConfiguredEvents.repeated(entry.event for entry in self.conversions)
        if repeated:
            raise ValueError(
                "conversions lists an event more than once (names match ignoring case and "
                "spaces): " + ", ".join(repeated) + "; keep one entry per event"
            )
        return self


# -- LinkedIn's answers ----------------------------------------------------------------------


def conversion_amount(value: int | float) -> str:
    """The amount as LinkedIn takes it: a decimal string, never in exponent form
    (``65.5`` -> ``"65.5"``, ``1e-05`` -> ``"0.00001"``)."""
    try:
        return format(Decimal(str(value)), "f")
    except InvalidOperation:  # pragma: no cover - the layer only passes finite numbers
        return str(value)


def _scrub_emails(text: str) -> str:
    return _EMAIL_LIKE.sub("<email>", text)


def _said(status: int, error: Mapping[str, Any], fallback: str, prefix: str = "") -> str:
    """``HTTP 403: LinkedIn ACCESS_DENIED (serviceErrorCode 100): <message>`` (``prefix``
    instead of ``HTTP 403: LinkedIn`` when given)."""
    code = error.get("code")
    service = error.get("serviceErrorCode")
    message = error.get("message")
    parts = [prefix or f"HTTP {status}: LinkedIn"]
    if isinstance(code, str) and code:
        parts.append(code)
    if isinstance(service, int) and not isinstance(service, bool):
        parts.append(f"(serviceErrorCode {service})")
    text = " ".join(parts)
    said = message if isinstance(message, str) and message.strip() else fallback
    if said:
        text += ": " + " ".join(said.split())
    return _scrub_emails(text)[:MAX_DETAIL_CHARS]


def refused_elements(message: str, elements: int) -> dict[int, str]:
    """The elements a 422's message names (``Index: N, ERROR :: <field> :: <message>``, the
    lines after it without an index about the same element), each with its lines joined;
    positions outside the request's ``elements`` are ignored. A request of one element is
    the one meant by lines without an index."""
    found: dict[int, list[str]] = {}
    current: int | None = None
    loose: list[str] = []
    for line in message.splitlines():
        match = _INDEX_LINE.match(line)
        if match is not None:
            current = int(match.group(1))
            text = match.group(2).strip()
        else:
            text = line.strip()
        if not text:
            continue
        text = text.removeprefix("ERROR ::").strip()
        if current is None:
            loose.append(text)
        elif 0 <= current < elements:
            found.setdefault(current, []).append(text)
    if not found and loose and elements == 1:
        found[0] = loose
    return {
        at: _scrub_emails("LinkedIn 422: " + "; ".join(lines))[:MAX_DETAIL_CHARS]
        for at, lines in sorted(found.items())
    }


def classify_linkedin_response(response: HttpResponse, elements: int) -> Outcome | Refused:
    """The outcome of one ``conversionEvents`` answer to a request of ``elements`` events
    (see the module docstring's table)."""
    status = response.status
    body = json_object(response.body)
    if 200 <= status < 300:
        return _per_element(body, elements, status)
    detail = _said(status, body, response.text)
    code = body.get("code")
    if status == 422:
        message = body.get("message")
        named = refused_elements(message if isinstance(message, str) else response.text, elements)
        if named:
            return Refused("linkedin_invalid", detail, named)
        return Dead("linkedin_invalid", detail)
    if status == 426 or (isinstance(code, str) and "VERSION" in code):
        return Dead("linkedin_version", detail + " (set api_version to a version LinkedIn serves)")
    if status == 401:
        return Dead("linkedin_unauthorized", detail)
    if status == 403:
        return Dead("linkedin_permission", detail)
    shared = classify_status(response)
    if isinstance(shared, Retry):
        return Retry(shared.reason, detail, shared.after_secs)
    return Dead("linkedin_error", detail)


def _per_element(body: Mapping[str, Any], elements: int, status: int) -> Outcome:
    """A 2xx answer: a BATCH_CREATE answer lists one ``{"status": ...}`` per element."""
    listed = body.get("elements")
    if not isinstance(listed, list):
        return Delivered()
    failed: dict[int, str] = {}
    transient = 0
    for at, element in enumerate(listed[:elements]):
        if not isinstance(element, dict):
            continue
        code = element.get("status")
        if not isinstance(code, int) or isinstance(code, bool) or code < 400:
            continue
        error = element.get("error")
        prefix = f"LinkedIn element status {code}"
        failed[at] = _said(code, error if isinstance(error, dict) else {}, "", prefix)
        if code == 429 or code >= 500:
            transient += 1
    if failed and transient == len(failed) == elements:
        detail = f"HTTP {status}: every element failed transiently: {failed[0]}"
        return Retry("linkedin_transient", detail[:MAX_DETAIL_CHARS])
    return Delivered(rejected=failed)


# -- the forwarder ---------------------------------------------------------------------------


class LinkedInForwarder(ConversionsForwarder[LinkedInConfig]):
    # A 422 lists an error per refused element, up to 5,000 elements.
    max_response_bytes = 8 * 1024 * 1024
    config_model = LinkedInConfig
    platform = "linkedin"
    standard_events = None
    max_events_per_request = MAX_EVENTS_PER_REQUEST
    max_event_age_secs = MAX_EVENT_AGE_SECS
    """LinkedIn refuses events older than 90 days (destinations.md §5)."""
    payload_match_keys = _SENT_MATCH_KEYS
    platform_event_drop_reasons = frozenset({"no_conversion_rule", "no_match_key"})

    def __init__(self, config: LinkedInConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self.tokens: TokenProvider | None = None
        if config.oauth is not None:
            self.tokens = TokenProvider.for_refresh_token(
                config.oauth.client_id,
                config.oauth.client_secret.get_secret_value(),
                config.oauth.refresh_token.get_secret_value(),
                config.token_url,
                timeout_secs=config.timeout_secs,
            )
        self.rules = ConfiguredEvents(
            (entry.event, CONVERSION_URN + entry.conversion_rule_id) for entry in config.conversions
        )
        self._url = f"{config.base_url}/rest/conversionEvents"
        self._headers = {
            "Content-Type": "application/json",
            "LinkedIn-Version": config.api_version,
            "X-Restli-Protocol-Version": "2.0.0",
            "X-RestLi-Method": "BATCH_CREATE",
        }

    # -- which events, as which rule ---------------------------------------------------

    def event_name(self, event: Event) -> tuple[str, bool, str | None] | str:
        """The conversion rule's URN stands for the event name."""
        named = named_event(event)
        if isinstance(named, str):
            return named
        name, canonical = named
        rule = self.rules.target(name, canonical)
        if rule is None:
            return "no_conversion_rule"
        return rule, True, canonical

    def convert(
        self, index: int, event: Event, now: datetime, drops: Counter[str]
    ) -> Conversion | None:
        conversion = super().convert(index, event, now, drops)
        if conversion is None:
            return None
        user_info = self._user_info(conversion) is not None
        if not (_user_ids(conversion) or user_info):
            drops["no_match_key"] += 1
            return None
        if user_info:
            return conversion
        # Names and country go only in userInfo, which needs both names.
        return replace(
            conversion,
            match_keys=conversion.match_keys - {"name", "address"},
            field_drops={
                reason: n
                for reason, n in conversion.field_drops.items()
                if reason not in _USER_INFO_FIELD_DROPS
            },
        )

    # -- the request -------------------------------------------------------------------

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        body = {"elements": [self._element(c) for c in conversions]}
        return HttpRequest("POST", self._url, dict(self._headers), orjson.dumps(body))

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome | Refused:
        return classify_linkedin_response(response, len(planned.indices))

    async def authorize(
        self, request: HttpRequest, *, refresh: bool = False
    ) -> HttpRequest | Retry | Dead:
        if self.tokens is not None:
            return await self.tokens.authorize(self.context.http, request, refresh=refresh)
        token = self.config.access_token.get_secret_value() if self.config.access_token else ""
        return replace(request, headers={**request.headers, "Authorization": f"Bearer {token}"})

    def unauthorized(self, response: HttpResponse) -> bool:
        # Only a token from oauth can be renewed; a configured one is LinkedIn's to refuse.
        return response.status == 401 and self.tokens is not None

    def secrets(self) -> Iterable[str]:
        if self.tokens is not None:
            return self.tokens.secrets()
        token = self.config.access_token
        return (token.get_secret_value(),) if token is not None else ()

    # -- one element -------------------------------------------------------------------

    def _element(self, c: Conversion) -> dict[str, Any]:
        element: dict[str, Any] = {
            "conversion": c.name,
            "conversionHappenedAt": epoch_millis(c.time),
        }
        facts = c.commerce
        if facts.value is not None and facts.currency is not None:
            element["conversionValue"] = {
                "currencyCode": facts.currency,
                "amount": conversion_amount(facts.value),
            }
        element["eventId"] = c.event_id
        user: dict[str, Any] = {"userIds": _user_ids(c)}
        info = self._user_info(c)
        if info is not None:
            user["userInfo"] = info
        external_id = c.prepared.values.get("external_id")
        if external_id:
            user["externalIds"] = [external_id]
        element["user"] = user
        return element

    @staticmethod
    def _user_info(c: Conversion) -> dict[str, str] | None:
        values = c.prepared.values
        first, last = values.get("first_name"), values.get("last_name")
        if not first or not last:
            return None
        info = {"firstName": first, "lastName": last}
        # Not user data the layer reads: read here, under the same consent.
        if c.user_data_granted:
            title, company = _title_and_company(c.event)
            if title:
                info["title"] = title
            if company:
                info["companyName"] = company
        country = values.get("country")
        if country:
            info["countryCode"] = country
        return info


def _user_ids(c: Conversion) -> list[dict[str, str]]:
    ids = []
    email = c.prepared.values.get("email")
    if email:
        ids.append({"idType": EMAIL_ID, "idValue": email})
    click = c.user.click_ids.get("li_fat_id")
    if click:
        ids.append({"idType": CLICK_ID, "idValue": click})
    return ids


def _title_and_company(event: Event) -> tuple[str | None, str | None]:
    """``title`` and the company's name from the traits (Segment's identify spec:
    ``company.name``, or ``company`` as text), first of ``traits``, ``context.traits``."""
    context = event.get("context")
    sources = [event.get("traits"), context.get("traits") if isinstance(context, dict) else None]
    title = company = None
    for traits in sources:
        if not isinstance(traits, dict):
            continue
        if title is None:
            title = _short_text(traits.get("title"))
        if company is None:
            value = traits.get("company")
            company = _short_text(value.get("name") if isinstance(value, dict) else value)
    return title, company


def _short_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    return text if 0 < len(text) <= MAX_TEXT_CHARS else None
