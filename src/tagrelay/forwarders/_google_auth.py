"""Google OAuth2 access tokens for forwarders that call Google's APIs (Google Ads).

A forwarder declares its credentials by inheriting ``GoogleCredentialsConfig`` before
``ForwarderConfigBase`` (``class GoogleAdsConfig(GoogleCredentialsConfig,
ForwarderConfigBase)``, so that the shared options come first in the file's reference):
either ``oauth`` (an OAuth client and a refresh token, exchanged
at ``token_url`` with ``grant_type=refresh_token``) or ``service_account_file`` (a
service-account JSON key; the relay signs an RS256 JWT with the key and exchanges it at
the same endpoint with the ``jwt-bearer`` grant, RFC 7523). Exactly one of the two; a key
file that cannot be read or parsed is a configuration error, reported without the key.

At run time a ``TokenProvider`` hands out the access token
(https://developers.google.com/identity/protocols/oauth2/web-server#offline,
https://developers.google.com/identity/protocols/oauth2/service-account#httprest):

- it is cached until ``renew_margin_secs`` before Google says it expires;
- ``refresh=True`` (the API answered 401 to it) drops it and fetches a new one;
- concurrent callers that find no valid token share one request to the token endpoint;
- what the token endpoint answers is classified like any destination's answer:

  ============================================  =========================================
  what came back                                result
  ============================================  =========================================
  2xx with an ``access_token``                  the token
  2xx without one, or not JSON                  ``Retry("token_bad_response")``
  408, 429, 5xx, timeout, connection error      ``Retry("token_status_5xx")``,
                                                ``token_status_429``, ``token_timeout``, ...
                                                (``Retry-After`` honoured)
  other 4xx with an OAuth ``error``             ``Dead("token_<error>")`` for the codes of
                                                RFC 6749 §5.2 (``token_invalid_grant``:
                                                refresh token revoked or expired,
                                                ``token_invalid_client``, ...), else
                                                ``Dead("token_status_4xx")``; the detail
                                                is Google's ``error`` and
                                                ``error_description``
  ============================================  =========================================

No detail ever carries the client secret, the refresh token, the signed assertion or an
access token; ``TokenProvider.secrets()`` lists the ones the forwarder must scrub.

The refresh-token exchange is RFC 6749 §6, which other platforms' token endpoints answer the
same way: ``TokenProvider.for_refresh_token`` serves them (LinkedIn's).

In a ``BatchedHttpForwarder`` the provider plugs into the credentials hook::

    async def authorize(self, request, *, refresh=False):
        return await self.tokens.authorize(self.context.http, request, refresh=refresh)
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlencode

import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import Field, SecretStr, field_validator, model_validator

from tagrelay.config.common import ConfigModel
from tagrelay.forwarders._http import (
    HttpRequest,
    HttpResponse,
    classify_status,
    scrub_secrets,
    send,
)
from tagrelay.model import Dead, Retry

__all__ = [
    "ADWORDS_SCOPE",
    "GOOGLE_TOKEN_URL",
    "GoogleCredentialsConfig",
    "GoogleOAuthConfig",
    "ServiceAccountKey",
    "TokenProvider",
    "load_service_account_key",
    "service_account_assertion",
]

log = logging.getLogger(__name__)

GOOGLE_TOKEN_URL: Final = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
ADWORDS_SCOPE: Final = "https://www.googleapis.com/auth/adwords"
JWT_BEARER_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_SECS: Final = 3600
"""Google accepts assertions valid for at most an hour."""

OAUTH_ERRORS: Final = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    }
)
"""RFC 6749 §5.2's error codes: each becomes a bounded ``Dead`` reason ``token_<code>``."""

MAX_DESCRIPTION_CHARS: Final = 500


# -- configuration ----------------------------------------------------------------------


class GoogleOAuthConfig(ConfigModel):
    """An OAuth client (Google Cloud console > APIs & Services > Credentials) and a refresh
    token of a Google account that can reach the Google Ads account."""

    client_id: str = Field(
        min_length=1,
        description="The OAuth client's id.",
        examples=["123456789012-abc123def456.apps.googleusercontent.com"],
    )
    client_secret: SecretStr = Field(
        min_length=1,
        description="The OAuth client's secret. Never logged.",
        examples=["${GOOGLE_ADS_CLIENT_SECRET}"],
    )
    refresh_token: SecretStr = Field(
        min_length=1,
        description=(
            "A refresh token issued to that client for the adwords scope (for instance "
            "with the OAuth Playground or google-ads' generate_user_credentials example). "
            "Never logged."
        ),
        examples=["${GOOGLE_ADS_REFRESH_TOKEN}"],
    )


class GoogleCredentialsConfig(ConfigModel):
    """How a Google forwarder gets its OAuth2 access tokens: ``oauth`` or
    ``service_account_file``, exactly one. A forwarder's config inherits these options
    (``class MyConfig(GoogleCredentialsConfig, ForwarderConfigBase)``)."""

    oauth: GoogleOAuthConfig | None = Field(
        None,
        description=(
            "An OAuth client and a refresh token, exchanged at token_url for access "
            "tokens. Set this or service_account_file."
        ),
        examples=[
            {
                "client_id": "123456789012-abc123def456.apps.googleusercontent.com",
                "client_secret": "${GOOGLE_ADS_CLIENT_SECRET}",
                "refresh_token": "${GOOGLE_ADS_REFRESH_TOKEN}",
            }
        ],
    )
    service_account_file: Path | None = Field(
        None,
        description=(
            "A service account's JSON key file (Google Cloud console > IAM > Service "
            "accounts > Keys); the relay signs a JWT with its private key and exchanges it "
            "at token_url. The service account's email must be a user of the Google Ads "
            "account (or see service_account_subject). Read when the configuration is "
            "loaded: a file that cannot be read or parsed is a configuration error. "
            "Relative paths are relative to the working directory. Set this or oauth."
        ),
        examples=["/etc/tagrelay/google-ads-service-account.json"],
    )
    service_account_subject: str | None = Field(
        None,
        min_length=3,
        description=(
            "With service_account_file and domain-wide delegation: the email of the "
            "Google Workspace user the service account acts as (the JWT's sub claim; "
            "google-ads.yaml calls it impersonated_email). Unset: the service account "
            "acts as itself."
        ),
        examples=["ads-admin@example.com"],
    )
    token_url: str = Field(
        GOOGLE_TOKEN_URL,
        pattern=r"^https?://",
        description=(
            "Google's OAuth2 token endpoint, for both kinds of credentials (also the "
            "audience of a service account's JWT; the key file's token_uri is not used)."
        ),
        examples=[GOOGLE_TOKEN_URL],
    )

    @field_validator("service_account_file")
    @classmethod
    def _readable_key(cls, path: Path | None) -> Path | None:
        if path is not None:
            load_service_account_key(path)
        return path

    @model_validator(mode="after")
    def _one_kind(self) -> GoogleCredentialsConfig:
        if self.oauth is not None and self.service_account_file is not None:
            raise ValueError(
                "oauth and service_account_file are both set; keep one (a refresh token "
                "or a service account's key file)"
            )
        if self.oauth is None and self.service_account_file is None:
            raise ValueError(
                "no credentials: set oauth (client_id, client_secret, refresh_token) or "
                "service_account_file (a service account's JSON key file)"
            )
        if self.service_account_subject is not None and self.service_account_file is None:
            raise ValueError("service_account_subject applies to service_account_file only")
        return self


# -- service-account keys ---------------------------------------------------------------


@dataclass(frozen=True)
class ServiceAccountKey:
    """What the relay uses of a service account's JSON key file."""

    client_email: str
    private_key_id: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    token_uri: str | None = None
    """As the file says; informational (tokens are fetched at the config's token_url)."""


def load_service_account_key(path: Path) -> ServiceAccountKey:
    """Read and parse a service-account JSON key file. Raises ``ValueError`` with what is
    wrong (never any of the file's content beyond the names of its keys)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"cannot read the service account key file {str(path)!r}: {exc.strerror or exc}"
        ) from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        where = (
            f" (line {exc.lineno}, column {exc.colno})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise ValueError(
            f"the service account key file {str(path)!r} is not JSON{where}; expected the "
            "JSON key downloaded from Google Cloud (IAM > Service accounts > Keys)"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"the service account key file {str(path)!r} holds JSON {type(data).__name__}, "
            "not an object; expected the JSON key downloaded from Google Cloud"
        )
    kind = data.get("type")
    if kind != "service_account":
        hint = (
            " (an OAuth client or user's credentials go under oauth: client_id, "
            "client_secret, refresh_token)"
            if kind in ("authorized_user",) or "installed" in data or "web" in data
            else ""
        )
        raise ValueError(
            f"the file {str(path)!r} is not a service account key: its type is "
            f"{_describe_type(kind)}, expected 'service_account'{hint}"
        )
    missing = [
        name
        for name in ("client_email", "private_key_id", "private_key")
        if not isinstance(data.get(name), str) or not data[name]
    ]
    if missing:
        raise ValueError(
            f"the service account key file {str(path)!r} lacks {', '.join(missing)} (a string each)"
        )
    try:
        key = serialization.load_pem_private_key(data["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        # The library's message may quote the data it could not parse: not shown.
        raise ValueError(
            f"the private_key of the service account key file {str(path)!r} is not an "
            "unencrypted PEM private key; download a new JSON key from Google Cloud"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(
            f"the private_key of the service account key file {str(path)!r} is not an RSA "
            "key (RS256 needs one); download a new JSON key from Google Cloud"
        )
    token_uri = data.get("token_uri")
    return ServiceAccountKey(
        client_email=data["client_email"],
        private_key_id=data["private_key_id"],
        private_key=key,
        token_uri=token_uri if isinstance(token_uri, str) else None,
    )


def _describe_type(kind: object) -> str:
    return repr(kind) if isinstance(kind, str) and len(kind) <= 40 else "missing or not a name"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def service_account_assertion(
    key: ServiceAccountKey,
    *,
    audience: str,
    scope: str,
    now: int,
    subject: str | None = None,
) -> str:
    """The signed JWT a service account exchanges for an access token (pure: PKCS#1 v1.5
    signatures are deterministic): header
    ``{"alg":"RS256","typ":"JWT","kid":private_key_id}``, claims ``iss``, ``scope``,
    ``aud``, ``iat`` = ``now``, ``exp`` = ``now`` + 3600 (and ``sub`` when given), each
    part base64url without padding."""
    header = {"alg": "RS256", "typ": "JWT", "kid": key.private_key_id}
    claims: dict[str, Any] = {
        "iss": key.client_email,
        "scope": scope,
        "aud": audience,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    }
    if subject is not None:
        claims["sub"] = subject
    signing_input = f"{_b64url(_compact_json(header))}.{_b64url(_compact_json(claims))}"
    signature = key.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


# -- the token provider -----------------------------------------------------------------


class _Grant(Protocol):
    def form(self, now: int) -> dict[str, str]:
        """The token request's form fields at ``now`` (Unix seconds)."""

    def secrets(self) -> tuple[str, ...]: ...


@dataclass
class _RefreshTokenGrant:
    client_id: str
    client_secret: str
    refresh_token: str

    def form(self, now: int) -> dict[str, str]:
        return {
            "grant_type": "refresh_token",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "refresh_token": self.refresh_token,
        }

    def secrets(self) -> tuple[str, ...]:
        return (self.client_secret, self.refresh_token)


@dataclass
class _ServiceAccountGrant:
    key: ServiceAccountKey
    audience: str
    scope: str
    subject: str | None
    assertion: str = ""
    """The last assertion made: a credential for an hour, so a secret."""

    def form(self, now: int) -> dict[str, str]:
        self.assertion = service_account_assertion(
            self.key, audience=self.audience, scope=self.scope, now=now, subject=self.subject
        )
        return {"grant_type": JWT_BEARER_GRANT, "assertion": self.assertion}

    def secrets(self) -> tuple[str, ...]:
        return (self.assertion,) if self.assertion else ()


@dataclass(frozen=True)
class _Token:
    value: str
    renew_at: float


class TokenProvider:
    """Access tokens for one set of Google credentials (see the module docstring). Use
    ``from_config``; one provider per forwarder, used from one event loop at a time."""

    def __init__(
        self,
        grant: _Grant,
        token_url: str,
        *,
        timeout_secs: float = 10.0,
        renew_margin_secs: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._grant = grant
        self._token_url = token_url
        self._timeout_secs = timeout_secs
        self._renew_margin_secs = renew_margin_secs
        self._clock = clock
        self._token: _Token | None = None
        self._previous = ""
        """The token replaced last: a request that carried it may still be answered."""
        self._fetching: asyncio.Task[str | Retry | Dead] | None = None

    @classmethod
    def from_config(
        cls,
        config: GoogleCredentialsConfig,
        *,
        scope: str = ADWORDS_SCOPE,
        timeout_secs: float = 10.0,
        renew_margin_secs: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> TokenProvider:
        """The provider for a validated config. ``clock`` (Unix seconds) dates the JWT and
        the token's expiry. Raises ``ValueError`` if the key file went bad since the config
        was loaded."""
        grant: _Grant
        if config.oauth is not None:
            grant = _RefreshTokenGrant(
                config.oauth.client_id,
                config.oauth.client_secret.get_secret_value(),
                config.oauth.refresh_token.get_secret_value(),
            )
        elif config.service_account_file is not None:
            grant = _ServiceAccountGrant(
                load_service_account_key(config.service_account_file),
                audience=config.token_url,
                scope=scope,
                subject=config.service_account_subject,
            )
        else:  # pragma: no cover - the config's validator rules it out
            raise ValueError("no credentials configured")
        return cls(
            grant,
            config.token_url,
            timeout_secs=timeout_secs,
            renew_margin_secs=renew_margin_secs,
            clock=clock,
        )

    @classmethod
    def for_refresh_token(
        cls,
        client_id: str,
        client_secret: str,
        refresh_token: str,
        token_url: str,
        *,
        timeout_secs: float = 10.0,
        renew_margin_secs: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> TokenProvider:
        """The provider for an OAuth client and a refresh token exchanged at any RFC 6749
        token endpoint (``grant_type=refresh_token`` with the client's id and secret in the
        form, as Google's and LinkedIn's take them)."""
        grant = _RefreshTokenGrant(client_id, client_secret, refresh_token)
        return cls(
            grant,
            token_url,
            timeout_secs=timeout_secs,
            renew_margin_secs=renew_margin_secs,
            clock=clock,
        )

    def secrets(self) -> tuple[str, ...]:
        """Values never to show: the client secret and refresh token (or the last signed
        assertion), the current access token and the one it replaced."""
        tokens = (self._token.value if self._token is not None else "", self._previous)
        return (*self._grant.secrets(), *(token for token in tokens if token))

    async def token(
        self, session: aiohttp.ClientSession, *, refresh: bool = False
    ) -> str | Retry | Dead:
        """The access token: the cached one while it is valid, else a new one from the
        token endpoint (one request shared by every concurrent caller). ``refresh``: the
        API refused the cached token; drop it (a failed fetch leaves none) and get
        another. ``Retry``/``Dead`` when the endpoint gives none."""
        if refresh:
            self._drop()
        elif self._token is not None and self._clock() < self._token.renew_at:
            return self._token.value
        task = self._fetching
        if task is None:
            task = asyncio.ensure_future(self._fetch(session))
            self._fetching = task
            task.add_done_callback(self._fetched)
        # Shielded: a caller that is cancelled does not cancel the others' fetch.
        return await asyncio.shield(task)

    async def authorize(
        self, session: aiohttp.ClientSession, request: HttpRequest, *, refresh: bool = False
    ) -> HttpRequest | Retry | Dead:
        """``request`` with ``Authorization: Bearer <token>``: the body of a
        ``BatchedHttpForwarder.authorize`` hook."""
        token = await self.token(session, refresh=refresh)
        if not isinstance(token, str):
            return token
        return replace(request, headers={**request.headers, "Authorization": f"Bearer {token}"})

    def _drop(self) -> None:
        if self._token is not None:
            self._previous, self._token = self._token.value, None

    def _fetched(self, task: asyncio.Task[str | Retry | Dead]) -> None:
        if self._fetching is task:
            self._fetching = None
        if not task.cancelled():
            task.exception()  # retrieved: a bug surfaces in the callers, not as a warning

    async def _fetch(self, session: aiohttp.ClientSession) -> str | Retry | Dead:
        started = self._clock()
        request = HttpRequest(
            "POST",
            self._token_url,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
            body=urlencode(self._grant.form(int(started))).encode(),
        )
        answer = await send(session, request, self._timeout_secs)
        if isinstance(answer, Retry):
            result: str | Retry | Dead = Retry(
                f"token_{answer.reason}", self._scrub(f"token endpoint: {answer.detail}")
            )
        else:
            result = self._classify(answer, started)
        log.debug(
            "access token fetched",
            extra={"outcome": result.reason if not isinstance(result, str) else "ok"},
        )
        return result

    def _classify(self, response: HttpResponse, started: float) -> str | Retry | Dead:
        body = _json_object(response.body)
        if 200 <= response.status < 300:
            token = body.get("access_token")
            if not isinstance(token, str) or not token:
                return Retry(
                    "token_bad_response",
                    f"token endpoint answered HTTP {response.status} without an access_token",
                )
            expires_in = body.get("expires_in", 3600)
            lifetime = (
                float(expires_in)
                if isinstance(expires_in, int | float) and not isinstance(expires_in, bool)
                else 3600.0
            )
            # Renewed a margin before it expires, but never sooner than half its lifetime.
            renew_at = started + max(lifetime - self._renew_margin_secs, lifetime / 2)
            self._drop()
            self._token = _Token(token, renew_at)
            return token
        shared = classify_status(response)
        error = body.get("error")
        code = error if isinstance(error, str) else ""
        description = body.get("error_description")
        said = code + (f": {description}" if isinstance(description, str) else "")
        if not said:
            said = response.text
        said = said[:MAX_DESCRIPTION_CHARS]
        detail = self._scrub(f"token endpoint answered HTTP {response.status}: {said}")
        if isinstance(shared, Retry):
            return Retry(f"token_{shared.reason}", detail, shared.after_secs)
        reason = f"token_{code}" if code in OAUTH_ERRORS else "token_status_4xx"
        if not 400 <= response.status < 500:
            reason = f"token_status_{response.status // 100}xx"
        return Dead(reason, detail)

    def _scrub(self, text: str) -> str:
        # Also the forms a secret takes in the form body (an endpoint may echo it).
        return scrub_secrets(text, self.secrets())


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
