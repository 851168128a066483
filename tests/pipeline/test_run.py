"""pipeline.run: a request's events through every step, without HTTP."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from tagrelay.errors import IngestError
from tagrelay.pipeline.run import Pipeline, Processed
from tagrelay.sources import Decoded
from tests.support import make_config


@dataclass(frozen=True)
class Sender:
    id: str
    kind: Literal["browser", "server"]


BROWSER = Sender("website", "browser")
SERVER = Sender("backend", "server")


@dataclass
class Request:
    """The parts of an HTTP request the pipeline reads."""

    remote: str | None = "203.0.113.77"
    headers: Mapping[str, str] = field(
        default_factory=lambda: {"Host": "data.shop.test", "User-Agent": "UA/1"}
    )
    cookie_jar: Mapping[str, str] = field(default_factory=dict)
    cookie_reads: int = 0

    @property
    def cookies(self) -> Mapping[str, str]:
        self.cookie_reads += 1
        return self.cookie_jar


def run(
    tmp_path: Path,
    events: list[Any],
    *,
    request: Request | None = None,
    sender: Sender = BROWSER,
    source: str = "segment",
    **config: Any,
) -> tuple[Processed, list[dict[str, Any]]]:
    pipeline = Pipeline(make_config(tmp_path, **config))
    processed = pipeline.run(request or Request(), Decoded(events=events), source, sender)
    return processed, [orjson.loads(payload) for _, payload in processed.rows]


def track(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Signed Up", "anonymousId": "a-1", **fields}


def test_one_event_through_every_step(tmp_path: Path) -> None:
    page = {"url": "https://www.shop.test/?utm_source=news&gclid=G1"}
    processed, [event] = run(
        tmp_path, [track(context={"page": page})], privacy={"truncate_ip": True}
    )
    context = event["context"]
    assert event["receivedAt"] and event["messageId"]  # normalized
    assert (context["ip"], context["userAgent"]) == ("203.0.113.0", "UA/1")  # client, privacy
    assert context["campaign"] == {"source": "news"}  # campaign
    assert context["consent"]["analytics"] == "granted"  # consent
    assert context["clickIds"] == {"gclid": "G1"}  # identity
    assert (context["source"], context["writeKeyId"]) == ("segment", "website")
    assert processed.message_ids == [event["messageId"]]
    assert processed.visit is not None and "tr_clk" in processed.visit.cookies


def test_a_server_sender_keeps_its_client_and_has_no_visitor(tmp_path: Path) -> None:
    request = Request(cookie_jar={"tr_aid": "cookie-id"})
    processed, [event] = run(
        tmp_path,
        [track(context={"ip": "198.51.100.1", "userAgent": "Backend/2"})],
        request=request,
        sender=SERVER,
    )
    assert (event["context"]["ip"], event["context"]["userAgent"]) == (
        "198.51.100.1",
        "Backend/2",
    )
    assert processed.visit is None and request.cookie_reads == 0


def test_cookies_are_read_once_per_request_and_only_when_an_event_needs_them(
    tmp_path: Path,
) -> None:
    denied = {"consent": {"analytics": False}}
    request = Request(cookie_jar={"tr_aid": "cookie-id"})
    processed, _ = run(tmp_path, [track(context=denied)] * 2, request=request)
    assert request.cookie_reads == 0 and processed.visit is None

    request = Request(cookie_jar={"tr_aid": "cookie-id"})
    processed, events = run(tmp_path, [track(), track(), track()], request=request)
    assert request.cookie_reads == 1 and len(events) == 3


def test_every_event_is_a_row_or_a_rejection_the_decoders_first(tmp_path: Path) -> None:
    events = [track(), {"type": "track"}, track(properties={"text": "x" * 2000})]
    decoded = Decoded(events=events, rejected=[(3, IngestError("missing_event_name", "no name"))])
    pipeline = Pipeline(make_config(tmp_path, limits={"max_event_bytes": 1024}))
    processed = pipeline.run(Request(), decoded, "ga4_mp", SERVER)
    assert len(processed.rows) == 1
    assert [(r["index"], r["error"]) for r in processed.rejected] == [
        (3, "missing_event_name"),  # rejected by the source while decoding
        (1, "missing_event"),  # by normalize
        (2, "event_too_large"),  # by the size check
    ]
    assert decoded.events == []  # freed once serialized


def test_rudderstacks_anonymous_id_header_fills_in(tmp_path: Path) -> None:
    headers = {"AnonymousId": "aGVhZGVyLWlk"}  # base64("header-id")
    _, [without, with_own] = run(
        tmp_path,
        [{"type": "track", "event": "E", "userId": "u"}, track()],
        request=Request(headers=headers),
        sender=SERVER,
    )
    assert without["anonymousId"] == "header-id"
    assert with_own["anonymousId"] == "a-1"
