"""Reading events out of the spool's segments by sequence number.

A segment is one group commit: a row of ``segments`` holding its events as JSON lines, with
the sequence number of its last event, their count and when the oldest arrived (see
``tagrelay.spool.sqlite``). The relay reads them on its reader thread with
``segments_after``. A forwarder process that reads the spool file itself (the warehouse
process, ``Forwarder.reads_spool``) opens it with ``open_read_only`` and takes a batch with
``read_span``, so that the batch's events never pass through the relay process.

A segment's payload may be sealed (``encryption.keys``, ``tagrelay.spool.encryption``): the
readers take the function that opens it (``PayloadCipher.open_segment``), called with the
segment's ``last_seq`` and its stored bytes.

This module needs nothing but the standard library.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Generator
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

SELECT_AFTER = (
    "SELECT last_seq, count, received_ms, payload FROM segments WHERE last_seq > ? "
    "ORDER BY last_seq"
)
"""The segments holding events past a position, oldest first."""

SELECT_FIRST_RECEIVED = (
    "SELECT received_ms FROM segments WHERE last_seq > ? ORDER BY last_seq LIMIT 1"
)
"""When the oldest event past a position arrived (its segment's ``received_ms``)."""


OpenSegment = Callable[[int, bytes], bytes]
"""``(last_seq, stored payload) -> its events as JSON lines``."""


def _plaintext_only(last_seq: int, payload: bytes) -> bytes:
    """The default: a sealed payload (it starts with a NUL byte, which JSON never does) is
    refused rather than handed out as events."""
    if payload[:1] == b"\x00":
        raise SealedSegment(f"segment {last_seq} is encrypted; no key was given to read it")
    return payload


class SealedSegment(ValueError):
    """A sealed segment was read without the function that opens it."""


class SpanMissing(LookupError):
    """The spool no longer (or not yet) holds every event of the requested span."""


def open_read_only(path: Path | str) -> sqlite3.Connection:
    """A read-only connection to the spool at ``path``, for another process than the relay.
    The relay keeps the database in WAL mode, so reading never blocks its commits."""
    uri = f"file:{quote(str(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def segments_after(
    conn: sqlite3.Connection, after: int, open_segment: OpenSegment = _plaintext_only
) -> Generator[tuple[int, int, list[bytes]], None, None]:
    """For each segment holding events with ``seq > after``, oldest first: the sequence
    number of its first such event, when they arrived, and their stored JSON (one ``bytes``
    each; the segment's events at or before ``after`` left out). Close the iterator when
    done early (``contextlib.closing``): it holds a read transaction until then.
    ``open_segment`` turns a stored payload into its JSON lines (see the module docstring)."""
    cursor = conn.execute(SELECT_AFTER, (after,))
    try:
        for last_seq, count, received_ms, payload in cursor:
            first = last_seq - count + 1
            lines = open_segment(last_seq, payload).split(b"\n")
            if first <= after:
                lines = lines[after + 1 - first :]
                first = after + 1
            yield first, received_ms, lines
    finally:
        cursor.close()


def read_span(
    conn: sqlite3.Connection, after: int, last: int, open_segment: OpenSegment = _plaintext_only
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """The events with ``after < seq <= last``, in order: their stored JSON (one ``bytes``
    each), and ``(count, received_ms)`` for each segment they came from, which is when they
    arrived. Raises ``SpanMissing`` when the spool does not hold all of them, and
    ``sqlite3.Error`` when it cannot be read (and what ``open_segment`` raises)."""
    lines: list[bytes] = []
    arrivals: list[tuple[int, int]] = []
    if last <= after:
        return lines, arrivals
    with closing(segments_after(conn, after, open_segment)) as segments:
        for first, received_ms, segment in segments:
            if first != after + len(lines) + 1:
                break  # a gap: what should come next was pruned
            taken = segment[: last - first + 1]
            lines.extend(taken)
            arrivals.append((len(taken), received_ms))
            if len(lines) >= last - after:
                break
    if len(lines) != last - after:
        raise SpanMissing(
            f"the spool holds {len(lines)} of the {last - after} events after {after}"
        )
    return lines, arrivals
