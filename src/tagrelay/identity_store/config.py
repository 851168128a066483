"""``identity_store``: its configuration, and how long each click id is kept.

A click id is worth sending only while the platform can still attribute a conversion to
the click: past the platform's attribution (click-through) window it matches nothing,
and keeping it longer keeps personal data for no purpose. The defaults below are each
platform's *default* click-through window; an advertiser who set a longer one overrides it
(``identity_store.click_id_days``).

Sources: /work/shared/reference/destinations.md where it gives a window; where it says
nothing, the platform's documented default, named as such.

=========  ===========================  =====  ==============================================
click id   platform                     days   source
=========  ===========================  =====  ==============================================
fbclid     Meta (as fbc)                7      Meta's default attribution setting, 7-day
                                               click (destinations.md gives the 7-day event
                                               window, not the attribution one)
gclid,     Google Ads                   30     a conversion action's default click-through
gbraid,                                        window (adjustable up to 90 days;
wbraid                                         destinations.md: EXPIRED_EVENT past it)
ttclid     TikTok                       28     destinations.md T7: click-through 28 days
ScCid      Snapchat                     28     Snap's default 28-day swipe-up window
                                               (destinations.md: nothing)
epik       Pinterest                    30     Pinterest's default 30-day click window
                                               (destinations.md: nothing)
rdt_cid    Reddit                       28     Reddit's default 28-day click window
                                               (destinations.md: nothing)
twclid     X                            30     X's default 30-day post-engagement window
                                               (destinations.md: nothing)
li_fat_id  LinkedIn                     90     destinations.md L3: 90-day lookback (events
                                               older than 90 days are refused, L1)
msclkid    Microsoft Advertising        30     Microsoft's default 30-day conversion window
                                               (destinations.md: nothing)
=========  ===========================  =====  ==============================================

Browser ids (``fbp``, ``_ttp``, ``_scid``, ...) are the pixels' own cookies, which their
vendors keep for months; they and the person's data expire with ``ttl_days``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from pydantic import Field, field_validator

from tagrelay.config.common import ConfigModel
from tagrelay.model import CLICK_ID_PARAMS

__all__ = ["CLICK_ID_DAYS", "IDENTITY_WRITER_ID", "IdentityStoreConfig"]

CLICK_ID_DAYS: Final[Mapping[str, int]] = {
    "fbclid": 7,
    "gclid": 30,
    "gbraid": 30,
    "wbraid": 30,
    "ttclid": 28,
    "ScCid": 28,
    "epik": 30,
    "rdt_cid": 28,
    "twclid": 30,
    "li_fat_id": 90,
    "msclkid": 30,
}
"""Click id -> days it is kept after it was last seen (see the module docstring's table)."""

assert set(CLICK_ID_DAYS) == set(CLICK_ID_PARAMS), "a window for every click id"

IDENTITY_WRITER_ID: Final = "identity_store"
"""The spool cursor (and metric label) of the identity store's writer: a forwarder id no
configured forwarder may take while the store is on."""


class IdentityStoreConfig(ConfigModel):
    """What the relay remembers about a visitor and a user between their events, so that
    ad forwarders with ``enrich: true`` can send a backend's purchase with the email and
    click ids seen earlier at login and on the landing page."""

    enabled: bool = Field(
        False,
        description=(
            "Keep the identity store (identity.db in the data directory): per visitor "
            "(anonymousId) and user (userId), linked by identify and alias events and by any "
            "event carrying both, the latest user data (email, phone, names, address, "
            "external id) and browser and click ids, each with the time it was seen. Ad "
            "forwarders with enrich: true fill in what an event lacks from it. Personal "
            "fields are encrypted when encryption.keys is set."
        ),
        examples=[True],
    )
    ttl_days: int = Field(
        90,
        ge=1,
        le=3650,
        description=(
            "Days a visitor's or user's data is kept after it was last seen: older values "
            "are never used and are deleted."
        ),
        examples=[90],
    )
    click_id_days: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "Days a click id is kept after it was seen, by click id, overriding the default "
            "(the platform's default attribution window: fbclid 7, gclid, gbraid, wbraid, "
            "epik, twclid and msclkid 30, ttclid, ScCid and rdt_cid 28, li_fat_id 90); never "
            "longer than ttl_days."
        ),
        examples=[{"gclid": 90}],
    )
    enrich_wait_secs: float = Field(
        5.0,
        ge=0,
        le=60,
        description=(
            "How long a forwarder with enrich: true waits, before sending a batch, for the "
            "store to have taken every event up to that batch's last (so that a purchase "
            "sees the identify sent just before it). Past it, the batch goes with what the "
            "store holds, counted in tagrelay_identity_store_waits_total{outcome=timeout}."
        ),
        examples=[5.0],
    )

    @field_validator("click_id_days")
    @classmethod
    def _known_click_ids(cls, value: dict[str, int]) -> dict[str, int]:
        for name, days in value.items():
            if name not in CLICK_ID_DAYS:
                raise ValueError(
                    f"{name!r} is not a click id; click ids: {', '.join(CLICK_ID_PARAMS)}"
                )
            if days < 0:
                raise ValueError(f"click_id_days.{name} cannot be negative")
        return value

    def click_id_secs(self) -> dict[str, int]:
        """Click id -> seconds it is kept (the configured or default window, at most
        ``ttl_days``)."""
        ttl = self.ttl_days * 86_400
        days = {**CLICK_ID_DAYS, **self.click_id_days}
        return {name: min(ttl, n * 86_400) for name, n in days.items()}
