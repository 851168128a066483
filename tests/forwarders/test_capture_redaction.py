"""What the debug view is shown of a forwarder's requests: the exact request (method, URL,
headers, body) and the destination's answer, with no secret in it. The forwarders redact
where they send (``_http.captured_exchange``, with their ``secrets()``): credential headers
and query parameters become ``***`` whatever their value, and the secrets' values are taken
out of everything else, raw or percent-encoded. Nothing is built while capture is off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tagrelay.capture import DeliveryCapture
from tagrelay.forwarders import ForwarderContext
from tagrelay.forwarders._http import (
    MAX_CAPTURED_BODY,
    SCRUBBED,
    HttpRequest,
    HttpResponse,
    captured_exchange,
    header_secrets,
    redact_headers,
    redact_url,
)
from tagrelay.forwarders.meta_capi import MetaConfig, MetaForwarder
from tagrelay.forwarders.webhook import WebhookConfig, WebhookForwarder
from tagrelay.model import Dead, Delivered, Retry
from tests.support import Recorder, recording_server

TOKEN = "EAAB-test/token+with=odd&chars"
PIXEL = "123456789012345"
META_PATH = f"/v25.0/{PIXEL}/events"
HOOK_TOKEN = "hook-secret-7f3a9c"


class Recording(DeliveryCapture):
    """A capture that keeps what it is given, at a rate the test sets."""

    def __init__(self, rate: float = 1.0) -> None:
        self._rate = rate
        self.exchanges: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []

    def exchange(self, record: dict[str, Any]) -> None:
        self.exchanges.append(record)

    def outcome(self, record: dict[str, Any]) -> None:
        self.outcomes.append(record)


def with_capture(context: ForwarderContext, capture: DeliveryCapture) -> ForwarderContext:
    return ForwarderContext(context.data_dir, context.http, context.metrics, capture)


def page(message_id: str) -> dict[str, Any]:
    return {
        "type": "page",
        "messageId": message_id,
        "anonymousId": "anon-1",
        "timestamp": "2099-01-01T00:00:00Z",
        "receivedAt": "2099-01-01T00:00:00Z",
        "context": {
            "consent": {"ads": "granted", "ad_user_data": "granted"},
            "ip": "203.0.113.7",
            "userAgent": "Mozilla/5.0",
            "page": {"url": "https://www.shop.test/"},
            "traits": {"email": "jane@example.com"},
        },
    }


def test_credential_headers_are_replaced_whatever_their_value() -> None:
    headers = {
        "Authorization": "Bearer ya29.abc",
        "Access-Token": "tt-1",
        "X-Api-Key": "k-1",
        "developer-token": "dev-1",
        "Cookie": "sid=1",
        "Content-Type": "application/json",
        "X-Echo": "sent with s3cr3t-value inside",
    }
    redacted = redact_headers(headers, ["s3cr3t-value"])
    for name in ("Authorization", "Access-Token", "X-Api-Key", "developer-token", "Cookie"):
        assert redacted[name] == SCRUBBED
    assert redacted["Content-Type"] == "application/json"
    assert redacted["X-Echo"] == f"sent with {SCRUBBED} inside"


def test_secret_query_parameters_and_user_info_are_taken_out_of_urls() -> None:
    url = (
        "https://user:pass@graph.example/v1/events?access_token=abc&api_secret=def"
        "&measurement_id=G-1&key=ghi&token=jkl"
    )
    redacted = redact_url(url, [])
    assert redacted == (
        "https://graph.example/v1/events?access_token=***&api_secret=***"
        "&measurement_id=G-1&key=***&token=***"
    )
    # A secret elsewhere (in the path), also percent-encoded, goes by its value.
    assert redact_url("https://h/hooks/a%2Fb%3Dc/x", ["a/b=c"]) == "https://h/hooks/***/x"
    assert redact_url("https://h/p?x=1", []) == "https://h/p?x=1"


def test_an_exchange_is_redacted_and_its_bodies_cut() -> None:
    secret = "sk_live_123456"
    request = HttpRequest(
        "POST",
        f"https://api.example/v2/events?access_token={secret}",
        {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        orjson.dumps({"token": secret, "data": "x" * MAX_CAPTURED_BODY}),
    )
    response = HttpResponse(401, {"Content-Type": "text/plain"}, f"bad token {secret}".encode())
    record = captured_exchange(
        request, response, [secret], forwarder="f", message_ids=["m-1"], started=1.0
    )
    assert secret not in orjson.dumps(record).decode()
    assert record["request"]["url"] == "https://api.example/v2/events?access_token=***"
    assert record["request"]["headers"]["Authorization"] == SCRUBBED
    assert record["request"]["body_truncated"] is True
    assert len(record["request"]["body"]) == MAX_CAPTURED_BODY
    assert record["request"]["body"].startswith('{"token":"***","data":"xxx')
    assert record["response"] == {
        "status": 401,
        "headers": {"Content-Type": "text/plain"},
        "body": f"bad token {SCRUBBED}",
        "body_truncated": False,
    }
    assert (record["forwarder"], record["message_ids"], record["at_ms"]) == ("f", ["m-1"], 1000)

    failed = captured_exchange(
        request,
        Retry("connection_error", f"cannot reach https://api.example/?access_token={secret}"),
        [secret],
        forwarder="f",
        message_ids=["m-1"],
        started=1.0,
    )
    assert failed["response"] is None
    assert failed["error"] == "connection_error: cannot reach https://api.example/?access_token=***"


@pytest.fixture
async def meta() -> AsyncIterator[Recorder]:
    async with recording_server("Meta", [META_PATH]) as rec:
        yield rec


async def test_a_batched_forwarder_reports_each_request_without_its_token(
    meta: Recorder, context: ForwarderContext
) -> None:
    meta.script = [(400, {}, f'{{"error": {{"message": "bad token {TOKEN}"}}}}'.encode())]
    capture = Recording()
    config = MetaConfig.model_validate(
        {
            "id": "meta",
            "type": "meta",
            "pixel_id": PIXEL,
            "access_token": TOKEN,
            "base_url": meta.url.rstrip("/"),
        }
    )
    fwd = MetaForwarder(config, with_capture(context, capture))
    outcome = await fwd.deliver([page("m-1"), page("m-2")])
    assert isinstance(outcome, Dead)
    [exchange] = capture.exchanges
    text = orjson.dumps(exchange).decode()
    assert TOKEN not in text
    for form in ("EAAB-test%2Ftoken%2Bwith%3Dodd%26chars", "EAAB-test/token%2Bwith%3Dodd%26chars"):
        assert form not in text
    assert exchange["forwarder"] == "meta"
    assert exchange["message_ids"] == ["m-1", "m-2"]
    assert exchange["request"]["method"] == "POST"
    assert exchange["request"]["url"].endswith(f"{META_PATH}?access_token=***")
    sent = orjson.loads(exchange["request"]["body"])
    assert [e["event_id"] for e in sent["data"]] == ["m-1", "m-2"]
    # The personal data is there, hashed as it was sent: the debug view shows it.
    assert sent["data"][0]["user_data"]["em"]
    assert exchange["response"]["status"] == 400
    assert "bad token ***" in exchange["response"]["body"]


async def test_nothing_is_built_while_capture_is_off(
    meta: Recorder, context: ForwarderContext
) -> None:
    capture = Recording(rate=0.0)
    config = MetaConfig.model_validate(
        {"id": "meta", "type": "meta", "pixel_id": PIXEL, "access_token": TOKEN}
        | {"base_url": meta.url.rstrip("/")}
    )
    fwd = MetaForwarder(config, with_capture(context, capture))
    assert isinstance(await fwd.deliver([page("m-1")]), Delivered)
    assert capture.exchanges == []
    assert len(meta.requests) == 1


async def test_only_requests_that_carry_a_sampled_event_are_reported(
    meta: Recorder, context: ForwarderContext
) -> None:
    from tagrelay.capture import sampled

    ids = [f"m-{i}" for i in range(40)]
    kept = next(i for i in ids if sampled(i, 0.05))
    skipped = next(i for i in ids if not sampled(i, 0.05))
    capture = Recording(rate=0.05)
    config = MetaConfig.model_validate(
        {"id": "meta", "type": "meta", "pixel_id": PIXEL, "access_token": TOKEN}
        | {"base_url": meta.url.rstrip("/")}
    )
    fwd = MetaForwarder(config, with_capture(context, capture))
    await fwd.deliver([page(skipped)])
    assert capture.exchanges == []
    await fwd.deliver([page(kept)])
    assert [x["message_ids"] for x in capture.exchanges] == [[kept]]


async def test_a_webhook_reports_its_request_without_its_configured_headers(
    context: ForwarderContext,
) -> None:
    async with recording_server("a webhook", ["/hook"], "/hook") as hook:
        hook.script = [(503, {}, f"down, token {HOOK_TOKEN}".encode())]
        capture = Recording()
        config = WebhookConfig.model_validate(
            {
                "id": "hook",
                "type": "webhook",
                "endpoint": hook.url + f"?sig={HOOK_TOKEN}",
                "headers": {"X-Hook-Auth": HOOK_TOKEN, "X-Plain": "hello"},
            }
        )
        fwd = WebhookForwarder(config, with_capture(context, capture))
        outcome = await fwd.deliver([page("m-1")])
    assert isinstance(outcome, Retry)
    assert HOOK_TOKEN not in outcome.detail
    [exchange] = capture.exchanges
    assert HOOK_TOKEN not in orjson.dumps(exchange).decode()
    assert exchange["request"]["headers"]["X-Hook-Auth"] == SCRUBBED
    assert exchange["request"]["url"].endswith("/hook?sig=***")
    assert orjson.loads(exchange["request"]["body"])["batch"][0]["messageId"] == "m-1"
    assert exchange["response"]["status"] == 503
    assert exchange["response"]["body"] == "down, token ***"


def test_a_configured_header_is_a_secret_with_and_without_its_scheme() -> None:
    assert header_secrets("Bearer abc.def") == ("Bearer abc.def", "abc.def")
    assert header_secrets("Token  t-1 ") == ("Token  t-1 ", "t-1")
    assert header_secrets("just-a-value") == ("just-a-value",)
    assert header_secrets("two words here") == ("two words here",)


async def test_a_webhook_scrubs_its_bearer_token_when_the_answer_echoes_it_alone(
    context: ForwarderContext,
) -> None:
    async with recording_server("a webhook", ["/hook"], "/hook") as hook:
        hook.script = [(401, {}, f"unknown token {HOOK_TOKEN}".encode())]
        capture = Recording()
        config = WebhookConfig.model_validate(
            {
                "id": "hook",
                "type": "webhook",
                "endpoint": hook.url,
                "headers": {"Authorization": f"Bearer {HOOK_TOKEN}"},
            }
        )
        fwd = WebhookForwarder(config, with_capture(context, capture))
        outcome = await fwd.deliver([page("m-1")])
    assert isinstance(outcome, Dead)
    assert outcome.detail == "HTTP 401: unknown token ***"
    [exchange] = capture.exchanges
    assert exchange["response"]["body"] == "unknown token ***"
