"""User data for ad platforms: taken from an event once, normalized and hashed per platform.

Every ad forwarder (and GA4's ``user_data``) matches an event to a person with the same
keys: email, phone, name, address, date of birth, gender, an external id, plus what the
relay already knows (IP, user agent, click ids, browser ids). Each platform wants them
normalized its own way before SHA-256, and a value normalized the wrong way silently fails
to match. So there are two steps, both pure:

1. :func:`extract_user_data` reads an event into a :class:`UserData` (raw values, the same
   for every platform).
2. :func:`prepare` normalizes it for one platform by the table :data:`RULES` and hashes what
   that platform hashes; what does not normalize (an "email" without ``@``, a phone number
   that does not parse) is left out and counted by a code of :data:`DROP_REASONS`.

Where each field comes from (first found wins; sources in this order: ``traits`` of an
identify, ``context.traits`` (Segment puts them there on other calls), then, for email and
phone only, ``properties``):

============  ==============================================================================
field         keys
============  ==============================================================================
email         ``email``
phone         ``phone``
first_name    ``firstName``, ``first_name``; else the first word of ``name`` (see below)
last_name     ``lastName``, ``last_name``; else the rest of ``name``
street        ``address.street``
city          ``address.city``, ``city``
state         ``address.state``, ``address.region``, ``state``, ``region``
zip           ``address.postalCode``, ``address.postal_code``, ``address.zip``,
              ``postalCode``, ``postal_code``, ``zip``
country       ``address.country``, ``country``
gender        ``gender``
birthday      ``birthday``
external_id   the event's ``userId``
============  ==============================================================================

``name`` is split only when neither first nor last name is given, the way Segment's own
facade does it: the first word is the first name, the rest the last name ("Mary Ann Smith"
-> ``Mary`` / ``Ann Smith``); one word is a first name alone. Plus ``context.ip``,
``context.userAgent``, click ids (``context.clickIds``, then the query of
``context.page.search`` or ``context.page.url``, which wins as the latest landing), and
browser ids (``context.clientIds.fbc`` / ``fbp`` / ``_ttp`` or ``ttp``, and every cookie of
``BROWSER_ID_COOKIES`` in ``browser_ids``). These are passed through as they are: no platform
hashes them.

The table (``H`` = SHA-256 hex of the normalized UTF-8 string, ``plain`` = sent as
normalized; an empty cell = the platform takes no such field; ``?`` = not confirmed by the
platform's own documentation, see the comments at :data:`RULES`):

===========  =====  ========  ======  ========  =========  ========  ======  ===  =========
field        meta   google    tiktok  snapchat  pinterest  linkedin  reddit  x    microsoft
===========  =====  ========  ======  ========  =========  ========  ======  ===  =========
email        H      H g       H       H         H          H         H m     H    H m
phone        H d    H +       H +?    H d       H d                  H +     H +  H +
first_name   H n    H n       H lo    H n       H lo       plain?
last_name    H n    H n       H lo    H n       H lo       plain?
street              H s
city         H c    plain n           H c       H c
state        H st   plain n           H st      H st
zip          H z    plain p   H zt?   H z       H zd
country      H cc   plain CC          H cc      H cc       plain?
gender       H fm                     H fm      H fmn
birthday     H dob                    H dob     H dob
external_id  H lo             H t     H t       H t        plain?    H t          H t
===========  =====  ========  ======  ========  =========  ========  ======  ===  =========

Rules: email: trim and lowercase, must look like ``local@domain.tld``; ``g`` Google: no
whitespace anywhere, and for gmail.com / googlemail.com no dots and no ``+suffix`` in the
local part (``cloudy.sanfrancisco+shopping@gmail.com`` -> ``cloudysanfrancisco@gmail.com``);
``m`` Reddit and Microsoft: for every domain, local part without dots and without the
``+suffix``. Phone: parsed by ``phonenumbers`` (a leading ``00`` read as ``+``; a number
without a country code takes the forwarder's ``default_phone_country``, without one it is
read as if it started with ``+``); one that does not parse or is not a valid number for
its country is dropped, never sent raw; ``d`` E.164 digits without ``+`` (``16505551212``);
``+`` E.164 with ``+`` (``+16505551212``). Names: ``n`` lowercase, only letters and single spaces
(digits, punctuation and symbols removed), letters of every script kept as UTF-8
(``valéry``, ``정``): Meta's and Snap's rule, and it meets Google's for first and last
names (Google's city and region: the same, sent plain); ``lo`` lowercase and trim.
``s`` street: lowercase, symbols removed, single spaces. ``c`` city: lowercase letters only,
no spaces (``menlopark``); ``st`` state: like city, and a US state's name becomes its code
(``california`` -> ``ca``); ``z`` zip: lowercase, no spaces or dashes, a US ZIP+4 cut to its
5 digits; ``zt`` no spaces or dashes, lowercase; ``zd`` digits only; ``p`` Google postal
code: trimmed, ``.`` and ``~`` removed; ``cc``/``CC`` ISO 3166-1 alpha-2 in lower/upper case
(``uk`` is taken as ``gb``; anything else that is not a two-letter region code is dropped).
``fm`` gender: ``f`` or ``m`` (from f/female/woman, m/male/man); ``fmn`` the same, or ``n``
for non-binary (from n/non-binary/nonbinary). ``dob`` ``YYYYMMDD`` from
``YYYY-MM-DD`` (a time after it is ignored), ``YYYYMMDD``, ``YYYY/MM/DD`` or ``M/D/YYYY``
when the day is over 12 (otherwise month and day are ambiguous and it is dropped). ``t``
external id: trimmed. ``lo`` (Meta's external id): trimmed and lowercased, as Meta's pixel
does.

A value that already is a SHA-256 hex digest (64 hex characters, any case) passes through
lowercased for a hashed field (every platform here documents lowercase hex); for a field
sent plain it is dropped (it cannot be un-hashed).

**Raw personal data never leaves this module in text meant for people**: the module logs
nothing, its drop reasons are fixed codes, it raises nothing on bad input, and
:class:`UserData` prints which fields it holds, never their values. Forwarders count the
codes, never the values. Normalized values are kept in a bounded in-memory cache (the same
person's email and phone come back in each of their events, once per ad forwarder); it is
never written anywhere and forgets the least recently used values (``_normalized``).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import date
from functools import lru_cache
from operator import attrgetter
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import parse_qsl, urlsplit

from pydantic import AfterValidator

from tagrelay.forwarders._memo import ObjectMemo
from tagrelay.model import BROWSER_ID_COOKIES, CLICK_ID_PARAMS

__all__ = [
    "BROWSER_ID_COOKIES",
    "CLICK_ID_PARAMS",
    "DROP_REASONS",
    "FIELDS",
    "MATCH_KEYS",
    "PLATFORMS",
    "PLATFORM_BROWSER_IDS",
    "PLATFORM_CLICK_IDS",
    "PLATFORM_COOKIES",
    "RULES",
    "Field",
    "PhoneCountry",
    "Platform",
    "Prepared",
    "Rule",
    "UserData",
    "extract_user_data",
    "is_phone_country",
    "looks_hashed",
    "looks_like_email",
    "match_keys",
    "prepare",
    "sha256_hex",
]

Platform = Literal[
    "meta", "google", "tiktok", "snapchat", "pinterest", "linkedin", "reddit", "x", "microsoft"
]
PLATFORMS: Final[tuple[Platform, ...]] = get_args(Platform)

Field = Literal[
    "email",
    "phone",
    "first_name",
    "last_name",
    "street",
    "city",
    "state",
    "zip",
    "country",
    "gender",
    "birthday",
    "external_id",
]
FIELDS: Final[tuple[Field, ...]] = get_args(Field)

DROP_REASONS: Final = frozenset(f"invalid_{name}" for name in FIELDS)
"""``invalid_<field>``: a value given for the field that did not normalize (so it was left
out). Bounded: one code per field."""


PLATFORM_CLICK_IDS: Final[Mapping[Platform, tuple[str, ...]]] = {
    "meta": ("fbclid",),  # reaches Meta as fbc (UserData.fbc), built from it by the relay
    "google": ("gclid", "gbraid", "wbraid"),
    "tiktok": ("ttclid",),
    "snapchat": ("ScCid",),
    "pinterest": ("epik",),
    "linkedin": ("li_fat_id",),
    "reddit": ("rdt_cid",),
    "x": ("twclid",),
    "microsoft": ("msclkid",),
}
"""Which click ids each platform matches on."""

PLATFORM_BROWSER_IDS: Final[Mapping[Platform, tuple[str, ...]]] = {
    "meta": ("fbp",),
    "tiktok": ("ttp",),
}
"""Which first-party browser ids (``UserData`` attributes) each platform matches on."""

PLATFORM_COOKIES: Final[Mapping[Platform, Mapping[str, str]]] = {
    "snapchat": {"_scid": "browser_id"},
    # Pinterest's tag keeps the landing URL's epik click id in _epik (P1: user_data.click_id
    # is "stored in _epik cookie on your domain or &epik= query parameter in the URL").
    "pinterest": {"_epik": "click_id"},
    # Reddit's pixel cookie _rdt_uuid goes as user.uuid (R2); Microsoft's UET tag keeps its
    # visitor id in _uetvid, sent as userData.anonymousId (U3).
    "reddit": {"_rdt_uuid": "browser_id"},
    "microsoft": {"_uetvid": "browser_id"},
}
"""Which ``BROWSER_ID_COOKIES`` (``UserData.browser_ids``) each platform matches on, and the
match key each one counts as."""

MATCH_KEYS: Final = (
    "email",
    "phone",
    "name",
    "address",
    "external_id",
    "ip",
    "user_agent",
    "click_id",
    "browser_id",
)
"""The fixed label set of ``tagrelay_forwarder_match_keys_total{key}``."""

_MAX_INPUT: Final = 256
"""Longer values are not user data anyone types (and cost time to parse): dropped."""

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_EMAILISH = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+")
_GOOGLE_MAIL_DOMAINS: Final = frozenset({"gmail.com", "googlemail.com"})
_ZIP_PLUS4 = re.compile(r"(\d{5})-?\d{4}")
_CLICK_VALUE = re.compile(r"[A-Za-z0-9._~:\-]{1,200}")
_CLICK_ID_BY_LOWER: Final = {name.lower(): name for name in CLICK_ID_PARAMS}
_COUNTRY_ALIASES: Final = {"uk": "gb"}
_GENDERS: Final = {"f": "f", "female": "f", "woman": "f", "m": "m", "male": "m", "man": "m"}
_GENDERS_NONBINARY: Final = {**_GENDERS, "n": "n", "non-binary": "n", "nonbinary": "n"}
_US_STATES: Final = {
    "alabama": "al",
    "alaska": "ak",
    "arizona": "az",
    "arkansas": "ar",
    "california": "ca",
    "colorado": "co",
    "connecticut": "ct",
    "delaware": "de",
    "districtofcolumbia": "dc",
    "florida": "fl",
    "georgia": "ga",
    "hawaii": "hi",
    "idaho": "id",
    "illinois": "il",
    "indiana": "in",
    "iowa": "ia",
    "kansas": "ks",
    "kentucky": "ky",
    "louisiana": "la",
    "maine": "me",
    "maryland": "md",
    "massachusetts": "ma",
    "michigan": "mi",
    "minnesota": "mn",
    "mississippi": "ms",
    "missouri": "mo",
    "montana": "mt",
    "nebraska": "ne",
    "nevada": "nv",
    "newhampshire": "nh",
    "newjersey": "nj",
    "newmexico": "nm",
    "newyork": "ny",
    "northcarolina": "nc",
    "northdakota": "nd",
    "ohio": "oh",
    "oklahoma": "ok",
    "oregon": "or",
    "pennsylvania": "pa",
    "rhodeisland": "ri",
    "southcarolina": "sc",
    "southdakota": "sd",
    "tennessee": "tn",
    "texas": "tx",
    "utah": "ut",
    "vermont": "vt",
    "virginia": "va",
    "washington": "wa",
    "westvirginia": "wv",
    "wisconsin": "wi",
    "wyoming": "wy",
}


# -- the value object ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserData:
    """What an event says about its person, raw (trimmed, not normalized): the same for
    every platform. Its ``repr`` names the fields it holds, never their values."""

    email: str | None = None
    phone: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    street: str | None = None
    city: str | None = None
    state: str | None = None
    zip: str | None = None
    country: str | None = None
    gender: str | None = None
    birthday: str | None = None
    external_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    click_ids: Mapping[str, str] = field(default_factory=dict)
    """Canonical click-id name (``CLICK_ID_PARAMS``) -> value, as received."""
    fbc: str | None = None
    fbp: str | None = None
    ttp: str | None = None
    browser_ids: Mapping[str, str] = field(default_factory=dict)
    """Cookie name (``BROWSER_ID_COOKIES``) -> value, from ``context.clientIds``."""

    def present(self) -> tuple[str, ...]:
        """Names of the attributes that hold a value."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name))

    def __repr__(self) -> str:
        return f"UserData(<{', '.join(self.present())}>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Prepared:
    """User data ready for one platform: the fields it takes, normalized (and hashed where
    the platform hashes them), and what was left out. Prints no values. ``prepare`` hands
    the same one to every event with the same user data: read its mappings, never change
    them."""

    platform: Platform
    values: Mapping[Field, str]
    drops: Mapping[str, int]
    """``DROP_REASONS`` code -> count (0 or 1 each for one event)."""

    def __repr__(self) -> str:
        return f"Prepared({self.platform}, <{', '.join(self.values)}>, drops={dict(self.drops)})"

    __str__ = __repr__


# -- extraction ----------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    """A scalar as trimmed text (numbers too: a phone or ZIP sent as a number)."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return str(value).strip() or None


def _first(sources: list[dict[str, Any]], *keys: str) -> str | None:
    for source in sources:
        for key in keys:
            value = source.get(key)
            if value is not None and (text := _text(value)) is not None:
                return text
    return None


def _click_ids(context: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    click_ids = context.get("clickIds")
    if isinstance(click_ids, dict):
        for name, value in click_ids.items():
            canonical = _CLICK_ID_BY_LOWER.get(str(name).lower())
            if canonical is not None and isinstance(value, str) and _CLICK_VALUE.fullmatch(value):
                found[canonical] = value
    page = context.get("page")
    if not isinstance(page, dict):
        return found
    search, url = page.get("search"), page.get("url")
    if isinstance(search, str) and search:
        found.update(_query_click_ids(search, False))
    elif isinstance(url, str) and "?" in url:
        found.update(_query_click_ids(url, True))
    return found


def _query_click_ids(text: str, is_url: bool) -> tuple[tuple[str, str], ...]:
    """The click ids in ``text``'s query (``is_url``: a URL, else the query itself): the
    same landing URL comes with each of a visitor's events to each ad forwarder, so short
    ones are read once and cached (click ids and page addresses, in memory only)."""
    if len(text) > _MAX_CACHED_QUERY:
        return _read_query_click_ids(text, is_url)
    return _cached_query_click_ids(text, is_url)


_MAX_CACHED_QUERY: Final = 1024
"""Longer URLs are read each time (the cache holds at most 2,048 x 1 KB)."""


def _read_query_click_ids(text: str, is_url: bool) -> tuple[tuple[str, str], ...]:
    query: str | None = text
    if is_url:
        try:
            query = urlsplit(text).query
        except ValueError:
            query = None
    if not query:
        return ()
    found = []
    for name, value in parse_qsl(query.lstrip("?")):
        canonical = _CLICK_ID_BY_LOWER.get(name.lower())
        if canonical is not None and _CLICK_VALUE.fullmatch(value):
            found.append((canonical, value))
    return tuple(found)


_cached_query_click_ids = lru_cache(maxsize=2048)(_read_query_click_ids)


_EXTRACTED: Final[ObjectMemo[UserData]] = ObjectMemo(1024)
"""The user data of the events extracted last (``_memo``): the delivery process gives every
forwarder the same event objects, so each event's user data is read once for all ad
forwarders. Personal data, in memory only, like the events it comes from."""


def extract_user_data(event: Mapping[str, Any]) -> UserData:
    """What ``event`` says about its person (see the module docstring for the keys). Pure;
    never raises on odd shapes (a field of the wrong type is absent). The same event object
    (never changed: forwarders do not change events) gets the same ``UserData`` again."""
    found = _EXTRACTED.get(event)
    if found is not None:
        return found
    return _EXTRACTED.put(event, _extract_user_data(event))


def _extract_user_data(event: Mapping[str, Any]) -> UserData:
    context = _dict(event.get("context"))
    # Only the sources the event has (most have no identify traits, page views none at all).
    traits = [t for t in (event.get("traits"), context.get("traits")) if isinstance(t, dict) and t]
    properties = event.get("properties")
    with_properties = (
        [*traits, properties] if isinstance(properties, dict) and properties else traits
    )
    email = phone = first_name = last_name = street = city = state = None
    zip_code = country = gender = birthday = None
    if with_properties:
        email = _first(with_properties, "email")
        phone = _first(with_properties, "phone")
    if traits:  # else none of these can be found
        addresses = [a for t in traits if isinstance(a := t.get("address"), dict) and a]
        first_name = _first(traits, "firstName", "first_name")
        last_name = _first(traits, "lastName", "last_name")
        if first_name is None and last_name is None:
            name = _first(traits, "name")
            if name is not None:
                first, _, rest = name.partition(" ")
                first_name, last_name = first, (rest.strip() or None)
        street = _first(addresses, "street")
        city = _first(addresses, "city") or _first(traits, "city")
        state = _first(addresses, "state", "region") or _first(traits, "state", "region")
        zip_code = _first(addresses, "postalCode", "postal_code", "zip") or _first(
            traits, "postalCode", "postal_code", "zip"
        )
        country = _first(addresses, "country") or _first(traits, "country")
        gender = _first(traits, "gender")
        birthday = _first(traits, "birthday")
    user_id = event.get("userId")
    client_ids = _dict(context.get("clientIds"))
    return UserData(
        email=email,
        phone=phone,
        first_name=first_name,
        last_name=last_name,
        street=street,
        city=city,
        state=state,
        zip=zip_code,
        country=country,
        gender=gender,
        birthday=birthday,
        external_id=_text(user_id) if isinstance(user_id, str | int) else None,
        ip=_text(context.get("ip")),
        user_agent=_text(context.get("userAgent")),
        click_ids=_click_ids(context),
        fbc=_text(client_ids.get("fbc")),
        fbp=_text(client_ids.get("fbp")),
        ttp=_text(client_ids.get("_ttp")) or _text(client_ids.get("ttp")),
        browser_ids={
            name: value
            for name in BROWSER_ID_COOKIES
            if (value := _text(client_ids.get(name))) is not None
        },
    )


# -- normalizers: raw text -> normalized text, or None when it does not normalize ---------

Normalizer = Callable[[str, "_Context"], str | None]


@dataclass(frozen=True, slots=True)
class _Context:
    default_phone_country: str | None
    country: str | None
    """The event's own country (raw), for rules that depend on it (US ZIP codes)."""


def _valid_email(email: str) -> str | None:
    return email if _EMAIL.fullmatch(email) else None


def _email_basic(value: str, _: _Context) -> str | None:
    # Trim and lowercase [Meta M3, Snap S3, TikTok T1/T2, Pinterest P1, LinkedIn L2, X X4].
    return _valid_email(value.strip().lower())


def _email_google(value: str, _: _Context) -> str | None:
    # Google Data Manager formatting (A11), also GA4 MP (G3): no whitespace anywhere,
    # lowercase; gmail.com / googlemail.com: no dots and no "+suffix" in the local part.
    email = "".join(value.split()).lower()
    local, at, domain = email.rpartition("@")
    if at and domain in _GOOGLE_MAIL_DOMAINS:
        email = local.split("+", 1)[0].replace(".", "") + "@" + domain
    return _valid_email(email)


def _email_no_dots_or_alias(value: str, _: _Context) -> str | None:
    # Every domain: trimmed, lowercase, the local part without dots and without the
    # "+alias". Reddit: its Conversions API docs ("Hashing rules": "remove dots in local
    # part; remove anything after +", example Al.ice+Apple@Example.Com -> alice@example.com)
    # and the destination Reddit maintains in segmentio/action-destinations
    # (reddit-conversions-api/utils.ts, canonicalizeEmail); a mirror of its help center (R3)
    # said every non-alphanumeric character goes, which would also drop "_" and "-".
    # Microsoft: its CAPI guide (learn.microsoft.com/advertising/guides/
    # uet-conversion-api-integration, "To hash an email address").
    local, at, domain = value.strip().lower().rpartition("@")
    if not at:
        return None
    return _valid_email(local.split("+", 1)[0].replace(".", "") + "@" + domain)


def _e164(value: str, context: _Context) -> str | None:
    """The number in E.164 (``+16505551212``), or None when it is not a valid number."""
    return _parse_phone(value, context.default_phone_country)


@lru_cache(maxsize=4096)
def _parse_phone(value: str, region: str | None) -> str | None:
    # Cached: parsing is most of the cost of preparing an event, and every ad forwarder
    # prepares the same event's phone number in turn.
    text = value.strip()
    compact = "".join(ch for ch in text if ch.isdigit() or ch == "+")
    if compact.startswith("00"):
        # The ITU international prefix (Snap: "remove any double 0 in front of the country
        # code"); phonenumbers only reads it as such for regions that dial 00.
        text = "+" + compact[2:]
    if not text.startswith("+") and region is None:
        text = "+" + text  # no country to assume: the digits must start with one
    # Imported on first use, as in ``is_phone_country``: a relay none of whose forwarders
    # reads phone numbers never loads the library.
    import phonenumbers

    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    # Valid, not merely possible: "6505551212" without a country would otherwise pass as a
    # Singapore number (+65 0555 1212).
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _phone_digits(value: str, context: _Context) -> str | None:
    # Meta (M3: country code, no "+", no leading zeros), Snap (S3), Pinterest (P1).
    e164 = _e164(value, context)
    return e164[1:] if e164 is not None else None


def _phone_plus(value: str, context: _Context) -> str | None:
    # Google (A11: E.164 with "+"), GA4 MP (G3), X (X6), Reddit and Microsoft (their docs,
    # see RULES).
    return _e164(value, context)


def _is_letter(ch: str) -> bool:
    # Letters and the marks that belong to them (Devanagari vowel signs are marks, not
    # letters, for str.isalpha).
    return unicodedata.category(ch)[0] in "LM"


def _name(value: str, _: _Context) -> str | None:
    # Meta (M3) and Snap (S3): lowercase, no punctuation, letters of every script kept as
    # UTF-8 (valéry, 정). GA4 MP (G3): digits and symbols removed, lowercase, trimmed. Google
    # Ads (A10): extra spaces removed (first name), no punctuation (last name). Letters and
    # single spaces satisfy all of them.
    text = unicodedata.normalize("NFC", value).lower()
    kept = "".join(ch for ch in text if _is_letter(ch) or ch.isspace())
    return " ".join(kept.split()) or None


def _lower_trim(value: str, _: _Context) -> str | None:
    return value.strip().lower() or None


def _trim(value: str, _: _Context) -> str | None:
    return value.strip() or None


def _street_google(value: str, _: _Context) -> str | None:
    # GA4 MP (G3): symbols removed, lowercase, trimmed (digits kept: the house number).
    text = unicodedata.normalize("NFC", value).lower()
    kept = "".join(ch for ch in text if _is_letter(ch) or ch.isdigit() or ch.isspace())
    return " ".join(kept.split()) or None


def _letters(value: str) -> str:
    text = unicodedata.normalize("NFC", value).lower()
    return "".join(ch for ch in text if _is_letter(ch))


def _city_compact(value: str, _: _Context) -> str | None:
    # Meta M3 (and its SDK M9): lowercase, no digits, punctuation or spaces ("menlopark");
    # Pinterest P1 the same; Snap S3.
    return _letters(value) or None


def _state_compact(value: str, _: _Context) -> str | None:
    # Meta M3: the two-letter ANSI code in lowercase; elsewhere lowercase without punctuation
    # or spaces. A US state's name becomes its code (as Segment's Meta destination does).
    letters = _letters(value)
    return _US_STATES.get(letters, letters) or None


def _city_google(value: str, _: _Context) -> str | None:
    # GA4 MP city / region (G3): digits and symbols removed, lowercase, trimmed; sent plain.
    return _name(value, _)


def _country_code(value: str) -> str | None:
    code = value.strip().lower()
    code = _COUNTRY_ALIASES.get(code, code)
    return code if is_phone_country(code.upper()) else None


def _country_lower(value: str, _: _Context) -> str | None:
    # Meta M3 / Snap / Pinterest P1: ISO 3166-1 alpha-2, lowercase.
    return _country_code(value)


def _country_upper(value: str, _: _Context) -> str | None:
    # Google A10/A11: ISO 3166-1 alpha-2, sent plain (Google's samples write "US").
    code = _country_code(value)
    return code.upper() if code is not None else None


def _zip_meta(value: str, context: _Context) -> str | None:
    # Meta M3: lowercase, no spaces and no dash; US: the first 5 digits (UK: "m11ae").
    text = "".join(value.lower().split())
    country = _country_code(context.country) if context.country else None
    plus4 = _ZIP_PLUS4.fullmatch(text)
    if plus4 is not None and country in (None, "us"):
        return plus4.group(1)
    return text.replace("-", "") or None


def _zip_dashless(value: str, _: _Context) -> str | None:
    # TikTok (RS/Stape, T1/T2): spaces and dashes removed, lowercase.
    return "".join(value.lower().split()).replace("-", "") or None


def _zip_digits(value: str, _: _Context) -> str | None:
    # Pinterest P1: digits only.
    return "".join(ch for ch in value if ch.isdigit()) or None


def _postal_google(value: str, _: _Context) -> str | None:
    # GA4 MP (G3): "." and "~" removed, trimmed; sent plain (A11).
    return value.replace(".", "").replace("~", "").strip() or None


def _gender(value: str, _: _Context) -> str | None:
    # Meta M3: the initial in lowercase, f or m.
    return _GENDERS.get(value.strip().lower())


def _gender_nonbinary(value: str, _: _Context) -> str | None:
    # Pinterest P1 (ConversionEventsUserData.ge): "Either "f" or "m" or "n" for non-binary
    # gender", in lowercase.
    return _GENDERS_NONBINARY.get(value.strip().lower())


_ISO_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ].*)?")
_SLASH_YMD = re.compile(r"(\d{4})/(\d{1,2})/(\d{1,2})")
_COMPACT_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_US_DATE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")


def _birthday(value: str, _: _Context) -> str | None:
    # Meta M3: YYYYMMDD, year from 1900 ("2/16/1997" -> "19970216").
    text = value.strip()
    match = _ISO_DATE.fullmatch(text) or _SLASH_YMD.fullmatch(text)
    if match is None:
        match = _COMPACT_DATE.fullmatch(text)
    if match is not None:
        year, month, day = (int(g) for g in match.groups())
    else:
        us = _US_DATE.fullmatch(text)
        if us is None:
            return None
        month, day, year = (int(g) for g in us.groups())
        if day <= 12:
            return None  # 2/3/1997: February 3rd or March 2nd?
    try:
        born = date(year, month, day)
    except ValueError:
        return None
    return f"{born:%Y%m%d}" if born.year >= 1900 else None


# -- the table -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """How one platform takes one field: normalized by ``normalize``, then hashed or not."""

    normalize: Normalizer
    hashed: bool = True


_RAW: Final = Rule(_trim, hashed=False)

RULES: Final[Mapping[Platform, Mapping[Field, Rule]]] = {
    # Meta CAPI customer information parameters (M3) and Business SDK (M9).
    "meta": {
        "email": Rule(_email_basic),
        "phone": Rule(_phone_digits),
        "first_name": Rule(_name),
        "last_name": Rule(_name),
        "city": Rule(_city_compact),
        "state": Rule(_state_compact),
        "zip": Rule(_zip_meta),
        "country": Rule(_country_lower),
        "gender": Rule(_gender),
        "birthday": Rule(_birthday),
        # Hashing recommended (M3); lowercased like the pixel does (Segment's Meta
        # destination lowercases too).
        "external_id": Rule(_lower_trim),
    },
    # Google Ads user identifiers (A10, A11) and GA4 Measurement Protocol user_data (G3):
    # city, region, postal code and country go unhashed.
    "google": {
        "email": Rule(_email_google),
        "phone": Rule(_phone_plus),
        "first_name": Rule(_name),
        "last_name": Rule(_name),
        "street": Rule(_street_google),
        "city": Rule(_city_google, hashed=False),
        "state": Rule(_city_google, hashed=False),
        "zip": Rule(_postal_google, hashed=False),
        "country": Rule(_country_upper, hashed=False),
    },
    # TikTok Events API 2.0: no official normalization page was available; rules follow
    # RudderStack / Stape (T1, T2). The phone's "+" (E.164) is unverified.
    "tiktok": {
        "email": Rule(_email_basic),
        "phone": Rule(_phone_plus),
        "first_name": Rule(_lower_trim),
        "last_name": Rule(_lower_trim),
        "zip": Rule(_zip_dashless),  # unverified (T1/T2 implementations)
        "external_id": Rule(_trim),
    },
    # Snap CAPI v3 parameters (S3, S4).
    "snapchat": {
        "email": Rule(_email_basic),
        "phone": Rule(_phone_digits),
        "first_name": Rule(_name),
        "last_name": Rule(_name),
        "city": Rule(_city_compact),
        "state": Rule(_state_compact),
        "zip": Rule(_zip_meta),  # Snap's page gives no zip rule; Meta's (S6 trims+lowercases)
        "country": Rule(_country_lower),
        "gender": Rule(_gender),
        "birthday": Rule(_birthday),
        "external_id": Rule(_trim),
    },
    # Pinterest CAPI v5 user_data (P1, the generated client's docs from the API spec).
    "pinterest": {
        "email": Rule(_email_basic),
        "phone": Rule(_phone_digits),
        "first_name": Rule(_lower_trim),
        "last_name": Rule(_lower_trim),
        "city": Rule(_city_compact),
        "state": Rule(_state_compact),
        "zip": Rule(_zip_digits),
        "country": Rule(_country_lower),
        "gender": Rule(_gender_nonbinary),
        "birthday": Rule(_birthday),
        "external_id": Rule(_trim),
    },
    # LinkedIn CAPI: SHA256_EMAIL (L1, L2); userInfo names and countryCode are plain text
    # (L7, unverified format); externalIds plain (L6, unverified).
    "linkedin": {
        "email": Rule(_email_basic),
        "first_name": _RAW,
        "last_name": _RAW,
        "country": Rule(_country_upper, hashed=False),
        "external_id": _RAW,
    },
    # Reddit CAPI v3: match keys may go raw or hashed (R3); hashed here, by the hashing rules
    # of Reddit's Conversions API docs (see _email_no_dots_or_alias; phone: E.164 with "+",
    # "+15554441234"; external id: trimmed, as Reddit's own Segment destination does).
    "reddit": {
        "email": Rule(_email_no_dots_or_alias),
        "phone": Rule(_phone_plus),
        "external_id": Rule(_trim),
    },
    # X Conversion API: hashed_email (X4), hashed_phone_number as E.164 (X6, secondary).
    "x": {
        "email": Rule(_email_basic),
        "phone": Rule(_phone_plus),
    },
    # Microsoft UET CAPI, its guide (learn.microsoft.com/advertising/guides/
    # uet-conversion-api-integration): em and ph hashed (phone "in E.164 format with country
    # code", +14255551234); externalId "anonymized", "never send real user IDs ... apply a
    # hash": hashed, trimmed.
    "microsoft": {
        "email": Rule(_email_no_dots_or_alias),
        "phone": Rule(_phone_plus),
        "external_id": Rule(_trim),
    },
}
"""Platform -> field -> rule: the one table. A field absent from a platform's row is not
sent to it."""


# -- preparing ------------------------------------------------------------------------------


def sha256_hex(text: str) -> str:
    """SHA-256 of the UTF-8 text, lowercase hex."""
    return hashlib.sha256(text.encode()).hexdigest()


def looks_hashed(value: str) -> bool:
    """A SHA-256 hex digest already (64 hex characters, any case, spaces around ignored)."""
    return _HEX64.fullmatch(value.strip()) is not None


def looks_like_email(text: str) -> bool:
    """Text that contains something shaped like an email address (to keep it out of places
    that must not carry personal data, such as GA4 params and user properties)."""
    return _EMAILISH.search(text) is not None


def is_phone_country(code: str) -> bool:
    """An ISO 3166-1 alpha-2 code (upper case) that phone numbers can be read for."""
    import phonenumbers

    return code in phonenumbers.SUPPORTED_REGIONS


def _known_phone_country(value: str | None) -> str | None:
    if value is not None and not is_phone_country(value):
        raise ValueError(f"{value!r} is not an ISO 3166-1 alpha-2 country code")
    return value


PhoneCountry = Annotated[str | None, AfterValidator(_known_phone_country)]
"""The type of a forwarder's optional ``default_phone_country``: a country phone numbers
can be read for, checked when the configuration loads (the field's ``pattern`` documents
the shape)."""


def prepare(
    data: UserData, platform: Platform, *, default_phone_country: str | None = None
) -> Prepared:
    """``data`` normalized for ``platform`` by :data:`RULES`: hashed where the platform
    hashes, plain where it does not, left out (and counted in ``drops``) where a value does
    not normalize. ``default_phone_country``: the ISO 3166-1 alpha-2 code (``US``) of numbers
    written without a country code. Pure; raises nothing."""
    country = default_phone_country.upper() if default_phone_country else None
    return _prepared(platform, country, _field_values(data))


_field_values: Final[Callable[[UserData], tuple[str | None, ...]]] = attrgetter(*FIELDS)
"""A ``UserData``'s ``FIELDS``, in that order."""
_FIELD_INDEX: Final = {name: index for index, name in enumerate(FIELDS)}

_PREPARED_CACHE_SIZE: Final = 4096
"""How many prepared user data :func:`_prepared` keeps, the most recently used: one per
visitor and platform (a visitor's events carry the same fields), about 7 MB at most
(~1.6 KB each with a purchase's raw and hashed values)."""


@lru_cache(maxsize=_PREPARED_CACHE_SIZE)
def _prepared(
    platform: Platform, default_phone_country: str | None, raw: tuple[str | None, ...]
) -> Prepared:
    """``prepare`` of a ``UserData`` whose ``FIELDS`` are ``raw``. Cached: a visitor's events
    carry the same user data to each ad forwarder; a ``Prepared`` is immutable, so the same
    one serves them all (in process memory only, like ``_normalized``)."""
    event_country = raw[_FIELD_INDEX["country"]]
    values: dict[Field, str] = {}
    drops: dict[str, int] = {}
    for name, rule in RULES[platform].items():
        value = raw[_FIELD_INDEX[name]]
        if value is None:
            continue
        normalized = _normalized(
            rule.normalize, rule.hashed, value, default_phone_country, event_country
        )
        if normalized is None:
            drops["invalid_" + name] = 1
        else:
            values[name] = normalized
    return Prepared(platform, values, drops)


_NORMALIZED_CACHE_SIZE: Final = 8192
"""How many values :func:`_normalized` keeps, the most recently used: about 3.5 MB at most
(~420 bytes each: key, raw value, 64-character digest). It serves what ``_prepared`` has not
seen together: a new visitor's values for a rule two platforms share (Meta's and TikTok's
email), a field added to a known visitor's. A purchase with every field costs about 17
for Meta, TikTok and Google together."""


@lru_cache(maxsize=_NORMALIZED_CACHE_SIZE)
def _normalized(
    normalize: Normalizer,
    hashed: bool,
    raw: str,
    default_phone_country: str | None,
    country: str | None,
) -> str | None:
    """``raw`` normalized by a rule (``normalize``, ``hashed``), in the context of the
    forwarder's default phone country and the event's own ``country`` (raw); None when it
    does not normalize.

    Cached (a bounded LRU, :data:`_NORMALIZED_CACHE_SIZE`): parsing phone numbers and
    hashing are most of the cost of preparing an event, and the same person's email and
    phone come back in every event of theirs, once per ad forwarder. The cache holds raw
    and normalized personal data in this process's memory only (as the batches being
    delivered do): it is never written, logged or sent anywhere, and it forgets the least
    recently used values beyond its bound."""
    if looks_hashed(raw):
        return raw.strip().lower() if hashed else None
    if len(raw) > _MAX_INPUT:
        return None
    normalized = normalize(raw, _Context(default_phone_country, country))
    if normalized is None:
        return None
    return sha256_hex(normalized) if hashed else normalized


def match_keys(prepared: Prepared, data: UserData) -> frozenset[str]:
    """Which of :data:`MATCH_KEYS` an event sent with ``prepared`` (and the pass-through ids
    of ``data`` that its platform takes) carries."""
    values = prepared.values
    platform = prepared.platform
    keys: list[str] = []
    if "email" in values:
        keys.append("email")
    if "phone" in values:
        keys.append("phone")
    if "external_id" in values:
        keys.append("external_id")
    if "first_name" in values or "last_name" in values:
        keys.append("name")
    if not _ADDRESS_FIELDS.isdisjoint(values):
        keys.append("address")
    if data.ip:
        keys.append("ip")
    if data.user_agent:
        keys.append("user_agent")
    click_ids = data.click_ids
    if (click_ids and not click_ids.keys().isdisjoint(PLATFORM_CLICK_IDS[platform])) or (
        platform == "meta" and data.fbc
    ):
        keys.append("click_id")
    for browser_id in PLATFORM_BROWSER_IDS.get(platform, ()):
        if getattr(data, browser_id):
            keys.append("browser_id")
            break
    cookies = PLATFORM_COOKIES.get(platform)
    if cookies:
        for cookie, key in cookies.items():
            if data.browser_ids.get(cookie):
                keys.append(key)  # a key already there counts once (a frozenset)
    return frozenset(keys)


_ADDRESS_FIELDS: Final = frozenset({"street", "city", "state", "zip", "country"})
