"""The delivery process (``tagrelay.forwarders._process``): the HTTP forwarders run in a child
process that reads their spans from the spool file; the relay keeps their workers (cursor,
retries, dead letters, metrics). These tests drive a whole relay through real HTTP to local
fakes and check what the split must not change: what is delivered, which event a per-event
error dead-letters when the child left some of the batch out, the counts the forwarders make
in the child, a child killed mid-run, and their log lines."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tagrelay.app import SPOOL, WORKERS
from tagrelay.appkeys import DELIVERY_LOOP
from tagrelay.forwarders._process import DeliveryProcess, RemoteForwarder
from tagrelay.forwarders.webhook import WebhookForwarder
from tagrelay.model import Delivered
from tests.support import SERVER_KEY, Recorder, basic, metric_value, recording_server, wait_idle

ADS_PATH = "/v26/customers/1234567890:uploadClickConversions"
ACTION = "customers/1234567890/conversionActions/42"
GRANTED = {"ads": "granted", "ad_user_data": "granted", "ad_personalization": "granted"}
FAILURE_TYPE = "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure"


class Fakes:
    def __init__(self, hook: Recorder, ads: Recorder, token: Recorder) -> None:
        self.hook, self.ads, self.token = hook, ads, token

    def forwarders(self, **gads: Any) -> list[dict[str, Any]]:
        return [
            {
                "id": "hook",
                "type": "webhook",
                "endpoint": self.hook.url,
                "batch": {"max_events": 10, "max_wait_secs": 0.05},
            },
            {
                "id": "gads",
                "type": "google_ads",
                "customer_id": "123-456-7890",
                "developer_token": "dev-token",
                "oauth": {
                    "client_id": "client.apps.googleusercontent.com",
                    "client_secret": "client-secret",
                    "refresh_token": "refresh-token",
                },
                "token_url": self.token.url,
                "conversions": [{"event": "Order Completed", "conversion_action": ACTION}],
                "base_url": self.ads.url.rstrip("/"),
                "batch": {"max_events": 10, "max_wait_secs": 0.05},
                **gads,
            },
        ]


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with (
        recording_server("a webhook", ["/hook"], "/hook") as hook,
        recording_server("Google Ads", [ADS_PATH]) as ads,
        recording_server("Google's token endpoint", ["/token"], "/token") as token,
    ):
        token.script = [(200, {}, b'{"access_token":"ya29.process","expires_in":3599}')] * 5
        yield Fakes(hook, ads, token)


def order(message_id: str, consent: dict[str, str] = GRANTED) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": "user-7",
        "messageId": message_id,
        "properties": {"order_id": f"o-{message_id}", "revenue": 12.5, "currency": "EUR"},
        "context": {
            "consent": consent,
            "traits": {"email": "someone@example.com"},
            "clickIds": {"gclid": f"gclid-{message_id}"},
        },
    }


def delivery_process(app: Any) -> DeliveryProcess:
    forwarder = app[WORKERS]["gads"].forwarder
    assert isinstance(forwarder, RemoteForwarder)
    return forwarder.process


async def test_http_forwarders_deliver_from_a_process_of_their_own(
    relay: Any, fakes: Fakes
) -> None:
    client = await relay(forwarders=fakes.forwarders())
    process = delivery_process(client.app)
    hook = client.app[WORKERS]["hook"].forwarder
    assert isinstance(hook, RemoteForwarder) and hook.real is WebhookForwarder
    assert process.pid is not None and process.pid != os.getpid()
    assert process.running

    response = await client.post("/v1/track", json=order("m-1"), headers=basic(SERVER_KEY))
    assert response.status == 200
    await wait_idle(client.app)

    [hooked] = [e for r in fakes.hook.requests for e in orjson.loads(r["body"])["batch"]]
    assert hooked["messageId"] == "m-1"
    [conversion] = orjson.loads(fakes.ads.requests[0]["body"])["conversions"]
    assert (conversion["orderId"], conversion["gclid"]) == ("o-m-1", "gclid-m-1")
    app = client.app
    for forwarder in ("hook", "gads"):
        delivered = {"forwarder": forwarder, "outcome": "delivered"}
        assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 1
        latency = {"forwarder": forwarder}
        assert metric_value(app, "tagrelay_delivery_latency_seconds_count", latency) == 1
    # Counted by the forwarder itself, in the child, and added to the relay's registry.
    email = {"forwarder": "gads", "key": "email"}
    assert metric_value(app, "tagrelay_forwarder_match_keys_total", email) == 1
    click = {"forwarder": "gads", "key": "click_id"}
    assert metric_value(app, "tagrelay_forwarder_match_keys_total", click) == 1


async def test_a_per_event_error_dead_letters_the_right_event_when_the_child_left_some_out(
    relay: Any, fakes: Fakes
) -> None:
    """The child filters and checks consent, so the forwarder gets a part of the span; the
    index of Google's per-row error refers to that part, and must name the same event in
    the relay, which dead-letters it."""
    client = await relay(forwarders=fakes.forwarders(filter={"exclude_events": ["Ignored"]}))
    app = client.app
    fakes.ads.script = [
        (
            200,
            {},
            orjson.dumps(
                {
                    "partialFailureError": {
                        "code": 3,
                        "message": "Multiple errors in 'details'.",
                        "details": [
                            {
                                "@type": FAILURE_TYPE,
                                "errors": [
                                    {
                                        "errorCode": {"conversionUploadError": "UNPARSEABLE_GCLID"},
                                        "message": "The click id could not be decoded.",
                                        "location": {
                                            "fieldPathElements": [
                                                {"fieldName": "conversions", "index": 1}
                                            ]
                                        },
                                    }
                                ],
                            }
                        ],
                    },
                    "results": [{"gclid": "gclid-good"}, {}],
                }
            ),
        )
    ]
    denied = {"ads": "denied", "ad_user_data": "denied"}
    batch = [
        {**order("ignored"), "event": "Ignored"},  # filtered out in the child
        order("no-consent", denied),  # no ads consent
        order("good"),  # conversions[0]
        {
            "type": "page",
            "anonymousId": "a-1",
            "messageId": "page",
            "context": {"consent": GRANTED},
        },  # not a conversion
        order("bad"),  # conversions[1]: refused by Google
    ]
    response = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
    assert response.status == 200
    await wait_idle(app)

    [request] = fakes.ads.requests
    sent = [c["orderId"] for c in orjson.loads(request["body"])["conversions"]]
    assert sent == ["o-good", "o-bad"]
    [dead] = await app[SPOOL].dead_letters("gads")
    assert orjson.loads(dead.payload)["messageId"] == "bad"
    assert dead.reason == "rejected_by_destination"
    assert "could not be decoded" in dead.detail

    def events(outcome: str) -> float:
        labels = {"forwarder": "gads", "outcome": outcome}
        return metric_value(app, "tagrelay_forwarder_events_total", labels)

    assert (events("filtered"), events("delivered"), events("dead_letter")) == (1, 1, 1)
    assert events("dropped") == 2  # the one without consent, and the page view
    consent = {"forwarder": "gads", "reason": "consent_denied"}
    assert metric_value(app, "tagrelay_forwarder_dropped_total", consent) == 1
    # The webhook (no filter, no consent rule) got the whole span.
    assert len([e for r in fakes.hook.requests for e in orjson.loads(r["body"])["batch"]]) == 5


async def test_a_killed_delivery_process_is_started_again_and_nothing_is_lost(
    relay: Any, fakes: Fakes
) -> None:
    client = await relay(forwarders=fakes.forwarders())
    app = client.app
    process = delivery_process(app)
    first = process.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    for i in range(3):
        response = await client.post(
            "/v1/track", json=order(f"after-{i}"), headers=basic(SERVER_KEY)
        )
        assert response.status == 200
    await wait_idle(app, timeout=30)

    assert process.starts == 2 and process.pid not in (None, first)
    assert metric_value(app, "tagrelay_delivery_process_restarts_total") == 1
    hooked = [e["messageId"] for r in fakes.hook.requests for e in orjson.loads(r["body"])["batch"]]
    assert sorted(set(hooked)) == ["after-0", "after-1", "after-2"]
    sent = {
        c["orderId"] for r in fakes.ads.requests for c in orjson.loads(r["body"])["conversions"]
    }
    assert sent == {"o-after-0", "o-after-1", "o-after-2"}
    assert await app[SPOOL].dead_letters("hook") == []
    assert await app[SPOOL].dead_letters("gads") == []
    delivered = {"forwarder": "gads", "outcome": "delivered"}
    assert metric_value(app, "tagrelay_forwarder_events_total", delivered) == 3


async def test_the_childs_log_records_are_logged_by_the_relay(
    relay: Any, fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await relay(forwarders=fakes.forwarders())
    page = {
        "type": "page",
        "anonymousId": "a-1",
        "messageId": "p-1",
        "context": {"consent": GRANTED},
    }
    response = await client.post("/v1/page", json=page, headers=basic(SERVER_KEY))
    assert response.status == 200
    await wait_idle(client.app)
    [record] = [
        r
        for r in caplog.records
        if r.name == "tagrelay.forwarders._batched" and getattr(r, "forwarder", None) == "gads"
    ]
    assert record.getMessage() == "forwarder dropped"
    assert (record.process, record.processName) == (delivery_process(client.app).pid, "delivery")
    assert getattr(record, "reason", None) == "no_conversion_action"


async def test_off_the_forwarders_run_in_the_relay(relay: Any, fakes: Fakes) -> None:
    client = await relay(forwarders=fakes.forwarders(), delivery={"process": False})
    forwarder = client.app[WORKERS]["hook"].forwarder
    assert type(forwarder) is WebhookForwarder
    response = await client.post("/v1/track", json=order("m-2"), headers=basic(SERVER_KEY))
    assert response.status == 200
    await wait_idle(client.app)
    assert [
        e["messageId"] for r in fakes.hook.requests for e in orjson.loads(r["body"])["batch"]
    ] == ["m-2"]


async def test_the_span_cache_reads_each_event_once_and_shares_it() -> None:
    from tagrelay.forwarders._process import SpanCache

    reads: list[tuple[int, int]] = []

    async def read(path: str, after: int, last: int) -> tuple[list[bytes], list[tuple[int, int]]]:
        reads.append((after, last))
        lines = [orjson.dumps({"messageId": f"m{seq}"}) for seq in range(after + 1, last + 1)]
        return lines, [(len(lines), 1_000 + after)]

    cache = SpanCache(read, capacity=8)
    first = await cache.span("spool", 0, 4)
    second = await cache.span("spool", 2, 6)  # events 3 and 4 are known: only 5-6 are read
    assert reads == [(0, 4), (4, 6)]
    assert [e.event()["messageId"] for e in second] == ["m3", "m4", "m5", "m6"]
    assert second[0] is first[2] and second[0].event() is first[2].event()
    assert [e.received_ms for e in second] == [1_000, 1_000, 1_004, 1_004]
    assert (cache.hits, cache.misses) == (2, 6)

    await cache.span("spool", 6, 12)  # past the capacity: the oldest go
    await cache.span("spool", 0, 2)
    assert reads[-1] == (0, 2)
    await cache.span("other", 10, 11)  # another spool file: nothing of the first is used
    assert reads[-1] == (10, 11)
    big = await cache.span("other", 0, 20)  # longer than the cache: read, not kept
    assert len(big) == 20 and reads[-1] == (0, 20)
    await cache.span("other", 11, 12)
    assert reads[-1] == (11, 12)


async def test_events_from_elsewhere_are_delivered_by_the_child_as_they_are(
    relay: Any, fakes: Fakes
) -> None:
    """A stand-in's ``deliver`` (dead letters replayed, say) has the child's forwarder
    deliver the events given, without the filter or consent rule of spans."""
    client = await relay(forwarders=fakes.forwarders())
    workers = client.app[WORKERS]
    hook = workers["hook"].forwarder
    assert isinstance(hook, RemoteForwarder)
    on_loop = client.app[DELIVERY_LOOP].call  # where the forwarders run
    outcome = await on_loop(hook.deliver([order("given-1"), order("given-2")]))
    assert outcome == Delivered()
    sent = [e["messageId"] for r in fakes.hook.requests for e in orjson.loads(r["body"])["batch"]]
    assert sent == ["given-1", "given-2"]
    denied = order("given-3", {"ads": "denied"})
    fakes.ads.script = [(200, {}, b'{"results": [{}]}')]
    assert await on_loop(workers["gads"].forwarder.deliver([denied])) == Delivered()
    [request] = fakes.ads.requests
    assert [c["orderId"] for c in orjson.loads(request["body"])["conversions"]] == ["o-given-3"]


async def test_ga4_has_a_delivery_process_of_its_own(relay: Any, fakes: Fakes) -> None:
    """GA4 sends a request per visitor: its requests get an event loop of their own, not
    one shared with the ad platforms' planning."""
    ga4 = {
        "id": "ga4",
        "type": "ga4",
        "measurement_id": "G-PROCESS1",
        "api_secret": "ga4-secret",
        "mp_url": fakes.hook.url,
        "batch": {"max_events": 10, "max_wait_secs": 0.05},
    }
    client = await relay(forwarders=[*fakes.forwarders(), ga4])
    workers = client.app[WORKERS]
    processes = {fid: workers[fid].forwarder.process for fid in ("hook", "gads", "ga4")}
    assert processes["hook"] is processes["gads"]
    assert processes["ga4"] is not processes["hook"]
    pids = {p.pid for p in processes.values()}
    assert len(pids) == 2 and None not in pids and os.getpid() not in pids
    response = await client.post("/v1/track", json=order("m-3"), headers=basic(SERVER_KEY))
    assert response.status == 200
    await wait_idle(client.app)
    collected = [r for r in fakes.hook.requests if r["query"].get("measurement_id")]
    assert len(collected) == 1 and collected[0]["query"]["api_secret"] == "ga4-secret"
    assert metric_value(client.app, "tagrelay_delivery_process_restarts_total") == 0
    assert {p.starts for p in processes.values()} == {1}
