"""Events a forwarder does not send are counted as dropped, by reason, through a real relay:
``requires_consent`` (the runtime) and a destination's own drops (ga4)."""

from __future__ import annotations

from typing import Any

import orjson

from tests.support import SERVER_KEY, Recorder, basic, metric_value, wait_idle

AUTH = basic(SERVER_KEY)


def events(client_consent: dict[str, str] | None = None) -> list[dict[str, Any]]:
    context = {"consent": client_consent} if client_consent else {}
    return [
        {
            "type": "track",
            "event": "Order Completed",
            "userId": "u1",
            "messageId": "m-1",
            "properties": {"revenue": 10, "currency": "EUR"},
            "context": context,
        },
        {
            "type": "identify",
            "userId": "u1",
            "messageId": "m-2",
            "traits": {"plan": "pro"},
            "context": context,
        },
    ]


def counted(app: Any, forwarder: str, outcome: str) -> float:
    labels = {"forwarder": forwarder, "outcome": outcome}
    return metric_value(app, "tagrelay_forwarder_events_total", labels)


async def test_requires_consent_drops_and_counts(relay: Any, recorder: Recorder) -> None:
    hook = {
        "id": "ads-hook",
        "type": "webhook",
        "endpoint": recorder.url,
        "requires_consent": ["ads"],
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
    }
    client = await relay(forwarders=[hook])
    await client.post("/v1/batch", json={"batch": events({"ads": "denied"})}, headers=AUTH)
    granted = [{**e, "messageId": e["messageId"] + "-ok"} for e in events({"ads": "granted"})]
    await client.post("/v1/batch", json={"batch": granted}, headers=AUTH)
    await wait_idle(client.app)
    sent = [e["messageId"] for r in recorder.requests for e in orjson.loads(r["body"])["batch"]]
    assert sent == ["m-1-ok", "m-2-ok"]
    assert counted(client.app, "ads-hook", "dropped") == 2
    assert counted(client.app, "ads-hook", "delivered") == 2
    reason = {"forwarder": "ads-hook", "reason": "consent_denied"}
    assert metric_value(client.app, "tagrelay_forwarder_dropped_total", reason) == 2


async def test_ga4_drops_are_counted_apart_from_deliveries(relay: Any, recorder: Recorder) -> None:
    ga4 = {
        "id": "ga4",
        "type": "ga4",
        "measurement_id": "G-TEST1234",
        "api_secret": "s3cret",
        "mp_url": recorder.url,
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
    }
    client = await relay(forwarders=[ga4])
    await client.post("/v1/batch", json={"batch": events()}, headers=AUTH)
    await wait_idle(client.app)
    [request] = recorder.requests
    assert request["query"] == {"measurement_id": "G-TEST1234", "api_secret": "s3cret"}
    body = orjson.loads(request["body"])
    assert [e["name"] for e in body["events"]] == ["purchase"]
    assert counted(client.app, "ga4", "delivered") == 1
    assert counted(client.app, "ga4", "dropped") == 1
    reason = {"forwarder": "ga4", "reason": "unsupported_type"}
    assert metric_value(client.app, "tagrelay_forwarder_dropped_total", reason) == 1
