"""``google_ads``: Google Ads click conversions and enhanced conversions for leads, on the
shared conversions layer (``_conversions``).

``POST {base_url}/{api_version}/customers/{customer_id}:uploadClickConversions`` with a JSON
body ``{"conversions": [...], "partialFailure": true, "validateOnly": true?}`` of at most
2,000 conversions (destinations.md §3), headers ``Authorization: Bearer <access token>``
(``_google_auth``: a refresh token or a service account, refreshed once on a 401),
``developer-token`` and, through a manager account, ``login-customer-id``.

Google Ads uploads name no events: each conversion names a *conversion action* (type
"Import from clicks", ``UPLOAD_CLICKS``). The ``conversions`` option says which events go to
which action (``{event: "Order Completed", conversion_action:
"customers/123/conversionActions/456"}``); an event's name matches an entry exactly, then
ignoring case and spaces, then by meaning (the layer's canonical names: an entry for
``purchase`` also takes Segment's ``Order Completed`` and gtag's ``purchase``; page and
screen calls are ``page_view``). Events that match none are not sent
(``no_conversion_action``). The layer does the rest as for every ad platform: consent
(``ads`` required; user data only under ``ad_user_data``), the age window, user data
normalized by Google's rules and hashed, commerce fields.

Each conversion::

    gclid | wbraid | gbraid   the click id (context.clickIds, or the landing URL's query),
                              one only, as Google requires: gclid wins (it identifies the
                              click itself), then wbraid (iOS web conversions: the relay's
                              are web events), then gbraid (iOS app conversions)
    conversionAction          the resource name configured for the event
    conversionDateTime        the event time, "yyyy-mm-dd hh:mm:ss+00:00" (UTC)
    conversionValue, currencyCode, orderId   from the commerce fields (orderId: order_id,
                              else transaction_id; Google deduplicates on it)
    userIdentifiers           [{hashedEmail}, {hashedPhoneNumber}] (each object one
                              identifier, userIdentifierSource FIRST_PARTY): SHA-256 of the
                              email (gmail: no dots, no +suffix) and the E.164 phone
                              (with "+"), Google's rules in ``_user_data``; only under
                              ad_user_data consent. Click conversion uploads take only
                              these two (names and address are for adjustments), so that a
                              lead without a click id still matches (enhanced conversions
                              for leads)
    consent                   {adUserData, adPersonalization}: GRANTED / DENIED from
                              context.consent (a category it does not state is left out)

An event with neither a click id nor an identifier cannot match anything: not sent
(``no_match_key``). Events older than 90 days (the longest click-through window a
conversion action can have) are ``too_old``; a younger one outside its action's own window
comes back from Google as ``EXPIRED_EVENT`` and becomes a dead letter.

Errors (Google's REST error JSON ``{"error": {"code", "message", "status", "details":
[{"errors": [{"errorCode": {"<kind>": "<CODE>"}, "message", "location"}], "requestId"}]}}``):

=====================================================  ===================================
the answer                                             outcome
=====================================================  ===================================
2xx without ``partialFailureError``                    ``Delivered``
2xx with ``partialFailureError``: row errors located   ``Delivered`` with those rows
at ``conversions[N]``                                  rejected (dead letters with
                                                       Google's code and message); a row
                                                       that is ``CLICK_CONVERSION_ALREADY_
                                                       EXISTS`` only is already in Google
                                                       (a re-sent upload): delivered
... every row failed, each with a transient code       ``Retry(google_ads_transient)``
... errors on no row: the rows with an empty result    rejected with them; without one
                                                       result per row,
                                                       ``Dead(google_ads_partial_failure)``
429, ``RESOURCE_EXHAUSTED``,                           ``Retry(google_ads_rate_limited)``
``RESOURCE_TEMPORARILY_EXHAUSTED``                     (the error's retryDelay or
                                                       Retry-After honoured)
5xx, ``TRANSIENT_ERROR``, ``INTERNAL_ERROR``,          ``Retry(google_ads_transient)``
``DEADLINE_EXCEEDED``
a ``*DEVELOPER_TOKEN*`` code (no token refresh)        ``Dead(google_ads_developer_token)``
401 (after the one refresh the shell makes)            ``Dead(google_ads_unauthenticated)``
403, ``PERMISSION_DENIED``                             ``Dead(google_ads_permission_denied)``
other 4xx                                              ``Dead(google_ads_request_error)``
not Google's error JSON                                the shared status table
=====================================================  ===================================

A row Google refuses only for now (``TOO_RECENT_EVENT``: its click is under 6 hours old;
a transient error on some rows while others went through) is a dead letter too: the
shell retries requests, not single events, and re-sending the rows Google took would
count leads without a click id or order id twice. Such dead letters can be replayed.

A dead letter's detail is Google's words: HTTP status, gRPC status, each error's
``kind.CODE: message`` and the request id; the developer token, OAuth secrets and access
tokens are scrubbed (``secrets``), and so is anything shaped like an email address.

**Large answers.** The forwarder reads up to 8 MiB of an answer (``max_response_bytes``):
the row errors of a full 2,000-row upload, with every result. Google lists
``partialFailureError`` before ``results``, so an answer cut all the same is read by a
tolerant scan of its row errors (``scan_row_errors``): rows named in the part received are
rejected; rows after the cut, if any failed, cannot be told apart and count as delivered,
and a warning says so (``cut_in_row_errors``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

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
from tagrelay.forwarders._google_auth import GoogleCredentialsConfig, TokenProvider
from tagrelay.forwarders._http import (
    HttpRequest,
    HttpResponse,
    classify_status,
    parse_retry_after,
)
from tagrelay.logthrottle import LogThrottle
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry

__all__ = [
    "ConversionActionConfig",
    "GoogleAdsConfig",
    "GoogleAdsForwarder",
    "RowError",
    "classify_google_ads_response",
    "cut_in_row_errors",
    "google_date_time",
    "scan_row_errors",
]

log = logging.getLogger(__name__)

BASE_URL: Final = "https://googleads.googleapis.com"
API_VERSION: Final = "v26"
"""The latest active version (destinations.md §3, A2)."""
MAX_CONVERSIONS_PER_REQUEST: Final = 2000
MAX_EVENT_AGE_SECS: Final = 90 * 86_400.0
"""The longest click-through window a conversion action can have."""
MAX_USER_IDENTIFIERS: Final = 5
CLICK_ID_ORDER: Final = ("gclid", "wbraid", "gbraid")
"""Which click id is sent when an event has several (Google takes exactly one)."""

RATE_LIMIT_CODES: Final = frozenset({"RESOURCE_EXHAUSTED", "RESOURCE_TEMPORARILY_EXHAUSTED"})
TRANSIENT_CODES: Final = frozenset({"TRANSIENT_ERROR", "INTERNAL_ERROR", "DEADLINE_EXCEEDED"})
TRANSIENT_STATUSES: Final = frozenset({"UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"})
ALREADY_UPLOADED: Final = "CLICK_CONVERSION_ALREADY_EXISTS"
MAX_DETAIL_CHARS: Final = 1500

_CUSTOMER_ID = re.compile(r"[0-9]{3}-?[0-9]{3}-?[0-9]{4}")
_CONVERSION_ACTION = re.compile(r"customers/[0-9]{1,20}/conversionActions/[0-9]{1,20}")
_EMAIL_LIKE = re.compile(r"[^@\s\"'<>(),;:]+@[^@\s\"'<>(),;:]+\.[A-Za-z]{2,}")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)s")

# The tolerant scan of a cut answer (see the module docstring).
_SCAN_ERROR_CODE = re.compile(r'\{\s*"(\w+)"\s*:\s*"(\w+)"')
_SCAN_MESSAGE = re.compile(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)"')
_SCAN_ROW = re.compile(r'"fieldName"\s*:\s*"conversions"\s*(?:,\s*"index"\s*:\s*"?([0-9]+))?')
_SCAN_LOCATION_END = re.compile(r'"fieldPathElements"\s*:\s*\[[^\]]*\]')


# -- configuration -------------------------------------------------------------------------


def _digits_of_customer_id(value: str) -> str:
    value = value.strip()
    if not _CUSTOMER_ID.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Google Ads customer id: expected 10 digits, with or without "
            "dashes (123-456-7890), as shown at the top of the Google Ads UI"
        )
    return value.replace("-", "")


class ConversionActionConfig(ConfigModel):
    """An event name and the conversion action its events are uploaded as."""

    event: str = Field(
        min_length=1,
        description=(
            "The event's name: a track event (Segment's or GA4's name, matched exactly, then "
            "ignoring case and spaces, then by meaning: purchase also takes Order Completed), "
            "or page_view for page and screen calls."
        ),
        examples=["Order Completed"],
    )
    conversion_action: str = Field(
        description=(
            "The conversion action's resource name, customers/<customer id>/conversionActions/"
            "<action id> (the action id is the ctId in the action's URL in Google Ads). The "
            "action must be of type Import > Conversions from clicks (UPLOAD_CLICKS)."
        ),
        examples=["customers/1234567890/conversionActions/987654321"],
    )

    @field_validator("event")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("an event name must not be blank")
        return value

    @field_validator("conversion_action")
    @classmethod
    def _resource_name(cls, value: str) -> str:
        value = value.strip()
        if not _CONVERSION_ACTION.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a conversion action's resource name: expected "
                "customers/<customer id, digits only>/conversionActions/<action id>, such as "
                "customers/1234567890/conversionActions/987654321"
            )
        return value


class GoogleAdsConfig(GoogleCredentialsConfig, ConversionsConfig):
    """Google Ads click conversions and enhanced conversions for leads: conversions uploaded
    to conversion actions of type "Import from clicks", matched by the click id (gclid,
    wbraid, gbraid) and hashed email and phone."""

    type: Literal["google_ads"] = Field(description="Forwarder type.", examples=["google_ads"])
    customer_id: str = Field(
        description=(
            "The Google Ads account the conversions are uploaded to (the one that owns the "
            "conversion tracking), with or without dashes; sent without."
        ),
        examples=["123-456-7890"],
    )
    login_customer_id: str | None = Field(
        None,
        description=(
            "When the credentials reach customer_id through a manager account: the "
            "manager's customer id (sent as the login-customer-id header, without dashes)."
        ),
        examples=["987-654-3210"],
    )
    developer_token: SecretStr = Field(
        min_length=1,
        description=(
            "The Google Ads API developer token (manager account > Admin > API Center), "
            "approved for Basic or Standard access to reach real accounts. Never logged."
        ),
        examples=["${GOOGLE_ADS_DEVELOPER_TOKEN}"],
    )
    conversions: list[ConversionActionConfig] = Field(
        min_length=1,
        description=(
            "Which events are uploaded, as which conversion action; each event name once. "
            "Events without an entry are not sent (counted as no_conversion_action)."
        ),
        examples=[
            [
                {
                    "event": "Order Completed",
                    "conversion_action": "customers/1234567890/conversionActions/987654321",
                },
                {
                    "event": "Lead Generated",
                    "conversion_action": "customers/1234567890/conversionActions/987654322",
                },
            ]
        ],
    )
    validate_only: bool = Field(
        False,
        description=(
            "Google validates each upload and records nothing (its answer still lists "
            "every row's errors, which become dead letters): for checking a setup. Remove "
            "in production."
        ),
        examples=[True],
    )
    events: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Not used by google_ads (its uploads name no events): map event names to "
            "conversion actions under conversions. Must stay empty."
        ),
        examples=[{}],
    )
    unmapped: Literal["skip"] = Field(
        "skip",
        description=(
            "Always skip for google_ads: an event without a conversion action in "
            "conversions is not sent (counted as no_conversion_action)."
        ),
        examples=["skip"],
    )
    base_url: str = Field(
        BASE_URL,
        description="The Google Ads API's scheme and host (no trailing slash).",
        examples=[BASE_URL],
    )
    api_version: str = Field(
        API_VERSION,
        pattern=r"^v[0-9]+$",
        description=(
            "Google Ads API version in the path; Google sunsets each about a year after its "
            "release."
        ),
        examples=[API_VERSION],
    )

    @field_validator("customer_id")
    @classmethod
    def _customer_id(cls, value: str) -> str:
        return _digits_of_customer_id(value)

    @field_validator("login_customer_id")
    @classmethod
    def _login_customer_id(cls, value: str | None) -> str | None:
        return None if value is None else _digits_of_customer_id(value)

    @field_validator("events")
    @classmethod
    def _no_events(cls, value: dict[str, str]) -> dict[str, str]:
        if value:
            raise ValueError(
                "google_ads uploads name no events: list each event under conversions with "
                "its conversion_action instead"
            )
        return value

    @model_validator(mode="after")
    def _each_event_once(self) -> GoogleAdsConfig:
        repeated = ConfiguredEvents.repeated(entry.event for entry in self.conversions)
        if repeated:
            raise ValueError(
                "conversions lists an event more than once (names match ignoring case and "
                "spaces): " + ", ".join(repeated) + "; keep one entry per event"
            )
        return self


# -- Google's answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class RowError:
    """One error of a ``partialFailureError``: the row (position in the request) it is
    about, or None when Google located it elsewhere."""

    row: int | None
    code: str
    """``kind.CODE`` (``conversionUploadError.CLICK_NOT_FOUND``), or ``unknown``."""
    message: str

    @property
    def value(self) -> str:
        return self.code.rpartition(".")[2]


def google_date_time(moment: datetime) -> str:
    """``yyyy-mm-dd hh:mm:ss+00:00``: Google's conversion date time, in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _scrub_emails(text: str) -> str:
    return _EMAIL_LIKE.sub("<email>", text)


def _error_code(error: Mapping[str, Any]) -> str:
    for kind, value in _dict(error.get("errorCode")).items():
        if isinstance(value, str):
            return f"{kind}.{value}"
    return "unknown"


def _row_of(error: Mapping[str, Any]) -> int | None:
    """The ``conversions[N]`` of an error's location. An element without ``index`` is
    row 0 (proto3's JSON may leave out a zero)."""
    for element in _list(_dict(error.get("location")).get("fieldPathElements")):
        element = _dict(element)
        if element.get("fieldName") != "conversions":
            continue
        index = element.get("index", 0)
        if isinstance(index, str) and index.isdigit():
            return int(index)
        if isinstance(index, int) and not isinstance(index, bool):
            return index
        return None
    return None


def _errors_of(status: Mapping[str, Any]) -> tuple[list[RowError], list[str], float | None]:
    """A google.rpc Status's GoogleAdsFailure errors, request ids, and the longest
    ``quotaErrorDetails.retryDelay`` (seconds)."""
    errors: list[RowError] = []
    request_ids: list[str] = []
    delay: float | None = None
    for detail in _list(status.get("details")):
        detail = _dict(detail)
        request_id = detail.get("requestId")
        if isinstance(request_id, str) and request_id and request_id not in request_ids:
            request_ids.append(request_id)
        for error in _list(detail.get("errors")):
            error = _dict(error)
            message = error.get("message")
            errors.append(
                RowError(
                    _row_of(error), _error_code(error), message if isinstance(message, str) else ""
                )
            )
            quota = _dict(_dict(error.get("details")).get("quotaErrorDetails"))
            retry_delay = quota.get("retryDelay")
            match = _DURATION.fullmatch(retry_delay) if isinstance(retry_delay, str) else None
            if match:
                delay = max(delay or 0.0, float(match.group(1)))
    return errors, request_ids, delay


def scan_row_errors(text: str) -> list[RowError] | None:
    """The row errors of a 2xx answer cut off before its end (no longer JSON): each error
    object of ``partialFailureError`` received whole enough to name its row. None when the
    answer holds no ``partialFailureError``."""
    start = text.find('"partialFailureError"')
    if start < 0:
        return None
    results = text.find('"results"', start)
    scope = text[start : results if results >= 0 else len(text)]
    found: list[RowError] = []
    for part in scope.split('"errorCode"')[1:]:
        location = _SCAN_LOCATION_END.search(part)
        if location is None:
            continue  # cut before its location was complete
        row = _SCAN_ROW.search(location.group(0))
        code = _SCAN_ERROR_CODE.match(part.lstrip(" :\n\t\r"))
        message = _SCAN_MESSAGE.search(part)
        text_message = ""
        if message is not None:
            try:
                text_message = orjson.loads(f'"{message.group(1)}"')
            except orjson.JSONDecodeError:
                text_message = message.group(1)
        found.append(
            RowError(
                None if row is None else int(row.group(1) or 0),
                f"{code.group(1)}.{code.group(2)}" if code else "unknown",
                text_message,
            )
        )
    return found


def cut_in_row_errors(response: HttpResponse) -> bool:
    """A 2xx answer cut (by the shared size limit) before the end of its row errors: rows
    after the cut may have failed unreported."""
    if not 200 <= response.status < 300:
        return False
    body = response.body
    start = body.find(b'"partialFailureError"')
    if start < 0 or body.find(b'"results"', start) >= 0:
        return False
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return True
    return False


def _describe(errors: Sequence[RowError]) -> str:
    return "; ".join(f"{e.code}: {e.message}" if e.message else e.code for e in errors)


def _row_text(errors: Sequence[RowError], request_ids: Sequence[str], row: int) -> str:
    where = f"conversions[{row}]"
    ids = f"; request id {', '.join(request_ids)}" if request_ids else ""
    return _scrub_emails(f"Google Ads {_describe(errors)} (at {where}{ids})")[:MAX_DETAIL_CHARS]


def _partial_failure(
    failure: Mapping[str, Any] | None,
    scanned: list[RowError] | None,
    rows: int,
    status: int,
    results: Any = None,
) -> Outcome:
    if failure is not None:
        errors, request_ids, _ = _errors_of(failure)
        summary = failure.get("message")
    else:
        errors, request_ids, summary = scanned or [], [], None
    by_row: dict[int, list[RowError]] = {}
    for error in errors:
        if error.row is not None and 0 <= error.row < rows:
            by_row.setdefault(error.row, []).append(error)
    if not by_row and isinstance(results, list) and len(results) == rows and errors:
        # Errors Google located on no row, but one result per row: a failed row's
        # result is empty (partial failure guide), so those rows carry the errors.
        unlocated = [e for e in errors if e.row is None] or errors
        by_row = {row: unlocated for row, result in enumerate(results) if not result}
        if not by_row:
            return Delivered()
    if not by_row:
        said = _describe(errors) or (summary if isinstance(summary, str) else "")
        detail = f"HTTP {status}: Google Ads partial failure on no conversion: {said}"
        return Dead("google_ads_partial_failure", _scrub_emails(detail)[:MAX_DETAIL_CHARS])
    every_row_transient = len(by_row) == rows and all(
        e.value in TRANSIENT_CODES for row_errors in by_row.values() for e in row_errors
    )
    if every_row_transient:
        detail = f"HTTP {status}: every conversion failed transiently: {_describe(errors)}"
        return Retry("google_ads_transient", _scrub_emails(detail)[:MAX_DETAIL_CHARS])
    rejected = {
        row: _row_text(row_errors, request_ids, row)
        for row, row_errors in sorted(by_row.items())
        if any(e.value != ALREADY_UPLOADED for e in row_errors)
    }
    return Delivered(rejected=rejected)


def classify_google_ads_response(response: HttpResponse, rows: int) -> Outcome:
    """The outcome of one ``uploadClickConversions`` answer to a request of ``rows``
    conversions (see the module docstring's table)."""
    status = response.status
    try:
        parsed = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        parsed = None
    body = _dict(parsed)
    if 200 <= status < 300:
        if parsed is None:
            # Cut at the shared size limit, or not JSON at all: scan what arrived.
            scanned = scan_row_errors(response.body.decode("utf-8", "replace"))
            if scanned is None:
                return Delivered()
            return _partial_failure(None, scanned, rows, status)
        failure = body.get("partialFailureError")
        if not isinstance(failure, dict) or not failure:
            return Delivered()
        return _partial_failure(failure, None, rows, status, body.get("results"))
    error = body.get("error")
    if not isinstance(error, dict):
        return classify_status(response)
    errors, request_ids, delay = _errors_of(error)
    rpc_status = error.get("status") if isinstance(error.get("status"), str) else ""
    message = error.get("message") if isinstance(error.get("message"), str) else ""
    said = _describe(errors) or message
    detail = f"HTTP {status}" + (f" {rpc_status}" if rpc_status else "") + f": {said}"
    if request_ids:
        detail += f" (request id {', '.join(request_ids)})"
    detail = _scrub_emails(detail)[:MAX_DETAIL_CHARS]
    values = {e.value for e in errors}
    after = delay if delay is not None else parse_retry_after(response.headers.get("Retry-After"))
    if status == 429 or rpc_status == "RESOURCE_EXHAUSTED" or values & RATE_LIMIT_CODES:
        return Retry("google_ads_rate_limited", detail, after)
    if status >= 500 or rpc_status in TRANSIENT_STATUSES or values & TRANSIENT_CODES:
        return Retry("google_ads_transient", detail, after)
    if any("DEVELOPER_TOKEN" in value for value in values):
        return Dead("google_ads_developer_token", detail)
    if status == 401 or rpc_status == "UNAUTHENTICATED":
        return Dead("google_ads_unauthenticated", detail)
    if status == 403 or rpc_status == "PERMISSION_DENIED":
        return Dead("google_ads_permission_denied", detail)
    shared = classify_status(response)
    if isinstance(shared, Retry):  # 408
        return Retry(shared.reason, detail, shared.after_secs)
    return Dead("google_ads_request_error", detail)


# -- the forwarder ---------------------------------------------------------------------------

# What the layer counts that this platform uses: click conversion uploads take only the
# hashed email and phone (names and address go to adjustments, which this does not send).
_SENT_MATCH_KEYS: Final = frozenset({"email", "phone", "click_id"})
_SENT_FIELD_DROPS: Final = frozenset(
    {"invalid_email", "invalid_phone", "invalid_value", "invalid_currency"}
)


class GoogleAdsForwarder(ConversionsForwarder[GoogleAdsConfig]):
    # A partial failure lists an error (message, code, field path) per refused row, up to
    # 2,000 rows.
    max_response_bytes = 8 * 1024 * 1024
    config_model = GoogleAdsConfig
    platform = "google"
    standard_events = None
    max_events_per_request = MAX_CONVERSIONS_PER_REQUEST
    max_event_age_secs = MAX_EVENT_AGE_SECS
    """Conversions are accepted within their action's click-through window, 90 days at
    most; a shorter window is Google's to enforce (EXPIRED_EVENT, a dead letter)."""
    platform_event_drop_reasons = frozenset({"no_conversion_action", "no_match_key"})
    payload_match_keys = _SENT_MATCH_KEYS
    """The layer prepares every field Google's row has (names, address: GA4 sends them);
    an upload carries only email, phone and a click id, so only those count."""

    def __init__(self, config: GoogleAdsConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self.tokens = TokenProvider.from_config(config, timeout_secs=config.timeout_secs)
        self._throttle = LogThrottle(log)
        self._actions = ConfiguredEvents(
            (entry.event, entry.conversion_action) for entry in config.conversions
        )
        self._url = (
            f"{config.base_url}/{config.api_version}/customers/{config.customer_id}"
            ":uploadClickConversions"
        )
        headers = {
            "Content-Type": "application/json",
            "developer-token": config.developer_token.get_secret_value(),
        }
        if config.login_customer_id is not None:
            headers["login-customer-id"] = config.login_customer_id
        self._headers = headers

    # -- which events, as which conversion action --------------------------------------

    def conversion_action(self, name: str, canonical: str | None) -> str | None:
        """The conversion action configured for an event named ``name`` (``page_view`` for
        page views) whose canonical name is ``canonical``."""
        return self._actions.target(name, canonical)

    def event_name(self, event: Event) -> tuple[str, bool, str | None] | str:
        """The conversion action's resource name stands for the event name (the layer's
        table of standard events does not apply: Google Ads has none)."""
        named = named_event(event)
        if isinstance(named, str):
            return named
        name, canonical = named
        action = self.conversion_action(name, canonical)
        if action is None:
            return "no_conversion_action"
        return action, True, canonical

    def convert(
        self, index: int, event: Event, now: datetime, drops: Counter[str]
    ) -> Conversion | None:
        conversion = super().convert(index, event, now, drops)
        if conversion is None:
            return None
        if self._click_id(conversion) is None and not self._user_identifiers(conversion):
            drops["no_match_key"] += 1
            return None
        # Only what an upload carries counts as left out of it (not names or address).
        field_drops = conversion.field_drops
        if _SENT_FIELD_DROPS.issuperset(field_drops):
            return conversion
        sent = {reason: n for reason, n in field_drops.items() if reason in _SENT_FIELD_DROPS}
        return replace(conversion, field_drops=sent)

    # -- the request -------------------------------------------------------------------

    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        body: dict[str, Any] = {
            "conversions": [self._conversion(c) for c in conversions],
            "partialFailure": True,
        }
        if self.config.validate_only:
            body["validateOnly"] = True
        return HttpRequest("POST", self._url, dict(self._headers), orjson.dumps(body))

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome:
        outcome = classify_google_ads_response(response, len(planned.indices))
        if cut_in_row_errors(response):
            # Rows after the cut may have failed without a word: the operator should know.
            self._throttle.log(
                logging.WARNING,
                (self.id, "answer_cut"),
                "Google Ads answer cut before the end of its row errors; later rows that "
                "failed count as delivered",
                {
                    "forwarder": self.id,
                    "rows": len(planned.indices),
                    "rows_rejected": len(getattr(outcome, "rejected", {})),
                },
            )
        return outcome

    async def authorize(
        self, request: HttpRequest, *, refresh: bool = False
    ) -> HttpRequest | Retry | Dead:
        return await self.tokens.authorize(self.context.http, request, refresh=refresh)

    def unauthorized(self, response: HttpResponse) -> bool:
        # A refused developer token is not cured by a new access token.
        return response.status == 401 and b"DEVELOPER_TOKEN" not in response.body

    def secrets(self) -> Iterable[str]:
        return (self.config.developer_token.get_secret_value(), *self.tokens.secrets())

    # -- one conversion ----------------------------------------------------------------

    @staticmethod
    def _click_id(c: Conversion) -> tuple[str, str] | None:
        for name in CLICK_ID_ORDER:
            value = c.user.click_ids.get(name)
            if value:
                return name, value
        return None

    @staticmethod
    def _user_identifiers(c: Conversion) -> list[dict[str, str]]:
        # The layer leaves email and phone out unless ad_user_data is granted.
        values = c.prepared.values
        identifiers = []
        if "email" in values:
            identifiers.append({"hashedEmail": values["email"]})
        if "phone" in values:
            identifiers.append({"hashedPhoneNumber": values["phone"]})
        for identifier in identifiers:
            identifier["userIdentifierSource"] = "FIRST_PARTY"
        return identifiers[:MAX_USER_IDENTIFIERS]

    def _conversion(self, c: Conversion) -> dict[str, Any]:
        row: dict[str, Any] = {}
        click = self._click_id(c)
        if click is not None:
            row[click[0]] = click[1]
        row["conversionAction"] = c.name
        row["conversionDateTime"] = google_date_time(c.time)
        facts = c.commerce
        if facts.value is not None:
            row["conversionValue"] = facts.value
        if facts.currency is not None:
            row["currencyCode"] = facts.currency
        if facts.order_id is not None:
            row["orderId"] = facts.order_id
        identifiers = self._user_identifiers(c)
        if identifiers:
            row["userIdentifiers"] = identifiers
        consent = {
            key: state.upper()
            for key, category in (
                ("adUserData", "ad_user_data"),
                ("adPersonalization", "ad_personalization"),
            )
            if (state := c.consent.get(category)) in ("granted", "denied")
        }
        if consent:
            row["consent"] = consent
        return row
