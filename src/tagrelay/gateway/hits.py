"""What a request below a gateway route is, by its path below the route and its query
(pure): the ``kind`` label of the gateway's metrics, and whether the relay keeps a copy.

=============  =====================================================================
``health``     ``/healthy``; ``/`` with ``validate_geo=healthy`` (Tag Assistant's and
               Google's checks of the route and of the geo headers)
``script``     ``/`` (the container or tag, ``?id=...``), ``/gtm.js``, ``/gtag/js``,
               ``/gtag/destination``, ``/ns.html``, the tag's service worker
               (``/_/service_worker/...``)
``ga4_hit``    ``/ga/g/c``, ``/ag/g/c``, ``/g/collect``: GA4 hits in the ``/g/collect``
               format, copied through the GA4 source
``ads_hit``    ``/gs/ccm/...``, ``/as/...``, ``/d/ccm/...``, ``/g/d/ccm/...``,
               ``/pagead/...``: Google Ads hits, counted and copied when they carry an
               event name and a click id (``sources.google_ads_tag``)
``other``      everything else (telemetry ``/a``, ``/td``, opaque script paths)
=============  =====================================================================

The path prefixes of hits are inferred from captures, not documented by Google
(``shared/reference/google-tag-gateway.md``, section 3).
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["KINDS", "Kind", "classify"]

Kind = Literal["script", "ga4_hit", "ads_hit", "health", "other"]
KINDS: Final[tuple[Kind, ...]] = ("script", "ga4_hit", "ads_hit", "health", "other")

GA4_HIT_PATHS: Final = frozenset({"/ga/g/c", "/ag/g/c", "/g/collect"})
ADS_HIT_PREFIXES: Final = ("/gs/ccm/", "/as/", "/d/ccm/", "/g/d/ccm/", "/pagead/")
SCRIPT_PATHS: Final = frozenset({"/", "/gtm.js", "/gtag/js", "/gtag/destination", "/ns.html"})
SCRIPT_PREFIXES: Final = ("/_/service_worker/",)


def classify(rest: str, query: str) -> Kind:
    """The kind of a request at ``rest``, its path below the route (``/`` for the route's
    own), with ``query`` (raw, without ``?``)."""
    if rest == "/healthy":
        return "health"
    if rest == "/" and "validate_geo=healthy" in query.split("&"):
        return "health"
    if rest in GA4_HIT_PATHS:
        return "ga4_hit"
    if rest.startswith(ADS_HIT_PREFIXES):
        return "ads_hit"
    if rest in SCRIPT_PATHS or rest.startswith(SCRIPT_PREFIXES):
        return "script"
    return "other"
