"""The debug view's capture across the delivery process: the HTTP forwarders send from the
child, so the child records their requests and answers, redacted there with their secrets,
and ships them to the relay as ``capture`` frames, only while the relay says a view is
watching (``capture_rate`` frames), also after the child is started again."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from tagrelay.appkeys import CAPTURE, WORKERS
from tagrelay.capture import DebugHub
from tagrelay.forwarders._process import DeliveryProcess, RemoteForwarder
from tests.support import SERVER_KEY, Recorder, basic, recording_server, wait_idle

ADS_PATH = "/v26/customers/1234567890:uploadClickConversions"
ACTION = "customers/1234567890/conversionActions/42"
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
ACCESS_TOKEN = "ya29.capture-access-7b1d"
DEVELOPER_TOKEN = "devtok-5c2e91aa"
CLIENT_SECRET = "oauth-client-secret-44f0"
REFRESH_TOKEN = "oauth-refresh-token-9e3b"
HOOK_TOKEN = "hook-bearer-d41c8e"
SECRETS = (ACCESS_TOKEN, DEVELOPER_TOKEN, CLIENT_SECRET, REFRESH_TOKEN, HOOK_TOKEN, SERVER_KEY)


class Fakes:
    def __init__(self, hook: Recorder, ads: Recorder, token: Recorder) -> None:
        self.hook, self.ads, self.token = hook, ads, token

    def forwarders(self) -> list[dict[str, Any]]:
        return [
            {
                "id": "hook",
                "type": "webhook",
                "endpoint": self.hook.url,
                "headers": {"Authorization": f"Bearer {HOOK_TOKEN}"},
                "batch": {"max_events": 10, "max_wait_secs": 0.05},
            },
            {
                "id": "gads",
                "type": "google_ads",
                "customer_id": "123-456-7890",
                "developer_token": DEVELOPER_TOKEN,
                "oauth": {
                    "client_id": "client.apps.googleusercontent.com",
                    "client_secret": CLIENT_SECRET,
                    "refresh_token": REFRESH_TOKEN,
                },
                "token_url": self.token.url,
                "conversions": [{"event": "Order Completed", "conversion_action": ACTION}],
                "base_url": self.ads.url.rstrip("/"),
                "batch": {"max_events": 10, "max_wait_secs": 0.05},
            },
        ]


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with (
        recording_server("a webhook", ["/hook"], "/hook") as hook,
        recording_server("Google Ads", [ADS_PATH]) as ads,
        recording_server("Google's token endpoint", ["/token"], "/token") as token,
    ):
        answer = orjson.dumps({"access_token": ACCESS_TOKEN, "expires_in": 3599})
        token.script = [(200, {}, answer)] * 5
        yield Fakes(hook, ads, token)


def order(message_id: str) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": "user-7",
        "messageId": message_id,
        "properties": {"order_id": f"o-{message_id}", "revenue": 12.5, "currency": "EUR"},
        "context": {
            "consent": GRANTED,
            "traits": {"email": "someone@example.com"},
            "clickIds": {"gclid": f"gclid-{message_id}"},
        },
    }


def delivery_process(app: Any) -> DeliveryProcess:
    forwarder = app[WORKERS]["gads"].forwarder
    assert isinstance(forwarder, RemoteForwarder)
    return forwarder.process


def records(hub: DebugHub, kind: str) -> list[dict[str, Any]]:
    return [orjson.loads(c.data) for c in hub.backlog() if c.kind == kind]


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("not in time")
        await asyncio.sleep(0.02)


async def test_the_delivery_process_ships_redacted_exchanges_only_while_a_view_watches(
    relay: Any, fakes: Fakes
) -> None:
    client = await relay(forwarders=fakes.forwarders())
    app = client.app
    hub = app[CAPTURE]
    process = delivery_process(app)
    assert process.capture_rate == 0

    # Nobody watches: nothing is captured, in the relay or in the child.
    await client.post("/v1/track", json=order("m-unseen"), headers=basic(SERVER_KEY))
    await wait_idle(app)
    assert hub.backlog() == []

    view = await hub.attach()
    assert process.capture_rate == 1
    await client.post("/v1/track", json=order("m-1"), headers=basic(SERVER_KEY))
    await wait_idle(app)
    await until(lambda: len(records(hub, "exchange")) >= 2 and len(records(hub, "outcome")) >= 2)

    [request] = records(hub, "request")
    assert [e["messageId"] for e in request["events"]] == ["m-1"]
    exchanges = {x["forwarder"]: x for x in records(hub, "exchange")}
    assert set(exchanges) == {"hook", "gads"}
    ads = exchanges["gads"]
    assert ads["message_ids"] == ["m-1"]
    assert ads["request"]["url"].endswith(ADS_PATH)
    assert ads["request"]["headers"]["Authorization"] == "***"
    assert ads["request"]["headers"]["developer-token"] == "***"
    [conversion] = orjson.loads(ads["request"]["body"])["conversions"]
    assert conversion["gclid"] == "gclid-m-1"
    assert ads["response"]["status"] == 200
    assert exchanges["hook"]["request"]["headers"]["Authorization"] == "***"
    outcomes = {o["forwarder"]: o for o in records(hub, "outcome")}
    assert {f: (o["status"], o["message_ids"]) for f, o in outcomes.items()} == {
        "hook": ("sent", ["m-1"]),
        "gads": ("sent", ["m-1"]),
    }
    everything = b"".join(c.data for c in hub.backlog()).decode()
    for secret in SECRETS:
        assert secret not in everything

    # The last view leaves: the child stops capturing.
    await hub.detach(view)
    assert process.capture_rate == 0
    before = len(hub.backlog())
    await client.post("/v1/track", json=order("m-2"), headers=basic(SERVER_KEY))
    await wait_idle(app)
    await asyncio.sleep(0.3)  # a frame the child would still send has time to arrive
    assert len(hub.backlog()) == before
    assert len(fakes.ads.requests) == 3  # m-unseen, m-1, m-2: delivered all the same


async def test_a_child_started_again_is_told_to_capture(relay: Any, fakes: Fakes) -> None:
    client = await relay(forwarders=fakes.forwarders())
    app = client.app
    hub = app[CAPTURE]
    process = delivery_process(app)
    view = await hub.attach()
    first_pid = process.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    await until(lambda: not process.running)

    await client.post("/v1/track", json=order("m-after"), headers=basic(SERVER_KEY))
    await wait_idle(app, timeout=30)
    assert process.pid != first_pid
    await until(lambda: {x["forwarder"] for x in records(hub, "exchange")} == {"hook", "gads"})
    assert all(x["message_ids"] == ["m-after"] for x in records(hub, "exchange"))
    await hub.detach(view)
