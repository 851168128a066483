"""The shared spool: a NATS JetStream stream that several relay replicas write and read.

The forwarder runtime (``forwarders._worker``) is the same as over SQLite; this module
gives it the same small interface: append, read after a cursor, acknowledge (``advance``),
dead-letter, depth. How each maps onto JetStream:

- ``append`` publishes each event to ``<stream>.events`` with its ``messageId`` as
  ``Nats-Msg-Id`` (the stream's duplicate window drops a resend that reached another
  replica), asynchronously, and completes once JetStream has acknowledged every one of
  them: the 2xx waits for the stream, as it waits for the group commit over SQLite. The
  publishes of requests arriving together go out together and their acks are awaited
  together.
- Each forwarder is a durable pull consumer (``<stream>_<forwarder>``) that every replica
  pulls from: an event goes to one replica (work sharing). A replica holds at most one
  batch of a forwarder's messages unacknowledged (``max_events``). Those messages get
  numbers of the replica's own (contiguous, from 1), which the worker uses as its cursor
  positions; ``advance`` acknowledges every held message up to a position. While a batch
  is held (filling, being delivered, retried with backoff), its messages are told to the
  stream as in progress every third of ``ack_wait_secs``; a replica that dies has them
  redelivered to another after ``ack_wait_secs``. Such a redelivery is why delivery is at
  least once: destinations and the warehouse deduplicate by message id.
- A batch's retry state (attempts, first failure) lives in the replica's memory: a batch
  redelivered to another replica starts its attempts again.
- Dead letters are published to a stream of their own, ``<stream>_dead_letters``, subject
  ``<stream>_dead_letters.<forwarder>``, one message per event (a JSON envelope: the
  event, the reason, the detail, the attempts, when it died); the message's stream
  sequence is the dead letter's id. The event is acknowledged only after its dead letter
  is. ``tagrelay dlq`` works on that stream (``JetStreamDeadLetters``); a replay that
  fails again publishes the dead letter again (a new id) and deletes the old one.
- With ``encryption.keys``, each event is sealed on its own before it is published (bound
  to the stream and its ``messageId``), and a dead letter's event and detail as over SQLite
  (bound to the forwarder and the event's stream sequence).
- Depths, lags and dead-letter counts come from the server (consumer and stream info),
  refreshed by the relay's maintenance every ``spool.prune_interval_secs``; the metrics read
  the last figures.

NATS clients are bound to the event loop they were made on: the relay's loop publishes and
answers the admin API, the delivery loop pulls and acknowledges. The spool keeps one
connection per loop that uses it (``_connection``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, NotFoundError

from tagrelay.errors import SpoolUnavailable
from tagrelay.logthrottle import LogThrottle
from tagrelay.spool.dead_letters import DeadLetterRow, Selection
from tagrelay.spool.encryption import PLAINTEXT, PayloadCipher
from tagrelay.spool.sqlite import CursorState, HeadWatch, SpooledEvent

__all__ = ["JetStreamDeadLetters", "JetStreamSettings", "JetStreamSpool"]

log = logging.getLogger(__name__)

PULL_WAIT_SECS = 2.0
"""How long one pull request waits on the server for messages before it is made again."""

CONNECT_TIMEOUT_SECS = 5.0
PUBLISH_TIMEOUT_SECS = 10.0
"""How long an append waits for JetStream's acks before it answers 503."""
PUBLISH_MAX_PENDING = 65_536
"""Publishes whose acks may be outstanding at once (the client's default, 4000, would cap
a round of batch requests)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class JetStreamSettings:
    """What the spool needs of ``spool`` (``type: jetstream``) and ``dead_letters``."""

    servers: tuple[str, ...]
    stream: str
    replicas: int = 1
    max_age_secs: float = 7 * 86_400.0
    max_bytes: int = 0
    duplicate_window_secs: float = 600.0
    ack_wait_secs: float = 30.0
    dead_letter_max_age_secs: float = 30 * 86_400.0

    @property
    def subject(self) -> str:
        return f"{self.stream}.events"

    @property
    def dead_letter_stream(self) -> str:
        return f"{self.stream}_dead_letters"

    def dead_letter_subject(self, forwarder: str) -> str:
        return f"{self.dead_letter_stream}.{forwarder}"

    def durable(self, forwarder: str) -> str:
        return f"{self.stream}_{forwarder}"


def delivered_sequence(reply: str) -> int:
    """The stream sequence of a delivered message, from its ack subject."""
    return int(_ack_tokens(reply)[7])


def stored_ms(reply: str) -> int:
    """When the stream stored a delivered message (ms since the epoch): the event's
    arrival, to within the publish's round trip. From its ack subject, without the client's
    datetime parsing."""
    return int(_ack_tokens(reply)[9]) // 1_000_000


def _ack_tokens(reply: str) -> list[str]:
    """An ack subject's tokens in the layout with domain and account hash:
    ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``
    (older servers leave out the domain and the hash)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        tokens[2:2] = ["", ""]
    return tokens


def event_aad(stream: str, message_id: str) -> bytes:
    """The associated data of an event sealed in ``stream``."""
    return b"tagrelay jetstream event %s\x00%s" % (stream.encode(), message_id.encode())


async def _connect(servers: Sequence[str], name: str) -> NatsClient:
    try:
        client: NatsClient = await nats.connect(
            servers=list(servers),
            name=name,
            connect_timeout=CONNECT_TIMEOUT_SECS,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            # the subjects are the spool's own, checked once (``JetStreamSettings``)
            skip_subject_validation=True,
        )
    except Exception as exc:  # the client raises several kinds; all mean "not reachable"
        raise SpoolUnavailable(
            f"cannot reach NATS at {', '.join(servers)}: {type(exc).__name__}: {exc}"
        ) from exc
    return client


async def _close(client: NatsClient) -> None:
    """Send what is buffered (acks), then close. Not ``drain``: it waits for the pull
    requests still open on the server to expire."""
    with contextlib.suppress(Exception):
        await client.flush(timeout=2)
    with contextlib.suppress(Exception):
        await client.close()


_DUPLICATE = re.compile(rb'"duplicate":\s*true')
"""In a publish's ack: JetStream had the message id within its duplicate window."""


class _Round:
    """The publishes of one ``append``: how many acks are still due, how many of them
    were duplicates, the first error, and the future completed once every ack is in."""

    __slots__ = ("deadline", "due", "duplicates", "error", "future")

    def __init__(self, due: int, future: asyncio.Future[int], deadline: float) -> None:
        self.deadline = deadline
        self.due = due
        self.duplicates = 0
        self.error: str | None = None
        self.future = future


class _Publisher:
    """Asynchronous publishes with the acks awaited per round, leaner than the client's
    ``publish_async`` (a future, a fresh inbox token and a parsed ``PubAck`` per message):
    each message's reply subject is ``<inbox>.<round>``, and an ack only counts down its
    round (``"duplicate": true`` and ``"error"`` are found in its bytes)."""

    def __init__(self, client: NatsClient) -> None:
        self.client = client
        self.inbox = client.new_inbox()
        self.rounds: dict[str, _Round] = {}
        self.next_round = 0
        self._subscribed = False
        self._reaper: asyncio.Task[None] | None = None

    async def _reap(self) -> None:
        """Fail the rounds whose acks are overdue (``PUBLISH_TIMEOUT_SECS``): one task
        looking once a second, rather than a timer per append."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            late = [t for t, r in self.rounds.items() if r.deadline <= now]
            for token in late:
                round_ = self.rounds.pop(token)
                if not round_.future.done():
                    round_.future.set_exception(
                        SpoolUnavailable(
                            f"JetStream did not acknowledge within {PUBLISH_TIMEOUT_SECS:g}s"
                        )
                    )

    def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    def loop_call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the publisher's loop (from any thread)."""
        if self._reaper is None:
            return
        loop = self._reaper.get_loop()
        if loop is asyncio.get_running_loop():
            fn()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self.inbox) + 1 :]
        round_ = self.rounds.get(token)
        if round_ is None:
            return
        data = msg.data
        if not data or b'"error"' in data or (msg.headers and "Status" in msg.headers):
            if round_.error is None:
                round_.error = (data or b"no stream answered").decode(errors="replace")[:300]
        elif _DUPLICATE.search(data):
            round_.duplicates += 1
        round_.due -= 1
        if round_.due == 0:
            del self.rounds[token]
            if not round_.future.done():
                if round_.error is not None:
                    round_.future.set_exception(SpoolUnavailable(round_.error))
                else:
                    round_.future.set_result(round_.duplicates)

    async def publish(
        self, subject: str, messages: Sequence[tuple[bytes, dict[str, str] | None]]
    ) -> asyncio.Future[int]:
        """Publish ``(payload, headers)`` messages; the future completes with how many were
        duplicates once all are acknowledged (``SpoolUnavailable`` if any failed)."""
        loop = asyncio.get_running_loop()
        if not self._subscribed:
            await self.client.subscribe(self.inbox + ".*", cb=self._on_ack)
            self._subscribed = True
            self._reaper = loop.create_task(self._reap(), name="jetstream-publish-timeouts")
        self.next_round += 1
        token = str(self.next_round)
        future: asyncio.Future[int] = loop.create_future()
        self.rounds[token] = _Round(len(messages), future, loop.time() + PUBLISH_TIMEOUT_SECS)
        reply = f"{self.inbox}.{token}"
        publish = self.client.publish
        try:
            for payload, headers in messages:
                await publish(subject, payload, reply=reply, headers=headers)
        except BaseException:
            self.rounds.pop(token, None)
            raise
        return future

    def fail_all(self, why: str) -> None:
        rounds, self.rounds = self.rounds, {}
        for round_ in rounds.values():
            if not round_.future.done():
                round_.future.set_exception(SpoolUnavailable(why))


class _Connections:
    """One NATS connection per event loop that uses it (see the module docstring)."""

    def __init__(self, servers: Sequence[str]) -> None:
        self.servers = tuple(servers)
        self._by_loop: dict[asyncio.AbstractEventLoop, tuple[NatsClient, JetStreamContext]] = {}
        self._publishers: dict[asyncio.AbstractEventLoop, _Publisher] = {}

    async def js(self) -> JetStreamContext:
        loop = asyncio.get_running_loop()
        found = self._by_loop.get(loop)
        if found is None:
            client = await _connect(self.servers, "tagrelay")
            found = (client, client.jetstream(publish_async_max_pending=PUBLISH_MAX_PENDING))
            existing = self._by_loop.get(loop)
            if existing is not None:  # two callers raced to connect: keep the first
                await client.close()
                return existing[1]
            self._by_loop = {**self._by_loop, loop: found}
        return found[1]

    def client(self) -> NatsClient | None:
        """The running loop's connection, if it has one."""
        found = self._by_loop.get(asyncio.get_running_loop())
        return None if found is None else found[0]

    def connected(self) -> bool:
        """Whether every connection is up (from any thread: reads one flag each)."""
        return all(client.is_connected for client, _ in self._by_loop.values())

    async def publisher(self) -> _Publisher:
        loop = asyncio.get_running_loop()
        publisher = self._publishers.get(loop)
        if publisher is None:
            await self.js()
            publisher = _Publisher(self._by_loop[loop][0])
            self._publishers = {**self._publishers, loop: publisher}
        return publisher

    async def leave_loop(self) -> None:
        """Close the connection of the running loop (before that loop stops)."""
        loop = asyncio.get_running_loop()
        found = self._by_loop.get(loop)
        publisher = self._publishers.pop(loop, None)
        if publisher is not None:
            publisher.stop()
        if found is not None:
            self._by_loop = {k: v for k, v in self._by_loop.items() if k is not loop}
            await _close(found[0])

    async def close(self) -> None:
        """Close every connection: the running loop's here, others' on their loops."""
        for publisher in self._publishers.values():
            publisher.loop_call(publisher.stop)
        self._publishers = {}
        for loop in list(self._by_loop):
            client = self._by_loop[loop][0]
            if loop is asyncio.get_running_loop():
                await _close(client)
            elif loop.is_running():
                with contextlib.suppress(Exception):
                    done = asyncio.run_coroutine_threadsafe(_close(client), loop)
                    await asyncio.wrap_future(done)
        self._by_loop = {}


async def ensure_streams(js: JetStreamContext, settings: JetStreamSettings) -> None:
    """Create the events' and the dead letters' streams, or check and update those there:
    file storage, the replicas, the subjects derived from the name, the limits."""
    wanted = [
        js_api.StreamConfig(
            name=settings.stream,
            subjects=[settings.subject],
            storage=js_api.StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=settings.max_age_secs,
            max_bytes=settings.max_bytes or -1,
            duplicate_window=settings.duplicate_window_secs,
            discard=js_api.DiscardPolicy.NEW,
            retention=js_api.RetentionPolicy.LIMITS,
        ),
        js_api.StreamConfig(
            name=settings.dead_letter_stream,
            subjects=[f"{settings.dead_letter_stream}.*"],
            storage=js_api.StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=settings.dead_letter_max_age_secs,
            max_bytes=-1,
            duplicate_window=settings.duplicate_window_secs,
            retention=js_api.RetentionPolicy.LIMITS,
        ),
    ]
    for config in wanted:
        assert config.name is not None
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError as exc:  # another replica created it meanwhile
                if exc.err_code != 10058:  # stream name already in use
                    raise
            continue
        have = info.config
        if have.storage != js_api.StorageType.FILE:
            raise SpoolUnavailable(
                f"the JetStream stream {config.name} exists with {have.storage} storage; the "
                "spool needs file storage (delete the stream, or name another in spool.stream)"
            )
        if (
            have.subjects != config.subjects
            or have.num_replicas != config.num_replicas
            or abs((have.max_age or 0) - (config.max_age or 0)) > 0.001
            or (have.max_bytes or -1) != config.max_bytes
            or abs((have.duplicate_window or 0) - config.duplicate_window) > 0.001
        ):
            await js.update_stream(config)
            log.info("updated the JetStream stream's settings", extra={"stream": config.name})


@dataclass(slots=True)
class _Held:
    """A message a replica holds for a forwarder, under the replica's own number."""

    event: SpooledEvent
    msg: Msg


@dataclass(slots=True)
class _Consumer:
    """A forwarder's pull consumer on this replica and the batch it holds."""

    name: str
    durable: str
    sub: JetStreamContext.PullSubscription | None = None
    sub_loop: asyncio.AbstractEventLoop | None = None
    held: list[_Held] = field(default_factory=list)
    head: int = 0
    position: int = 0
    limit: int = 0
    watches: list[HeadWatch] = field(default_factory=list)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    puller: asyncio.Task[None] | None = None
    keeper: asyncio.Task[None] | None = None
    stopped: bool = False


class JetStreamSpool:
    """The spool on NATS JetStream (see the module docstring)."""

    spans = False
    """Forwarders that read the SQLite file themselves get payloads here."""
    expires_dead_letters = True
    """The dead letters' stream drops those past ``dead_letters.retention_days`` itself."""

    def __init__(
        self,
        settings: JetStreamSettings,
        *,
        cipher: PayloadCipher = PLAINTEXT,
    ) -> None:
        self.settings = settings
        self.cipher = cipher
        self.commits = 0
        """Publish rounds acknowledged (several requests' events share one)."""
        self.on_commit: Callable[[float], None] | None = None
        self.on_reencrypted: Callable[[str, int], None] | None = None
        self.duplicates = 0
        """Events the stream dropped as resends of a message id it had."""
        self._conns = _Connections(settings.servers)
        self._consumers: dict[str, _Consumer] = {}
        self._depths: dict[str, int] = {}
        self._ack_floors: dict[str, int] = {}
        self._dead_counts: dict[str, int] = {}
        self._open = False
        self._closed = False
        self._last_failure: float | None = None
        self._errors = LogThrottle(log)
        self.dead_letter_store = JetStreamDeadLetters(settings, self._conns, cipher)

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        js = await self._conns.js()
        try:
            await ensure_streams(js, self.settings)
        except SpoolUnavailable:
            await self._conns.close()
            raise
        except Exception as exc:
            await self._conns.close()
            raise SpoolUnavailable(
                f"cannot create or check the JetStream stream {self.settings.stream}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._open = True
        await self.refresh()
        log.info(
            "spool opened",
            extra={"stream": self.settings.stream, "servers": ", ".join(self.settings.servers)},
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._open = False
        await self._stop_consumers()
        await self._conns.close()

    async def leave_loop(self) -> None:
        """Stop this loop's consumers and close its connection (the delivery loop, before
        it stops)."""
        await self._stop_consumers()
        await self._conns.leave_loop()

    async def _stop_consumers(self) -> None:
        """Stop the pullers and keepers that run on this loop, handing back what they
        hold."""
        loop = asyncio.get_running_loop()
        for consumer in list(self._consumers.values()):
            if consumer.puller is not None and consumer.puller.get_loop() is loop:
                await self._release(consumer)

    async def _release(self, consumer: _Consumer) -> None:
        """Stop ``consumer``'s puller and keeper and hand its held messages back to the
        stream (``nak``), for another replica or the next worker within seconds, rather
        than after ``ack_wait_secs``."""
        consumer.stopped = True
        for task in (consumer.puller, consumer.keeper):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        consumer.puller = consumer.keeper = None
        held, consumer.held = consumer.held, []
        for item in held:
            # Once the pull request this replica may still have open on the server has
            # expired (``PULL_WAIT_SECS``): else it would be handed them again at once.
            with contextlib.suppress(Exception):
                await item.msg.nak(delay=PULL_WAIT_SECS + 0.5)
        if held:
            client = self._conns.client()
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.flush(timeout=2)

    def writable(self, within_secs: float = 5.0) -> bool:
        """Open, connected, and no publish failed in the last ``within_secs``."""
        if not self._open or self._closed or not self._conns.connected():
            return False
        recent = self._last_failure is not None and (
            time.monotonic() - self._last_failure <= within_secs
        )
        return not recent

    # -- append ------------------------------------------------------------------------

    def append(
        self, events: Sequence[tuple[int, bytes]], message_ids: Sequence[str] | None = None
    ) -> Awaitable[int]:
        """Publish ``(received_ms, payload)`` rows with their message ids; the awaitable
        completes once JetStream acknowledged every one, with the number that were not
        resends. Raises ``SpoolUnavailable`` when any publish fails (the client may send
        the request again: resends are dropped by id)."""
        return self._append(events, message_ids)

    async def _append(
        self, events: Sequence[tuple[int, bytes]], message_ids: Sequence[str] | None
    ) -> int:
        if self._closed:
            raise SpoolUnavailable("the spool is closed (shutting down)")
        if not events:
            return 0
        started = time.perf_counter()
        messages: list[tuple[bytes, dict[str, str] | None]]
        if message_ids is None:
            # no ids to deduplicate on; sealed all the same when keys are set (the reader
            # opens an event without an id with the empty one)
            aad = event_aad(self.settings.stream, "")
            messages = [
                (self.cipher.seal(payload, aad) if self.cipher.enabled else payload, None)
                for _, payload in events
            ]
        elif self.cipher.enabled:
            stream = self.settings.stream
            messages = [
                (self.cipher.seal(payload, event_aad(stream, mid)), {"Nats-Msg-Id": mid})
                for (_, payload), mid in zip(events, message_ids, strict=True)
            ]
        else:
            messages = [
                (payload, {"Nats-Msg-Id": mid})
                for (_, payload), mid in zip(events, message_ids, strict=True)
            ]
        try:
            publisher = await self._conns.publisher()
            duplicates = await (await publisher.publish(self.settings.subject, messages))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._last_failure = time.monotonic()
            self._errors.log(logging.ERROR, "publish", "spool publish failed", {"error": str(exc)})
            raise SpoolUnavailable(f"JetStream did not acknowledge: {exc}") from exc
        stored = len(events) - duplicates
        self.duplicates += duplicates
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        return stored

    # -- the forwarders' cursors ---------------------------------------------------------

    def subscribe(self, forwarder: str | None = None) -> HeadWatch:
        watch = HeadWatch(asyncio.get_running_loop())
        if forwarder is not None:
            consumer = self._consumers.setdefault(
                forwarder, _Consumer(forwarder, self.settings.durable(forwarder))
            )
            consumer.watches.append(watch)
        return watch

    def unsubscribe(self, watch: HeadWatch) -> None:
        for consumer in self._consumers.values():
            consumer.watches = [w for w in consumer.watches if w is not watch]

    async def register(self, forwarder: str, start: str = "head") -> CursorState:
        """Create the forwarder's durable consumer, or bind to it (a replica started it,
        or a previous run): ``start`` applies only when it is created (``head``: the
        events published from now on; ``earliest``: every event the stream holds)."""
        js = await self._conns.js()
        consumer = self._consumers.setdefault(
            forwarder, _Consumer(forwarder, self.settings.durable(forwarder))
        )
        await self._release(consumer)  # a reload: the previous worker's batch goes back
        consumer.stopped = False
        config = js_api.ConsumerConfig(
            durable_name=consumer.durable,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait_secs,
            deliver_policy=(
                js_api.DeliverPolicy.ALL if start == "earliest" else js_api.DeliverPolicy.NEW
            ),
            filter_subject=self.settings.subject,
            max_ack_pending=-1,
            max_waiting=512,
        )
        try:
            await js.consumer_info(self.settings.stream, consumer.durable)
        except NotFoundError:
            with contextlib.suppress(BadRequestError):  # another replica made it meanwhile
                await js.add_consumer(self.settings.stream, config)
        if consumer.sub is None or consumer.sub_loop is not asyncio.get_running_loop():
            # Kept across registrations (a reload): a pull request still open on the
            # server delivers to this subscription's inbox, and the next fetch drains it.
            consumer.sub = await js.pull_subscribe_bind(consumer.durable, self.settings.stream)
            consumer.sub_loop = asyncio.get_running_loop()
        consumer.held = []
        consumer.head = consumer.position = 0
        loop = asyncio.get_running_loop()
        consumer.room = asyncio.Event()
        consumer.puller = loop.create_task(self._pull(consumer), name=f"pull-{forwarder}")
        consumer.keeper = loop.create_task(self._keep(consumer), name=f"keep-{forwarder}")
        return CursorState(0)

    def head_of(self, forwarder: str) -> int:
        """The number of the last message this replica holds for ``forwarder``."""
        consumer = self._consumers.get(forwarder)
        return 0 if consumer is None else consumer.head

    async def _pull(self, consumer: _Consumer) -> None:
        """Keep up to one batch (``limit``) of the forwarder's messages held here."""
        throttle = LogThrottle(log)
        loop = asyncio.get_running_loop()
        while not consumer.stopped:
            room = consumer.limit - (consumer.head - consumer.position)
            if consumer.limit == 0 or room <= 0:
                consumer.room.clear()
                await consumer.room.wait()
                continue
            assert consumer.sub is not None
            try:
                msgs = await consumer.sub.fetch(room, timeout=PULL_WAIT_SECS)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                continue
            except Exception as exc:
                throttle.log(
                    logging.WARNING,
                    "pull",
                    "pulling from JetStream failed; will try again",
                    {"forwarder": consumer.name, "error": f"{type(exc).__name__}: {exc}"},
                )
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                try:
                    event = self._opened(consumer.head + 1, msg)
                except Exception as exc:  # sealed under a key not configured, or damaged
                    await self._unreadable(consumer, msg, exc, throttle)
                    continue
                consumer.head += 1
                consumer.held.append(_Held(event, msg))
            for watch in consumer.watches:
                watch.notify(consumer.head, loop)

    async def _unreadable(
        self, consumer: _Consumer, msg: Msg, exc: Exception, throttle: LogThrottle
    ) -> None:
        """An event this replica cannot open stays in the stream, for a replica with the
        right keys (or this one once they are configured): it is handed back, to come
        again after ``ack_wait_secs``. The operator must act: an ERROR."""
        throttle.log(
            logging.ERROR,
            "unreadable",
            "an event in the stream cannot be opened with encryption.keys; it stays there",
            {"forwarder": consumer.name, "error": f"{type(exc).__name__}: {exc}"},
        )
        with contextlib.suppress(Exception):
            await msg.nak(delay=self.settings.ack_wait_secs)

    def _opened(self, number: int, msg: Msg) -> SpooledEvent:
        payload = msg.data
        if self.cipher.enabled or payload[:1] != b"{":
            message_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            payload = self.cipher.open(payload, event_aad(self.settings.stream, message_id))
        return SpooledEvent(number, stored_ms(msg.reply), payload)

    async def _keep(self, consumer: _Consumer) -> None:
        """Tell the stream the held messages are in progress, so that it does not hand
        them to another replica while this one works on them."""
        every = max(0.1, self.settings.ack_wait_secs / 3)
        while True:
            await asyncio.sleep(every)
            for held in list(consumer.held):
                with contextlib.suppress(Exception):
                    await held.msg.in_progress()

    async def read(
        self, after: int, limit: int, *, forwarder: str | None = None
    ) -> list[SpooledEvent]:
        """Up to ``limit`` held messages of ``forwarder`` numbered after ``after``. Also
        sets how many the replica holds (one batch, ``limit``)."""
        assert forwarder is not None, "the JetStream spool reads a forwarder's consumer"
        consumer = self._consumers[forwarder]
        if consumer.limit != limit:
            consumer.limit = limit
            consumer.room.set()
        return [h.event for h in consumer.held if h.event.seq > after][:limit]

    async def advance(self, forwarder: str, position: int) -> None:
        """Acknowledge every held message of ``forwarder`` up to ``position``."""
        consumer = self._consumers[forwarder]
        done = [h for h in consumer.held if h.event.seq <= position]
        consumer.held = [h for h in consumer.held if h.event.seq > position]
        consumer.position = max(consumer.position, position)
        for held in done:
            await held.msg.ack()
        consumer.room.set()

    async def record_failure(self, forwarder: str, state: CursorState) -> None:
        """The batch's retry state stays in memory; its messages stay held (and kept in
        progress) until it goes through or becomes dead letters."""
        if state.position > self._consumers[forwarder].position:
            await self.advance(forwarder, state.position)

    def depth(self, forwarder: str) -> int:
        """Messages of the stream ``forwarder``'s consumer has not had acknowledged (by
        any replica), as of the last ``refresh``."""
        return self._depths.get(forwarder, 0)

    def positions(self) -> dict[str, int]:
        """Each forwarder's ack floor: the stream sequence every event up to which is
        acknowledged (as of the last ``refresh``)."""
        return dict(self._ack_floors)

    async def first_received_ms(self, after: int) -> int | None:
        """When the first event of the stream after sequence ``after`` was received."""
        js = await self._conns.js()
        try:
            raw = await js.get_msg(
                self.settings.stream, seq=after + 1, subject=self.settings.subject, next=True
            )
        except NotFoundError:
            return None
        return None if raw.time is None else int(raw.time.timestamp() * 1000)

    async def refresh(self) -> None:
        """Read the consumers' depths and ack floors and the dead letters' counts."""
        js = await self._conns.js()
        depths: dict[str, int] = {}
        floors: dict[str, int] = {}
        for name, consumer in list(self._consumers.items()):
            try:
                info = await js.consumer_info(self.settings.stream, consumer.durable)
            except NotFoundError:
                continue
            depths[name] = (info.num_pending or 0) + (info.num_ack_pending or 0)
            floors[name] = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        self._depths = depths
        self._ack_floors = floors
        self._dead_counts = await self.dead_letter_store.counts()

    # -- maintenance: what the stream's limits do by themselves --------------------------

    async def prune(self) -> int:
        """JetStream removes what its limits say (``max_age_secs``, ``max_bytes``): here
        maintenance only reads the figures the metrics show."""
        await self.refresh()
        return 0

    async def prune_message_ids(self, now_ms: int | None = None, chunk: int = 5000) -> int:
        return 0  # the stream's duplicate window forgets by itself

    async def checkpoint(self) -> None:
        return None

    async def retire_cursors_except(self, keep: set[str]) -> list[str]:
        """Consumers of forwarders no longer configured stay on the server (another
        replica may still run them); ``forget_retired_cursors`` never deletes them."""
        return []

    async def forget_retired_cursors(self, retired_before_ms: int) -> list[str]:
        return []

    def encryption_backlog(self) -> dict[tuple[str, str], int]:
        return {}

    async def count_encryption_backlog(self) -> dict[tuple[str, str], int]:
        return {}

    def rotate_keys(self) -> asyncio.Future[Any]:
        from tagrelay.errors import EncryptionKeyError

        raise EncryptionKeyError(
            "events in JetStream are not re-encrypted: they leave the stream within "
            "spool.max_age_secs; keep the old key in encryption.keys until then"
        )

    # -- dead letters ------------------------------------------------------------------

    async def dead_letter(
        self,
        forwarder: str,
        events: Sequence[SpooledEvent],
        reason: str,
        detail: str,
        attempts: int,
        advance_to: int | CursorState | None = None,
    ) -> None:
        """Publish ``events`` as dead letters of ``forwarder``; once the stream has them,
        acknowledge the events (all held up to ``advance_to`` when given, else these)."""
        consumer = self._consumers[forwarder]
        by_number = {h.event.seq: h for h in consumer.held}
        stream_seqs = [
            delivered_sequence(by_number[e.seq].msg.reply) if e.seq in by_number else e.seq
            for e in events
        ]
        await self.dead_letter_store.publish(
            forwarder,
            [(seq, e.payload) for seq, e in zip(stream_seqs, events, strict=True)],
            reason,
            detail,
            attempts,
        )
        if advance_to is not None:
            position = advance_to if isinstance(advance_to, int) else advance_to.position
            await self.advance(forwarder, position)
        else:
            numbers = {e.seq for e in events}
            done = [h for h in consumer.held if h.event.seq in numbers]
            consumer.held = [h for h in consumer.held if h.event.seq not in numbers]
            for held in done:
                await held.msg.ack()
        counts = dict(self._dead_counts)
        counts[forwarder] = counts.get(forwarder, 0) + len(events)
        self._dead_counts = counts

    async def dead_letters(
        self,
        forwarder: str | None = None,
        limit: int = 100,
        *,
        selection: Selection | None = None,
        after_id: int = 0,
        newest_first: bool = False,
    ) -> list[DeadLetterRow]:
        chosen = selection if selection is not None else Selection(forwarder=forwarder)
        return await self.dead_letter_store.select(
            chosen, after_id=after_id, limit=limit, newest_first=newest_first
        )

    async def dead_letter_by_id(self, dead_letter_id: int) -> DeadLetterRow | None:
        return await self.dead_letter_store.get(dead_letter_id)

    def dead_letter_counts(self) -> dict[str, int]:
        return dict(self._dead_counts)

    async def last_dead_letter_id(self) -> int:
        return await self.dead_letter_store.last_id()

    async def forget_dead_letters(self, ids: Sequence[int]) -> int:
        deleted = await self.dead_letter_store.delete(ids)
        self._dead_counts = await self.dead_letter_store.counts()
        return deleted

    async def purge_dead_letters(self, selection: Selection) -> int:
        """Delete every dead letter of ``selection``."""
        deleted = await self.dead_letter_store.purge(selection)
        self._dead_counts = await self.dead_letter_store.counts()
        return deleted

    async def dead_letters_died_again(self, ids: Sequence[int], reason: str, detail: str) -> int:
        return await self.dead_letter_store.died_again(ids, reason, detail)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class JetStreamDeadLetters:
    """The dead letters' stream: written by the workers, read by ``tagrelay dlq`` (through
    the relay's admin API, or here directly when no relay runs)."""

    def __init__(
        self, settings: JetStreamSettings, conns: _Connections, cipher: PayloadCipher
    ) -> None:
        self.settings = settings
        self.cipher = cipher
        self._conns = conns

    @classmethod
    def standalone(cls, settings: JetStreamSettings, cipher: PayloadCipher) -> JetStreamDeadLetters:
        """For ``tagrelay dlq`` without a relay: a connection of its own (``close`` it)."""
        return cls(settings, _Connections(settings.servers), cipher)

    async def close(self) -> None:
        await self._conns.close()

    def _envelope(
        self, forwarder: str, seq: int, payload: bytes, reason: str, detail: str, attempts: int
    ) -> bytes:
        if self.cipher.enabled:
            sealed = self.cipher.seal_dead_letter(forwarder, seq, "payload", payload)
            sealed_detail = self.cipher.seal_dead_letter(forwarder, seq, "detail", detail.encode())
            body: dict[str, Any] = {
                "payload_sealed": _b64(sealed),
                "detail_sealed": _b64(sealed_detail),
            }
        else:
            body = {"payload": payload.decode(), "detail": detail}
        body.update(
            forwarder=forwarder, seq=seq, reason=reason, attempts=attempts, dead_at_ms=_now_ms()
        )
        return orjson.dumps(body)

    async def publish(
        self,
        forwarder: str,
        events: Sequence[tuple[int, bytes]],
        reason: str,
        detail: str,
        attempts: int,
    ) -> None:
        """Publish dead letters (``(stream seq, event)``) and await the stream's acks."""
        js = await self._conns.js()
        subject = self.settings.dead_letter_subject(forwarder)
        futures = [
            await js.publish_async(
                subject, self._envelope(forwarder, seq, payload, reason, detail, attempts)
            )
            for seq, payload in events
        ]
        try:
            await asyncio.gather(*futures)
        except Exception as exc:
            raise SpoolUnavailable(f"JetStream did not take the dead letters: {exc}") from exc

    def _row(self, dead_letter_id: int, data: bytes) -> DeadLetterRow:
        body = orjson.loads(data)
        forwarder, seq = body["forwarder"], int(body["seq"])
        if "payload_sealed" in body:
            payload = self.cipher.open_dead_letter(
                forwarder, seq, "payload", base64.b64decode(body["payload_sealed"])
            )
            detail = self.cipher.open_dead_letter(
                forwarder, seq, "detail", base64.b64decode(body["detail_sealed"])
            ).decode()
        else:
            payload, detail = body["payload"].encode(), body["detail"]
        return DeadLetterRow(
            dead_letter_id,
            forwarder,
            seq,
            payload,
            body["reason"],
            detail,
            int(body["attempts"]),
            int(body["dead_at_ms"]),
        )

    async def _next(self, after_id: int, subject: str) -> tuple[int, bytes] | None:
        js = await self._conns.js()
        try:
            raw = await js.get_msg(
                self.settings.dead_letter_stream, seq=after_id + 1, subject=subject, next=True
            )
        except NotFoundError:
            return None
        assert raw.seq is not None and raw.data is not None
        return raw.seq, raw.data

    @staticmethod
    def _matches(row: DeadLetterRow, selection: Selection) -> bool:
        return (
            (selection.reason is None or row.reason == selection.reason)
            and (selection.since_ms is None or row.dead_at_ms >= selection.since_ms)
            and (selection.before_ms is None or row.dead_at_ms < selection.before_ms)
            and (selection.ids is None or row.id in selection.ids)
        )

    async def select(
        self,
        selection: Selection,
        *,
        after_id: int = 0,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[DeadLetterRow]:
        """Up to ``limit`` dead letters of ``selection`` after ``after_id``, by id (read one
        message at a time: dead letters are few, and an operator pages through them)."""
        subject = self.settings.dead_letter_subject(selection.forwarder or "*")
        if selection.ids is not None:
            chosen: list[DeadLetterRow] = []
            for dead_letter_id in sorted(selection.ids):
                row = await self.get(dead_letter_id) if dead_letter_id > after_id else None
                if row is not None and selection.forwarder in (None, row.forwarder):
                    chosen.append(row)
            chosen = [r for r in chosen if self._matches(r, selection)]
            return (chosen[::-1] if newest_first else chosen)[:limit]
        found: list[DeadLetterRow] = []
        if newest_first:  # the debug view's last ones: from the end, backwards
            js = await self._conns.js()
            state = (await js.stream_info(self.settings.dead_letter_stream)).state
            seq = int(state.last_seq)
            while seq > max(after_id, int(state.first_seq) - 1) and len(found) < limit:
                row = await self.get(seq)
                seq -= 1
                if (
                    row is not None
                    and selection.forwarder in (None, row.forwarder)
                    and self._matches(row, selection)
                ):
                    found.append(row)
            return found
        position = after_id
        while len(found) < limit:
            got = await self._next(position, subject)
            if got is None:
                break
            position = got[0]
            row = self._row(*got)
            if self._matches(row, selection):
                found.append(row)
        return found

    async def get(self, dead_letter_id: int) -> DeadLetterRow | None:
        js = await self._conns.js()
        try:
            raw = await js.get_msg(self.settings.dead_letter_stream, seq=dead_letter_id)
        except NotFoundError:
            return None
        if raw.data is None or not (raw.subject or "").startswith(
            self.settings.dead_letter_stream + "."
        ):
            return None
        return self._row(dead_letter_id, raw.data)

    async def last_id(self) -> int:
        js = await self._conns.js()
        info = await js.stream_info(self.settings.dead_letter_stream)
        return int(info.state.last_seq)

    async def counts(self) -> dict[str, int]:
        """Dead letters stored now, by forwarder."""
        js = await self._conns.js()
        prefix = self.settings.dead_letter_stream + "."
        info = await js.stream_info(self.settings.dead_letter_stream, subjects_filter=">")
        return {
            subject[len(prefix) :]: count
            for subject, count in (info.state.subjects or {}).items()
            if subject.startswith(prefix)
        }

    async def delete(self, ids: Sequence[int]) -> int:
        js = await self._conns.js()
        deleted = 0
        for dead_letter_id in ids:
            with contextlib.suppress(NotFoundError, BadRequestError):
                if await js.delete_msg(self.settings.dead_letter_stream, dead_letter_id):
                    deleted += 1
        return deleted

    async def purge(self, selection: Selection) -> int:
        rows: list[DeadLetterRow] = []
        after = 0
        while True:
            page = await self.select(selection, after_id=after, limit=1000)
            if not page:
                break
            rows.extend(page)
            after = page[-1].id
            if selection.ids is not None:
                break
        return await self.delete([row.id for row in rows])

    async def died_again(self, ids: Sequence[int], reason: str, detail: str) -> int:
        """Publish each of ``ids`` again with ``reason`` and ``detail``, one attempt more,
        dying now; then delete the old one. Returns how many."""
        done = 0
        for dead_letter_id in ids:
            row = await self.get(dead_letter_id)
            if row is None:
                continue
            await self.publish(
                row.forwarder, [(row.seq, row.payload)], reason, detail, row.attempts + 1
            )
            await self.delete([dead_letter_id])
            done += 1
        return done
