"""The one event model every source produces and every forwarder consumes.

It is Segment's spec, kept as a plain ``dict`` (events are decoded from and encoded to JSON
at high rates; a class per event would cost more than it adds). The keys, after
normalization by ``tagrelay.pipeline.normalize``:

=====================  =====================================================================
``type``               page, track, identify, group, alias or screen
``event``              the name of a track event (required for track)
``name``               the name of a page or screen (optional)
``messageId``          unique id of the event; the deduplication key everywhere
``anonymousId``        the visitor's anonymous id
``userId``             the known user id
``groupId``            group events: the account/company id
``previousId``         alias events: the previous id
``properties``         object: what happened (track, page, screen)
``traits``             object: who it is (identify, group)
``context``            object: ``page``, ``ip``, ``userAgent``, ``locale``, ``campaign``,
                       ``library``, ``consent``, ``clientIds``, ``traits``, ...
``timestamp``          when it happened, corrected for the client's clock skew (ISO 8601, UTC)
``originalTimestamp``  the client's own timestamp, as sent
``sentAt``             the client's clock when it sent the request
``receivedAt``         the relay's clock when the request arrived
``integrations``       Segment's per-destination switches, kept as sent
=====================  =====================================================================

Every event is stored with ``context.source`` naming the protocol it arrived by and
``context.writeKeyId`` naming the write key's id (never its secret).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

Event = dict[str, Any]
"""An event: a JSON object following the table above."""

EVENT_TYPES: Final = frozenset({"page", "track", "identify", "group", "alias", "screen"})

CLICK_ID_PARAMS: Final = (
    "gclid",
    "gbraid",
    "wbraid",
    "fbclid",
    "ttclid",
    "ScCid",
    "epik",
    "rdt_cid",
    "twclid",
    "li_fat_id",
    "msclkid",
)
"""The ad click ids an event's ``context.clickIds`` may hold, by these names: the identity
step captures them from landing URLs, the ad forwarders send them."""

BROWSER_ID_COOKIES: Final = ("_ttp", "_scid", "_epik", "_rdt_uuid", "_uetvid")
"""First-party cookies that ad platforms' pixels set on the site's own domain and their
conversion APIs match on: TikTok's ``_ttp``, Snap's ``_scid``, Pinterest's ``_epik`` (the
click id its tag kept from the landing URL), Reddit's ``_rdt_uuid``, Microsoft's ``_uetvid``.
The identity step attaches each one a request carries, under ``ads`` consent, as
``context.clientIds.<name>`` (never making one up: only the vendor's pixel can tie it to
its records); the ad forwarders send them."""


# ``datetime.isoformat`` costs about 1.5 us on the ingest machine and every event needs two
# or three timestamps formatted; most of them fall in the same few seconds (the request's
# receive time, clocks close to it). So the part up to the seconds is memoized per second
# and the milliseconds come from a table: about 0.4 us. Bounded: cleared when full.
_SECOND_PREFIXES: dict[tuple[int, int, int, int, int, int], str] = {}
_MAX_SECOND_PREFIXES: Final = 4096
_MILLIS_SUFFIXES: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


def iso(dt: datetime) -> str:
    """``2026-11-29T15:38:32.123Z``: the one timestamp format events carry (UTC,
    milliseconds truncated, like ``isoformat(timespec="milliseconds")``)."""
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    second = (dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second)
    prefix = _SECOND_PREFIXES.get(second)
    if prefix is None:
        if len(_SECOND_PREFIXES) >= _MAX_SECOND_PREFIXES:
            _SECOND_PREFIXES.clear()
        # "2026-11-29T15:38:32+00:00" without its offset
        prefix = _SECOND_PREFIXES[second] = dt.isoformat(timespec="seconds")[:-6]
    return prefix + _MILLIS_SUFFIXES[dt.microsecond // 1000]
