"""Sources: one module per inbound protocol, registered here by name.

Every request becomes events the same way: its route reads the body and calls the
protocol's decoder from ``SOURCES``, ``decode(body, param) -> Decoded`` (pure; a bad
request raises ``IngestError``). ``body`` is the request body as received (``b""`` for a
GET); ``param`` is the one thing the route adds to it:

==========  ======================================  =====================================
name        protocol                                param
==========  ======================================  =====================================
segment     Segment's HTTP API (``/v1/*``)          the path's type (``track``, ``b``...)
jitsu       Jitsu's ingest (``/api/s/*``)           the path's type
tagrelay    the relay's script (``paths.events``)   unused
ga4         gtag hits (``/g/collect``)              the raw query string (the request's
                                                    parameters, re-sent verbatim)
ga4_mp      GA4 Measurement Protocol                the measurement id the api secret
            (``/mp/collect``)                       was checked against
google_     Google Ads tag hits passing a Google    the path below the gateway route,
ads_tag     tag gateway route (``web.gateway``)     ``?`` and the raw query string
==========  ======================================  =====================================

GA4 hits passing a gateway route are decoded by ``ga4`` (source ``ga4``, marked
``context.ga4.gateway``).

The name is the ``source`` label of the ingest metrics and ``context.source`` of the stored
events, except that requests from RudderStack's SDKs on the Segment routes are labelled
``rudderstack`` (``segment.sdk_source``). ``SOURCE_LABELS`` is every label a request of
these sources gets.
"""

from __future__ import annotations

from collections.abc import Callable

from tagrelay.sources import ga4, google_ads_tag, jitsu, segment, tagrelay
from tagrelay.sources._base import Decoded, parse_json_body

Decoder = Callable[[bytes, str], Decoded]

SOURCES: dict[str, Decoder] = {
    "segment": segment.decode,
    "jitsu": jitsu.decode,
    "tagrelay": tagrelay.decode,
    ga4.COLLECT_SOURCE: ga4.decode_collect,
    ga4.MP_SOURCE: ga4.decode_measurement_protocol,
    google_ads_tag.ADS_TAG_SOURCE: google_ads_tag.decode_ads_hit,
}
SOURCE_LABELS: frozenset[str] = frozenset({*SOURCES, segment.RUDDERSTACK})

__all__ = ["SOURCES", "SOURCE_LABELS", "Decoded", "Decoder", "parse_json_body"]
