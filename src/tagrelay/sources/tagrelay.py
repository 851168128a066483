"""The relay's own script (tagrelay.js): ``POST <paths.events>``.

The script always sends a batch, as a ``text/plain`` body (no CORS preflight) that carries
its write key: ``{"writeKey": "...", "sentAt": "...", "batch": [events...]}``, with
``"reset": true`` after the page called ``reset()``. The events follow Segment's spec.
"""

from __future__ import annotations

from typing import Any

from tagrelay.sources import segment
from tagrelay.sources._base import Decoded


def decode(obj: Any, path_name: str) -> Decoded:
    decoded = segment.decode(obj, "batch")
    decoded.reset = obj.get("reset") is True
    return decoded
