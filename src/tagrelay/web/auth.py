"""Write keys and CORS.

A write key arrives as the HTTP Basic username (Segment, RudderStack), as ``X-Write-Key``
(Jitsu), as ``?writeKey=`` (beacons cannot set headers) or as ``writeKey`` in the body.
Browser keys are public and restricted by their ``allowed_origins``; server keys are secrets.
Keys are compared in constant time and never appear in logs, metrics or error messages.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tagrelay.config.models import WriteKeyConfig
from tagrelay.errors import AuthError, IngestError

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

    def __post_init__(self) -> None:
        secrets = tuple((key.key.get_secret_value().encode(), key) for key in self.keys)
        object.__setattr__(self, "_secrets", secrets)

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
        if key.kind == "server":
            return True
        if self._same_origin(origin, host):
            return True
        any_origin, patterns = self._per_key.get(key.id, (False, ()))
        return any_origin or any(p.match(origin.lower()) for p in patterns)

    def origin_allowed_anywhere(self, origin: str, host: str | None) -> bool:
        """For preflights, which do not carry the key: is any browser key open to it?"""
        if self._same_origin(origin, host):
            return True
        low = origin.lower()
        return any(
            any_origin or any(p.match(low) for p in patterns)
            for any_origin, patterns in self._per_key.values()
        )

    @staticmethod
    def _same_origin(origin: str, host: str | None) -> bool:
        if not host:
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
