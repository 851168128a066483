"""``tagrelay health``: ask a running relay whether it is alive (or ready), for a container's
health check or a process supervisor.

The address comes from the same configuration the relay runs with: ``server.port`` and
``server.base_path``, and ``server.host`` unless it is a wildcard (``0.0.0.0``, ``::``),
when the check goes to the loopback address of the same family. Only the standard library
speaks HTTP here: the check runs every few seconds in the container.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import sys
import urllib.error
import urllib.request

from tagrelay.config.models import Config

__all__ = ["health_url", "run_health"]

_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def health_url(
    config: Config, *, host: str | None = None, port: int | None = None, ready: bool = False
) -> str:
    """The URL of the relay's ``/healthz`` (``/readyz`` when ``ready``) under its base path."""
    host = host or _WILDCARDS.get(config.server.host, config.server.host)
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    port = config.server.port if port is None else port
    path = "/readyz" if ready else "/healthz"
    return f"http://{host}:{port}{config.server.base_path}{path}"


def run_health(
    config: Config,
    *,
    host: str | None,
    port: int | None,
    ready: bool,
    timeout_secs: float,
) -> int:
    """0 when the relay answers 200, 1 otherwise; one line on stdout or stderr says why."""
    url = health_url(config, host=host, port=port, ready=ready)
    try:
        # the URL is built from the configuration above: always http
        with urllib.request.urlopen(url, timeout=timeout_secs) as resp:  # noqa: S310
            status, body = resp.status, resp.read(4096)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(4096)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"unhealthy: {url}: {reason}", file=sys.stderr)
        return 1
    if status == 200:
        print(f"ok: {url}")
        return 0
    print(f"unhealthy: {url}: HTTP {status}{_problems(body)}", file=sys.stderr)
    return 1


def _problems(body: bytes) -> str:
    """``/readyz``'s list of problems, when the answer carries one."""
    try:
        problems = json.loads(body).get("problems")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(problems, list) or not problems:
        return ""
    return " (" + ", ".join(str(p) for p in problems) + ")"
