"""Who sent the request: the client IP behind trusted proxies, the user agent, and the
anonymous id RudderStack's SDKs send in a header.

``context.ip`` comes from the socket. ``X-Forwarded-For`` and ``X-Real-IP`` are believed only
when the peer is a configured trusted proxy; then the client is the right-most address in
``X-Forwarded-For`` that is not itself a trusted proxy (addresses further left can be forged
by the client). Only server keys may set ``context.ip`` and ``context.userAgent`` themselves;
for browser keys the relay's view always wins.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from tagrelay.model import Event

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class ClientResolver:
    def __init__(self, trusted_proxies: Sequence[IPNetwork]) -> None:
        self._trusted = tuple(trusted_proxies)
        # Every request asks whether its peer is a trusted proxy, and `address in network`
        # is slow Python code in ipaddress: the answer is memoized per peer text.
        self._peer_is_trusted = lru_cache(maxsize=4096)(self._text_is_trusted)

    def _is_trusted(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self._trusted)

    def _text_is_trusted(self, text: str) -> bool:
        addr = _parse_ip(text)
        return addr is not None and self._is_trusted(addr)

    def peer_is_trusted(self, peer: str | None) -> bool:
        """Whether ``peer`` (the socket's address) is a trusted proxy, whose headers about
        the client are believed."""
        return peer is not None and bool(self._trusted) and self._peer_is_trusted(peer)

    def client_ip(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        """The client's address as the relay can prove it."""
        if peer is None:
            return None
        if not self._trusted or not self._peer_is_trusted(peer):
            return peer
        forwarded = headers.get("X-Forwarded-For")
        if forwarded:
            hops = [h for h in forwarded.split(",") if h.strip()]
            for hop in reversed(hops):
                addr = _parse_ip(hop)
                if addr is None:
                    break
                if not self._is_trusted(addr):
                    return str(addr)
            else:
                first = _parse_ip(hops[0]) if hops else None
                if first is not None:
                    return str(first)
        real = headers.get("X-Real-IP")
        if real:
            addr = _parse_ip(real)
            if addr is not None:
                return str(addr)
        return peer

    def is_https(self, scheme: str, peer: str | None, headers: Mapping[str, str]) -> bool:
        """Whether the browser reached the relay over HTTPS: the connection's own scheme,
        or ``X-Forwarded-Proto`` (first value) from a trusted proxy that ended TLS."""
        if scheme == "https":
            return True
        proto = headers.get("X-Forwarded-Proto")
        if not proto or peer is None or not self._peer_is_trusted(peer):
            return False
        return proto.split(",", 1)[0].strip().lower() == "https"


def apply_client(
    event: Event, *, ip: str | None, user_agent: str | None, trusted_sender: bool
) -> None:
    """Set ``context.ip`` and ``context.userAgent`` from the request, unless a trusted
    (server-key) sender set them itself."""
    context = event.get("context")
    if context is None:
        context = event["context"] = {}
    if not (trusted_sender and context.get("ip")):
        if ip is not None:
            context["ip"] = ip
        else:
            context.pop("ip", None)
    if not (trusted_sender and context.get("userAgent")) and user_agent:
        context["userAgent"] = user_agent


def anonymous_id_header(value: str | None) -> str | None:
    """The anonymous id of RudderStack's browser SDK, which sends
    ``AnonymousId: base64(anonymousId)`` (the body has it too; the header fills in when the
    body has none). None when absent or not base64 of UTF-8 text."""
    if not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8").strip()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded or None


def fill_anonymous_id(raw: Any, anonymous_id: str) -> None:
    """Give a raw event without an ``anonymousId`` the one from the request's header."""
    if type(raw) is dict and not raw.get("anonymousId"):
        raw["anonymousId"] = anonymous_id
