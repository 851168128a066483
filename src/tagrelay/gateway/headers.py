"""What passes between the visitor and Google through a gateway route, header by header
(pure).

Upstream, a request keeps the visitor's headers (user agent, client hints, language,
referrer, origin, content type, ``Accept-Encoding``) except:

- hop-by-hop headers (RFC 9110, 7.6.1), including those ``Connection`` names;
- ``Host`` (set to the upstream's), ``Content-Length`` (set by the client library),
  ``Expect``;
- credentials: ``Authorization``, ``Proxy-Authorization``, ``X-Api-Key`` and the relay's own
  ``X-Write-Key``;
- what the relay itself states about the visitor, which a visitor must not forge:
  ``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``, ``True-Client-IP``,
  ``CF-Connecting-IP``, the configured geo headers, and ``X-Gtg-Tag-Id`` (the upstream
  is addressed by its host: Google refuses a tag id in both);
- cookies other than Google's (``GOOGLE_COOKIE``): a site's session cookies never leave.

Back to the visitor, Google's answer keeps its headers (status, ``Content-Type``,
``Cache-Control``, every ``Set-Cookie``, ``Location``, ``Content-Encoding``,
``Content-Length``, ``Vary``, ``ETag``...) except hop-by-hop ones, ``Alt-Svc`` and
``Strict-Transport-Security`` (about Google's host, not the site's), and ``Date`` and
``Server`` (the relay's own server sets them).

The body is never decoded or rewritten: ``Accept-Encoding`` goes to Google as the browser
sent it, the answer comes back with its ``Content-Encoding`` as Google chose it, and the
relay's client does not decompress (``auto_decompress=False``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from multidict import CIMultiDict, MultiMapping

__all__ = [
    "GOOGLE_COOKIE",
    "google_cookies",
    "response_headers",
    "upstream_headers",
]

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROPPED: Final = frozenset(
    {
        "host",
        "content-length",
        "expect",
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "x-write-key",
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "x-gtg-tag-id",
        "cookie",
    }
)
_RESPONSE_DROPPED: Final = frozenset({"alt-svc", "strict-transport-security", "date", "server"})

GOOGLE_COOKIE: Final = re.compile(r"_ga|_ga_.+|_gid|_gcl_.+|_gac_.+|FPID|FPLC|FPAU|FPGCL.*")
"""Names of the cookies Google's tags use on the site's domain (GA's ``_ga``,
``_ga_<stream>``, ``_gid``; Ads' ``_gcl_*``, ``_gac_*``; the first-party ``FP*`` cookies of
server-side tagging and the gateway). Only these go upstream."""


def google_cookies(header: str) -> str | None:
    """The ``Cookie`` header ``header`` with Google's cookies only, in their order and as
    sent (values untouched); None when none is left."""
    kept = []
    for part in header.split(";"):
        pair = part.strip()
        name = pair.split("=", 1)[0].strip()
        if name and GOOGLE_COOKIE.fullmatch(name):
            kept.append(pair)
    return "; ".join(kept) if kept else None


def _connection_tokens(headers: MultiMapping[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def upstream_headers(
    incoming: MultiMapping[str],
    *,
    own: Iterable[str] = (),
    added: Mapping[str, str] = {},
) -> CIMultiDict[str]:
    """The headers of the request sent upstream: ``incoming`` less what the module's
    docstring lists and the header names in ``own`` (the relay's geo headers), Google's
    cookies only, then ``added`` (``X-Forwarded-For``, the geo headers), which replace any
    incoming header of the same name."""
    dropped = {name.lower() for name in own} | _connection_tokens(incoming) | set(added)
    dropped = {name.lower() for name in dropped}
    headers: CIMultiDict[str] = CIMultiDict()
    cookies: list[str] = []
    for name, value in incoming.items():
        lower = name.lower()
        if lower == "cookie":
            cookies.append(value)
            continue
        if (
            lower in HOP_BY_HOP
            or lower in _REQUEST_DROPPED
            or lower in dropped
            or lower.startswith("x-forwarded-")
        ):
            continue
        headers.add(name, value)
    if cookies:
        kept = google_cookies("; ".join(cookies))
        if kept is not None:
            headers["Cookie"] = kept
    for name, value in added.items():
        headers[name] = value
    return headers


def response_headers(upstream: MultiMapping[str]) -> CIMultiDict[str]:
    """The headers of Google's answer that go back to the visitor, every ``Set-Cookie``
    and repeated header kept (see the module docstring)."""
    dropped = _connection_tokens(upstream)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in _RESPONSE_DROPPED or lower in dropped:
            continue
        headers.add(name, value)
    return headers
