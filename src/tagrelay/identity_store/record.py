"""What the identity store keeps, as values: pure functions, no I/O.

- :func:`observe`: what one event tells the store (its ids, the person's data, click and
  browser ids, when), or None when it tells nothing.
- :class:`Person`: one person's record, a set of anonymous and user ids and the latest
  value of each field with the time it was seen; :meth:`Person.merge` folds an
  observation or another person in (the newer value wins), :meth:`Person.profile` is what
  enrichment may use at a given time (expired values left out).
- ``Profile`` and ``enrich`` (re-exported from ``forwarders._enrichment``, where the ad
  forwarders use them): an event's ``UserData`` with what it lacks filled in.

What an event may contribute follows its own consent (``context.consent``): nothing at
all unless it grants ``ads`` (every ad forwarder requires it, and the identity step keeps
click ids and ad cookies only under it); the person's data (email, phone, names, address)
only when it also grants ``ad_user_data``. Values are kept raw (trimmed, as
``_user_data.extract_user_data`` reads them): each platform normalizes and hashes them its
own way when it sends them (``_user_data.prepare``), so one stored value serves all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from tagrelay.forwarders._enrichment import BROWSER_IDS, Profile, enrich, person_id
from tagrelay.forwarders._user_data import extract_user_data

__all__ = [
    "BROWSER_IDS",
    "PERSON_FIELDS",
    "REFRESH_MS",
    "Observation",
    "Person",
    "Profile",
    "enrich",
    "observe",
]

PERSON_FIELDS: Final = (
    "email",
    "phone",
    "first_name",
    "last_name",
    "street",
    "city",
    "state",
    "zip",
    "country",
)
"""The person's data the store keeps (``UserData`` attributes). The external id is the
person's latest ``userId``."""

REFRESH_MS: Final = 3_600_000
"""A value seen again unchanged has its time renewed (which keeps it from expiring) at most
this often: a visitor's page views do not rewrite their record each time."""


@dataclass(frozen=True, slots=True)
class Observation:
    """What one event tells the store. Prints no values."""

    anonymous_id: str | None
    user_id: str | None
    previous_id: str | None
    """An alias event's ``previousId``: an earlier anonymous or user id of the person."""
    at_ms: int
    user: Mapping[str, str] = field(default_factory=dict)
    click_ids: Mapping[str, str] = field(default_factory=dict)
    browser_ids: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        held = [name for name in ("user", "click_ids", "browser_ids") if getattr(self, name)]
        return f"Observation(<{', '.join(held)}>)"

    __str__ = __repr__


def _time_ms(event: Mapping[str, Any], now_ms: int) -> int:
    """When the store saw it: the relay's ``receivedAt`` (the sender's clock may be off)."""
    for key in ("receivedAt", "timestamp"):
        value = event.get(key)
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                continue
            if moment.tzinfo is None:
                continue
            return min(now_ms, int(moment.timestamp() * 1000))
    return now_ms


def observe(event: Mapping[str, Any], now_ms: int) -> Observation | None:
    """What ``event`` tells the store, or None: no ``ads`` consent, no id, or nothing to
    keep (an event with one id and no data; two ids alone link them)."""
    context = event.get("context")
    if not isinstance(context, dict):
        return None
    consent = context.get("consent")
    if not isinstance(consent, dict) or consent.get("ads") != "granted":
        return None
    anonymous_id, user_id = person_id(event.get("anonymousId")), person_id(event.get("userId"))
    previous_id = person_id(event.get("previousId")) if event.get("type") == "alias" else None
    ids = [i for i in (anonymous_id, user_id, previous_id) if i is not None]
    if not ids:
        return None
    data = extract_user_data(event)
    user: dict[str, str] = {}
    if consent.get("ad_user_data") == "granted":
        for name in PERSON_FIELDS:
            value = getattr(data, name)
            if value:
                user[name] = value
    browser: dict[str, str] = {}
    for name in ("fbc", "fbp", "ttp"):
        value = getattr(data, name)
        if value:
            browser[name] = value
    browser.update(data.browser_ids)
    click_ids = dict(data.click_ids)
    if not (user or click_ids or browser) and len(set(ids)) < 2:
        return None
    return Observation(
        anonymous_id,
        user_id,
        previous_id,
        _time_ms(event, now_ms),
        user,
        click_ids,
        browser,
    )


Stamped = dict[str, list[Any]]
"""name -> [value, seen_ms]."""


def _fresher(mine: Stamped, name: str, value: str, at_ms: int) -> bool:
    """Set ``mine[name]`` to ``value`` seen at ``at_ms`` if that is news: a new value seen
    later than the one held, or the same value seen ``REFRESH_MS`` after it. Returns
    whether it changed."""
    held = mine.get(name)
    if held is None:
        mine[name] = [value, at_ms]
        return True
    held_value, held_ms = held
    if held_value == value:
        if at_ms - held_ms >= REFRESH_MS:
            held[1] = at_ms
            return True
        return False
    if at_ms >= held_ms:
        mine[name] = [value, at_ms]
        return True
    return False


@dataclass
class Person:
    """One person's record as stored (JSON): ids and stamped values."""

    anonymous_ids: dict[str, int] = field(default_factory=dict)
    """anonymousId -> last seen (Unix ms)."""
    user_ids: dict[str, int] = field(default_factory=dict)
    user: Stamped = field(default_factory=dict)
    click_ids: Stamped = field(default_factory=dict)
    browser_ids: Stamped = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Person({len(self.anonymous_ids)} anonymous ids, {len(self.user_ids)} user ids, "
            f"<{', '.join([*self.user, *self.click_ids, *self.browser_ids])}>)"
        )

    __str__ = __repr__

    # -- stored form -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.anonymous_ids,
            "u": self.user_ids,
            "f": self.user,
            "c": self.click_ids,
            "b": self.browser_ids,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Person:
        return cls(
            dict(data.get("a", {})),
            dict(data.get("u", {})),
            {k: list(v) for k, v in data.get("f", {}).items()},
            {k: list(v) for k, v in data.get("c", {}).items()},
            {k: list(v) for k, v in data.get("b", {}).items()},
        )

    @property
    def last_seen_ms(self) -> int:
        """The latest time anything of the person was seen."""
        times = [*self.anonymous_ids.values(), *self.user_ids.values()]
        for stamped in (self.user, self.click_ids, self.browser_ids):
            times.extend(seen for _, seen in stamped.values())
        return max(times, default=0)

    # -- changes ---------------------------------------------------------------------------

    def add_id(self, ids: dict[str, int], value: str, at_ms: int) -> bool:
        held = ids.get(value)
        if held is None or at_ms - held >= REFRESH_MS:
            ids[value] = max(at_ms, held or 0)
            return True
        return False

    def merge(self, seen: Observation, previous_is_user: bool = False) -> bool:
        """Fold ``seen`` in; returns whether anything changed."""
        at = seen.at_ms
        changed = False
        if seen.anonymous_id is not None:
            changed |= self.add_id(self.anonymous_ids, seen.anonymous_id, at)
        if seen.user_id is not None:
            changed |= self.add_id(self.user_ids, seen.user_id, at)
        if seen.previous_id is not None:
            ids = self.user_ids if previous_is_user else self.anonymous_ids
            changed |= self.add_id(ids, seen.previous_id, at)
        for stamped, values in (
            (self.user, seen.user),
            (self.click_ids, seen.click_ids),
            (self.browser_ids, seen.browser_ids),
        ):
            for name, value in values.items():
                changed |= _fresher(stamped, name, value, at)
        return changed

    def absorb(self, other: Person) -> None:
        """Fold another record of the same person in (two records linked by an event)."""
        for mine, theirs in (
            (self.anonymous_ids, other.anonymous_ids),
            (self.user_ids, other.user_ids),
        ):
            for value, at in theirs.items():
                mine[value] = max(at, mine.get(value, 0))
        for stamped, more in (
            (self.user, other.user),
            (self.click_ids, other.click_ids),
            (self.browser_ids, other.browser_ids),
        ):
            for name, (value, at) in more.items():
                held = stamped.get(name)
                if held is None or at > held[1]:
                    stamped[name] = [value, at]

    def expire(self, now_ms: int, ttl_ms: int, click_id_ms: Mapping[str, int]) -> bool:
        """Drop what is past its time; returns whether anything was dropped."""
        before = self.size()
        cutoff = now_ms - ttl_ms
        for ids in (self.anonymous_ids, self.user_ids):
            for value in [v for v, at in ids.items() if at < cutoff]:
                del ids[value]
        for stamped in (self.user, self.browser_ids):
            for name in [n for n, (_, at) in stamped.items() if at < cutoff]:
                del stamped[name]
        for name in [
            n for n, (_, at) in self.click_ids.items() if at < now_ms - click_id_ms.get(n, ttl_ms)
        ]:
            del self.click_ids[name]
        return self.size() != before

    def size(self) -> int:
        return sum(
            len(part)
            for part in (
                self.anonymous_ids,
                self.user_ids,
                self.user,
                self.click_ids,
                self.browser_ids,
            )
        )

    def profile(self, now_ms: int, ttl_ms: int, click_id_ms: Mapping[str, int]) -> Profile:
        """What enrichment may use at ``now_ms``."""
        cutoff = now_ms - ttl_ms
        user_ids = [(at, value) for value, at in self.user_ids.items() if at >= cutoff]
        return Profile(
            user={n: v for n, (v, at) in self.user.items() if at >= cutoff},
            external_id=max(user_ids)[1] if user_ids else None,
            click_ids={
                n: (v, at)
                for n, (v, at) in self.click_ids.items()
                if at >= now_ms - click_id_ms.get(n, ttl_ms)
            },
            browser_ids={n: v for n, (v, at) in self.browser_ids.items() if at >= cutoff},
        )
