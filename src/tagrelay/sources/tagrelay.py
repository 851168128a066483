"""The relay's own script (tagrelay.js): ``POST <paths.events>``.

The script always sends a batch, as a ``text/plain`` body (no CORS preflight) that carries
its write key: ``{"writeKey": "...", "sentAt": "...", "batch": [events...]}``, with
``"reset": true`` after the page called ``reset()``. The events follow Segment's spec.
"""

from __future__ import annotations

from tagrelay.sources import segment
from tagrelay.sources._base import Decoded, parse_json_body, require_object


def decode(body: bytes, path_name: str) -> Decoded:
    obj = require_object(parse_json_body(body), "the request body")
    decoded = segment.decode_batch(obj)
    decoded.reset = obj.get("reset") is True
    return decoded
