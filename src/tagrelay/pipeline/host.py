"""The request's host, validated: the only form of the ``Host`` header the relay acts on.

The ``Host`` header is request text. What the relay derives from it (the identity cookie's
``Domain`` attribute, the write key mapped to a host, the same-origin check of CORS) is
derived from ``parse_host``'s answer, never from the header itself: a value such as
``a.shop.test; SameSite=None; Secure`` is not a host name, and copying it into a
``Set-Cookie`` header would let the client write the cookie's attributes.

A valid host is an IP literal (``127.0.0.1``, ``[::1]``) or a DNS name of LDH labels
(letters, digits and inner hyphens, 1 to 63 characters, 253 in all; internationalized names
in their ``xn--`` form, which is what browsers send), optionally followed by ``:port``.
Anything else (spaces, ``;``, ``,``, ``=``, ``_``, non-ASCII, an empty label, a name whose
last label is numeric but that is not an IPv4 address) is not a host: ``parse_host`` answers
None. ``X-Forwarded-Host`` is not read anywhere: a proxy in front of the relay passes the
browser's ``Host`` on (nginx: ``proxy_set_header Host $host``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["RequestHost", "parse_host", "valid_host_name"]

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
MAX_NAME_CHARS = 253


@dataclass(frozen=True)
class RequestHost:
    name: str
    """Lower case, without a port or a trailing dot; an IP address in its canonical text
    (without brackets) when ``is_ip``."""
    port: int | None = None
    is_ip: bool = False
    trailing_dot: bool = False
    """The client named the host as an absolute name (``example.com.``): browsers keep
    such a host apart from ``example.com``, cookies included."""


def valid_host_name(name: str) -> bool:
    """Whether ``name`` (lower case, no port, no trailing dot) is a DNS name of LDH labels
    that is not an IP address in disguise (a numeric last label)."""
    return (
        len(name) <= MAX_NAME_CHARS
        and _NAME_RE.fullmatch(name) is not None
        and not name.rsplit(".", 1)[-1].isdigit()
    )


@lru_cache(maxsize=1024)
def parse_host(value: str | None) -> RequestHost | None:
    """The host a ``Host`` header value names, or None when it names none."""
    if not value or len(value) > MAX_NAME_CHARS + 8 or not value.isascii():
        return None
    text = value.lower()
    port: int | None = None
    if text.startswith("["):
        literal, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not _port_text(rest)):
            return None
        try:
            v6 = ipaddress.IPv6Address(literal)
        except ValueError:
            return None
        return RequestHost(str(v6), int(rest[1:]) if rest else None, is_ip=True)
    name, colon, port_text = text.partition(":")
    if colon:
        if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
            return None
        port = int(port_text)
    trailing_dot = name.endswith(".")
    if trailing_dot:
        name = name[:-1]
    try:
        v4 = ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        return None if trailing_dot else RequestHost(str(v4), port, is_ip=True)
    if not valid_host_name(name):
        return None
    return RequestHost(name, port, trailing_dot=trailing_dot)


def _port_text(rest: str) -> bool:
    return (
        rest.startswith(":") and _PORT_RE.fullmatch(rest[1:]) is not None and int(rest[1:]) <= 65535
    )
