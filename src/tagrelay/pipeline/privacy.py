"""Privacy transformations applied before an event is stored or forwarded."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from tagrelay.model import Event


@lru_cache(maxsize=4096)
def truncate_ip(address: str) -> str | None:
    """IPv4 to its /24 (last octet zero), IPv6 to its /48; None when not an address.
    An IPv4-mapped IPv6 address is truncated as the IPv4 address it carries."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    return str(network.network_address)


def apply_ip_truncation(event: Event) -> None:
    context = event.get("context")
    if not isinstance(context, dict):
        return
    ip = context.get("ip")
    if isinstance(ip, str):
        truncated = truncate_ip(ip)
        if truncated is None:
            # Not an address (a server key may set anything): drop it rather than keep it.
            context.pop("ip", None)
        else:
            context["ip"] = truncated
    elif ip is not None:
        context.pop("ip", None)
