"""Server-set identity: the visitor cookie, click ids, the ad platforms' browser ids, GA's
client id.

Browsers cap cookies that scripts set (Safari: 7 days). A cookie set by the relay's own
HTTP answer, HttpOnly, on the site's registrable domain, lives as long as the relay renews
it (400 days, renewed on every visit). What this module does for each browser request:

- **Visitor id** (cookie ``identity.cookie_name``, default ``tr_aid``, HttpOnly). The relay's
  own script and the cookie keep one id: when the cookie exists, its id wins and is handed
  back to the script, which adopts it; on first sight the relay adopts the script's id.
  Events from other SDKs keep their own ``anonymousId``; one that has neither an
  ``anonymousId`` nor a ``userId`` gets the cookie's.
- **Click ids** (``gclid``, ``gbraid``, ``wbraid``, ``fbclid``, ``ttclid``, ``ScCid``,
  ``epik``, ``rdt_cid``, ``twclid``, ``li_fat_id``, ``msclkid``): taken from the event's page
  URL (and from ``context.clickIds`` sent by the script), kept in the HttpOnly cookie
  ``tr_clk``, and attached to every later event of the visitor as ``context.clickIds``
  (``{"gclid": "...", ...}``).
- **Meta**: ``_fbc`` is built as ``fb.<subdomain index>.<ms>.<fbclid>`` when a landing URL
  carries an fbclid the cookie does not have; ``_fbp`` is created when absent. Both are
  set as first-party cookies (readable by Meta's pixel, so not HttpOnly) and attached as
  ``context.clientIds.fbc`` / ``.fbp``.
- **Other ad platforms' browser ids** (``BROWSER_ID_COOKIES``: TikTok's ``_ttp``, Snap's
  ``_scid``, Pinterest's ``_epik``, Reddit's ``_rdt_uuid``, Microsoft's ``_uetvid``), the
  cookies their pixels set on the site's domain, are attached as ``context.clientIds.<name>``
  when the request carries them (the relay never makes one up: only the vendor's pixel can
  tie it to its own records); an id the event already carries there wins.
- **Google Analytics**: ``_ga`` and ``_ga_<container>`` are parsed into
  ``context.clientIds.ga4 = {"clientId": "123.456", "sessionIds": {"G-XXXX": "1700000000"},
  "sessionNumbers": {"G-XXXX": 5}}``.
- **Cookie keeper**: chosen vendor cookies the request carries are set again by the relay
  with the visitor cookie's lifetime.

Consent decides what may be stored: the visitor cookie, GA ids and the cookie keeper need
analytics storage; click ids and the ad platforms' browser ids need ads storage (see
``pipeline.consent``).
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from tagrelay.config.models import IdentityConfig
from tagrelay.model import BROWSER_ID_COOKIES, CLICK_ID_PARAMS, Event
from tagrelay.pipeline.host import parse_host

_CLICK_ID_BY_LOWER = {name.lower(): name for name in CLICK_ID_PARAMS}

CLICK_COOKIE = "tr_clk"
FBC_COOKIE = "_fbc"
FBP_COOKIE = "_fbp"
TTP_COOKIE = "_ttp"
GA_COOKIE = "_ga"
GA_SESSION_PREFIX = "_ga_"

_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_GA_CLIENT_ID_RE = re.compile(r"[0-9]{1,20}\.[0-9]{1,20}")
_CLICK_VALUE_RE = re.compile(r"[A-Za-z0-9._~:\-]{1,200}")
_COOKIE_VALUE_RE = re.compile(r"[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]{1,1024}")
"""RFC 6265 cookie-octet: printable ASCII without space, quote, comma, semicolon, backslash."""
_MAX_BROWSER_ID = 200
"""Longer values of a ``BROWSER_ID_COOKIES`` cookie are not the vendor's id: not attached."""


@dataclass(frozen=True)
class SetCookie:
    name: str
    value: str
    max_age: int
    path: str
    domain: str | None
    http_only: bool


@dataclass
class VisitorState:
    """What the request's cookies say about the visitor."""

    anonymous_id: str | None = None
    click_ids: dict[str, str] = field(default_factory=dict)
    fbc: str | None = None
    fbp: str | None = None
    browser_ids: dict[str, str] = field(default_factory=dict)
    """``BROWSER_ID_COOKIES`` the request carried (cookie name -> value)."""
    ga4: dict[str, Any] | None = None
    kept: dict[str, str] = field(default_factory=dict)
    ga_client_id: str | None = None
    """The server-managed GA client id (cookie ``google.server_client_id``)."""
    cookies_flow: bool = False
    """The request carried the relay's visitor cookie: cookies set now will come back."""

    @property
    def ttp(self) -> str | None:
        """TikTok's ``_ttp`` browser id, when the request carried a valid one."""
        return self.browser_ids.get(TTP_COOKIE)


@dataclass
class Visit:
    """The outcome of one request: the id to hand back and the cookies to set (on
    ``domain``: None for a host-only cookie)."""

    domain: str | None = None
    anonymous_id: str | None = None
    cookies: dict[str, SetCookie] = field(default_factory=dict)


@cache
def _suffix_list() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


@lru_cache(maxsize=1024)
def registrable_domain(host: str | None) -> str | None:
    """The registrable domain (eTLD+1) of a Host header value: ``data.example.co.uk:443``
    -> ``example.co.uk``. None, for a host-only cookie, when the value is not a valid host
    (``pipeline.host``: it is never copied into a cookie), and for IP addresses,
    single-label hosts, public suffixes and absolute names (``example.com.``, which
    browsers keep apart from ``example.com``)."""
    parsed = parse_host(host)
    if parsed is None or parsed.is_ip or parsed.trailing_dot or "." not in parsed.name:
        return None
    result: str | None = _suffix_list().privatesuffix(parsed.name)
    return result


def subdomain_index(domain: str | None) -> int:
    """Meta's subdomain index of the domain a cookie is set on: 1 for example.com."""
    if not domain:
        return 1
    return max(0, len(domain.strip(".").split(".")) - 1)


def parse_ga_client_id(value: str) -> str | None:
    """``GA1.1.1234567890.1700000000`` -> ``1234567890.1700000000``."""
    parts = value.split(".")
    if len(parts) >= 4 and parts[0].startswith("GA") and parts[-1].isdigit():
        return f"{parts[-2]}.{parts[-1]}"
    return None


def parse_ga_session(value: str) -> tuple[str, int | None] | None:
    """The session id and number in a ``_ga_<container>`` cookie, in either format:
    ``GS1.1.1700000000.5.1.1700000100.0.0.0`` or ``GS2.1.s1700000000$o5$g1$t1700000100``."""
    parts = value.split(".")
    if len(parts) < 3:
        return None
    if parts[0] == "GS1":
        session = parts[2]
        number = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else None
        return (session, number) if session.isdigit() else None
    if parts[0] == "GS2":
        fields = {item[:1]: item[1:] for item in parts[2].split("$") if item}
        session = fields.get("s", "")
        count = fields.get("o", "")
        if session.isdigit():
            return session, int(count) if count.isdigit() else None
    return None


def click_ids_in_url(url: str | None, search: str | None) -> dict[str, str]:
    """Click ids in a page URL's query (``search`` when given, else the URL's)."""
    query = search if isinstance(search, str) and search else None
    if query is None and isinstance(url, str) and "?" in url:
        query = urlsplit(url).query
    if not query:
        return {}
    found: dict[str, str] = {}
    for name, value in parse_qsl(query.lstrip("?"), keep_blank_values=False):
        canonical = _CLICK_ID_BY_LOWER.get(name.lower())
        if canonical is not None and _CLICK_VALUE_RE.fullmatch(value):
            found[canonical] = value
    return found


def _valid_click_ids(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        return {}
    found: dict[str, str] = {}
    for name, value in raw.items():
        canonical = _CLICK_ID_BY_LOWER.get(str(name).lower())
        if canonical is not None and isinstance(value, str) and _CLICK_VALUE_RE.fullmatch(value):
            found[canonical] = value
    return found


class IdentityService:
    def __init__(
        self, config: IdentityConfig, base_path: str, ga_client_id_cookie: str | None = None
    ) -> None:
        """``ga_client_id_cookie``: the name of the server-managed GA client id cookie
        (``google.server_client_id``), or None when the relay does not manage one."""
        self.config = config
        self.ga_cookie = ga_client_id_cookie
        self.max_age = config.max_age_days * 86_400
        self.path = base_path or "/"
        keeper = config.cookie_keeper
        self._keep_exact = frozenset(n for n in keeper if not n.endswith("*"))
        self._keep_prefixes = tuple(n[:-1] for n in keeper if n.endswith("*"))

    def load_suffix_list(self) -> None:
        """Load the Public Suffix List now if ``cookie_domain`` is ``auto`` (the first
        visitor's request would otherwise)."""
        if self.config.cookie_domain == "auto":
            _suffix_list()

    # -- reading ---------------------------------------------------------------------

    def cookie_domain(self, host: str | None) -> str | None:
        setting = self.config.cookie_domain
        if setting == "host":
            return None
        if setting == "auto":
            return registrable_domain(host)
        return setting.lstrip(".")

    def read(self, cookies: Mapping[str, str]) -> VisitorState:
        state = VisitorState()
        if not cookies:
            return state
        aid = cookies.get(self.config.cookie_name)
        if aid and _ID_RE.fullmatch(aid):
            state.anonymous_id = aid
            state.cookies_flow = True
        clicks = cookies.get(CLICK_COOKIE)
        if clicks:
            state.click_ids = _valid_click_ids(dict(parse_qsl(clicks)))
        state.fbc = cookies.get(FBC_COOKIE) or None
        state.fbp = cookies.get(FBP_COOKIE) or None
        for name in BROWSER_ID_COOKIES:
            value = cookies.get(name)
            if value and len(value) <= _MAX_BROWSER_ID and _COOKIE_VALUE_RE.fullmatch(value):
                state.browser_ids[name] = value
        ga = cookies.get(GA_COOKIE)
        client_id = parse_ga_client_id(ga) if ga else None
        if client_id is not None:
            sessions: dict[str, str] = {}
            numbers: dict[str, int] = {}
            for name, value in cookies.items():
                if name.startswith(GA_SESSION_PREFIX) and len(name) > len(GA_SESSION_PREFIX):
                    parsed = parse_ga_session(value)
                    if parsed is not None:
                        measurement_id = "G-" + name[len(GA_SESSION_PREFIX) :]
                        sessions[measurement_id] = parsed[0]
                        if parsed[1] is not None:
                            numbers[measurement_id] = parsed[1]
            state.ga4 = {"clientId": client_id, "sessionIds": sessions}
            if numbers:
                state.ga4["sessionNumbers"] = numbers
        if self.ga_cookie is not None:
            managed = cookies.get(self.ga_cookie)
            if managed and _GA_CLIENT_ID_RE.fullmatch(managed):
                state.ga_client_id = managed
        if self._keep_exact or self._keep_prefixes:
            for name, value in cookies.items():
                if (
                    name in self._keep_exact or name.startswith(self._keep_prefixes)
                ) and _COOKIE_VALUE_RE.fullmatch(value):
                    state.kept[name] = value
        return state

    # -- one event -------------------------------------------------------------------

    def apply(
        self,
        event: Event,
        visitor: VisitorState,
        visit: Visit,
        *,
        own_script: bool,
        ads: bool,
        now_ms: int,
        reset: bool = False,
    ) -> None:
        """Reconcile the event with the visitor's cookies (analytics storage is granted),
        attach click and client ids, and record in ``visit`` the cookies to set. ``reset``:
        the script started a new identity, which replaces the cookie's."""
        context = event["context"]
        self._visitor_id(event, visitor, visit, own_script=own_script, reset=reset)
        domain = visit.domain
        client_ids = context.get("clientIds")
        if not isinstance(client_ids, dict):
            client_ids = {}
        if visitor.ga4 is not None and "ga4" not in client_ids:
            client_ids["ga4"] = visitor.ga4
        if self.ga_cookie is not None:
            self._server_ga_client_id(event, client_ids, visitor, visit)

        if ads and self.config.click_ids:
            page = context.get("page")
            page = page if isinstance(page, dict) else {}
            fresh = {
                **_valid_click_ids(context.get("clickIds")),
                **click_ids_in_url(page.get("url"), page.get("search")),
            }
            if fresh and any(visitor.click_ids.get(k) != v for k, v in fresh.items()):
                visitor.click_ids = {**visitor.click_ids, **fresh}
                visit.cookies[CLICK_COOKIE] = self._cookie(
                    CLICK_COOKIE, urlencode(visitor.click_ids), domain, http_only=True
                )
            if visitor.click_ids:
                context["clickIds"] = {**visitor.click_ids, **fresh}
        if ads and self.config.meta_cookies:
            self._meta(visitor, visit, now_ms, mint=own_script or visitor.cookies_flow)
        if ads and visitor.fbc and "fbc" not in client_ids:
            client_ids["fbc"] = visitor.fbc
        if ads and visitor.fbp and "fbp" not in client_ids:
            client_ids["fbp"] = visitor.fbp
        if ads:
            for name, value in visitor.browser_ids.items():
                client_ids.setdefault(name, value)
        if client_ids:
            context["clientIds"] = client_ids

    def _visitor_id(
        self, event: Event, visitor: VisitorState, visit: Visit, *, own_script: bool, reset: bool
    ) -> None:
        sent = event.get("anonymousId")
        sent = sent if isinstance(sent, str) and _ID_RE.fullmatch(sent) else None
        if reset and own_script and sent is not None:
            visitor.anonymous_id = sent
        known = visitor.anonymous_id
        if known is None:
            # First sight: adopt the sender's id, or make one.
            known = sent or str(uuid.uuid4())
            visitor.anonymous_id = known
        if own_script or ("anonymousId" not in event and not event.get("userId")):
            event["anonymousId"] = known
        visit.anonymous_id = known
        visit.cookies[self.config.cookie_name] = self._cookie(
            self.config.cookie_name, known, visit.domain, http_only=True
        )

    def _server_ga_client_id(
        self, event: Event, client_ids: dict[str, Any], visitor: VisitorState, visit: Visit
    ) -> None:
        """Like sGTM's FPID: the relay keeps the GA client id in an HttpOnly cookie of its
        own, which outlives gtag's script-set ``_ga``, and uses it on both GA4 paths: as
        ``clientIds.ga4.clientId`` (Measurement Protocol) and as the ``cid`` of a gtag hit
        it re-sends. On first sight it adopts the client id the visitor already has."""
        ga4 = client_ids.get("ga4")
        ga4 = dict(ga4) if isinstance(ga4, dict) else {}
        current = ga4.get("clientId")
        if visitor.ga_client_id is None:
            adopted = current if isinstance(current, str) else None
            if adopted is None or not _GA_CLIENT_ID_RE.fullmatch(adopted):
                adopted = f"{secrets.randbelow(2**31)}.{int(time.time())}"
            visitor.ga_client_id = adopted
        client_id = visitor.ga_client_id
        ga4["clientId"] = client_id
        client_ids["ga4"] = ga4
        assert self.ga_cookie is not None
        visit.cookies[self.ga_cookie] = self._cookie(
            self.ga_cookie, client_id, visit.domain, http_only=True, root=True
        )
        hit = event["context"].get("ga4")
        if isinstance(hit, dict) and isinstance(hit.get("request"), str):
            parts = hit["request"].split("&")
            for i, part in enumerate(parts):
                if part.startswith("cid="):
                    if event.get("anonymousId") == unquote(part[4:]):
                        event["anonymousId"] = client_id
                    parts[i] = "cid=" + quote(client_id, safe=".")
            hit["request"] = "&".join(parts)

    def _meta(self, visitor: VisitorState, visit: Visit, now_ms: int, *, mint: bool) -> None:
        """``_fbc`` from a new fbclid, and ``_fbp`` when absent. ``mint``: a new ``_fbp``
        would come back with the visitor's next request (the relay's script sends cookies,
        or this request already carried the relay's cookie). A cross-origin SDK request
        sends no cookies: making one up each time would give Meta a new browser per event."""
        domain = visit.domain
        fbclid = visitor.click_ids.get("fbclid")
        if fbclid and (visitor.fbc is None or visitor.fbc.rsplit(".", 1)[-1] != fbclid):
            visitor.fbc = f"fb.{subdomain_index(domain)}.{now_ms}.{fbclid}"
            visit.cookies[FBC_COOKIE] = self._cookie(FBC_COOKIE, visitor.fbc, domain, root=True)
        if visitor.fbp is None and mint:
            visitor.fbp = f"fb.{subdomain_index(domain)}.{now_ms}.{secrets.randbelow(2**31)}"
            visit.cookies[FBP_COOKIE] = self._cookie(FBP_COOKIE, visitor.fbp, domain, root=True)

    # -- cookies ---------------------------------------------------------------------

    def keep(self, visitor: VisitorState, visit: Visit) -> None:
        """The cookie keeper: set the chosen vendor cookies again, server-side."""
        for name, value in visitor.kept.items():
            if name not in visit.cookies:
                visit.cookies[name] = self._cookie(name, value, visit.domain, root=True)

    def _cookie(
        self,
        name: str,
        value: str,
        domain: str | None,
        *,
        http_only: bool = False,
        root: bool = False,
    ) -> SetCookie:
        return SetCookie(
            name=name,
            value=value,
            max_age=self.max_age,
            path="/" if root else self.path,
            domain=domain,
            http_only=http_only,
        )
