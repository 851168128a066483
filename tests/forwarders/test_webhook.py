"""The webhook forwarder: the exact request it builds for a batch (golden), and that it is
registered for ``type: webhook``."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders.webhook import WebhookConfig, WebhookForwarder, build_request


def test_batch_is_posted_as_segment_batch_json_with_configured_headers() -> None:
    config = WebhookConfig(
        id="hook",
        type="webhook",
        endpoint="https://hooks.example.com/in?src=tagrelay",
        headers={"Authorization": "Bearer t0ken", "X-Team": "growth"},
    )
    events = [
        {"type": "track", "event": "Signed Up", "messageId": "m-1", "anonymousId": "a"},
        {"type": "page", "messageId": "m-2", "anonymousId": "a", "properties": {"path": "/"}},
    ]
    request = build_request(config, events, datetime(2026, 11, 29, 12, 0, 0, 250_000, UTC))
    assert request.method == "POST"
    assert request.url == "https://hooks.example.com/in?src=tagrelay"
    assert request.headers == {
        "Content-Type": "application/json",
        "User-Agent": "tagrelay",
        "Authorization": "Bearer t0ken",
        "X-Team": "growth",
    }
    assert request.body == (
        b'{"batch":[{"type":"track","event":"Signed Up","messageId":"m-1","anonymousId":"a"},'
        b'{"type":"page","messageId":"m-2","anonymousId":"a","properties":{"path":"/"}}],'
        b'"sentAt":"2026-11-29T12:00:00.250Z"}'
    )
    assert orjson.loads(request.body)["batch"] == events


def test_webhook_is_registered() -> None:
    assert FORWARDERS["webhook"] is WebhookForwarder
    assert WebhookForwarder.config_model is WebhookConfig
