"""Jitsu-style ingest: ``/api/s/{type}`` (browser) and ``/api/s/s2s/{type}`` (server keys).

``type`` is a full type name or its one-letter code. Jitsu clients parse every answer as
JSON, so the handler always answers with a JSON body.
"""

from __future__ import annotations

from tagrelay.errors import IngestError
from tagrelay.sources._base import Decoded, body_write_key, parse_json_body, require_object
from tagrelay.sources.segment import PATH_TYPES


def decode(body: bytes, path_name: str) -> Decoded:
    obj = require_object(parse_json_body(body), "the request body")
    path_type = PATH_TYPES.get(path_name)
    if path_type is None:
        raise IngestError(
            "unknown_type",
            f"unknown event type {path_name[:40]!r} in the path; expected one of "
            "page, track, identify, group, alias, screen (or p, t, i, g, a, s)",
        )
    obj["type"] = path_type
    return Decoded(events=[obj], default_type=path_type, write_key=body_write_key(obj))
