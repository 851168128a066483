"""Enrichment: an event's user data with what it lacks filled in from what the identity
store remembers of its person (``identity_store``), for ad forwarders with ``enrich: true``
(``_conversions``). Pure.

The store's record of a person is read as a :class:`Profile` (the values that have not
expired at the time of reading); :func:`enrich` fills the ``UserData`` an event gave
(``_user_data.extract_user_data``) from it. The event's own values always win.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from tagrelay.forwarders._user_data import UserData
from tagrelay.model import BROWSER_ID_COOKIES

__all__ = ["BROWSER_IDS", "Profile", "enrich", "person_id"]

BROWSER_IDS: Final = ("fbc", "fbp", "ttp", *BROWSER_ID_COOKIES)
"""The browser ids the store keeps: ``UserData.fbc``/``fbp``/``ttp`` and each cookie of
``BROWSER_ID_COOKIES`` (``UserData.browser_ids``)."""


def person_id(value: Any) -> str | None:
    """An ``anonymousId``, ``userId`` or ``previousId`` as the identity store keys it (the
    writer and the readers must agree): text trimmed, an integer as its digits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip() or None
    return None


@dataclass(frozen=True, slots=True)
class Profile:
    """What enrichment may use of a person at one moment (expired values left out). Prints
    no values."""

    user: Mapping[str, str] = field(default_factory=dict)
    """``PERSON_FIELDS`` -> raw value."""
    external_id: str | None = None
    click_ids: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    """Click id name -> (value, when it was seen, Unix ms)."""
    browser_ids: Mapping[str, str] = field(default_factory=dict)
    """``BROWSER_IDS`` -> value."""

    def __repr__(self) -> str:
        held = [*self.user, *self.click_ids, *self.browser_ids]
        if self.external_id:
            held.append("external_id")
        return f"Profile(<{', '.join(held)}>)"

    __str__ = __repr__


def enrich(user: UserData, profile: Profile) -> UserData:
    """``user`` with what it lacks taken from ``profile``: its own values always win. An
    ``fbc`` the event lacks (and cannot build from its own ``fbclid``) is the stored
    ``_fbc`` cookie's, else built from the stored ``fbclid`` with the time it was seen,
    as Meta's ClickID format wants (``fb.1.<creation time ms>.<fbclid>``)."""
    changes: dict[str, Any] = {}
    for name, value in profile.user.items():
        if not getattr(user, name):
            changes[name] = value
    if not user.external_id and profile.external_id:
        changes["external_id"] = profile.external_id
    missing_clicks = {
        name: value for name, (value, _) in profile.click_ids.items() if name not in user.click_ids
    }
    if missing_clicks:
        changes["click_ids"] = {**missing_clicks, **user.click_ids}
    stored = profile.browser_ids
    if not user.fbc and "fbclid" not in user.click_ids:
        if stored.get("fbc"):
            changes["fbc"] = stored["fbc"]
        elif "fbclid" in profile.click_ids:
            fbclid, seen_ms = profile.click_ids["fbclid"]
            changes["fbc"] = f"fb.1.{seen_ms}.{fbclid}"
    for name in ("fbp", "ttp"):
        if not getattr(user, name) and stored.get(name):
            changes[name] = stored[name]
    cookies = {n: v for n, v in stored.items() if n in BROWSER_ID_COOKIES}
    if cookies.keys() - user.browser_ids.keys():
        changes["browser_ids"] = {**cookies, **user.browser_ids}
    return replace(user, **changes) if changes else user
