"""Google Ads tag hits seen by the Google tag gateway (pure).

Through a gateway route (``web.gateway``) the Google tag sends its Ads hits to the site's
own path: ``/<path>/gs/ccm/collect``, ``/<path>/as/p/c/<AW number>/``,
``/<path>/d/ccm/form-data/<AW number>``, ``/<path>/as/d/ccm/conversion/<AW number>/`` and
the like (``shared/reference/google-tag-gateway.md``, section 3). Google documents none of
them; what is read here is what captured hits carry in their query string:

=============================  ===========================================================
``en``                         the event name (``conversion``, ``page_view``, ...)
``tid`` or the path's number   the Ads account (``AW-123456789``)
``gclid``, ``gbraid``,         the click ids, also from ``gclaw`` / ``gclgb`` (the values
``wbraid``                     of ``_gcl_aw`` / ``_gcl_gb``: ``GCL.<time>.<id>`` or the id)
                               and from the page URL (``url``)
``label``                      the conversion label
``value``, ``currency_code``   the conversion's value and currency
``oid``                        the order (transaction) id
``url``, ``ref``, ``tiba``     the page's URL, referrer and title
``gcs``, ``gcd``, ``npa``      consent, read as for GA4 hits (``sources.ga4``)
=============================  ===========================================================

A hit becomes one ``track`` event only when it carries an event name and a click id (a
conversion the ad forwarders can attribute); any other decodes to no event and is only
counted. The raw query is kept (``context.googleAds.request``) with the hit's path
(``.path``) and ``gateway: true``: Google has had the hit already. ``anonymousId`` is a
digest of the click id (the gateway replaces it by GA's client id when the ``_ga`` cookie
came with the hit); ``messageId`` a digest of the path and query, so a repeated hit
deduplicates in the spool. The body (form data with hashed user data on ``form-data``
hits) is not read.

``param`` (``sources.SOURCES``) is the path below the gateway route, ``?``, and the query
string exactly as received.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from tagrelay.model import Event
from tagrelay.sources._base import Decoded
from tagrelay.sources.ga4 import parse_consent_gcd, parse_consent_gcs

__all__ = ["ADS_TAG_SOURCE", "CLICK_ID_NAMES", "decode_ads_hit"]

ADS_TAG_SOURCE: Final = "google_ads_tag"
"""The source name (metrics label, ``context.source``) of Ads hits copied by the gateway."""

CLICK_ID_NAMES: Final = ("gclid", "gbraid", "wbraid")
_COOKIE_CLICK_IDS: Final = {"gclaw": "gclid", "gclgb": "gbraid"}
_ACCOUNT_IN_PATH: Final = re.compile(r"/(\d{4,15})(?:/|$)")
_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def _digest(*parts: str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        hasher.update(f"{len(data)}:".encode())
        hasher.update(data)
    return hasher.hexdigest()[:32]


def _cookie_click_id(value: str) -> str:
    """``GCL.1700000000.<id>`` (a ``_gcl_*`` cookie's value) -> ``<id>``; else as sent."""
    parts = value.split(".", 2)
    if len(parts) == 3 and parts[0] == "GCL" and parts[1].isdigit():
        return parts[2]
    return value


def click_ids(params: dict[str, str]) -> dict[str, str]:
    """The hit's click ids: its own parameters first, then the cookies' values it carries,
    then the page URL's."""
    found: dict[str, str] = {}
    url = params.get("url")
    if url:
        try:
            page_query = dict(parse_qsl(urlsplit(url).query))
        except ValueError:
            page_query = {}
        for name in CLICK_ID_NAMES:
            if page_query.get(name):
                found[name] = page_query[name]
    for param, name in _COOKIE_CLICK_IDS.items():
        if params.get(param):
            found[name] = _cookie_click_id(params[param])
    for name in CLICK_ID_NAMES:
        if params.get(name):
            found[name] = params[name]
    return found


def _consent(params: dict[str, str]) -> dict[str, str]:
    consent: dict[str, str] = {}
    if "gcs" in params:
        consent.update(parse_consent_gcs(params["gcs"]))
    if "gcd" in params:
        consent.update(parse_consent_gcd(params["gcd"]))
    if params.get("npa") == "1":
        consent["ad_personalization"] = "denied"
    for raw in ("gcs", "gcd", "dma"):
        if raw in params:
            consent[raw] = params[raw]
    return consent


def _page(params: dict[str, str]) -> dict[str, str]:
    page: dict[str, str] = {}
    url = params.get("url")
    if url:
        page["url"] = url
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is not None and parts.netloc:
            page["path"] = parts.path or "/"
            page["search"] = f"?{parts.query}" if parts.query else ""
    if params.get("ref"):
        page["referrer"] = params["ref"]
    if params.get("tiba"):
        page["title"] = params["tiba"]
    return page


def parse_ads_hit(path: str, query: str) -> Event | None:
    """The event of an Ads hit at ``path`` (below the gateway route) with ``query`` (raw),
    or None when it has no event name or no click id (see the module docstring)."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    name = params.get("en")
    clicks = click_ids(params)
    if not name or not clicks:
        return None
    account = params.get("tid") or ""
    if not account.startswith("AW-"):
        match = _ACCOUNT_IN_PATH.search(path)
        account = f"AW-{match.group(1)}" if match else account
    properties: dict[str, Any] = {}
    if params.get("label"):
        properties["conversion_label"] = params["label"]
    value = params.get("value", "")
    if _NUMBER.fullmatch(value):
        number = float(value)
        properties["value"] = int(number) if number.is_integer() else number
    if params.get("currency_code"):
        properties["currency"] = params["currency_code"]
    if params.get("oid"):
        properties["order_id"] = params["oid"]
    context: dict[str, Any] = {"clickIds": clicks}
    page = _page(params)
    if page:
        context["page"] = page
    consent = _consent(params)
    if consent:
        context["consent"] = consent
    ads: dict[str, Any] = {"path": path, "request": query, "gateway": True}
    if account:
        ads["accountId"] = account
    context["googleAds"] = ads
    first_click = next(iter(clicks.items()))
    return {
        "type": "track",
        "event": name,
        "messageId": _digest(path, query),
        "anonymousId": "gclick-" + _digest(*first_click),
        "properties": properties,
        "context": context,
    }


def decode_ads_hit(body: bytes, target: str) -> Decoded:
    """An Ads hit from its ``target`` (path below the route, ``?``, raw query); ``body`` is
    not read. No event when the hit is not one to keep (:func:`parse_ads_hit`)."""
    path, _, query = target.partition("?")
    event = parse_ads_hit(path, query)
    return Decoded(events=[] if event is None else [event], is_batch=True)
