"""The conversions layer: what every ad-platform forwarder (Meta, TikTok, Google Ads, ...)
does the same way, written once. A platform module adds only its payload and its errors.

The path of an event through an ad forwarder (after the runtime's filter and
``requires_consent``, which defaults to ``[ads]`` here):

1. **Is it a conversion?** ``page`` and ``screen`` calls are page views; a ``track`` call is
   what its name says; ``identify``, ``group`` and ``alias`` are not conversions (dropped,
   ``not_a_conversion``).
2. **Its name on the platform** (:meth:`ConversionsForwarder.event_name`), the first that
   applies:

   - the forwarder's ``events`` option (``{"Demo Booked": "Lead"}``), matched exactly, then
     case- and space-insensitively; the value is the platform's event name, taken as is;
   - the name already *is* one of the platform's standard events, exactly (``Purchase``
     for Meta);
   - the canonical name (:data:`CANONICAL_EVENT_NAMES`: Segment's e-commerce and B2B spec
     names, ``Order Completed`` -> ``purchase``; GA4's recommended names as gtag and
     Measurement Protocol senders send them, ``purchase``, ``add_to_cart``; page views are
     ``page_view``) -> the platform's standard event (``_ecommerce.STANDARD_EVENTS``);
   - otherwise ``unmapped``: ``custom`` sends the event under its own name (a custom event),
     ``skip`` drops it (``unmapped_event``). The default is the platform's: ``custom`` where
     it takes custom events.

3. **Too old?** The event time is ``timestamp`` (else ``receivedAt``, else now), never
   later than the relay received it (a fast client clock is cut to ``receivedAt``, which a
   retry reads again unchanged). Older than the platform's window
   (``max_event_age_secs``, less :data:`AGE_MARGIN_SECS` for the time in flight): dropped,
   ``too_old`` (Meta refuses a whole request for one such event).
4. **Consent for user data.** What counts as *user data* (Google's ``ad_user_data``: the
   person's data sent for advertising) is :data:`USER_DATA_KEYS`: the hashed identifiers
   (email, phone, name, address, gender, birthday, external id) and the IP address. They
   are sent only when ``context.consent.ad_user_data`` is ``granted``; otherwise the event
   goes without them (``ad_user_data_denied: send_without``) or not at all (``skip``:
   dropped, ``ad_user_data_denied``). The user agent, click ids and browser ids stay: they
   describe the ad interaction, not the person, and the relay only keeps click ids and
   ad cookies for visitors that grant ``ads`` (``pipeline.identity``), which every ad
   forwarder requires.
5. **User data** read once (``_user_data.extract_user_data``) and normalized and hashed for
   the platform by the one table (``_user_data.prepare``, with ``default_phone_country``);
   values that do not normalize are left out and counted (``invalid_email``, ...). With
   ``enrich: true`` (and ``identity_store.enabled``), an event that grants
   ``ad_user_data`` first gets what it lacks (email, phone, names, address, external id,
   click and browser ids) from the identity store's record of its person, found by its
   ``userId``, else its ``anonymousId`` (``identity_store.record.enrich``; its own values
   win). The store is read once per batch, before planning, and a retried batch is
   planned from the same reading, so that it is the same bytes. Each match key it filled
   in counts ``tagrelay_forwarder_enriched_total{forwarder, key}`` once the platform took
   the event.
6. **Commerce**: value, currency, order id and items (``_ecommerce.commerce``); values that
   do not read are left out and counted (``invalid_value``, ``invalid_currency``,
   ``invalid_item``).
7. The event id is the event's ``messageId`` (the tracking script's ``track`` returns it;
   the site passes it to the vendor's pixel, which is how the platform deduplicates).

Each kept event becomes a :class:`Conversion`; the platform turns chunks of at most
``max_events_per_request`` of them into requests (:meth:`ConversionsForwarder.request`) and
classifies the answers (``BatchedHttpForwarder.classify``). Sending, retries that never
resend an accepted request, secret scrubbing and drop counts are ``_batched``'s. A request
the platform refuses for some of its events (``_batched.Refused``) is sent again without
them: :meth:`ConversionsForwarder.without` rebuilds it through ``request``.

**Match quality.** Once a batch is done (never on an attempt that will be retried), each
event the platform took counts one ``tagrelay_forwarder_match_keys_total{forwarder, key}``
per match key it carried (``_user_data.MATCH_KEYS``), or ``key="none"`` when it carried none.

Drop reasons are bounded: :data:`EVENT_DROP_REASONS` (whole events, counted by the runtime in
``tagrelay_forwarder_dropped_total``) plus a platform's own, and :data:`FIELD_DROP_REASONS`
(parts of sent events, ``tagrelay_forwarder_field_drops_total``).

Writing a platform: subclass :class:`ConversionsConfig` (a ``type`` literal, ``base_url`` and
``api_version`` redeclared with today's defaults, the platform's credentials and test mode)
and :class:`ConversionsForwarder` (class attributes ``platform``, ``standard_events``,
``max_events_per_request``, ``max_event_age_secs``, and where they apply
``extra_standard_events``, ``payload_match_keys``, ``platform_event_drop_reasons``; methods
``request``, ``classify``, ``secrets``), then one line in ``forwarders.FORWARDERS``. A
platform whose payload names no events (each conversion names a conversion action, rule or
event tag configured for it: Google Ads, LinkedIn, X) overrides ``event_name`` with a
:class:`ConfiguredEvents` table.
"""

from __future__ import annotations

import hashlib
import logging
import re
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Literal, TypeVar

import orjson
from pydantic import Field, field_validator

from tagrelay.config.common import ConsentCategory, ForwarderConfigBase
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import BatchedHttpForwarder, Plan, PlannedRequest
from tagrelay.forwarders._ecommerce import (
    SEGMENT_EVENT_NAMES,
    STANDARD_EVENTS,
    Commerce,
    commerce,
    event_name_key,
)
from tagrelay.forwarders._enrichment import Profile, enrich, person_id
from tagrelay.forwarders._http import HttpRequest
from tagrelay.forwarders._user_data import DROP_REASONS as USER_DATA_DROP_REASONS
from tagrelay.forwarders._user_data import (
    FIELDS,
    MATCH_KEYS,
    PhoneCountry,
    Platform,
    Prepared,
    UserData,
    extract_user_data,
    match_keys,
    prepare,
)
from tagrelay.forwarders._user_data import Field as UserDataField
from tagrelay.logthrottle import LogThrottle
from tagrelay.model import Dead, Delivered, Event, Outcome

if TYPE_CHECKING:
    from tagrelay.identity_store import IdentityStore

__all__ = [
    "AD_EVENT_NAMES",
    "AGE_MARGIN_SECS",
    "CANONICAL_EVENT_NAMES",
    "EVENT_DROP_REASONS",
    "FIELD_DROP_REASONS",
    "META_STYLE_KEYS",
    "NO_MATCH_KEY",
    "PAGE_VIEW",
    "USER_DATA_KEYS",
    "ConfiguredEvents",
    "Conversion",
    "ConversionPlan",
    "ConversionsConfig",
    "ConversionsForwarder",
    "epoch_millis",
    "epoch_seconds",
    "event_time",
    "meta_style_user_data",
    "named_event",
]

AD_EVENT_NAMES: Final[Mapping[str, str]] = {
    "Form Submitted": "generate_lead",
    "Subscription Started": "subscribe",
    "Trial Started": "start_trial",
    "Product List Filtered": "view_item_list",
}
"""Segment spec names (B2B SaaS, e-commerce) that ad platforms have standard events for and
GA4's table (``SEGMENT_EVENT_NAMES``, which must not change what GA4 sends) lacks."""

CANONICAL_EVENT_NAMES: Final[Mapping[str, str]] = {
    event_name_key(name): canonical
    for table in (SEGMENT_EVENT_NAMES, AD_EVENT_NAMES)
    for name, canonical in table.items()
} | {event_name_key(canonical): canonical for canonical in STANDARD_EVENTS}
"""``event_name_key(name)`` -> canonical (GA4 recommended) event name: Segment's names, and
the canonical names themselves (as gtag.js and Measurement Protocol senders send them)."""

PAGE_VIEW: Final = "page_view"

EVENT_DROP_REASONS: Final = frozenset(
    {
        "not_a_conversion",  # identify, group, alias: no conversion to report
        "unmapped_event",  # no standard event for it and unmapped: skip
        "no_event_name",  # a track call without a name
        "too_old",  # older than the platform's window
        "ad_user_data_denied",  # ad_user_data not granted and ad_user_data_denied: skip
    }
)
"""Reasons for which the layer does not send a whole event."""

FIELD_DROP_REASONS: Final = frozenset(
    {
        *USER_DATA_DROP_REASONS,  # invalid_email, invalid_phone, ...: left out of user data
        "invalid_value",  # a value, price or quantity that is not a number
        "invalid_currency",  # a currency that is not three letters
        "invalid_item",  # a product that is not an object
    }
)
"""Reasons for which part of a sent event was left out."""

USER_DATA_KEYS: Final = frozenset(
    {"email", "phone", "name", "address", "external_id", "ip", "gender", "birthday"}
)
"""What ``context.consent.ad_user_data`` governs (see the module docstring, step 4)."""

_PERSONAL_FIELDS: Final = (*FIELDS, "ip")
"""The ``UserData`` attributes of ``USER_DATA_KEYS``: the person's data."""

NO_MATCH_KEY: Final = "none"
"""The ``key`` label of events sent with none of ``MATCH_KEYS``."""

_BASE_URL: Final = re.compile(r"https?://[^?#\s]*[^/?#\s]")

AGE_MARGIN_SECS: Final = 60.0
"""Events this close to the platform's age limit are dropped too: they would pass it while
in flight."""


# -- the config ----------------------------------------------------------------------------


def _ads() -> list[ConsentCategory]:
    return ["ads"]


class ConversionsConfig(ForwarderConfigBase):
    """Options every ad-platform forwarder has (a platform's model subclasses it, redeclaring
    ``base_url`` and ``api_version`` with its defaults, and ``unmapped`` where the platform
    takes no custom events)."""

    events: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Track event name -> the platform's event name; adds to and overrides the "
            "built-in mapping (Segment's e-commerce and B2B names and GA4's recommended "
            "names to the platform's standard events). Names match exactly, then ignoring "
            "case and spaces."
        ),
        examples=[{"Demo Booked": "Lead", "Order Completed": "Purchase"}],
    )
    unmapped: Literal["custom", "skip"] = Field(
        "custom",
        description=(
            "Track events with no standard event on the platform and not in events: sent "
            "as custom events under their own name (custom), or not sent (skip, counted as "
            "unmapped_event)."
        ),
        examples=["skip"],
    )
    default_phone_country: PhoneCountry = Field(
        None,
        pattern=r"^[A-Z]{2}$",
        description=(
            "ISO 3166-1 alpha-2 country (US, GB, ...) of phone numbers written without a "
            "country code. Without it, a number must start with its country code (+ or 00 "
            "optional); one that does not is left out, counted as invalid_phone."
        ),
        examples=["US"],
    )
    enrich: bool = Field(
        False,
        description=(
            "Fill in what an event lacks (email, phone, names, address, external id, click "
            "and browser ids) from the identity store's record of its person (by userId, "
            "else anonymousId), when the event grants ad_user_data. Needs "
            "identity_store.enabled; each key filled in is counted in "
            "tagrelay_forwarder_enriched_total."
        ),
        examples=[True],
    )
    ad_user_data_denied: Literal["send_without", "skip"] = Field(
        "send_without",
        description=(
            "Events that do not grant ad_user_data consent: sent without user data (hashed "
            "identifiers and IP address; user agent, click and browser ids stay), or not "
            "sent (skip, counted as ad_user_data_denied)."
        ),
        examples=["send_without"],
    )
    requires_consent: list[ConsentCategory] = Field(
        default_factory=_ads,
        description=(
            "Consent categories an event must grant (context.consent) to be sent here; "
            "other events are dropped and counted with reason consent_denied. Ad "
            "forwarders require ads by default."
        ),
        examples=[["ads"]],
    )
    base_url: str = Field(
        description="The platform API's scheme and host (no trailing slash).",
        examples=["https://graph.facebook.com"],
    )
    api_version: str = Field(
        min_length=1,
        description="The platform API's version, as it appears in the URL or header.",
        examples=["v25.0"],
    )
    timeout_secs: float = Field(
        10.0, gt=0, le=300, description="Per-request timeout.", examples=[10.0]
    )
    max_concurrent_requests: int = Field(
        4,
        ge=1,
        le=64,
        description="Requests in flight at once while delivering one batch.",
        examples=[4],
    )

    @field_validator("events")
    @classmethod
    def _named_events(cls, value: dict[str, str]) -> dict[str, str]:
        blank = [source for source, target in value.items() if not target.strip()]
        if blank:
            raise ValueError("event names cannot be blank: " + ", ".join(map(repr, blank)))
        return {source: target.strip() for source, target in value.items()}

    @field_validator("base_url")
    @classmethod
    def _plain_base_url(cls, value: str) -> str:
        # A validator, not a pattern: it also holds where a platform redeclares the field.
        if not _BASE_URL.fullmatch(value):
            raise ValueError(
                f"{value!r} must be an http(s) URL without query, fragment or trailing slash"
            )
        return value


# -- one conversion ------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversion:
    """One event as an ad platform sees it, everything read and normalized; the platform
    only lays it out. Prints no personal data (``user`` and ``prepared`` print field names)."""

    index: int
    """The event's position in the batch."""
    event: Event = field(repr=False)
    """The event itself, for what only one platform reads."""
    name: str
    """The platform's event name (standard, configured, or the event's own for a custom
    event)."""
    standard: bool
    """``name`` is one of the platform's standard events."""
    canonical: str | None
    """The canonical (GA4 recommended) name, ``page_view`` for page views; None when the
    event has none."""
    event_id: str
    """The event's ``messageId``: the dedup key shared with the browser pixel."""
    time: datetime
    """When it happened (UTC; never after the plan's ``now``)."""
    commerce: Commerce
    user: UserData
    """What may be sent about the person (without ``USER_DATA_KEYS`` when ``ad_user_data``
    is not granted), raw: click ids, browser ids and user agent are sent as they are."""
    prepared: Prepared
    """``user`` normalized and hashed for the platform (``_user_data.prepare``)."""
    user_data_granted: bool
    """``context.consent.ad_user_data`` is granted."""
    match_keys: frozenset[str]
    """Which ``MATCH_KEYS`` the event carries to this platform."""
    page_url: str | None = None
    referrer: str | None = None
    consent: Mapping[str, str] = field(default_factory=dict)
    """``context.consent`` as the relay stated it (category -> granted/denied)."""
    browser: bool = False
    """The event came from a browser: it carries a user agent and a page URL."""
    field_drops: Mapping[str, int] = field(default_factory=dict)
    """What was left out of it (``FIELD_DROP_REASONS``), counted only if it is sent. May be
    the mapping of its ``prepared`` or ``commerce`` itself: read it, never change it."""
    enriched: frozenset[str] = frozenset()
    """The ``match_keys`` it carries only thanks to the identity store (``enrich``)."""

    @property
    def properties(self) -> Mapping[str, Any]:
        return _dict(self.event.get("properties"))


@dataclass
class ConversionPlan(Plan):
    """A plan that also says which match keys each planned event carries (batch index ->
    keys), counted once the batch is done."""

    match_keys: dict[int, frozenset[str]] = field(default_factory=dict)
    enriched: dict[int, frozenset[str]] = field(default_factory=dict)
    """Batch index -> the match keys the identity store filled in (``enrich``)."""
    conversions: dict[int, Conversion] = field(default_factory=dict)
    """The planned conversions by batch index (a refused request is rebuilt from them)."""


META_STYLE_KEYS: Final[tuple[tuple[UserDataField, str], ...]] = (
    ("email", "em"),
    ("phone", "ph"),
    ("first_name", "fn"),
    ("last_name", "ln"),
    ("gender", "ge"),
    ("birthday", "db"),
    ("city", "ct"),
    ("state", "st"),
    ("zip", "zp"),
    ("country", "country"),
    ("external_id", "external_id"),
)
"""``user_data`` keys of the hashed fields (``_user_data`` field -> key) in Meta's
Conversions API, in Meta's order; Snap's and Pinterest's APIs take the same keys."""


def meta_style_user_data(c: Conversion) -> dict[str, Any]:
    """``user_data`` in the layout Meta's Conversions API set and Snap's and Pinterest's
    copy: each hashed value under its :data:`META_STYLE_KEYS` key as a one-element list,
    then ``client_ip_address`` and ``client_user_agent`` as they are. The platform adds its
    click and browser ids."""
    values = c.prepared.values
    user: dict[str, Any] = {key: [values[name]] for name, key in META_STYLE_KEYS if name in values}
    data = c.user
    if data.ip:
        user["client_ip_address"] = data.ip
    if data.user_agent:
        user["client_user_agent"] = data.user_agent
    return user


def epoch_seconds(moment: datetime) -> int:
    """Unix time in whole seconds (Meta, TikTok, Snap, Pinterest, Microsoft)."""
    return int(moment.timestamp())


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)


def epoch_millis(moment: datetime) -> int:
    """Unix time in milliseconds (LinkedIn, Reddit)."""
    return (moment - _EPOCH) // _MILLISECOND


def event_time(event: Event, now: datetime) -> datetime:
    """When the event happened: ``timestamp``, else ``receivedAt``, else ``now``; never
    later than when the relay received it (``receivedAt``, else ``now``). The ceiling is the
    stored ``receivedAt`` rather than ``now`` so that a retried batch is the same bytes: a
    request the destination took is then recognized and not sent again (``_batched``)."""
    timestamp, received = _moment(event.get("timestamp")), _moment(event.get("receivedAt"))
    ceiling = min(received, now) if received is not None else now
    if timestamp is not None:
        return min(timestamp, ceiling)
    return ceiling


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _added(counts: Mapping[str, int], more: Mapping[str, int]) -> Mapping[str, int]:
    """Both counts added up (each already positive); one of them as it is when the other is
    empty (the common case: nothing left out)."""
    if not more:
        return counts
    if not counts:
        return more
    added = dict(counts)
    for reason, n in more.items():
        added[reason] = added.get(reason, 0) + n
    return added


def _text(value: Any) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


_store_failures: Final = LogThrottle(logging.getLogger(__name__))


def named_event(event: Event) -> tuple[str, str | None] | str:
    """``(name, canonical name)`` of an event that may be a conversion: a track call's
    name, ``page_view`` for page and screen calls; or the drop reason (``no_event_name``,
    ``not_a_conversion``)."""
    etype = event.get("type")
    if etype in ("page", "screen"):
        return PAGE_VIEW, PAGE_VIEW
    if etype != "track":
        return "not_a_conversion"
    name = event.get("event")
    if not isinstance(name, str) or not name.strip():
        return "no_event_name"
    return name, CANONICAL_EVENT_NAMES.get(event_name_key(name))


T = TypeVar("T")


class ConfiguredEvents(Generic[T]):
    """Event names -> what a platform whose payload names no events reports them as (a
    conversion action, rule or event tag), from the forwarder's configuration. A name
    (``page_view`` for page and screen calls) matches an entry exactly, then ignoring case
    and spaces, then by meaning: an entry for ``purchase`` also takes Segment's ``Order
    Completed`` and gtag's ``purchase`` (:data:`CANONICAL_EVENT_NAMES`). The first entry
    for a name wins (configurations refuse repeated names: :meth:`repeated`)."""

    def __init__(self, entries: Iterable[tuple[str, T]]) -> None:
        self._exact: dict[str, T] = {}
        self._loose: dict[str, T] = {}
        self._by_meaning: dict[str, T] = {}
        for name, target in entries:
            key = event_name_key(name)
            self._exact.setdefault(name, target)
            self._loose.setdefault(key, target)
            canonical = CANONICAL_EVENT_NAMES.get(key)
            if canonical is not None:
                self._by_meaning.setdefault(canonical, target)
        if PAGE_VIEW in self._loose:
            self._by_meaning.setdefault(PAGE_VIEW, self._loose[PAGE_VIEW])

    def target(self, name: str, canonical: str | None) -> T | None:
        """The target configured for an event named ``name`` whose canonical name is
        ``canonical``, or None."""
        found = self._exact.get(name)
        if found is None:
            found = self._loose.get(event_name_key(name))
        if found is None and canonical is not None:
            found = self._by_meaning.get(canonical)
        return found

    @staticmethod
    def repeated(names: Iterable[str]) -> list[str]:
        """The names that repeat an earlier one (ignoring case and spaces), each as
        ``'order completed' (also 'Order Completed')``, for a configuration error."""
        seen: dict[str, str] = {}
        repeated = []
        for name in names:
            key = event_name_key(name)
            if key in seen:
                repeated.append(f"{name!r} (also {seen[key]!r})")
            else:
                seen[key] = name
        return repeated


# -- the forwarder base --------------------------------------------------------------------

CC = TypeVar("CC", bound=ConversionsConfig)


class ConversionsForwarder(BatchedHttpForwarder[CC]):
    """Base of an ad-platform forwarder (see the module docstring). A platform sets the class
    attributes below and implements ``request``; it may override ``classify``,
    ``secrets``, ``authorize``/``unauthorized``, ``requests`` (another grouping than
    chunks in batch order), ``event_name`` and ``convert`` (extra drops)."""

    platform: ClassVar[Platform]
    """The platform's row in ``_user_data.RULES`` (normalization and hashing)."""
    standard_events: ClassVar[str | None] = None
    """The platform's key in ``_ecommerce.STANDARD_EVENTS``; None for a platform whose
    payload names no events (Google Ads: only ``events`` maps names)."""
    extra_standard_events: ClassVar[frozenset[str]] = frozenset()
    """Standard events of the platform beyond the canonical table (Meta's ``Donate``, ...):
    a track event so named is sent as that standard event."""
    max_events_per_request: ClassVar[int]
    payload_match_keys: ClassVar[frozenset[str]] = frozenset(MATCH_KEYS)
    """The match keys the platform's payload can carry: a key outside it is not counted
    (Google Ads click conversions carry no IP or user agent)."""
    platform_event_drop_reasons: ClassVar[frozenset[str]] = frozenset()
    """The platform's own reasons for not sending a whole event (added to the layer's)."""
    platform_field_drop_reasons: ClassVar[frozenset[str]] = frozenset()
    """The platform's own reasons for leaving part of a sent event out (added to the
    layer's; a platform's ``convert`` adds them to ``Conversion.field_drops``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.event_drop_reasons = EVENT_DROP_REASONS | cls.platform_event_drop_reasons
        cls.field_drop_reasons = FIELD_DROP_REASONS | cls.platform_field_drop_reasons

    def __init__(self, config: CC, context: ForwarderContext) -> None:
        super().__init__(config, context)
        table = self.standard_events
        self._standard: dict[str, str] = {}
        if table is not None:
            self._standard = {
                canonical: names[table]
                for canonical, names in STANDARD_EVENTS.items()
                if table in names
            }
        standard_names = set(self._standard.values()) | set(self.extra_standard_events)
        self._standard_names = frozenset(standard_names)
        self._configured_exact = dict(config.events)
        self._configured = {event_name_key(k): v for k, v in config.events.items()}
        window = self.max_event_age_secs
        self._max_age = None if window is None else timedelta(seconds=window - AGE_MARGIN_SECS)
        self._identity: IdentityStore | None = None
        self._profiles: dict[int, Profile] = {}
        """The identity store's profiles of the batch being delivered, by batch index."""
        self._profiles_batch = b""

    # -- what a platform writes --------------------------------------------------------

    @abstractmethod
    def request(self, conversions: Sequence[Conversion]) -> HttpRequest:
        """The request that reports ``conversions`` (at most ``max_events_per_request``, in
        batch order; never empty). Pure."""

    def requests(self, conversions: Sequence[Conversion]) -> Iterable[PlannedRequest]:
        """The planned requests for a batch's conversions: by default chunks of
        ``max_events_per_request`` in batch order, each through ``request``."""
        size = self.max_events_per_request
        for start in range(0, len(conversions), size):
            chunk = conversions[start : start + size]
            yield PlannedRequest(self.request(chunk), tuple(c.index for c in chunk))

    # -- the identity store (enrich) ---------------------------------------------------

    async def start(self) -> None:
        await super().start()
        if self.config.enrich:
            settings = self.context.identity
            if settings is None:
                raise RuntimeError(f"forwarder {self.id}: enrich needs identity_store.enabled")
            self._identity = await settings.open(self.context.data_dir)

    async def close(self) -> None:
        if self._identity is not None:
            await self._identity.close()
            self._identity = None
        await super().close()

    async def deliver(self, events: list[Event]) -> Outcome:
        if self._identity is not None:
            batch = hashlib.sha256(orjson.dumps([e.get("messageId") for e in events])).digest()
            if batch != self._profiles_batch:  # a retry keeps the first reading
                self._profiles = await self._read_profiles(self._identity, events)
                self._profiles_batch = batch
        return await super().deliver(events)

    async def _read_profiles(
        self, store: IdentityStore, events: Sequence[Event]
    ) -> dict[int, Profile]:
        """The stored profiles of the events that may be enriched (conversions granting
        ``ad_user_data`` with an id), by batch index. A store that cannot be read leaves
        the batch as it is (logged once a minute): enrichment adds, it never holds back."""
        wanted: list[int] = []
        keys: list[tuple[str | None, str | None]] = []
        for index, event in enumerate(events):
            if event.get("type") not in ("track", "page", "screen"):
                continue
            context = _dict(event.get("context"))
            if _dict(context.get("consent")).get("ad_user_data") != "granted":
                continue
            anonymous_id = person_id(event.get("anonymousId"))
            user_id = person_id(event.get("userId"))
            if anonymous_id is None and user_id is None:
                continue
            wanted.append(index)
            keys.append((anonymous_id, user_id))
        if not keys:
            return {}
        try:
            found = await store.lookup(keys)
        except Exception as exc:
            _store_failures.log(
                logging.WARNING,
                self.id,
                "the identity store could not be read; events go without enrichment",
                {"forwarder": self.id, "error": f"{type(exc).__name__}: {exc}"},
            )
            return {}
        return {i: p for i, p in zip(wanted, found, strict=True) if p is not None}

    # -- the shared path ---------------------------------------------------------------

    def event_name(self, event: Event) -> tuple[str, bool, str | None] | str:
        """``(platform name, standard?, canonical name)`` for ``event``, or the drop reason
        (see the module docstring, steps 1 and 2)."""
        etype = event.get("type")
        if etype in ("page", "screen"):
            canonical: str | None = PAGE_VIEW
            raw = PAGE_VIEW
        elif etype == "track":
            name = event.get("event")
            if not isinstance(name, str) or not name.strip():
                return "no_event_name"
            raw = name
            canonical = CANONICAL_EVENT_NAMES.get(event_name_key(name))
        else:
            return "not_a_conversion"
        key = event_name_key(raw)
        configured = self._configured_exact.get(raw) or self._configured.get(key)
        if configured is not None:
            return configured, configured in self._standard_names, canonical
        if raw in self._standard_names:
            return raw, True, canonical
        if canonical is not None and canonical in self._standard:
            return self._standard[canonical], True, canonical
        if etype != "track" or self.config.unmapped == "skip":
            return "unmapped_event"
        return raw.strip(), False, canonical

    def convert(
        self, index: int, event: Event, now: datetime, drops: Counter[str]
    ) -> Conversion | None:
        """``event`` as a :class:`Conversion`, or None when it is not sent (the reason
        counted in ``drops``; what was left out of a conversion is in its ``field_drops``,
        counted by ``plan`` for the conversions it keeps). A platform that drops more
        events overrides this, calling it first. Pure."""
        named = self.event_name(event)
        if isinstance(named, str):
            drops[named] += 1
            return None
        name, standard, canonical = named
        moment = event_time(event, now)
        if self._max_age is not None and moment < now - self._max_age:
            drops["too_old"] += 1
            return None
        context = _dict(event.get("context"))
        consent = {k: v for k, v in _dict(context.get("consent")).items() if isinstance(v, str)}
        granted = consent.get("ad_user_data") == "granted"
        if not granted and self.config.ad_user_data_denied == "skip":
            drops["ad_user_data_denied"] += 1
            return None
        user = extract_user_data(event)
        country = self.config.default_phone_country
        profile = self._profiles.get(index) if granted else None
        own_keys: frozenset[str] | None = None
        if not granted:
            # What is left: the user agent, click ids and browser ids, whichever they are.
            cleared: dict[str, Any] = dict.fromkeys(_PERSONAL_FIELDS)
            user = replace(user, **cleared)
        elif profile is not None:
            enriched = enrich(user, profile)
            if enriched is not user:
                own = prepare(user, self.platform, default_phone_country=country)
                own_keys = match_keys(own, user)
                user = enriched
        prepared = prepare(user, self.platform, default_phone_country=country)
        keys = match_keys(prepared, user) & self.payload_match_keys
        properties = _dict(event.get("properties"))
        facts = commerce(properties, canonical)
        page = _dict(context.get("page"))
        is_page = canonical == PAGE_VIEW and event.get("type") in ("page", "screen")
        page_url = _text(page.get("url")) or (_text(properties.get("url")) if is_page else None)
        referrer = _text(page.get("referrer")) or (
            _text(properties.get("referrer")) if is_page else None
        )
        message_id = event.get("messageId")
        return Conversion(
            index=index,
            event=event,
            name=name,
            standard=standard,
            canonical=canonical,
            event_id=str(message_id) if message_id is not None else "",
            time=moment,
            commerce=facts,
            user=user,
            prepared=prepared,
            user_data_granted=granted,
            match_keys=keys,
            enriched=keys - own_keys if own_keys is not None else frozenset(),
            page_url=page_url,
            referrer=referrer,
            consent=consent,
            browser=bool(user.user_agent and page_url),
            field_drops=_added(prepared.drops, facts.problems),
        )

    def plan(self, events: list[Event], now: datetime) -> ConversionPlan:
        plan = ConversionPlan()
        conversions = [
            c
            for index, event in enumerate(events)
            if (c := self.convert(index, event, now, plan.drops)) is not None
        ]
        for c in conversions:
            if c.field_drops:
                plan.drops.update(c.field_drops)
        plan.requests.extend(self.requests(conversions))
        plan.match_keys = {c.index: c.match_keys for c in conversions}
        plan.enriched = {c.index: c.enriched for c in conversions if c.enriched}
        plan.conversions = {c.index: c for c in conversions}
        return plan

    def without(
        self, plan: Plan, planned: PlannedRequest, positions: frozenset[int]
    ) -> PlannedRequest | None:
        """``planned`` without the conversions at ``positions``, through ``request``."""
        if not isinstance(plan, ConversionPlan):
            return None
        kept = [
            plan.conversions[index]
            for at, index in enumerate(planned.indices)
            if at not in positions and index in plan.conversions
        ]
        if not kept:
            return None
        return PlannedRequest(self.request(kept), tuple(c.index for c in kept))

    def settled(self, plan: Plan, outcome: Delivered | Dead) -> None:
        """Count the match keys of the events the platform took (once per batch)."""
        if not isinstance(outcome, Delivered) or not isinstance(plan, ConversionPlan):
            return
        counts: Counter[str] = Counter()
        filled: Counter[str] = Counter()
        for planned in plan.requests:
            for index in planned.indices:
                if index in outcome.rejected:
                    continue
                keys = plan.match_keys.get(index, frozenset())
                counts.update(keys or (NO_MATCH_KEY,))
                filled.update(plan.enriched.get(index, ()))
        counter = self.context.metrics.forwarder_match_keys
        for key in (*MATCH_KEYS, NO_MATCH_KEY):
            if counts[key]:
                counter.labels(self.id, key).inc(counts[key])
        enriched = self.context.metrics.forwarder_enriched
        for key in MATCH_KEYS:
            if filled[key]:
                enriched.labels(self.id, key).inc(filled[key])
