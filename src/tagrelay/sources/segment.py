"""The Segment HTTP tracking API: ``/v1/{track,page,screen,identify,group,alias,batch}``.

Also the one-letter paths Segment's browser library (analytics-next) posts to
(``/v1/t``, ``/v1/p``, ...; ``/v1/b`` for batches) and ``/v1/import``, Segment's older name
for ``/v1/batch``. The path names the type; a batch carries its events under ``batch`` with
a shared ``sentAt``, ``context`` and ``integrations``.

RudderStack's SDKs post to the same routes. Their requests are labelled ``rudderstack``
instead of ``segment`` (the ``source`` of the metrics and ``context.source``), as their
``context.library.name`` tells: ``RudderLabs JavaScript SDK``, ``rudder-ios-library``,
``com.rudderstack.android.sdk.core``, ``rudder-analytics-python``... RudderStack's Node SDK
kept Segment's ``analytics-node`` but adds ``channel: "server"``, which Segment's libraries
leave to Segment's servers. RudderStack's other server SDKs that kept Segment's names and
add no channel cannot be told apart and stay ``segment``.
"""

from __future__ import annotations

from typing import Any, Final

from tagrelay.errors import IngestError
from tagrelay.sources._base import Decoded, body_write_key, parse_json_body, require_object

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
SEGMENT: Final = "segment"
RUDDERSTACK: Final = "rudderstack"
_LIBRARY_NAME_PEEK = 64


def decode(body: bytes, path_name: str) -> Decoded:
    """Decode a body posted to ``/v1/<path_name>``."""
    obj = require_object(parse_json_body(body), "the request body")
    if path_name in BATCH_PATHS:
        return decode_batch(obj)
    path_type = PATH_TYPES[path_name]
    declared = obj.get("type")
    if declared is not None and declared != path_type:
        # Segment's rule: the endpoint decides the type.
        obj["type"] = path_type
    return Decoded(events=[obj], default_type=path_type, write_key=body_write_key(obj))


def decode_batch(obj: dict[str, Any]) -> Decoded:
    """A batch request's parsed body: its events under ``batch``, with a shared ``sentAt``,
    ``context`` and ``integrations``."""
    batch = obj.get("batch")
    if not isinstance(batch, list):
        raise IngestError("invalid_batch", "a batch request needs a 'batch' array of events")
    shared = {k: obj[k] for k in ("context", "integrations") if isinstance(obj.get(k), dict)}
    return Decoded(
        events=batch,
        batch_sent_at=obj.get("sentAt"),
        shared=shared,
        write_key=body_write_key(obj),
        is_batch=True,
    )


def _library_name(obj: Any) -> Any:
    if type(obj) is dict:
        context = obj.get("context")
        if type(context) is dict:
            library = context.get("library")
            if type(library) is dict:
                return library.get("name")
    return None


def sdk_source(decoded: Decoded) -> str:
    """``rudderstack`` for a request one of RudderStack's SDKs sent, else ``segment``. One
    look at the first event's library (or the batch's shared one): an SDK sends its own
    events only."""
    first = decoded.events[0] if decoded.events else None
    name = _library_name(first)
    if name is None:
        name = _library_name(decoded.shared)
    if type(name) is not str:
        return SEGMENT
    if "rudder" in name[:_LIBRARY_NAME_PEEK].lower():
        return RUDDERSTACK
    if name == "analytics-node" and type(first) is dict and first.get("channel") == "server":
        return RUDDERSTACK
    return SEGMENT
