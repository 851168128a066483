"""What every source shares: the decoded form of a request, and JSON body parsing.

A source is a pure function from a request body (plus one value the route passes) to a
``Decoded`` value. Authentication and the answer are the HTTP shell's business
(``tagrelay.web.ingest``, ``tagrelay.web.google``); normalization and enrichment the
pipeline's (``tagrelay.pipeline.run``), the same for every source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from tagrelay.errors import IngestError


@dataclass
class Decoded:
    events: list[Any]
    """The raw events, in request order (indexes in error reports refer to this list)."""
    rejected: Sequence[tuple[int, IngestError]] = ()
    """Events the source itself rejected while decoding, ``(index, error)``, the index
    counting the request's events (GA4: an event without a name). They are reported and
    counted with those the pipeline rejects; a request of Segment's or Jitsu's protocols
    has none here."""
    batch_sent_at: Any = None
    default_type: str | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    """Batch-level ``context`` / ``integrations`` merged under each event's own."""
    write_key: str | None = None
    """A write key found in the body (``writeKey``), if any."""
    is_batch: bool = False
    reset: bool = False
    """The relay's script says the visitor reset its identity (``reset()``): the relay's
    cookie moves to the events' new anonymous id instead of handing back the old one."""
    depth_bound: int | None = None
    """An upper bound on the nesting depth of any event (set by the ingest handler from the
    body's bracket count when that is within the nesting limit), so that shallow requests
    skip the per-event depth walk."""


def parse_json_body(body: bytes) -> Any:
    """Decode a request body as JSON; invalid UTF-8 and malformed JSON are 400s."""
    if not body or body.isspace():  # isspace stops at the first non-space; strip copies
        raise IngestError("empty_body", "the request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        message = str(exc)
        if "UTF-8" in message or "utf-8" in message:
            raise IngestError("invalid_utf8", "the request body is not valid UTF-8") from None
        raise IngestError(
            "malformed_json", f"the request body is not valid JSON: {message}"
        ) from None


def require_object(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise IngestError("invalid_body", f"{what} must be a JSON object")
    return obj


def body_write_key(obj: dict[str, Any]) -> str | None:
    key = obj.get("writeKey")
    return key if isinstance(key, str) and key else None
