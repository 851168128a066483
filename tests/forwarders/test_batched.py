"""The batched HTTP shell (``forwarders._batched``) on its own, with a toy destination: one
request per event (its body names the event), answered by a fake that looks the answer up
by that name. What is asserted: the batch outcome combined from the requests' outcomes, a
retry that does not resend what was accepted, secrets kept out of every detail, per-event
rejections from ``classify``, a request refused for some of its events (sent again
without them), and the credentials hook (per request, refreshed once on a refusal)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote_plus

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

import tagrelay.forwarders._batched as batched
from tagrelay.config.common import ForwarderConfigBase
from tagrelay.forwarders._base import ForwarderContext
from tagrelay.forwarders._batched import BatchedHttpForwarder, Plan, PlannedRequest, Refused
from tagrelay.forwarders._http import HttpRequest, HttpResponse, classify_status
from tagrelay.model import Dead, Delivered, Event, Outcome, Retry
from tests.support import fake_server

TOKEN = "tok/en+with=odd&chars"
"""A secret whose percent-encoded forms differ from it."""


class ToyConfig(ForwarderConfigBase):
    type: Literal["toy"] = "toy"
    endpoint: str
    token: SecretStr = SecretStr(TOKEN)
    timeout_secs: float = 5.0
    max_concurrent_requests: int = 4


class Toy(BatchedHttpForwarder[ToyConfig]):
    """One request per event, ``POST <endpoint>?token=<token>`` with ``{"ids": [...]}``;
    events whose ``event`` is ``"skip"`` are left out (``skipped``, a whole event), and each
    event sent counts a ``trimmed`` field. Events sharing a ``properties.group`` share a
    request. A 200 body ``{"failed": [positions]}`` rejects those events one by one."""

    event_drop_reasons = frozenset({"skipped"})
    field_drop_reasons = frozenset({"trimmed"})

    def plan(self, events: list[Event], now: datetime) -> Plan:
        plan = Plan()
        groups: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            if event.get("event") == "skip":
                plan.drops["skipped"] += 1
                continue
            plan.drops["trimmed"] += 1
            group = event.get("properties", {}).get("group", event["messageId"])
            groups.setdefault(group, []).append(index)
        url = f"{self.config.endpoint}?token={quote_plus(TOKEN)}"
        for indices in groups.values():
            body = orjson.dumps({"ids": [events[i]["messageId"] for i in indices]})
            plan.requests.append(PlannedRequest(HttpRequest("POST", url, {}, body), tuple(indices)))
        return plan

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome:
        if response.status == 200 and response.body.startswith(b'{"failed"'):
            failed = orjson.loads(response.body)["failed"]
            return Delivered(rejected={p: f"row_error: row {p} refused ({TOKEN})" for p in failed})
        return classify_status(response)

    def secrets(self) -> Iterable[str]:
        return (self.config.token.get_secret_value(),)


@dataclass
class FakeDestination:
    """Answers by the first id of a request's body (``answers``; 204 when not listed) and
    records every request (``seen``: ids, headers)."""

    answers: dict[str, list[tuple[int, dict[str, str], bytes]]] = field(default_factory=dict)
    seen: list[tuple[list[str], dict[str, str]]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        ids = orjson.loads(await request.read())["ids"]
        self.seen.append((ids, dict(request.headers)))
        script = self.answers.get(ids[0])
        if script:
            status, headers, body = script.pop(0) if len(script) > 1 else script[0]
            return web.Response(status=status, headers=headers, body=body)
        return web.Response(status=204)

    def sent(self, first_id: str) -> int:
        return sum(1 for ids, _ in self.seen if ids[0] == first_id)


@pytest.fixture
async def destination() -> AsyncIterator[FakeDestination]:
    fake = FakeDestination()
    async with fake_server("destination", {"/collect": fake.handle}) as server:
        fake.url = str(server.make_url("/collect"))
        yield fake


def toy(destination: FakeDestination, context: ForwarderContext, **overrides: Any) -> Toy:
    raw: dict[str, Any] = {"id": "toy", "endpoint": destination.url, **overrides}
    return Toy(ToyConfig.model_validate(raw), context)


def events(*ids: str, **groups: str) -> list[Event]:
    return [
        {"type": "track", "event": "skip" if i.startswith("skip") else "Clicked", "messageId": i}
        | ({"properties": {"group": groups[i]}} if i in groups else {})
        for i in ids
    ]


def field_drops(context: ForwarderContext, reason: str) -> float:
    value = context.metrics.registry.get_sample_value(
        "tagrelay_forwarder_field_drops_total", {"forwarder": "toy", "reason": reason}
    )
    return 0.0 if value is None else value


def test_the_module_exports_its_public_names() -> None:
    assert sorted(batched.__all__) == ["BatchedHttpForwarder", "Plan", "PlannedRequest", "Refused"]
    for name in batched.__all__:
        assert getattr(batched, name) is not None


async def test_accepted_retried_and_dead_requests_make_one_retry_that_skips_the_accepted(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    destination.answers = {
        "retried": [(503, {"Retry-After": "3"}, b"busy"), (204, {}, b"")],
        "dead": [(400, {}, b"no such pixel")],
    }
    fwd = toy(destination, context)
    batch = events("accepted", "retried", "dead", "skip-1")
    outcome = await fwd.deliver(batch)
    assert outcome == Retry("status_5xx", "HTTP 503: busy", 3.0, delivered=frozenset({0}))
    assert fwd.drops == {}  # nothing counted on an attempt that will be retried
    outcome = await fwd.deliver(batch)
    assert outcome == Delivered(
        rejected={2: "status_4xx: HTTP 400: no such pixel"}, dropped={"skipped": 1}
    )
    # the accepted request went out once; the retried and the dead ones twice
    assert [destination.sent(i) for i in ("accepted", "retried", "dead")] == [1, 2, 2]
    assert fwd.drops == {"skipped": 1, "trimmed": 3}
    assert field_drops(context, "trimmed") == 3
    assert field_drops(context, "skipped") == 0  # whole events: counted by the runtime


async def test_the_longest_retry_after_wins_and_another_batch_starts_afresh(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    destination.answers = {
        "a": [(429, {"Retry-After": "2"}, b"slow down")],
        "b": [(503, {"Retry-After": "9"}, b"busy")],
        "c": [(503, {}, b"busy")],
    }
    fwd = toy(destination, context, max_concurrent_requests=1)
    outcome = await fwd.deliver(events("a", "b", "c", "ok"))
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_secs, outcome.delivered) == (
        "status_429",
        9.0,
        frozenset({3}),
    )
    # a batch with other events is another batch: nothing of it counts as already sent
    destination.answers = {}
    assert await fwd.deliver(events("ok", "d")) == Delivered()
    assert destination.sent("ok") == 2


async def test_when_every_request_is_dead_the_batch_is_dead_and_nothing_is_dropped(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    destination.answers = {"a": [(403, {}, b"forbidden")], "b": [(404, {}, b"gone")]}
    fwd = toy(destination, context)
    outcome = await fwd.deliver(events("a", "b", "skip-1"))
    assert outcome == Dead("status_4xx", "HTTP 403: forbidden")
    assert fwd.drops == {}


async def test_a_batch_with_nothing_to_send_sends_nothing(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    fwd = toy(destination, context)
    assert await fwd.deliver(events("skip-1", "skip-2")) == Delivered(dropped={"skipped": 2})
    assert destination.seen == []


async def test_secrets_are_scrubbed_from_every_detail_raw_or_encoded(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    echo = f"bad token {TOKEN} in {quote_plus(TOKEN)}".encode()
    destination.answers = {"a": [(401, {}, echo)], "b": [(503, {}, echo)], "c": [(204, {}, b"")]}
    fwd = toy(destination, context)
    retry = await fwd.deliver(events("a", "b"))
    assert isinstance(retry, Retry)
    assert retry.detail == "HTTP 503: bad token *** in ***"
    destination.answers["b"] = [(204, {}, b"")]
    delivered = await fwd.deliver(events("a", "b"))
    assert delivered == Delivered(rejected={0: "status_4xx: HTTP 401: bad token *** in ***"})
    dead = await fwd.deliver(events("a"))
    assert dead == Dead("status_4xx", "HTTP 401: bad token *** in ***")
    # a connection error names the URL, where the token is a percent-encoded query value
    nowhere = toy(destination, context, endpoint="http://127.0.0.1:9/collect")
    refused = await nowhere.deliver(events("c"))
    assert isinstance(refused, Retry)
    assert refused.reason == "connection_error"
    assert TOKEN not in refused.detail and quote_plus(TOKEN) not in refused.detail


async def test_per_event_rejections_from_classify_dead_letter_only_those_events(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    # events 1, 2, 3 share one request; the destination refuses its second row (event 2)
    destination.answers = {
        "r1": [(200, {}, b'{"failed": [1, 7]}')],
        "x": [(503, {}, b"busy"), (204, {}, b"")],
    }
    fwd = toy(destination, context)
    batch = events("x", "r1", "r2", "r3", r1="g", r2="g", r3="g")
    outcome = await fwd.deliver(batch)
    # a retry counts the rows that went through as delivered, not the refused one
    assert isinstance(outcome, Retry)
    assert outcome.delivered == frozenset({1, 3})
    outcome = await fwd.deliver(batch)
    # position 7 does not exist in the request and is ignored; the rejection is remembered
    # for the request that was not sent again
    assert outcome == Delivered(rejected={2: "row_error: row 1 refused (***)"})
    assert destination.sent("r1") == 1


class Refusing(Toy):
    """A 422 body ``{"refused": [positions]}`` refuses the whole request for those events;
    ``rebuild`` says whether ``without`` can send the others again."""

    rebuild = True

    def classify(self, planned: PlannedRequest, response: HttpResponse) -> Outcome | Refused:
        if response.status == 422:
            refused = orjson.loads(response.body)["refused"]
            return Refused(
                "toy_refused",
                f"HTTP 422: refused {refused} ({TOKEN})",
                {p: f"row {p} refused ({TOKEN})" for p in refused},
            )
        return super().classify(planned, response)

    def without(
        self, plan: Plan, planned: PlannedRequest, positions: frozenset[int]
    ) -> PlannedRequest | None:
        if not self.rebuild:
            return None
        ids = orjson.loads(planned.request.body)["ids"]
        kept = [at for at in range(len(ids)) if at not in positions]
        body = orjson.dumps({"ids": [ids[at] for at in kept]})
        request = HttpRequest("POST", planned.request.url, {}, body)
        return PlannedRequest(request, tuple(planned.indices[at] for at in kept))


def refusing(destination: FakeDestination, context: ForwarderContext) -> Refusing:
    return Refusing(ToyConfig.model_validate({"id": "toy", "endpoint": destination.url}), context)


async def test_a_request_refused_for_some_events_is_sent_again_without_them(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    # one request for r1..r4 (batch 1..4); refused for its 2nd row (r2), then, without it,
    # for the 3rd of [r1, r3, r4] (r4); [r1, r3] goes through
    destination.answers = {
        "r1": [(422, {}, b'{"refused": [1, 9]}'), (422, {}, b'{"refused": [2]}'), (204, {}, b"")],
        "x": [(503, {}, b"busy"), (204, {}, b"")],
    }
    fwd = refusing(destination, context)
    batch = events("x", "r1", "r2", "r3", "r4", r1="g", r2="g", r3="g", r4="g")
    outcome = await fwd.deliver(batch)
    assert isinstance(outcome, Retry)  # for x; of r1..r4 the destination took r1 and r3
    assert outcome.delivered == frozenset({1, 3})
    assert [ids for ids, _ in destination.seen if ids[0] == "r1"] == [
        ["r1", "r2", "r3", "r4"],
        ["r1", "r3", "r4"],
        ["r1", "r3"],
    ]
    # the request it took is remembered like any other: the retry does not send it again
    outcome = await fwd.deliver(batch)
    assert outcome == Delivered(rejected={2: "row 1 refused (***)", 4: "row 2 refused (***)"})
    assert destination.sent("r1") == 3


async def test_a_request_refused_for_every_event_or_that_cannot_be_rebuilt(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    destination.answers = {"r1": [(422, {}, b'{"refused": [0, 1]}')]}
    fwd = refusing(destination, context)
    batch = events("r1", "r2", r1="g", r2="g")
    outcome = await fwd.deliver(batch)
    assert outcome == Delivered(rejected={0: "row 0 refused (***)", 1: "row 1 refused (***)"})
    assert destination.sent("r1") == 1
    destination.answers = {"s1": [(422, {}, b'{"refused": [0]}')]}
    fwd.rebuild = False
    outcome = await fwd.deliver(events("s1", "s2", s1="h", s2="h"))
    assert outcome == Dead("toy_refused", "HTTP 422: refused [0] (***)")
    assert destination.sent("s1") == 1


class Authorized(Toy):
    """Adds ``Authorization: Bearer <token>``, token ``t<n>`` from the n-th fetch; a 401
    means the token was refused."""

    def __init__(self, config: ToyConfig, context: ForwarderContext) -> None:
        super().__init__(config, context)
        self.token: str | None = None
        self.fetches = 0
        self.calls: list[bool] = []
        self.token_endpoint_down = False

    async def authorize(
        self, request: HttpRequest, *, refresh: bool = False
    ) -> HttpRequest | Retry | Dead:
        self.calls.append(refresh)
        if refresh:
            self.token = None
        if self.token is None:
            if self.token_endpoint_down:
                return Retry("token_unavailable", "token endpoint answered 503")
            self.fetches += 1
            self.token = f"t{self.fetches}"
        headers = {**request.headers, "Authorization": f"Bearer {self.token}"}
        return HttpRequest(request.method, request.url, headers, request.body)

    def unauthorized(self, response: HttpResponse) -> bool:
        return response.status == 401

    def secrets(self) -> Iterable[str]:
        return (*super().secrets(), *([self.token] if self.token else []))


def authorized(destination: FakeDestination, context: ForwarderContext) -> Authorized:
    return Authorized(ToyConfig.model_validate({"id": "toy", "endpoint": destination.url}), context)


async def test_credentials_are_added_to_every_request(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    fwd = authorized(destination, context)
    assert await fwd.deliver(events("a", "b", "c")) == Delivered()
    assert fwd.calls == [False, False, False]
    assert [headers["Authorization"] for _, headers in destination.seen] == ["Bearer t1"] * 3


async def test_refused_credentials_are_refreshed_once_and_the_requests_sent_again(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    expired = (401, {}, b'{"error": "token expired"}')
    destination.answers = {i: [expired, (204, {}, b"")] for i in ("a", "b", "c")}
    fwd = authorized(destination, context)
    assert await fwd.deliver(events("a", "b", "c")) == Delivered()
    # three refusals at once: one refresh, the others reuse its token
    assert fwd.fetches == 2
    assert fwd.calls.count(True) == 1
    assert [headers["Authorization"] for _, headers in destination.seen[3:]] == ["Bearer t2"] * 3


async def test_credentials_refused_twice_are_classified_like_any_answer(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    destination.answers = {"a": [(401, {}, b"still not")]}
    fwd = authorized(destination, context)
    assert await fwd.deliver(events("a")) == Dead("status_4xx", "HTTP 401: still not")
    assert destination.sent("a") == 2


async def test_credentials_that_cannot_be_had_are_the_requests_outcome(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    fwd = authorized(destination, context)
    fwd.token_endpoint_down = True
    outcome = await fwd.deliver(events("a"))
    assert outcome == Retry("token_unavailable", "token endpoint answered 503")
    assert destination.seen == []


def test_a_config_without_the_http_limits_is_refused(context: ForwarderContext) -> None:
    class Bare(ForwarderConfigBase):
        type: Literal["bare"] = "bare"

    class BareForwarder(BatchedHttpForwarder[Bare]):  # type: ignore[type-var]
        def plan(self, events: list[Event], now: datetime) -> Plan:
            return Plan()

    with pytest.raises(TypeError, match="timeout_secs, max_concurrent_requests"):
        BareForwarder(Bare(id="bare"), context)


async def test_settled_is_called_once_per_batch_when_it_is_done(
    destination: FakeDestination, context: ForwarderContext
) -> None:
    calls: list[Outcome] = []

    class Counting(Toy):
        def settled(self, plan: Plan, outcome: Delivered | Dead) -> None:
            calls.append(outcome)

    raw: dict[str, Any] = {"id": "toy", "endpoint": destination.url}
    fwd = Counting(ToyConfig.model_validate(raw), context)
    destination.answers = {"b": [(503, {}, b"busy"), (204, {}, b"")], "c": [(400, {}, b"no")]}
    batch = events("a", "b")
    assert isinstance(await fwd.deliver(batch), Retry)
    assert calls == []  # an attempt that will be retried is not done
    assert await fwd.deliver(batch) == Delivered()
    assert calls == [Delivered()]
    dead = await fwd.deliver(events("c"))
    assert isinstance(dead, Dead)
    assert calls == [Delivered(), dead]


async def test_send_reads_an_answer_that_comes_in_pieces_up_to_its_limit() -> None:
    """An answer written in pieces is read whole up to the limit (one read returned only
    what had arrived), and one past the limit is cut and says so."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from tagrelay.forwarders._http import HttpRequest, HttpResponse, send
    from tests.support import fake_server

    piece = b"x" * 30_000

    async def slow(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(10):
            await response.write(piece)
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response

    async with fake_server("a slow destination", {"/slow": slow}) as server:
        request = HttpRequest("POST", str(server.make_url("/slow")), {}, b"{}")
        async with aiohttp.ClientSession() as http:
            whole = await send(http, request, 10.0, 1024 * 1024)
            cut = await send(http, request, 10.0, 64 * 1024)
    assert isinstance(whole, HttpResponse) and isinstance(cut, HttpResponse)
    assert (len(whole.body), whole.truncated) == (300_000, False)
    assert (len(cut.body), cut.truncated) == (64 * 1024, True)
