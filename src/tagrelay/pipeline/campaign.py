"""``utm_*`` parameters of the page URL into ``context.campaign`` (Segment's names).

``utm_campaign`` becomes ``name``, the others lose their prefix. Values the client already
put in ``context.campaign`` are kept.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, urlsplit

from tagrelay.model import Event

UTM_KEYS: Final = {
    "utm_source": "source",
    "utm_medium": "medium",
    "utm_campaign": "name",
    "utm_term": "term",
    "utm_content": "content",
    "utm_id": "id",
}


def _page_query(event: Event) -> str:
    context = event.get("context") or {}
    page = context.get("page")
    if not isinstance(page, dict):
        page = {}
    search = page.get("search")
    if isinstance(search, str) and "utm_" in search:
        return search.lstrip("?")
    url = page.get("url")
    if not isinstance(url, str) or "utm_" not in url:
        props = event.get("properties") or {}
        url = props.get("url") if isinstance(props, dict) else None
        if not isinstance(url, str) or "utm_" not in url:
            return ""
    try:
        return urlsplit(url).query
    except ValueError:
        return ""


def apply_campaign(event: Event) -> None:
    query = _page_query(event)
    if not query:
        return
    found = {UTM_KEYS[k]: v for k, v in parse_qsl(query, keep_blank_values=False) if k in UTM_KEYS}
    if not found:
        return
    context = event.setdefault("context", {})
    campaign = context.get("campaign")
    if not isinstance(campaign, dict):
        campaign = {}
    for key, value in found.items():
        campaign.setdefault(key, value)
    context["campaign"] = campaign
