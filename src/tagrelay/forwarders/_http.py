"""Shared HTTP sending and the one table that classifies responses.

==========================================  ==========================================
what came back                              outcome
==========================================  ==========================================
2xx                                         ``Delivered``
408, 429, 5xx                               ``Retry`` (honouring ``Retry-After``)
timeout, connection error                   ``Retry``
any other status                            ``Dead`` with the response body as detail
==========================================  ==========================================

A forwarder builds ``HttpRequest`` values (a pure function of the batch, golden-tested) and
calls ``send``; it overrides classification only for its platform's quirks, such as a 200
that carries an error body.

Secrets: ``scrub_secrets`` takes the forwarder's secrets out of a detail (dead letters, log
lines); ``captured_exchange`` records a request and its answer for the debug view
(``tagrelay.capture``) with them taken out, the credential headers and the secret-looking
query parameters (``SECRET_NAME``) replaced by ``***`` whatever their value.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

import aiohttp
import orjson
from yarl import URL

from tagrelay.model import Dead, Delivered, Outcome, Retry

MAX_DETAIL_CHARS = 2000
"""Response bodies kept in dead letters and logs are cut to this length."""

SCRUBBED = "***"
"""What a secret becomes in a detail, a log line or a dead letter."""


@functools.lru_cache(maxsize=64)
def _url_forms(secret: str) -> tuple[str, ...]:
    encoded = (quote(secret, safe=""), quote_plus(secret))
    # The HTTP client re-quotes a URL as it sends it: what a query may hold unencoded
    # ("/", ":", "@", ...) goes out decoded, and that is what an echoed URL shows.
    requoted = tuple(URL("http://h/?k=" + form).raw_query_string[2:] for form in encoded)
    return (secret, *encoded, *requoted)


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` replaced by ``SCRUBBED``, raw and in the forms it
    takes in a URL or a form body (percent-encoded, ``+`` for spaces, as the HTTP client
    re-quotes a query), which a destination's error may echo. Longer forms first, so a
    secret inside another is not half-replaced."""
    forms = {form for secret in secrets if secret for form in _url_forms(secret)}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, SCRUBBED)
    return text


SECRET_NAME = re.compile(
    r"auth|token|secret|passw|api[-_]?key|apikey|signature|credential|cookie|session|"
    r"^key$|write[-_]?key|private",
    re.IGNORECASE,
)
"""Header and query parameter names whose values are credentials, whatever the value."""

MAX_CAPTURED_BODY = 64 * 1024
"""How much of a request's or an answer's body the debug view keeps."""


_AUTH_SCHEME = re.compile(r"^\s*[A-Za-z][A-Za-z0-9_-]*\s+(\S+)\s*$")


def header_secrets(value: str) -> tuple[str, ...]:
    """A configured header's value as secrets: the value, and when it reads
    ``<scheme> <credentials>`` (``Bearer abc``) the credentials alone too, which an answer
    or an error may echo without the scheme."""
    found = _AUTH_SCHEME.match(value)
    return (value, found.group(1)) if found else (value,)


def redact_headers(headers: Mapping[str, str], secrets: Iterable[str]) -> dict[str, str]:
    """``headers`` with credential headers (``Authorization``, ``*-Token``, ``*-Key``...)
    replaced by ``SCRUBBED`` and the ``secrets`` taken out of the others."""
    secrets = tuple(secrets)
    return {
        str(name): SCRUBBED if SECRET_NAME.search(name) else scrub_secrets(value, secrets)
        for name, value in headers.items()
    }


def redact_url(url: str, secrets: Iterable[str]) -> str:
    """``url`` with the values of secret-looking query parameters (``access_token``,
    ``api_secret``, ``key``...) replaced by ``SCRUBBED``, its user info dropped, and the
    ``secrets`` taken out of the rest."""
    secrets = tuple(secrets)
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub_secrets(url, secrets)
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_NAME.search(name) for name, _ in pairs):
            query = urlencode(
                [(n, SCRUBBED if SECRET_NAME.search(n) else v) for n, v in pairs], safe="*"
            )
    return scrub_secrets(urlunsplit(parts._replace(netloc=netloc, query=query)), secrets)


def _body_text(body: bytes, secrets: Sequence[str]) -> tuple[str, bool]:
    """A body as text, scrubbed, then cut to ``MAX_CAPTURED_BODY`` characters (scrubbed
    first: a cut through a secret would leave its beginning)."""
    text = scrub_secrets(body.decode("utf-8", "replace"), secrets)
    return text[:MAX_CAPTURED_BODY], len(text) > MAX_CAPTURED_BODY


def captured_exchange(
    request: HttpRequest,
    response: HttpResponse | Retry,
    secrets: Iterable[str],
    *,
    forwarder: str,
    message_ids: Sequence[object],
    started: float,
) -> dict[str, Any]:
    """One request sent and what came back, as the debug view shows it, redacted:
    ``secrets`` (the forwarder's) out of the URL, headers and bodies, credential headers
    and query parameters replaced whatever their value. ``message_ids``: the events the
    request carries; ``started``: ``time.time()`` when it was sent."""
    secret_list = tuple(s for s in secrets if s)
    body, body_cut = _body_text(request.body, secret_list)
    record: dict[str, Any] = {
        "at_ms": int(started * 1000),
        "forwarder": forwarder,
        "message_ids": list(message_ids),
        "duration_ms": round((time.time() - started) * 1000, 1),
        "request": {
            "method": request.method,
            "url": redact_url(request.url, secret_list),
            "headers": redact_headers(request.headers, secret_list),
            "body": body,
            "body_truncated": body_cut,
        },
        "response": None,
        "error": None,
    }
    if isinstance(response, Retry):
        record["error"] = scrub_secrets(f"{response.reason}: {response.detail}", secret_list)
    else:
        answer, answer_cut = _body_text(response.body, secret_list)
        record["response"] = {
            "status": response.status,
            "headers": redact_headers(response.headers, secret_list),
            "body": answer,
            "body_truncated": answer_cut or response.truncated,
        }
    return record


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    url_encoded: bool = False
    """The URL is already percent-encoded and goes out byte for byte (a re-sent gtag
    query); otherwise the HTTP client normalizes its quoting."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool = False
    """The body went on past the ``max_body_bytes`` read (``body`` is its beginning)."""

    @property
    def text(self) -> str:
        return self.body[:MAX_DETAIL_CHARS].decode("utf-8", "replace")


def json_object(body: bytes) -> dict[str, Any]:
    """An answer's body as the JSON object it should be; ``{}`` when it is not JSON or not
    an object (a proxy's HTML page, an empty body)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_status(response: HttpResponse) -> Outcome:
    """The shared classification table (see the module docstring)."""
    status = response.status
    if 200 <= status < 300:
        return Delivered()
    if status == 408 or status == 429 or status >= 500:
        reason = f"status_{status}" if status in (408, 429) else "status_5xx"
        return Retry(
            reason=reason,
            detail=f"HTTP {status}: {response.text}",
            after_secs=parse_retry_after(response.headers.get("Retry-After")),
        )
    return Dead(
        reason="status_4xx" if 400 <= status < 500 else f"status_{status // 100}xx",
        detail=f"HTTP {status}: {response.text}",
    )


MAX_RESPONSE_BYTES = 64 * 1024
"""How much of a response body ``send`` reads by default: enough for any status or error
answer. A destination that lists per-event errors in its answer reads more (its
forwarder's ``max_response_bytes``)."""


async def send(
    session: aiohttp.ClientSession,
    request: HttpRequest,
    timeout_secs: float,
    max_body_bytes: int = MAX_RESPONSE_BYTES,
) -> HttpResponse | Retry:
    """Send one request. Network failures come back as ``Retry``; responses, whatever their
    status, as ``HttpResponse`` for the caller to classify, with at most ``max_body_bytes``
    of the body (``truncated`` says when there was more)."""
    try:
        async with session.request(
            request.method,
            URL(request.url, encoded=True) if request.url_encoded else request.url,
            headers=request.headers,
            data=request.body,
            timeout=aiohttp.ClientTimeout(total=timeout_secs),
            allow_redirects=False,
        ) as resp:
            body = await resp.content.read(max_body_bytes + 1)
            while len(body) <= max_body_bytes and not resp.content.at_eof():
                more = await resp.content.read(max_body_bytes + 1 - len(body))
                if not more:
                    break
                body += more
            truncated = len(body) > max_body_bytes
            return HttpResponse(resp.status, dict(resp.headers), body[:max_body_bytes], truncated)
    except TimeoutError:
        return Retry(reason="timeout", detail=f"no response within {timeout_secs:g}s")
    except aiohttp.ClientError as exc:
        return Retry(reason="connection_error", detail=f"{type(exc).__name__}: {exc}")
    except asyncio.CancelledError:
        raise
    except OSError as exc:
        return Retry(reason="connection_error", detail=f"{type(exc).__name__}: {exc}")
