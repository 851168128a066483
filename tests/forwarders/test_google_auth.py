"""Google OAuth2 access tokens (``forwarders._google_auth``) against a fake token endpoint
on 127.0.0.1: the exact form bodies of both grants, the service account's JWT verified
with a key made here, caching, expiry, refresh, one fetch for concurrent callers, the
token endpoint's answers classified without secrets, a bad key file as a configuration
error, and the provider plugged into the batched shell's credentials hook."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pydantic import ValidationError

import tagrelay.forwarders._google_auth as google_auth
from tagrelay.config.common import ForwarderConfigBase
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import BatchedHttpForwarder, Plan, PlannedRequest
from tagrelay.forwarders._google_auth import (
    ADWORDS_SCOPE,
    GoogleCredentialsConfig,
    GoogleOAuthConfig,
    TokenProvider,
    load_service_account_key,
)
from tagrelay.forwarders._http import HttpRequest, HttpResponse
from tagrelay.metrics import Metrics
from tagrelay.model import Dead, Delivered, Event, Retry
from tests.support import fake_server

CLIENT_ID = "1234-abc.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-client/secret+with=odd&chars"
REFRESH_TOKEN = "1//0refresh-token/with+odd=chars"
"""Secrets whose percent-encoded forms differ from them."""
KEY_ID = "0123456789abcdef0123456789abcdef01234567"
CLIENT_EMAIL = "relay@my-project.iam.gserviceaccount.com"
NOW = 1_780_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


Answer = tuple[int, dict[str, str], bytes]


def granted(token: str, expires_in: int = 3599) -> Answer:
    body = {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def refused(status: int, error: str, description: str) -> Answer:
    body = {"error": error, "error_description": description}
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


@dataclass
class FakeTokenEndpoint:
    """Google's token endpoint: records each POST to /token (headers, raw body) and
    answers from ``answers`` in order (the last one repeats; by default a fresh token per
    request). While ``gate`` is set and not yet open, requests wait for it."""

    answers: list[Answer] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        if self.gate is not None:
            await self.gate.wait()
        if not self.answers:
            status, headers, body = granted(f"ya29.token-{len(self.requests)}")
        else:
            status, headers, body = (
                self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            )
        return web.Response(status=status, headers=headers, body=body)

    def forms(self) -> list[dict[str, list[str]]]:
        return [parse_qs(body.decode(), strict_parsing=True) for _, body in self.requests]


@pytest.fixture
async def endpoint() -> AsyncIterator[FakeTokenEndpoint]:
    fake = FakeTokenEndpoint()
    async with fake_server("token endpoint", {"/token": fake.handle}) as server:
        fake.url = str(server.make_url("/token"))
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def key_file(tmp_path: Path, key: rsa.RSAPrivateKey, **overrides: Any) -> Path:
    """A service-account key file laid out as Google Cloud's downloads are."""
    data: dict[str, Any] = {
        "type": "service_account",
        "project_id": "my-project",
        "private_key_id": KEY_ID,
        "private_key": pem(key),
        "client_email": CLIENT_EMAIL,
        "client_id": "104",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    data.update(overrides)
    path = tmp_path / "key.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return path


def oauth_config(endpoint: FakeTokenEndpoint) -> GoogleCredentialsConfig:
    return GoogleCredentialsConfig.model_validate(
        {
            "oauth": {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "refresh_token": REFRESH_TOKEN,
            },
            "token_url": endpoint.url,
        }
    )


def oauth_provider(endpoint: FakeTokenEndpoint, clock: Clock | None = None) -> TokenProvider:
    return TokenProvider.from_config(oauth_config(endpoint), clock=clock or Clock())


def b64url_decode(part: str) -> bytes:
    assert re.fullmatch(r"[A-Za-z0-9_-]+", part), "base64url without padding"
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_public_api() -> None:
    assert sorted(google_auth.__all__) == [
        "ADWORDS_SCOPE",
        "GOOGLE_TOKEN_URL",
        "GoogleCredentialsConfig",
        "GoogleOAuthConfig",
        "ServiceAccountKey",
        "TokenProvider",
        "load_service_account_key",
        "service_account_assertion",
    ]
    for name in google_auth.__all__:
        assert getattr(google_auth, name) is not None


# -- the two grants, byte for byte ------------------------------------------------------


async def test_a_refresh_token_is_exchanged_with_the_exact_form(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    tokens = oauth_provider(endpoint)
    assert await tokens.token(http) == "ya29.token-1"
    [(headers, body)] = endpoint.requests
    assert body == (
        b"grant_type=refresh_token"
        b"&client_id=1234-abc.apps.googleusercontent.com"
        b"&client_secret=GOCSPX-client%2Fsecret%2Bwith%3Dodd%26chars"
        b"&refresh_token=1%2F%2F0refresh-token%2Fwith%2Bodd%3Dchars"
    )
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["Accept"] == "application/json"
    assert set(tokens.secrets()) == {CLIENT_SECRET, REFRESH_TOKEN, "ya29.token-1"}


async def test_a_service_account_signs_an_rs256_jwt_google_accepts(
    endpoint: FakeTokenEndpoint,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    config = GoogleCredentialsConfig.model_validate(
        {"service_account_file": str(key_file(tmp_path, rsa_key)), "token_url": endpoint.url}
    )
    tokens = TokenProvider.from_config(config, clock=Clock())
    assert await tokens.token(http) == "ya29.token-1"

    [(headers, body)] = endpoint.requests
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    [form] = endpoint.forms()
    assert list(form) == ["grant_type", "assertion"]
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    [assertion] = form["assertion"]
    assert (
        body
        == urlencode(
            {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
        ).encode()
    )

    header, claims, signature = assertion.split(".")
    assert json.loads(b64url_decode(header)) == {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
    assert list(json.loads(b64url_decode(header))) == ["alg", "typ", "kid"]
    assert json.loads(b64url_decode(claims)) == {
        "iss": CLIENT_EMAIL,
        "scope": "https://www.googleapis.com/auth/adwords",
        "aud": endpoint.url,
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
    }
    # Raises InvalidSignature unless the key signed exactly "header.claims".
    rsa_key.public_key().verify(
        b64url_decode(signature),
        f"{header}.{claims}".encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    assert assertion in tokens.secrets()
    assert "ya29.token-1" in tokens.secrets()


async def test_a_subject_is_the_jwt_sub_claim(
    endpoint: FakeTokenEndpoint,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    config = GoogleCredentialsConfig.model_validate(
        {
            "service_account_file": str(key_file(tmp_path, rsa_key)),
            "service_account_subject": "ads-admin@example.com",
            "token_url": endpoint.url,
        }
    )
    await TokenProvider.from_config(config, clock=Clock()).token(http)
    [form] = endpoint.forms()
    claims = json.loads(b64url_decode(form["assertion"][0].split(".")[1]))
    assert claims["sub"] == "ads-admin@example.com"
    assert claims["scope"] == ADWORDS_SCOPE


# -- caching, expiry, refresh, concurrency ----------------------------------------------


async def test_the_token_is_cached_until_a_minute_before_it_expires(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    clock = Clock()
    endpoint.answers = [granted("ya29.first", expires_in=3600), granted("ya29.second")]
    tokens = oauth_provider(endpoint, clock)
    assert await tokens.token(http) == "ya29.first"
    assert await tokens.token(http) == "ya29.first"
    clock.now = NOW + 3600 - 61
    assert await tokens.token(http) == "ya29.first"
    assert len(endpoint.requests) == 1

    clock.now = NOW + 3600 - 60
    assert await tokens.token(http) == "ya29.second"
    assert len(endpoint.requests) == 2
    assert set(tokens.secrets()) == {CLIENT_SECRET, REFRESH_TOKEN, "ya29.first", "ya29.second"}


async def test_a_short_lived_token_is_kept_for_half_its_life(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    clock = Clock()
    endpoint.answers = [granted("ya29.short", expires_in=40), granted("ya29.next")]
    tokens = oauth_provider(endpoint, clock)
    assert await tokens.token(http) == "ya29.short"
    clock.now = NOW + 19
    assert await tokens.token(http) == "ya29.short"
    clock.now = NOW + 20
    assert await tokens.token(http) == "ya29.next"


async def test_refresh_drops_the_cached_token_and_fetches_once(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    tokens = oauth_provider(endpoint)
    assert await tokens.token(http) == "ya29.token-1"
    assert await tokens.token(http, refresh=True) == "ya29.token-2"
    assert await tokens.token(http) == "ya29.token-2"
    assert len(endpoint.requests) == 2


async def test_a_failed_refresh_leaves_no_token_cached(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    endpoint.answers = [granted("ya29.old"), (503, {}, b"busy"), granted("ya29.new")]
    tokens = oauth_provider(endpoint)
    assert await tokens.token(http) == "ya29.old"
    assert isinstance(await tokens.token(http, refresh=True), Retry)
    assert await tokens.token(http) == "ya29.new"
    assert len(endpoint.requests) == 3


async def test_ten_concurrent_callers_share_one_fetch(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    endpoint.gate = asyncio.Event()
    tokens = oauth_provider(endpoint)
    callers = asyncio.gather(*(tokens.token(http) for _ in range(10)))
    while not endpoint.requests:  # the fetch is at the endpoint, every caller waiting
        await asyncio.sleep(0.01)
    endpoint.gate.set()
    assert await callers == ["ya29.token-1"] * 10
    assert len(endpoint.requests) == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    endpoint.gate = asyncio.Event()
    tokens = oauth_provider(endpoint)
    first = asyncio.ensure_future(tokens.token(http))
    second = asyncio.ensure_future(tokens.token(http))
    while not endpoint.requests:
        await asyncio.sleep(0.01)
    first.cancel()
    endpoint.gate.set()
    assert await second == "ya29.token-1"
    assert first.cancelled()
    assert len(endpoint.requests) == 1


# -- what the token endpoint answers ----------------------------------------------------


async def test_a_revoked_refresh_token_is_dead_with_googles_words_and_no_secret(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    # An endpoint that echoes what it was sent must not leak it either.
    endpoint.answers = [
        refused(400, "invalid_grant", f"Token has been expired or revoked. ({REFRESH_TOKEN})")
    ]
    outcome = await oauth_provider(endpoint).token(http)
    assert outcome == Dead(
        "token_invalid_grant",
        "token endpoint answered HTTP 400: invalid_grant: Token has been expired or revoked. (***)",
    )


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (refused(401, "invalid_client", "The OAuth client was not found."), "token_invalid_client"),
        (refused(400, "unauthorized_client", "Unauthorized"), "token_unauthorized_client"),
        (refused(400, "invalid_scope", "Bad scope"), "token_invalid_scope"),
        (refused(403, "some_new_code", "Forbidden"), "token_status_4xx"),
        ((404, {}, b"<html>Not Found</html>"), "token_status_4xx"),
    ],
)
async def test_other_refusals_are_dead_with_a_bounded_reason(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession, answer: Answer, reason: str
) -> None:
    endpoint.answers = [answer]
    outcome = await oauth_provider(endpoint).token(http)
    assert isinstance(outcome, Dead)
    assert outcome.reason == reason
    assert outcome.detail.startswith(f"token endpoint answered HTTP {answer[0]}: ")
    for secret in (CLIENT_SECRET, REFRESH_TOKEN):
        assert secret not in outcome.detail


async def test_an_unavailable_endpoint_is_a_retry_and_nothing_is_cached(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    endpoint.answers = [
        (503, {"Retry-After": "7"}, b"Service Unavailable"),
        (429, {}, b'{"error": "rate_limit_exceeded"}'),
        granted("ya29.at-last"),
    ]
    tokens = oauth_provider(endpoint)
    assert await tokens.token(http) == Retry(
        "token_status_5xx", "token endpoint answered HTTP 503: Service Unavailable", 7.0
    )
    assert await tokens.token(http) == Retry(
        "token_status_429", "token endpoint answered HTTP 429: rate_limit_exceeded", None
    )
    assert await tokens.token(http) == "ya29.at-last"
    assert len(endpoint.requests) == 3


async def test_a_200_without_an_access_token_is_a_retry(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession
) -> None:
    endpoint.answers = [(200, {}, b"<html>captive portal</html>")]
    outcome = await oauth_provider(endpoint).token(http)
    assert outcome == Retry(
        "token_bad_response", "token endpoint answered HTTP 200 without an access_token"
    )


async def test_a_network_failure_is_a_retry(http: aiohttp.ClientSession) -> None:
    # A port that was just free: nothing listens there.
    server = TestServer(web.Application(), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("/token"))
    await server.close()
    config = oauth_config(FakeTokenEndpoint(url=url))
    outcome = await TokenProvider.from_config(config).token(http)
    assert isinstance(outcome, Retry)
    assert outcome.reason == "token_connection_error"


# -- configuration ----------------------------------------------------------------------


class AdsLikeConfig(GoogleCredentialsConfig, ForwarderConfigBase):
    """A forwarder's config that inherits the credentials' options."""

    type: Literal["ads_like"] = "ads_like"
    timeout_secs: float = 5.0
    max_concurrent_requests: int = 2


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        AdsLikeConfig.model_validate({"id": "ads", **raw})
    return [
        f"{'.'.join(map(str, e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}"
        for e in caught.value.errors()
    ]


def test_every_option_documents_itself() -> None:
    for model in (GoogleOAuthConfig, GoogleCredentialsConfig):
        assert (model.__doc__ or "").strip()
        for name, info in model.model_fields.items():
            assert (info.description or "").strip(), name
            assert info.examples, name


def test_the_options_join_a_forwarder_config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    config = AdsLikeConfig.model_validate(
        {
            "id": "ads",
            "oauth": {"client_id": CLIENT_ID, "client_secret": "s", "refresh_token": "r"},
        }
    )
    assert config.token_url == "https://oauth2.googleapis.com/token"
    assert list(AdsLikeConfig.model_fields)[:1] == ["id"]
    assert config.oauth is not None and config.oauth.refresh_token.get_secret_value() == "r"
    path = key_file(tmp_path, rsa_key)
    assert (
        AdsLikeConfig.model_validate(
            {"id": "ads", "service_account_file": str(path)}
        ).service_account_file
        == path
    )


def test_exactly_one_kind_of_credentials(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    oauth = {"client_id": CLIENT_ID, "client_secret": "s", "refresh_token": "r"}
    path = str(key_file(tmp_path, rsa_key))
    assert problems({}) == [
        ": no credentials: set oauth (client_id, client_secret, refresh_token) or "
        "service_account_file (a service account's JSON key file)"
    ]
    assert problems({"oauth": oauth, "service_account_file": path}) == [
        ": oauth and service_account_file are both set; keep one (a refresh token or a "
        "service account's key file)"
    ]
    assert problems({"oauth": oauth, "service_account_subject": "a@example.com"}) == [
        ": service_account_subject applies to service_account_file only"
    ]
    assert problems({"oauth": {"client_id": CLIENT_ID, "client_secret": "s"}}) == [
        "oauth.refresh_token: Field required"
    ]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"private_key": "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"},
            "the private_key of the service account key file {path!r} is not an unencrypted "
            "PEM private key; download a new JSON key from Google Cloud",
        ),
        (
            {"private_key": None, "client_email": None},
            "the service account key file {path!r} lacks client_email, private_key (a string each)",
        ),
        (
            {"type": "authorized_user"},
            "the file {path!r} is not a service account key: its type is 'authorized_user', "
            "expected 'service_account' (an OAuth client or user's credentials go under "
            "oauth: client_id, client_secret, refresh_token)",
        ),
    ],
)
def test_a_malformed_key_file_is_a_configuration_error_without_the_key(
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    overrides: dict[str, Any],
    expected: str,
) -> None:
    path = key_file(tmp_path, rsa_key, **overrides)
    [problem] = problems({"service_account_file": str(path)})
    assert problem == "service_account_file: " + expected.format(path=str(path))
    assert "PRIVATE KEY" not in problem and "not a key" not in problem


def test_an_unreadable_or_non_json_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert problems({"service_account_file": str(missing)}) == [
        f"service_account_file: cannot read the service account key file {str(missing)!r}: "
        "No such file or directory"
    ]
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "service_account", "private_key": "-----BEGIN')
    assert problems({"service_account_file": str(broken)}) == [
        f"service_account_file: the service account key file {str(broken)!r} is not JSON "
        "(line 1, column 44); expected the JSON key downloaded from Google Cloud "
        "(IAM > Service accounts > Keys)"
    ]


def test_a_key_that_is_not_rsa_is_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "key.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "private_key_id": KEY_ID,
                "private_key": pem(ec_key),
                "client_email": CLIENT_EMAIL,
            }
        )
    )
    with pytest.raises(ValueError, match="is not an RSA key"):
        load_service_account_key(path)


def test_a_loaded_key_never_shows_in_its_repr(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key = load_service_account_key(key_file(tmp_path, rsa_key))
    assert key.client_email == CLIENT_EMAIL
    assert key.private_key_id == KEY_ID
    assert key.token_uri == "https://oauth2.googleapis.com/token"
    assert "private_key=" not in repr(key)


# -- in the batched shell's credentials hook --------------------------------------------


class AdsLike(BatchedHttpForwarder[AdsLikeConfig]):
    """One request per batch to ``api_url``, with the provider behind ``authorize``."""

    api_url = ""

    def __init__(self, config: AdsLikeConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self.tokens = TokenProvider.from_config(config, timeout_secs=config.timeout_secs)

    def plan(self, events: list[Event], now: datetime) -> Plan:
        body = json.dumps([e["messageId"] for e in events]).encode()
        request = HttpRequest("POST", self.api_url, {}, body)
        return Plan([PlannedRequest(request, tuple(range(len(events))))])

    async def authorize(
        self, request: HttpRequest, *, refresh: bool = False
    ) -> HttpRequest | Retry | Dead:
        return await self.tokens.authorize(self.context.http, request, refresh=refresh)

    def unauthorized(self, response: HttpResponse) -> bool:
        return response.status == 401

    def secrets(self) -> tuple[str, ...]:
        return self.tokens.secrets()


async def test_a_401_from_the_api_refreshes_the_token_once(
    endpoint: FakeTokenEndpoint, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    seen: list[str] = []

    async def api(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return web.Response(status=401 if len(seen) == 1 else 200)

    async with fake_server("Ads API", {"/upload": api}) as server:
        config = AdsLikeConfig.model_validate(
            {
                "id": "ads",
                "oauth": {
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                    "refresh_token": REFRESH_TOKEN,
                },
                "token_url": endpoint.url,
            }
        )
        forwarder = AdsLike(config, ForwarderContext(tmp_path, http, Metrics()))
        forwarder.api_url = str(server.make_url("/upload"))
        outcome = await forwarder.deliver([{"type": "track", "messageId": "m1"}])
    assert outcome == Delivered()
    assert seen == ["Bearer ya29.token-1", "Bearer ya29.token-2"]
    assert len(endpoint.requests) == 2
