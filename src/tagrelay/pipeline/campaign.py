"""``utm_*`` parameters of the page URL into ``context.campaign`` (Segment's names).

``utm_campaign`` becomes ``name``, the others lose their prefix. Values the client already
put in ``context.campaign`` are kept. The query is read from ``context.page.search``, else
``context.page.url``, else ``properties.url``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final
from urllib.parse import unquote_plus

from tagrelay.model import Event

UTM_KEYS: Final = {
    "utm_source": "source",
    "utm_medium": "medium",
    "utm_campaign": "name",
    "utm_term": "term",
    "utm_content": "content",
    "utm_id": "id",
}


def _query_with_utm(value: Any) -> str | None:
    if not isinstance(value, str) or "utm_" not in value:
        return None
    query = value.split("#", 1)[0]
    return query.split("?", 1)[1] if "?" in query else query


def _page_query(event: Event) -> str | None:
    context = event.get("context")
    page = context.get("page") if isinstance(context, dict) else None
    if isinstance(page, dict):
        query = _query_with_utm(page.get("search")) or _query_with_utm(page.get("url"))
        if query:
            return query
    props = event.get("properties")
    return _query_with_utm(props.get("url")) if isinstance(props, dict) else None


@lru_cache(maxsize=4096)
def _utm_fields(query: str) -> tuple[tuple[str, str], ...]:
    """The campaign fields of one query string. Pages repeat their URLs, so the answer is
    memoized per query (bounded)."""
    found: dict[str, str] = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        field = UTM_KEYS.get(name)
        if field is not None and value and field not in found:
            # unquote_plus costs about 1 us even when there is nothing to decode
            found[field] = unquote_plus(value) if "%" in value or "+" in value else value
    return tuple(found.items())


def apply_campaign(event: Event) -> None:
    query = _page_query(event)
    if not query:
        return
    found = _utm_fields(query)
    if not found:
        return
    context = event.setdefault("context", {})
    campaign = context.get("campaign")
    if not isinstance(campaign, dict):
        campaign = {}
    for key, value in found:
        campaign.setdefault(key, value)
    context["campaign"] = campaign
