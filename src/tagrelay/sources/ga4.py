"""GA4 inbound traffic: gtag ``/g/collect`` hits and Measurement Protocol bodies (pure).

Two decoders, no I/O: the ingest handler hands them what it read from the request and gets
back events of the internal model (``tagrelay.model.event``) plus the per-event rejections.

``parse_collect(query, body)``
    A hit of the gtag protocol, which Google does not document (community reference:
    ``shared/reference/ga4-collect.md``). The query string carries the request-level
    parameters (``v``, ``tid``, ``cid``, ``sid``, consent, client hints, page); the body, when
    not blank, holds one event per line, each line a URL-encoded query string of event-level
    parameters (``en``, ``ep.*``, ``epn.*``, ``pr1``...). An event's parameters are the query's
    merged with its line's, the line's winning. A blank body means the query is the one event
    (gtag's GET hits, and POSTs of a single event).

``parse_measurement_protocol(obj, measurement_id)``
    A documented Measurement Protocol JSON body (``/mp/collect``): ``client_id``,
    ``user_id``, ``timestamp_micros``, ``user_properties``, ``consent``, ``user_data`` and
    ``events: [{name, params}]``.

``decode_collect(body, query)`` and ``decode_measurement_protocol(body, measurement_id)``
    The same two from the raw request body, as the sources registry (``tagrelay.sources``)
    calls them: they return the ``Decoded`` form every source returns.

Both parsers return :class:`Hits`: the accepted events in request order, and
``(index, IngestError)`` for each event rejected on its own (an event without a name), so that
a batch keeps its valid events. A problem with the request as a whole (no measurement id, a
wrong protocol version, too many events) raises :class:`~tagrelay.errors.IngestError` instead.

The events are decoded, not yet normalized: they carry a deterministic ``messageId`` (so a
resent request deduplicates in the spool) and no ``receivedAt``; a gtag hit has no
``timestamp`` either (gtag sends no event time; normalization uses the receive time).

A gtag event keeps its raw request in ``context.ga4.request`` (the query string exactly as
received) and ``context.ga4.event`` (its body line exactly as received, ``""`` for a query-only
hit): the GA4 forwarder re-sends those verbatim, unknown parameters included, in their order.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from tagrelay.errors import IngestError
from tagrelay.model import Event, iso
from tagrelay.sources._base import Decoded, parse_json_body

__all__ = [
    "COLLECT_SOURCE",
    "MAX_COLLECT_EVENTS",
    "MAX_MP_EVENTS",
    "MP_SOURCE",
    "Hits",
    "decode_collect",
    "decode_measurement_protocol",
    "parse_collect",
    "parse_consent_gcd",
    "parse_consent_gcs",
    "parse_measurement_protocol",
]

COLLECT_SOURCE: Final = "ga4"
"""The source name (metrics label, ``context.source``) of gtag hits."""
MP_SOURCE: Final = "ga4_mp"
"""The source name of Measurement Protocol requests."""

MAX_COLLECT_EVENTS: Final = 500
"""Event lines accepted in one ``/g/collect`` body (gtag batches far fewer)."""
MAX_MP_EVENTS: Final = 25
"""Events per Measurement Protocol request: Google's own limit."""

GRANTED: Final = "granted"
DENIED: Final = "denied"


@dataclass
class Hits:
    """What one GA4 request decodes to."""

    events: list[Event] = field(default_factory=list)
    """The accepted events, in request order."""
    rejected: list[tuple[int, IngestError]] = field(default_factory=list)
    """Events rejected on their own: ``(index, error)``. The index counts the request's events
    (for ``/g/collect``, the non-blank body lines; for the Measurement Protocol, ``events[]``),
    accepted and rejected alike, from 0."""


# -- shared helpers ----------------------------------------------------------------------

_NUMBER_RE: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INT_RE: Final = re.compile(r"[+-]?\d+")
_INT64: Final = 2**63
_EXACT_FLOAT_INT: Final = 2**53


def _number(text: str) -> int | float | str:
    """A gtag numeric value (``epn.*``, ``upn.*``, item price...): an int when integral, else
    a float. Anything that is not a finite JSON-style number, and integers beyond 64 bits
    (which JSON encoders refuse), stay the string they were, so nothing is lost."""
    text = text.strip()
    if _INT_RE.fullmatch(text):
        value = int(text)
        return value if -_INT64 <= value < _INT64 else text
    if not _NUMBER_RE.fullmatch(text):
        return text
    number = float(text)
    if not math.isfinite(number):
        return text
    if number.is_integer() and abs(number) <= _EXACT_FLOAT_INT:
        return int(number)
    return number


def _digest(*parts: str) -> str:
    """32 hex characters of the SHA-256 of ``parts``, each prefixed by its length so that no
    two different sequences of parts hash the same input."""
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        hasher.update(f"{len(data)}:".encode())
        hasher.update(data)
    return hasher.hexdigest()[:32]


def _page(url: str | None, referrer: str | None, title: str | None, host: str | None) -> Any:
    """``context.page`` from the document's location, referrer, title and hostname. ``path``
    and ``search`` are what ``location.pathname`` and ``location.search`` would give (search
    with its ``?``, ``""`` without a query); ``host`` falls back to the URL's."""
    page: dict[str, str] = {}
    if url:
        page["url"] = url
        try:
            parts = urlsplit(url)
            hostname = parts.hostname
        except ValueError:  # an invalid IPv6 literal or port
            parts = None
            hostname = None
        if parts is not None:
            page["path"] = parts.path or ("/" if parts.netloc else "")
            page["search"] = f"?{parts.query}" if parts.query else ""
        if not host and hostname:
            host = hostname
    if referrer:
        page["referrer"] = referrer
    if title:
        page["title"] = title
    if host:
        page["host"] = host
    return page


# -- consent -----------------------------------------------------------------------------

_GCS_RE: Final = re.compile(r"G1([01])([01])")
_GCS_BITS: Final = {"1": GRANTED, "0": DENIED}

_GCD_RE: Final = re.compile(r"\d\d([a-z])\d([a-z])\d([a-z])\d([a-z])")
_GCD_SIGNALS: Final = ("ads", "analytics", "ad_user_data", "ad_personalization")
_GCD_LETTERS: Final = {
    # default only (no update)
    "p": DENIED,
    "t": GRANTED,
    # updated to denied
    "q": DENIED,
    "m": DENIED,
    "u": DENIED,
    # updated to granted
    "e": GRANTED,
    "r": GRANTED,
    "n": GRANTED,
    "v": GRANTED,
    # "l": not set -> absent from the table, so the signal is not stated
}


def parse_consent_gcs(gcs: str) -> dict[str, str]:
    """Consent mode v1, ``gcs``: ``G1`` + the ad_storage bit + the analytics_storage bit.

    ``G100`` denies both, ``G111`` grants both, ``G110`` grants ads only, ``G101`` grants
    analytics only. Returns ``{"ads": ..., "analytics": ...}``, or ``{}`` when the string is
    not of that form."""
    match = _GCS_RE.fullmatch(gcs)
    if match is None:
        return {}
    return {"ads": _GCS_BITS[match.group(1)], "analytics": _GCS_BITS[match.group(2)]}


def parse_consent_gcd(gcd: str) -> dict[str, str]:
    """Consent mode v2, ``gcd``: the four signals' states as letters.

    The string is a leading digit, then four ``<digit><letter>`` pairs (the digit a separator,
    the letter the state) for ad_storage, analytics_storage, ad_user_data and
    ad_personalization, in that order, then a tail this reading ignores (``5``, sometimes
    followed by more letters and digits for newer signals)::

        1 1p 1p 1p 1p 5         -> "11p1p1p1p5"    every signal denied by default
        1 3r 3r 2r 2r 5 l1      -> "13r3r2r2r5l1"  every signal updated to granted

    Letters (``shared/reference/ga4-collect.md``): ``p``/``t`` default denied/granted with no
    update; ``q``, ``m``, ``u`` updated to denied; ``e``, ``r``, ``n``, ``v`` updated to
    granted; ``l`` not set. The state is the current one (after the update, if any). A signal
    that is not set, or whose letter is unknown, is left out: the relay's consent step gives
    it the configured default. A string of another shape states nothing (``{}``)."""
    match = _GCD_RE.match(gcd)
    if match is None:
        return {}
    stated: dict[str, str] = {}
    for signal, letter in zip(_GCD_SIGNALS, match.groups(), strict=True):
        state = _GCD_LETTERS.get(letter)
        if state is not None:
            stated[signal] = state
    return stated


def _collect_consent(params: dict[str, str]) -> dict[str, str]:
    """``context.consent`` of a gtag hit: the categories the hit states and its raw consent
    strings. ``gcd`` (v2, four signals) refines ``gcs`` (v1, two); ``npa=1`` (non-personalized
    ads) denies ad_personalization whatever the strings say."""
    consent: dict[str, str] = {}
    gcs = params.get("gcs")
    gcd = params.get("gcd")
    if gcs is not None:
        consent.update(parse_consent_gcs(gcs))
    if gcd is not None:
        consent.update(parse_consent_gcd(gcd))
    if params.get("npa") == "1":
        consent["ad_personalization"] = DENIED
    for raw in ("gcs", "gcd", "dma"):
        value = params.get(raw)
        if value is not None:
            consent[raw] = value
    return consent


# -- gtag /g/collect ---------------------------------------------------------------------

_ITEM_FIELDS: Final = {
    "id": "item_id",
    "nm": "item_name",
    "br": "item_brand",
    "ca": "item_category",
    "c2": "item_category2",
    "c3": "item_category3",
    "c4": "item_category4",
    "c5": "item_category5",
    "va": "item_variant",
    "pr": "price",
    "qt": "quantity",
    "cp": "coupon",
    "ds": "discount",
    "ln": "item_list_name",
    "li": "item_list_id",
    "lp": "index",
    "af": "affiliation",
    # gtag sends "lo" for location_id (community references); "lc" is accepted too.
    "lo": "location_id",
    "lc": "location_id",
    "cn": "creative_name",
    "cs": "creative_slot",
    "pi": "promotion_id",
    "pn": "promotion_name",
}
_ITEM_NUMBERS: Final = frozenset({"price", "quantity", "discount", "index"})
_ITEM_CUSTOM_RE: Final = re.compile(r"([kv])(\d+)(.*)", re.DOTALL)

_UA_STRINGS: Final = {
    "uaa": "architecture",
    "uab": "bitness",
    "uam": "model",
    "uap": "platform",
    "uapv": "platformVersion",
}
_UA_FLAGS: Final = {"uamb": "mobile", "uaw": "wow64"}
_SCREEN_RE: Final = re.compile(r"(\d{1,6})x(\d{1,6})")
_FALSE_FLAGS: Final = frozenset({"", "0", "false"})


def _params(query: str) -> dict[str, str]:
    """A query string's parameters; a repeated name keeps its last value. Malformed
    percent-escapes stay as they are and invalid UTF-8 becomes U+FFFD (``parse_qsl``)."""
    return dict(parse_qsl(query, keep_blank_values=True))


def _item(value: str) -> dict[str, Any]:
    """One ``pr<n>`` value: ``~``-separated fields, each a two-letter key and its value
    (``idSKU_1~nmTee~pr10.5~qt2``), plus custom item parameters as ``k<n><name>`` /
    ``v<n><value>`` pairs (``k0color~v0blue``).

    A parameter name starts with a letter, so ``k<n>``'s index is all its digits; a value
    may start with digits, so ``v<n>`` takes the longest index that has a ``k``. Unknown keys,
    and a ``k``/``v`` without its partner, are kept under their raw key."""
    item: dict[str, Any] = {}
    names: dict[str, str] = {}
    values: list[str] = []
    for part in value.split("~"):
        if not part:
            continue
        custom = _ITEM_CUSTOM_RE.fullmatch(part)
        if custom is not None:
            if custom.group(1) == "k":
                names[custom.group(2)] = custom.group(3)
            else:
                values.append(part[1:])
            continue
        key, text = part[:2], part[2:]
        name = _ITEM_FIELDS.get(key)
        if name is None:
            item[key] = text
        else:
            item[name] = _number(text) if name in _ITEM_NUMBERS else text
    paired: set[str] = set()
    for rest in values:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        for cut in range(digits, 0, -1):
            index = rest[:cut]
            if index in names:
                item[names[index]] = rest[cut:]
                paired.add(index)
                break
        else:
            item[f"v{rest[:digits]}"] = rest[digits:]
    for index, name in names.items():
        if index not in paired:
            item[f"k{index}"] = name
    return item


def _full_version_list(value: str) -> list[dict[str, str]]:
    """``uafvl``: ``Brand;version|Brand;version``. gtag encodes each brand and version before
    joining them (``Not%3DA%3FBrand``), so each is decoded once more after splitting."""
    brands: list[dict[str, str]] = []
    for entry in value.split("|"):
        if not entry:
            continue
        brand, _, version = entry.rpartition(";") if ";" in entry else (entry, "", "")
        brands.append({"brand": unquote(brand), "version": unquote(version)})
    return brands


def _user_agent_data(params: dict[str, str]) -> dict[str, Any]:
    """``navigator.userAgentData`` (high-entropy client hints) from ``ua*`` parameters."""
    data: dict[str, Any] = {}
    for param, name in _UA_STRINGS.items():
        if param in params:
            data[name] = params[param]
    if "uafvl" in params:
        data["fullVersionList"] = _full_version_list(params["uafvl"])
    for param, name in _UA_FLAGS.items():
        if param in params:
            data[name] = params[param] == "1"
    return data


def _collect_event(
    params: dict[str, str], query: str, line: str, message_id: str
) -> Event | IngestError:
    name = params.get("en")
    if not name:
        return IngestError(
            "missing_event_name", "a GA4 hit event needs an event name ('en'); none was sent"
        )
    tid = params["tid"]
    properties: dict[str, Any] = {}
    traits: dict[str, Any] = {}
    items: dict[int, dict[str, Any]] = {}
    for key, value in params.items():
        if key.startswith("ep."):
            if key[3:]:
                properties[key[3:]] = value
        elif key.startswith("epn."):
            if key[4:]:
                properties[key[4:]] = _number(value)
        elif key.startswith("up."):
            if key[3:]:
                traits[key[3:]] = value
        elif key.startswith("upn."):
            if key[4:]:
                traits[key[4:]] = _number(value)
        elif key.startswith("pr") and key[2:].isdecimal() and key[2:].isascii():
            items[int(key[2:])] = _item(value)
    if "cu" in params:
        properties["currency"] = params["cu"]
    if items:
        properties["items"] = [items[index] for index in sorted(items)]

    context: dict[str, Any] = {}
    page = _page(params.get("dl"), params.get("dr"), params.get("dt"), params.get("dh"))
    if page:
        context["page"] = page
    if params.get("ul"):
        context["locale"] = params["ul"]
    screen = _SCREEN_RE.fullmatch(params.get("sr", ""))
    if screen is not None:
        context["screen"] = {"width": int(screen.group(1)), "height": int(screen.group(2))}
    user_agent_data = _user_agent_data(params)
    if user_agent_data:
        context["userAgentData"] = user_agent_data
    if traits:
        context["traits"] = traits

    client_id = params.get("cid")
    ga4_ids: dict[str, Any] = {}
    if client_id:
        ga4_ids["clientId"] = client_id
    if params.get("sid"):
        ga4_ids["sessionIds"] = {tid: params["sid"]}
    session_number = _number(params.get("sct", ""))
    if isinstance(session_number, int):
        ga4_ids["sessionNumbers"] = {tid: session_number}
    if ga4_ids:
        context["clientIds"] = {"ga4": ga4_ids}

    consent = _collect_consent(params)
    if consent:
        context["consent"] = consent

    ga4: dict[str, Any] = {"measurementId": tid, "sessionEngaged": params.get("seg") == "1"}
    engagement = _number(params.get("_et", ""))
    if isinstance(engagement, int):
        ga4["engagementTimeMsec"] = engagement
    ga4["firstVisit"] = "_fv" in params
    ga4["sessionStart"] = "_ss" in params
    ga4["newSessionId"] = "_nsi" in params
    ga4["conversion"] = "_c" in params
    ga4["debug"] = "_dbg" in params or (
        "ep.debug_mode" in params and params["ep.debug_mode"].lower() not in _FALSE_FLAGS
    )
    ga4["request"] = query
    ga4["event"] = line
    context["ga4"] = ga4

    event: Event = {"type": "page" if name == "page_view" else "track", "event": name}
    if name == "page_view" and params.get("dt"):
        event["name"] = params["dt"]
    event["messageId"] = message_id
    if client_id:
        event["anonymousId"] = client_id
    if params.get("uid"):
        event["userId"] = params["uid"]
    event["properties"] = properties
    event["context"] = context
    return event


def parse_collect(query: str, body: str = "") -> Hits:
    """Decode a gtag ``/g/collect`` request: ``query`` is its query string without the
    ``?``, exactly as received; ``body`` its decoded text (``""`` for a GET).

    One event per non-blank body line (``\\r\\n`` line ends are accepted), or the query as
    the one event when the body is blank. Raises ``IngestError`` for the request as a whole:
    ``missing_measurement_id`` (no ``tid`` in the query), ``unsupported_version`` (``v`` is
    not ``2``), ``too_many_events`` (more than :data:`MAX_COLLECT_EVENTS` lines) and, for a
    query-only hit, ``missing_event_name``. A body line without ``en`` is rejected on its
    own (``Hits.rejected``, code ``missing_event_name``).

    The event (``tagrelay.model.event``; keys present only when the hit has the data)::

        type            "page" for en=page_view, else "track"
        event           en (page events keep "page_view")
        name            dt, on page events
        messageId       32 hex chars of SHA-256 over the query, the line and, for a line that
                        repeats an earlier one in the same body, its index: a resent request
                        gets the same ids (the spool drops it), two hits never share one
        anonymousId     cid;  userId: uid
        properties      ep.<k> strings, epn.<k> numbers, cu -> currency, pr<n> -> items
        context.page    url (dl), referrer (dr), title (dt), path, search, host (dh or dl's)
        context.locale  ul;  context.screen: sr "1920x1080" -> {"width", "height"}
        context.userAgentData   client hints (uaa, uab, uafvl, uamb, uam, uap, uapv, uaw)
        context.traits  user properties: up.<k> strings, upn.<k> numbers
        context.clientIds.ga4   {"clientId": cid, "sessionIds": {tid: sid},
                                 "sessionNumbers": {tid: sct}}
        context.consent the categories the hit states (gcs, gcd, npa) + raw gcs/gcd/dma
        context.ga4     measurementId, sessionEngaged, engagementTimeMsec, firstVisit,
                        sessionStart, newSessionId, conversion, debug, request, event

    User properties go to ``context.traits``, Segment's place for what is known about the
    user when the event is not an identify call; the raw strings keep them as sent.
    """
    shared = _params(query)
    if not shared.get("tid"):
        raise IngestError(
            "missing_measurement_id",
            "a GA4 hit needs its measurement id ('tid=G-...') in the query string",
        )
    version = shared.get("v")
    if version != "2":
        got = "none" if version is None else repr(version[:20])
        raise IngestError(
            "unsupported_version",
            f"only version 2 of the gtag protocol is understood ('v=2'); got {got}",
        )

    lines: list[str] = []
    for raw_line in body.split("\n"):
        line = raw_line[:-1] if raw_line.endswith("\r") else raw_line
        if line.strip():
            lines.append(line)
    if len(lines) > MAX_COLLECT_EVENTS:
        raise IngestError(
            "too_many_events",
            f"a GA4 hit carries at most {MAX_COLLECT_EVENTS} events (body lines); got {len(lines)}",
        )

    hits = Hits()
    if not lines:
        result = _collect_event(shared, query, "", _digest(query, ""))
        if isinstance(result, IngestError):
            raise result
        hits.events.append(result)
        return hits

    seen: set[str] = set()
    for index, line in enumerate(lines):
        if line in seen:
            message_id = _digest(query, line, str(index))
        else:
            seen.add(line)
            message_id = _digest(query, line)
        params = {**shared, **_params(line)}
        params["tid"] = shared["tid"]  # the request's measurement id, not a line's
        result = _collect_event(params, query, line, message_id)
        if isinstance(result, IngestError):
            hits.rejected.append((index, result))
        else:
            hits.events.append(result)
    return hits


# -- Measurement Protocol ----------------------------------------------------------------

_MP_CONSENT: Final = {"GRANTED": GRANTED, "DENIED": DENIED}
_MP_REQUEST_EXTRAS: Final = {
    "user_data": "userData",
    "user_location": "userLocation",
    "device": "device",
    "ip_override": "ipOverride",
}


def _micros(value: Any, where: str) -> str | None:
    """``timestamp_micros`` (an integer, or a string of digits) as the model's ISO 8601
    time with milliseconds; ``None`` when absent."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdecimal() and value.isascii():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise IngestError(
            "invalid_timestamp",
            f"{where} must be microseconds since the epoch (an integer); got {str(value)[:40]!r}",
        )
    seconds, micros = divmod(value, 1_000_000)
    try:
        moment = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micros)
    except (OverflowError, OSError, ValueError):
        raise IngestError("invalid_timestamp", f"{where} is out of range") from None
    return iso(moment)


def _mp_id(value: Any, name: str) -> str | None:
    """An identifier field: a non-empty string (a number is accepted and turned into one)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise IngestError("invalid_field", f"{name} must be a string, got {type(value).__name__}")


@dataclass(frozen=True)
class _MPRequest:
    """What a Measurement Protocol request says for all its events."""

    body: dict[str, Any]
    measurement_id: str
    client_id: str | None
    app_instance_id: str | None
    user_id: str | None
    timestamp: str | None
    traits: dict[str, Any]
    consent: dict[str, str]


def _text(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    return value if isinstance(value, str) else None


def _mp_event(raw: Any, index: int, request: _MPRequest) -> Event | IngestError:
    if not isinstance(raw, dict):
        return IngestError("invalid_event", f"events[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        return IngestError("missing_event_name", f"events[{index}] needs a string 'name'")
    params = raw.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return IngestError("invalid_params", f"events[{index}].params must be an object")
    try:
        timestamp = _micros(raw.get("timestamp_micros"), f"events[{index}].timestamp_micros")
    except IngestError as exc:
        return exc
    if timestamp is None:
        timestamp = request.timestamp

    context: dict[str, Any] = {}
    title = _text(params, "page_title")
    page = _page(_text(params, "page_location"), _text(params, "page_referrer"), title, None)
    if page:
        context["page"] = page
    if request.traits:
        context["traits"] = dict(request.traits)
    ga4_ids: dict[str, Any] = {}
    if request.client_id is not None:
        ga4_ids["clientId"] = request.client_id
    session_id = params.get("session_id")
    if isinstance(session_id, str | int) and not isinstance(session_id, bool) and session_id != "":
        ga4_ids["sessionIds"] = {request.measurement_id: str(session_id)}
    if ga4_ids:
        context["clientIds"] = {"ga4": ga4_ids}
    if request.consent:
        context["consent"] = dict(request.consent)
    ga4: dict[str, Any] = {"measurementId": request.measurement_id, "mp": True}
    if session_id is not None:
        ga4["sessionId"] = session_id
    if "engagement_time_msec" in params:
        ga4["engagementTimeMsec"] = params["engagement_time_msec"]
    if request.app_instance_id is not None:
        ga4["appInstanceId"] = request.app_instance_id
    for key, name_in_context in _MP_REQUEST_EXTRAS.items():
        if key in request.body:
            ga4[name_in_context] = request.body[key]
    context["ga4"] = ga4

    visitor = request.client_id or request.app_instance_id or ""
    event_json = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
    event: Event = {"type": "page" if name == "page_view" else "track", "event": name}
    if name == "page_view" and title:
        event["name"] = title
    event["messageId"] = _digest(
        request.measurement_id,
        visitor,
        str(request.body.get("timestamp_micros", "")),
        event_json,
        str(index),
    )
    event["anonymousId"] = visitor
    if request.user_id is not None:
        event["userId"] = request.user_id
    if timestamp is not None:
        event["timestamp"] = timestamp
    event["properties"] = dict(params)
    event["context"] = context
    return event


def parse_measurement_protocol(obj: Any, measurement_id: str) -> Hits:
    """Decode a Measurement Protocol body (``/mp/collect``) already parsed from JSON, for the
    stream ``measurement_id`` (the request's ``measurement_id`` query parameter).

    Raises ``IngestError`` for the request as a whole: ``missing_measurement_id``,
    ``invalid_body`` (not an object), ``missing_events`` (absent or empty), ``invalid_events``
    (not a list), ``too_many_events`` (more than :data:`MAX_MP_EVENTS`, Google's limit),
    ``missing_client_id`` (neither ``client_id`` nor ``app_instance_id``), ``invalid_field``
    (an id that is not a string) and ``invalid_timestamp``. An event is rejected on its own
    (``Hits.rejected``) when it is not an object (``invalid_event``), has no string name
    (``missing_event_name``), has ``params`` that are not an object (``invalid_params``) or
    an invalid ``timestamp_micros`` of its own (``invalid_timestamp``).

    The event::

        type, event     "page" for page_view, else "track"; event = name
        name            params.page_title, on page events
        messageId       32 hex chars of SHA-256 over the measurement id, client id, request
                        timestamp_micros, the event's JSON (sorted keys) and its index
        anonymousId     client_id (app streams: app_instance_id);  userId: user_id
        timestamp       the event's timestamp_micros, else the request's (ISO 8601, ms, Z)
        properties      params, as given (items included)
        context.page    from params page_location, page_referrer, page_title
        context.traits  user_properties: {name: {"value": v}} -> {name: v}
        context.consent ad_user_data / ad_personalization from consent ("GRANTED"/"DENIED");
                        non_personalized_ads: true denies ad_personalization
        context.clientIds.ga4   {"clientId": client_id, "sessionIds": {measurement_id:
                                 str(params.session_id)}}
        context.ga4     {"measurementId", "mp": true, "sessionId", "engagementTimeMsec"
                        (params' values as given), "appInstanceId", and the request's
                        user_data, user_location, device, ip_override as userData,
                        userLocation, device, ipOverride}
    """
    if not measurement_id:
        raise IngestError(
            "missing_measurement_id",
            "a Measurement Protocol request needs 'measurement_id=G-...' in its query string",
        )
    if not isinstance(obj, dict):
        raise IngestError("invalid_body", "a Measurement Protocol body must be a JSON object")
    events = obj.get("events")
    if events is None or events == []:
        raise IngestError("missing_events", "a Measurement Protocol body needs an 'events' list")
    if not isinstance(events, list):
        raise IngestError("invalid_events", "'events' must be a list of {name, params} objects")
    if len(events) > MAX_MP_EVENTS:
        raise IngestError(
            "too_many_events",
            f"the Measurement Protocol takes at most {MAX_MP_EVENTS} events per request; "
            f"got {len(events)}",
        )
    client_id = _mp_id(obj.get("client_id"), "client_id")
    app_instance_id = _mp_id(obj.get("app_instance_id"), "app_instance_id")
    if client_id is None and app_instance_id is None:
        raise IngestError(
            "missing_client_id",
            "a Measurement Protocol body needs 'client_id' (web) or 'app_instance_id' (app)",
        )

    traits: dict[str, Any] = {}
    user_properties = obj.get("user_properties")
    if isinstance(user_properties, dict):
        for name, entry in user_properties.items():
            if isinstance(entry, dict) and "value" in entry:
                traits[name] = entry["value"]
    consent: dict[str, str] = {}
    stated = obj.get("consent")
    if isinstance(stated, dict):
        for signal in ("ad_user_data", "ad_personalization"):
            value = stated.get(signal)
            state = _MP_CONSENT.get(value.upper()) if isinstance(value, str) else None
            if state is not None:
                consent[signal] = state
    if obj.get("non_personalized_ads") is True:
        consent["ad_personalization"] = DENIED

    request = _MPRequest(
        body=obj,
        measurement_id=measurement_id,
        client_id=client_id,
        app_instance_id=app_instance_id,
        user_id=_mp_id(obj.get("user_id"), "user_id"),
        timestamp=_micros(obj.get("timestamp_micros"), "timestamp_micros"),
        traits=traits,
        consent=consent,
    )
    hits = Hits()
    for index, raw in enumerate(events):
        result = _mp_event(raw, index, request)
        if isinstance(result, IngestError):
            hits.rejected.append((index, result))
        else:
            hits.events.append(result)
    return hits


# -- as sources ----------------------------------------------------------------------------


def decode_collect(body: bytes, query: str) -> Decoded:
    """A gtag hit from its raw body (``b""`` for a GET) and its query string exactly as
    received (see :func:`parse_collect`). A body that is not UTF-8 is ``invalid_utf8``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise IngestError("invalid_utf8", "the request body is not valid UTF-8") from None
    hits = parse_collect(query, text)
    return Decoded(events=hits.events, rejected=hits.rejected, is_batch=True)


def decode_measurement_protocol(body: bytes, measurement_id: str) -> Decoded:
    """A Measurement Protocol request from its raw JSON body, for the stream
    ``measurement_id`` the request was authorized for (see
    :func:`parse_measurement_protocol`)."""
    hits = parse_measurement_protocol(parse_json_body(body), measurement_id)
    return Decoded(events=hits.events, rejected=hits.rejected, is_batch=True)
