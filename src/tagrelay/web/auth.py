"""Write keys and CORS.

A write key arrives as the HTTP Basic username (Segment, RudderStack), as ``X-Write-Key``
(Jitsu), as ``?writeKey=`` (beacons cannot set headers) or as ``writeKey`` in the body.
Browser keys are public and restricted by their ``allowed_origins``; a browser key may also
claim host names (``hosts``): a keyless request on a Jitsu browser route or the relay's own
events path, sent to one of them, is taken as sent with that key (Jitsu maps hosts to keys
the same way). Keys are compared in constant time and never appear in logs, metrics or
error messages.

Server keys are secrets for backends: no CORS at all. A request that presents one gets no
``Access-Control-*`` header whatever its ``Origin``, and a request that presents one with an
``Origin`` header (which browsers send and backends do not) is refused 403
``server_key_from_browser``: a server key in a web page is a leaked secret, and refusing it
makes the mistake visible at once instead of letting a page send trusted events (which may
set ``context.ip``) that it cannot even read the answers to.

An origin is reflected in ``Access-Control-Allow-Origin`` only when it is allowed and is a
well-formed origin (``scheme://host[:port]``). Refused origins and refused preflights are
counted (``tagrelay_cors_refused_total{key}``) and logged at INFO once per interval per
(key, origin) by ``CorsRefusals``: the site owner whose origin is missing from
``allowed_origins`` sees more than a browser error.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter

from tagrelay.config.models import WriteKeyConfig
from tagrelay.errors import AuthError, IngestError
from tagrelay.logthrottle import LogThrottle
from tagrelay.metrics import Metrics
from tagrelay.pipeline.host import parse_host

log = logging.getLogger(__name__)

CORS_ALLOW_METHODS = "POST, GET, OPTIONS"
CORS_MAX_AGE_SECS = "86400"
# Headers real SDKs send (Segment: authorization, x-retry-count; Jitsu: x-write-key;
# RudderStack: anonymousid, sentat). Preflights are answered by echoing the requested
# headers; this list is the answer when none were named.
CORS_DEFAULT_HEADERS = (
    "authorization, content-type, x-write-key, x-retry-count, anonymousid, sentat"
)


def key_from_headers(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization")
    if auth and auth[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError(
                "invalid_auth", "the Authorization header is not valid Basic auth"
            ) from None
        # SDKs send the key as the username with an empty password ("<key>:"). A key may
        # itself contain ":" (Jitsu's "id:secret"), so an empty password is cut at the last
        # colon; with a password, the username ends at the first one (RFC 7617).
        user = decoded[:-1] if decoded.endswith(":") else decoded.split(":", 1)[0]
        if user:
            return user
    header = headers.get("X-Write-Key")
    if header:
        return header.strip()
    q = query.get("writeKey")
    return q or None


_ORIGIN_RE = re.compile(r"[a-z][a-z0-9+.-]{0,31}://[a-z0-9.:\[\]-]{1,262}", re.IGNORECASE)
"""A serialized origin (RFC 6454): scheme, host (a name or an IP literal) and port; no path,
no spaces, no separators. Browsers send nothing else (or ``null``)."""


def well_formed_origin(origin: str) -> bool:
    return _ORIGIN_RE.fullmatch(origin) is not None


def _origin_pattern(origin: str) -> re.Pattern[str]:
    escaped = re.escape(origin.rstrip("/").lower()).replace(r"\*", r"[a-z0-9.-]+")
    return re.compile(f"^{escaped}$")


@dataclass(frozen=True)
class KeyRing:
    """The configured write keys, ready for lookups."""

    keys: tuple[WriteKeyConfig, ...]
    _secrets: tuple[tuple[bytes, WriteKeyConfig], ...] = field(
        init=False, repr=False, compare=False
    )
    """Each key's secret encoded once, not on every lookup."""

    _by_host: dict[str, WriteKeyConfig] = field(init=False, repr=False, compare=False)
    """Browser keys by the host names they claim (the config makes them unique)."""

    def __post_init__(self) -> None:
        secrets = tuple((key.key.get_secret_value().encode(), key) for key in self.keys)
        object.__setattr__(self, "_secrets", secrets)
        by_host = {host: key for key in self.keys if key.kind == "browser" for host in key.hosts}
        object.__setattr__(self, "_by_host", by_host)

    def for_host(self, host_header: str | None) -> WriteKeyConfig | None:
        """The browser key that claims the request's host (``Host``, port and a trailing dot
        left out), or None."""
        if not self._by_host:
            return None
        host = parse_host(host_header)
        if host is None or host.is_ip:
            return None
        return self._by_host.get(host.name)

    @classmethod
    def from_config(cls, keys: Sequence[WriteKeyConfig]) -> KeyRing:
        return cls(tuple(keys))

    def lookup(self, presented: str | None) -> WriteKeyConfig:
        if not presented:
            raise AuthError(
                "missing_key",
                "no write key: send it as the Basic auth username, X-Write-Key or writeKey",
            )
        found: WriteKeyConfig | None = None
        wanted = presented.encode()
        for secret, key in self._secrets:
            # compare against every key, so timing tells nothing about which one is close
            if hmac.compare_digest(secret, wanted):
                found = key
        if found is None:
            raise AuthError("unknown_key", "the write key is not known to this relay")
        return found


class CorsPolicy:
    """Which page origins may send events with which browser key."""

    def __init__(self, keys: Sequence[WriteKeyConfig]) -> None:
        self._per_key: dict[str, tuple[bool, tuple[re.Pattern[str], ...]]] = {}
        for key in keys:
            if key.kind != "browser":
                continue
            any_origin = "*" in key.allowed_origins
            patterns = tuple(_origin_pattern(o) for o in key.allowed_origins if o != "*")
            self._per_key[key.id] = (any_origin, patterns)

    def origin_allowed_for(self, key: WriteKeyConfig, origin: str, host: str | None) -> bool:
        """Whether a page on ``origin`` may send with ``key`` (never with a server key)."""
        if key.kind == "server" or not well_formed_origin(origin):
            return False
        if self._same_origin(origin, host):
            return True
        any_origin, patterns = self._per_key.get(key.id, (False, ()))
        return any_origin or any(p.match(origin.lower()) for p in patterns)

    def origin_allowed_anywhere(self, origin: str, host: str | None) -> bool:
        """For preflights, which do not carry the key: is any browser key open to it?"""
        if not well_formed_origin(origin):
            return False
        if self._same_origin(origin, host):
            return True
        low = origin.lower()
        return any(
            any_origin or any(p.match(low) for p in patterns)
            for any_origin, patterns in self._per_key.values()
        )

    @staticmethod
    def _same_origin(origin: str, host: str | None) -> bool:
        """Whether ``origin`` names the host the request was sent to (host and port as the
        ``Host`` header has them; the origin is well-formed, the header is validated)."""
        if not host or parse_host(host) is None:
            return False
        _, _, rest = origin.partition("://")
        return rest.lower() == host.lower()

    @staticmethod
    def response_headers(origin: str) -> dict[str, str]:
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        }

    @staticmethod
    def preflight_headers(origin: str, requested_headers: str | None) -> dict[str, str]:
        headers = CorsPolicy.response_headers(origin)
        allowed = CORS_DEFAULT_HEADERS
        if requested_headers:
            if not re.fullmatch(r"[A-Za-z0-9_\-, ]{1,512}", requested_headers):
                raise IngestError(
                    "invalid_preflight", "Access-Control-Request-Headers is malformed"
                )
            allowed = requested_headers
        headers.update(
            {
                "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
                "Access-Control-Allow-Headers": allowed,
                "Access-Control-Max-Age": CORS_MAX_AGE_SECS,
            }
        )
        return headers


MALFORMED_ORIGIN = "(malformed)"
"""What the log says instead of an origin that is not well-formed (it is request text)."""
_REFUSAL_HINTS = {
    "origin_not_allowed": "add it to the key's allowed_origins if it is the site's own",
    "server_key_from_browser": "a page sent a server key (a secret); pages use browser keys",
    "invalid_preflight": "the preflight named malformed request headers",
}
NO_KEY = "none"
"""The ``key`` label of a refusal no key is known for (a preflight, the identity endpoint)."""


class CorsRefusals:
    """Counts refused origins by key and logs each (key, origin) once per interval at INFO.

    The log is bounded twice: the throttle remembers at most ``max_origins`` pairs, and at
    most ``max_lines`` origin lines are written per interval; past that, one line per
    interval says that more were refused (the counter has them all)."""

    def __init__(
        self,
        metrics: Metrics,
        interval_secs: float = 60.0,
        *,
        max_origins: int = 512,
        max_lines: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counter = metrics.cors_refused
        self._children: dict[str, Counter] = {}
        self._throttle = LogThrottle(log, interval_secs, max_keys=max_origins, clock=clock)
        self._overflow = LogThrottle(log, interval_secs, max_keys=4, clock=clock)
        self._interval = interval_secs
        self._max_lines = max_lines
        self._clock = clock
        self._window_start = -interval_secs
        self._lines = 0

    def record(self, key_id: str, origin: str | None, reason: str) -> None:
        """One refusal: ``key_id`` is a configured key's id or ``NO_KEY``."""
        child = self._children.get(key_id)
        if child is None:
            child = self._children[key_id] = self._counter.labels(key_id)
        child.inc()
        if origin is None:
            shown = "(none)"
        elif well_formed_origin(origin):  # at most ~300 characters
            shown = origin
        else:
            shown = MALFORMED_ORIGIN
        now = self._clock()
        if now - self._window_start >= self._interval:
            self._window_start, self._lines = now, 0
        if self._lines >= self._max_lines:
            self._overflow.log(
                logging.INFO,
                "overflow",
                "more origins were refused than are logged per interval; "
                "see tagrelay_cors_refused_total",
            )
            return
        if self._throttle.log(
            logging.INFO,
            (key_id, shown, reason),
            "origin refused: " + _REFUSAL_HINTS.get(reason, reason),
            {"key": key_id, "origin": shown, "reason": reason},
        ):
            self._lines += 1
