"""Request bodies: read once, decoded from their ``Content-Encoding``, never past the limit.

Every route of the relay that reads a body reads it with ``read_body``. aiohttp's own
inflation is turned off for the relay's server (``SERVER_HANDLER_ARGS``, set by
``create_app`` on the application itself, so that ``tagrelay serve`` and every test server
behave the same): it inflated a body in its payload parser, and after the 413 it drained
the rest of the body by inflating all of it on the event loop. A 1.6 KB brotli body that
inflates to 1 GiB cost 1.7 s of the loop's time; four at once held ``/healthz`` for 7.9 s.
Here the body is read as sent, then each content coding is undone in turn, and decoding
stops as soon as its output passes the limit.

=====================================================  ========================================
what                                                   answer (``IngestError``)
=====================================================  ========================================
the body as sent is larger than the limit              413 ``body_too_large``
it inflates to more than the limit                     413 ``body_too_large``
it is not what its coding says, or ends before the     400 ``invalid_body_encoding``
coded stream does
a coding other than gzip, x-gzip, deflate, br, zstd    415 ``unsupported_content_encoding``
and identity, or more than ``MAX_CODINGS`` of them
the client sent less than it announced                 400 ``incomplete_body``
the client went away                                   400 ``client_disconnected``
=====================================================  ========================================

The work of decoding is bounded by the limit, input and output. Brotli's decoder sets up its
window before it writes anything (about 5 ms for a stream that declares a 16 MB window,
whatever the limit) and releases the GIL: it runs in a small pool of threads of its own.
gzip, deflate and zstd cost under a millisecond per MiB of output: they run on the event
loop while the limit is small (``INLINE_MAX_BYTES``), and in the pool beyond, so that a
large configured limit never holds the loop. A body without a coding costs one header
lookup more than ``read()``. Figures: ``bench/bomb_bench.py``.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any

import brotli
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from tagrelay.errors import IngestError

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # before Python 3.14
    from backports import zstd

__all__ = [
    "DECODE_THREADS",
    "INLINE_MAX_BYTES",
    "MAX_CODINGS",
    "SERVER_HANDLER_ARGS",
    "decode_body",
    "read_body",
]

SERVER_HANDLER_ARGS: Mapping[str, Any] = MappingProxyType({"auto_decompress": False})
"""What the relay's HTTP server is made with (``web.Application(handler_args=...)``): bodies
arrive as sent, and ``read_body`` decodes them."""

INLINE_MAX_BYTES = 1024 * 1024
"""Up to this limit, gzip, deflate and zstd bodies are decoded on the event loop (at most
about a millisecond); beyond, in a thread."""

MAX_CODINGS = 2
"""The most content codings one body may stack (``Content-Encoding: gzip, br``)."""

DECODE_THREADS = 1
"""The most bodies decoded in threads at once. One: a body that is not a bomb decodes in
well under a millisecond, and a flood of bombs then holds one core, not the loop's."""

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS


def too_large(limit: int, inflated: bool) -> IngestError:
    what = "inflates to more than" if inflated else "is larger than"
    return IngestError("body_too_large", f"the request body {what} {limit} bytes", status=413)


def _invalid(coding: str, what: str) -> IngestError:
    return IngestError(
        "invalid_body_encoding",
        f"the request body is not valid {coding} ({what}); "
        "send the body as its Content-Encoding says, or no Content-Encoding",
    )


def _truncated(coding: str) -> IngestError:
    return _invalid(coding, "it ends before the compressed stream does")


# -- decoders: (body, limit) -> at most ``limit`` bytes, or IngestError -----------------


def _inflate_zlib(body: bytes, limit: int, wbits: int, coding: str, members: bool) -> bytes:
    """zlib's formats; with ``members``, gzip's concatenated members (RFC 1952, 2.2)."""
    parts: list[bytes] = []
    size = 0
    while True:
        decompressor = zlib.decompressobj(wbits)
        try:
            part = decompressor.decompress(body, limit + 1 - size)
        except zlib.error as exc:
            raise _invalid(coding, str(exc)) from None
        size += len(part)
        if size > limit:
            raise too_large(limit, inflated=True)
        parts.append(part)
        if not decompressor.eof:
            raise _truncated(coding)
        body = decompressor.unused_data
        if not body:
            return b"".join(parts)
        if not members:
            raise _invalid(coding, "data follows the end of the compressed stream")


def _gzip(body: bytes, limit: int) -> bytes:
    return _inflate_zlib(body, limit, _GZIP_WBITS, "gzip", members=True)


def _deflate(body: bytes, limit: int) -> bytes:
    # RFC 9110 means the zlib format (RFC 1950), but some clients send raw deflate (RFC
    # 1951): a zlib stream starts with a header whose method is 8 and which is a multiple
    # of 31 read as a 16-bit number.
    zlib_header = len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0
    wbits = _ZLIB_WBITS if zlib_header else _RAW_DEFLATE_WBITS
    return _inflate_zlib(body, limit, wbits, "deflate", members=False)


def _brotli(body: bytes, limit: int) -> bytes:
    decompressor = brotli.Decompressor()
    parts: list[bytes] = []
    size = 0
    pending = body
    try:
        while True:
            # The output buffer stops growing once past the limit given (it may end a
            # little beyond it); what is left comes with the next calls, on empty input.
            part = decompressor.process(pending, output_buffer_limit=limit + 1 - size)
            pending = b""
            size += len(part)
            if size > limit:
                raise too_large(limit, inflated=True)
            parts.append(part)
            if decompressor.can_accept_more_data():
                break
    except brotli.error:
        raise _invalid("br", "the brotli decoder failed") from None
    if not decompressor.is_finished():
        raise _truncated("br")
    return b"".join(parts)


def _zstd(body: bytes, limit: int) -> bytes:
    """Zstandard, with concatenated frames (RFC 8878, 3)."""
    parts: list[bytes] = []
    size = 0
    while True:
        decompressor = zstd.ZstdDecompressor()
        try:
            part = decompressor.decompress(body, limit + 1 - size)
        except zstd.ZstdError as exc:
            raise _invalid("zstd", str(exc)) from None
        size += len(part)
        if size > limit:
            raise too_large(limit, inflated=True)
        parts.append(part)
        if not decompressor.eof:
            raise _truncated("zstd")
        body = decompressor.unused_data
        if not body:
            return b"".join(parts)


_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}
_INLINE_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "zstd"})


def codings_of(header: str) -> list[str]:
    """The codings of a ``Content-Encoding`` header in the order they were applied, without
    ``identity``; IngestError 415 for a coding the relay cannot undo."""
    codings = [c for c in (part.strip().lower() for part in header.split(",")) if c]
    codings = [c for c in codings if c != "identity"]
    if len(codings) > MAX_CODINGS:
        raise IngestError(
            "unsupported_content_encoding",
            f"{len(codings)} content codings stacked; at most {MAX_CODINGS}",
            status=415,
        )
    for coding in codings:
        if coding not in _DECODERS:
            raise IngestError(
                "unsupported_content_encoding",
                f"expected a Content-Encoding of gzip, deflate, br or zstd, got {coding[:40]!r}",
                status=415,
            )
    return codings


def decode_body(body: bytes, codings: list[str], limit: int) -> bytes:
    """``body`` with ``codings`` (in the order they were applied) undone: at most ``limit``
    bytes, or IngestError (413 ``body_too_large``, 400 ``invalid_body_encoding``). Pure and
    blocking: ``read_body`` decides where it runs."""
    for coding in reversed(codings):
        body = _DECODERS[coding](body, limit)
    return body


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, decoded from its ``Content-Encoding``: at most ``limit`` bytes
    (as sent, and decoded), or IngestError with the reason (see the module's table).
    The relay's application has ``client_max_size == limit``."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit, inflated=False) from None
    except (RequestPayloadError, HttpProcessingError):
        # A chunked body that breaks its framing, or a body cut short by the client.
        raise IngestError(
            "incomplete_body", "the request body ended before its announced length"
        ) from None
    except ConnectionResetError:
        raise IngestError(
            "client_disconnected", "the client went away before sending the whole body"
        ) from None
    header = request.headers.get("Content-Encoding")
    if header is None or not body:
        return body
    codings = codings_of(header)
    if not codings:
        return body
    if limit <= INLINE_MAX_BYTES and _INLINE_CODINGS.issuperset(codings):
        return decode_body(body, codings, limit)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_decode_pool(), decode_body, body, codings, limit)


_pool: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    """The threads that decode bodies (``DECODE_THREADS``), made on first use: a flood of
    brotli bodies waits for them, and holds neither more cores nor more decoder windows
    (up to 16 MB each) than that, nor the loop's default executor."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="tagrelay-bodies")
    return _pool
