"""The Segment HTTP tracking API: ``/v1/{track,page,screen,identify,group,alias,batch}``.

Also the one-letter paths Segment's browser library (analytics-next) posts to
(``/v1/t``, ``/v1/p``, ...; ``/v1/b`` for batches) and ``/v1/import``, Segment's older name
for ``/v1/batch``. The path names the type; a batch carries its events under ``batch`` with
a shared ``sentAt``, ``context`` and ``integrations``.
"""

from __future__ import annotations

from typing import Any, Final

from tagrelay.errors import IngestError
from tagrelay.sources._base import Decoded, body_write_key, require_object

PATH_TYPES: Final = {
    "track": "track",
    "t": "track",
    "page": "page",
    "p": "page",
    "screen": "screen",
    "s": "screen",
    "identify": "identify",
    "i": "identify",
    "group": "group",
    "g": "group",
    "alias": "alias",
    "a": "alias",
}
BATCH_PATHS: Final = frozenset({"batch", "b", "import"})


def decode(obj: Any, path_name: str) -> Decoded:
    """Decode a parsed body posted to ``/v1/<path_name>``."""
    body = require_object(obj, "the request body")
    if path_name in BATCH_PATHS:
        batch = body.get("batch")
        if not isinstance(batch, list):
            raise IngestError("invalid_batch", "a batch request needs a 'batch' array of events")
        shared = {k: body[k] for k in ("context", "integrations") if isinstance(body.get(k), dict)}
        return Decoded(
            events=batch,
            batch_sent_at=body.get("sentAt"),
            shared=shared,
            write_key=body_write_key(body),
            is_batch=True,
        )
    path_type = PATH_TYPES[path_name]
    declared = body.get("type")
    if declared is not None and declared != path_type:
        # Segment's rule: the endpoint decides the type.
        body["type"] = path_type
    return Decoded(events=[body], default_type=path_type, write_key=body_write_key(body))
