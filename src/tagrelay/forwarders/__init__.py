"""Forwarders: one module per destination, registered here by ``type``.

Adding a destination: a module with a config model and a ``Forwarder`` subclass, one line
in ``FORWARDERS``, one test file under ``tests/forwarders/``. An HTTP API subclasses
``_batched.BatchedHttpForwarder`` (a pure plan of requests and a classification of
responses; sending, retries without resending, credentials and secret scrubbing are
shared) and reads commerce fields through ``_ecommerce``; an ad platform subclasses
``_conversions.ConversionsForwarder`` (event names, consent, user data, commerce and
match-key counts shared; it lays out its payload and reads its errors).
"""

from __future__ import annotations

from tagrelay.forwarders._base import Forwarder, ForwarderContext
from tagrelay.forwarders.ga4 import GA4Forwarder
from tagrelay.forwarders.google_ads import GoogleAdsForwarder
from tagrelay.forwarders.linkedin_conversions import LinkedInForwarder
from tagrelay.forwarders.meta_capi import MetaForwarder
from tagrelay.forwarders.microsoft_uet import MicrosoftForwarder
from tagrelay.forwarders.pinterest_capi import PinterestForwarder
from tagrelay.forwarders.reddit_capi import RedditForwarder
from tagrelay.forwarders.snap_capi import SnapForwarder
from tagrelay.forwarders.tiktok_events import TikTokForwarder
from tagrelay.forwarders.warehouse import WarehouseForwarder
from tagrelay.forwarders.webhook import WebhookForwarder
from tagrelay.forwarders.x_conversions import XForwarder

FORWARDERS: dict[str, type[Forwarder]] = {  # type: ignore[type-arg]
    "ga4": GA4Forwarder,
    "google_ads": GoogleAdsForwarder,
    "linkedin": LinkedInForwarder,
    "meta": MetaForwarder,
    "microsoft": MicrosoftForwarder,
    "pinterest": PinterestForwarder,
    "reddit": RedditForwarder,
    "snapchat": SnapForwarder,
    "tiktok": TikTokForwarder,
    "warehouse": WarehouseForwarder,
    "webhook": WebhookForwarder,
    "x": XForwarder,
}

INTERNAL_FORWARDERS = frozenset({"identity_store"})
"""Forwarder types the relay runs on its own, never named in a configuration file: the
identity store's writer (``tagrelay.identity_store.writer``)."""


def forwarder_class(kind: str) -> type[Forwarder]:  # type: ignore[type-arg]
    """The forwarder class of ``kind``: a registered type or an internal one."""
    if kind == "identity_store":
        # Imported here: the writer's module imports the forwarders' base, which comes
        # after this package.
        from tagrelay.identity_store.writer import IdentityWriter

        return IdentityWriter
    return FORWARDERS[kind]


__all__ = ["FORWARDERS", "INTERNAL_FORWARDERS", "Forwarder", "ForwarderContext", "forwarder_class"]
