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
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

import aiohttp
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
