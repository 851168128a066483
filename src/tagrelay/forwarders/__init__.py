"""Forwarders: one module per destination, registered here by ``type``.

Adding a destination: a module with a config model and a ``Forwarder`` subclass, one line
in ``FORWARDERS``, one test file under ``tests/forwarders/``. An HTTP API subclasses
``_batched.BatchedHttpForwarder`` (a pure plan of requests and a classification of
responses; sending, retries without resending, credentials and secret scrubbing are
shared) and reads commerce fields through ``_ecommerce``; an ad platform subclasses
``_conversions.ConversionsForwarder`` (event names, consent, user data, commerce and
match-key counts shared; it lays out its payload and reads its errors).

The registry names each destination's module instead of importing it: a module, and what
it brings (phone number metadata, RSA signing, ...), is imported the first time its type
is looked up, when a configuration names it. A relay that only loads its warehouse never
holds the ad platforms' code.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from tagrelay.forwarders._base import Forwarder, ForwarderContext

ForwarderClass = type[Forwarder[Any]]


class ForwarderRegistry(MutableMapping[str, ForwarderClass]):
    """Forwarder type -> class. Iterating, ``len`` and ``in`` never import anything;
    looking a type up imports its module once (``values()`` and ``items()`` therefore import
    every one, for the tools that document them all). A class set by hand (a test's, a
    plugin's) replaces the registered one."""

    def __init__(self, locations: Mapping[str, str]) -> None:
        self._locations = dict(locations)
        """Type -> ``"module:ClassName"``."""
        self._classes: dict[str, ForwarderClass] = {}

    def __getitem__(self, kind: str) -> ForwarderClass:
        cls = self._classes.get(kind)
        if cls is None:
            module, _, name = self._locations[kind].partition(":")
            cls = self._classes[kind] = getattr(importlib.import_module(module), name)
        return cls

    def __setitem__(self, kind: str, cls: ForwarderClass) -> None:
        self._locations.setdefault(kind, f"{cls.__module__}:{cls.__qualname__}")
        self._classes[kind] = cls

    def __delitem__(self, kind: str) -> None:
        del self._locations[kind]
        self._classes.pop(kind, None)

    def __contains__(self, kind: object) -> bool:
        return kind in self._locations

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)


FORWARDERS = ForwarderRegistry(
    {
        "ga4": "tagrelay.forwarders.ga4:GA4Forwarder",
        "google_ads": "tagrelay.forwarders.google_ads:GoogleAdsForwarder",
        "linkedin": "tagrelay.forwarders.linkedin_conversions:LinkedInForwarder",
        "meta": "tagrelay.forwarders.meta_capi:MetaForwarder",
        "microsoft": "tagrelay.forwarders.microsoft_uet:MicrosoftForwarder",
        "pinterest": "tagrelay.forwarders.pinterest_capi:PinterestForwarder",
        "reddit": "tagrelay.forwarders.reddit_capi:RedditForwarder",
        "snapchat": "tagrelay.forwarders.snap_capi:SnapForwarder",
        "tiktok": "tagrelay.forwarders.tiktok_events:TikTokForwarder",
        "warehouse": "tagrelay.forwarders.warehouse:WarehouseForwarder",
        "webhook": "tagrelay.forwarders.webhook:WebhookForwarder",
        "x": "tagrelay.forwarders.x_conversions:XForwarder",
    }
)

INTERNAL_FORWARDERS = frozenset({"identity_store"})
"""Forwarder types the relay runs on its own, never named in a configuration file: the
identity store's writer (``tagrelay.identity_store.writer``)."""


def forwarder_class(kind: str) -> ForwarderClass:
    """The forwarder class of ``kind``: a registered type or an internal one."""
    if kind == "identity_store":
        # Imported here: the writer's module imports the forwarders' base, which comes
        # after this package.
        from tagrelay.identity_store.writer import IdentityWriter

        return IdentityWriter
    return FORWARDERS[kind]


__all__ = [
    "FORWARDERS",
    "INTERNAL_FORWARDERS",
    "Forwarder",
    "ForwarderClass",
    "ForwarderContext",
    "ForwarderRegistry",
    "forwarder_class",
]
