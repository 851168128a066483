"""Consent: every event leaves ingestion with ``context.consent`` stating each category.

The categories are ``analytics`` (analytics storage), ``ads`` (advertising storage),
``ad_user_data`` and ``ad_personalization`` (Google consent mode v2's names). Each is
``"granted"`` or ``"denied"``. Events arrive with consent in several shapes, all understood:

- tagrelay.js: ``{"analytics": "granted", "ads": "denied", ...}`` (true/false also accepted);
- Google consent mode names: ``analytics_storage``, ``ad_storage``;
- Segment's consent object: ``{"categoryPreferences": {"Analytics": true, "Advertising":
  false}}`` (category names are matched case-insensitively; Marketing counts as ads).

A category the event says nothing about takes the configured default. Global Privacy
Control (``Sec-GPC: 1``, or ``context.gpc`` from the script) denies the advertising
categories when ``consent.honor_gpc`` is set.

When an event denies analytics and ``consent.analytics_denied`` is ``anonymize``, its
identifiers are removed (:func:`anonymize`) and the relay sets no cookie for it; the event
is still stored and counted.
"""

from __future__ import annotations

from typing import Any

from tagrelay.config.common import CONSENT_CATEGORIES
from tagrelay.config.models import ConsentConfig
from tagrelay.model import Event

GRANTED = "granted"
DENIED = "denied"

ADS_CATEGORIES = ("ads", "ad_user_data", "ad_personalization")

_ALIASES = {
    "analytics": "analytics",
    "analytics_storage": "analytics",
    "statistics": "analytics",
    "ads": "ads",
    "ad_storage": "ads",
    "advertising": "ads",
    "marketing": "ads",
    "targeting": "ads",
    "ad_user_data": "ad_user_data",
    "ad_personalization": "ad_personalization",
}

_TRUE = frozenset({True, "granted", "true", "yes", "1", "allow", "allowed", "accept"})
_FALSE = frozenset({False, "denied", "false", "no", "0", "deny", "rejected", "reject"})


def _state(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip().lower()
    # True == 1 and False == 0, so the sets also match the numbers 1 and 0.
    try:
        if value in _TRUE:
            return GRANTED
        if value in _FALSE:
            return DENIED
    except TypeError:  # unhashable (a list, a dict)
        return None
    return None


def _read(source: Any, into: dict[str, str]) -> None:
    if not isinstance(source, dict):
        return
    for name, value in source.items():
        if not isinstance(name, str):
            continue
        category = _ALIASES.get(name.lower())
        if category is None:
            continue
        state = _state(value)
        if state is not None:
            into[category] = state


class ConsentPolicy:
    def __init__(self, config: ConsentConfig) -> None:
        self.config = config
        self.defaults: dict[str, str] = {
            category: getattr(config.default, category) for category in CONSENT_CATEGORIES
        }
        self.anonymize_denied = config.analytics_denied == "anonymize"

    def apply(self, event: Event, *, gpc_header: bool) -> dict[str, str]:
        """Set ``context.consent`` to the event's full consent state and return it."""
        context = event["context"]
        raw = context.get("consent")
        stated: dict[str, str] = {}
        if isinstance(raw, dict):
            _read(raw.get("categoryPreferences"), stated)
            _read(raw, stated)
        consent = {**self.defaults, **stated}
        if self.config.honor_gpc and (gpc_header or context.get("gpc") is True):
            for category in ADS_CATEGORIES:
                consent[category] = DENIED
        if isinstance(raw, dict):
            # Keep what else the sender said (Segment's categoryPreferences, say).
            context["consent"] = {**raw, **consent}
        else:
            context["consent"] = consent
        return consent


# Identifiers removed from an event that denies analytics storage.
_TOP_IDENTIFIERS = ("anonymousId", "userId", "previousId", "traits")
_CONTEXT_IDENTIFIERS = ("ip", "clientIds", "clickIds", "traits", "device")


def anonymize(event: Event) -> None:
    """Remove what identifies the visitor: its ids, traits, IP, client and click ids. The
    event keeps its type, name, properties, page and consent, so it can still be counted."""
    for name in _TOP_IDENTIFIERS:
        event.pop(name, None)
    context = event.get("context")
    if isinstance(context, dict):
        for name in _CONTEXT_IDENTIFIERS:
            context.pop(name, None)
        context["anonymized"] = True
