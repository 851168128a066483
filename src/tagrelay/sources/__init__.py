"""Sources: one module per inbound protocol, registered here by name.

Each exposes ``decode(parsed_body, path_name) -> Decoded`` (pure). The name is the
``source`` label of the ingest metrics and ``context.source`` of the stored events, except
that requests from RudderStack's SDKs on the Segment routes are labelled ``rudderstack``
(``segment.sdk_source``). ``SOURCE_LABELS`` is every label a request of these sources gets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tagrelay.sources import jitsu, segment, tagrelay
from tagrelay.sources._base import Decoded, parse_json_body

Decoder = Callable[[Any, str], Decoded]

SOURCES: dict[str, Decoder] = {
    "segment": segment.decode,
    "jitsu": jitsu.decode,
    "tagrelay": tagrelay.decode,
}
SOURCE_LABELS: frozenset[str] = frozenset({*SOURCES, segment.RUDDERSTACK})

__all__ = ["SOURCES", "SOURCE_LABELS", "Decoded", "Decoder", "parse_json_body"]
