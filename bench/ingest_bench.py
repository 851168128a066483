"""Ingest benchmark: the relay against a bare aiohttp app, side by side in one run.

Starts ``tagrelay serve`` (one process, its own temporary data dir and config) and
``bench/bare_app.py`` (reads the body, answers 204) on free loopback ports, drives both with
the same load, and prints a table:

  track  single-event POST /v1/track, closed loop (wrk, N connections): req/s, p50, p99,
         and the relay/bare ratio;
  batch  POST /v1/batch with 100 events per request, closed loop: events/s, p50, p99;
  rate   single events at a fixed 2,000 req/s, open loop (a Python generator in its own
         process; latency from each request's *scheduled* send time, so a stall is not
         hidden by coordinated omission): achieved rate, p50, p99.

For the relay it also reports RSS (VmRSS now, VmHWM peak), the warehouse spool depth at the
end of each scenario and after a drain wait, the warehouse's delivery rate during the load,
and the number of rows in the warehouse (``tagrelay sql``).

    .venv/bin/python bench/ingest_bench.py                 # everything, 2-3 minutes
    .venv/bin/python bench/ingest_bench.py --duration 5 --scenarios track --only bare
    .venv/bin/python bench/ingest_bench.py --encryption on   # the spool encrypted at rest

Load: ``wrk`` (Debian: ``apt-get install -y wrk``) with ``bench/ingest.lua`` for the
closed-loop scenarios, else a Python closed-loop generator. Only loopback addresses are used.
Exit status: 0 when every requested server started and the scenarios ran (whether or not the
targets were met); 1 when a server did not start or stopped during the run; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import math
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
HOST = "127.0.0.1"
WRITE_KEY = "bench-server-key"
AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
FORWARDER = "warehouse"
WAREHOUSE_MAX_EVENTS = 1000
SCENARIOS = ("track", "batch", "rate")
LOAD_MODES = ("track", "batch", "conversions", "gtag")
"""What the load generators send (bench/ingest.lua's MODE): see ``BodyMaker``."""

TARGETS = {
    "track_ratio": 0.40,  # relay req/s >= 40% of the bare app's
    "batch_events_per_s": 50_000,
    "rate_p99_ms": 25.0,
    "rss_mb": 150.0,
}

CONFIG_TEMPLATE = """\
data_dir: {data_dir}
metrics: {{public: true}}
admin: {{listen: "127.0.0.1:0"}}
keys:
  - {{id: backend, kind: server, key: {key}}}
{encryption}
{spool}
forwarders:
  - {{id: {forwarder}, type: warehouse, batch: {{max_events: {max_events}, max_wait_secs: 0.5}}}}
"""

ENCRYPTION_KEY_ENV = "TAGRELAY_BENCH_KEY"
"""With ``--encryption on``: a fresh key, given to the relay through its environment (as in
production; never on its command line)."""
ENCRYPTION_CONFIG = 'encryption: {keys: ["${' + ENCRYPTION_KEY_ENV + '}"]}'

JETSTREAM_CONFIG = "spool: {{type: jetstream, servers: [{url}], stream: {stream}, replicas: 1}}"
"""With ``--spool jetstream``: the relay's spool is a stream of its own on the local NATS
server (R1, file storage), deleted after the run."""


def delete_streams(url: str, stream: str) -> None:
    """Delete the run's streams (``--spool jetstream``)."""
    import asyncio
    import contextlib

    import nats

    async def delete() -> None:
        client = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
        try:
            js = client.jetstream()
            for name in (stream, f"{stream}_dead_letters"):
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
        finally:
            await client.close()

    asyncio.run(delete())


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Event bodies (Python load generators). The same shape as bench/ingest.lua builds.

_EVENT_HEAD = '{"type":"track","event":"Signed Up","anonymousId":"anon-'
_EVENT_TAIL = (
    '"properties":{"plan":"pro","value":%d,"currency":"EUR","coupon":null,"items":2},'
    '"context":{"page":{"path":"/signup","url":"https://shop.example/signup?utm_source=bench&utm_medium=load",'
    '"title":"Sign up","referrer":""},'
    '"userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) '
    'Chrome/126.0 Safari/537.36",'
    '"library":{"name":"bench","version":"1"}},"timestamp":"%s"%s}'
)


_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0 Safari/537.36"
)
_CONSENT = (
    '{"analytics":"granted","ads":"granted","ad_user_data":"granted",'
    '"ad_personalization":"granted"}'
)
_PURCHASE = (
    '{"type":"track","event":"Order Completed","anonymousId":"anon-%d","userId":"user-%d",'
    '"messageId":"%s","properties":{"order_id":"%s","revenue":%d.5,"currency":"usd","products":['
    '{"product_id":"p-%d","sku":"SKU-%d","name":"T-shirt","price":19.5,"quantity":1},'
    '{"product_id":"p-%d","sku":"SKU-%d","name":"Mug","price":%d,"quantity":2}]},'
    '"context":{"consent":' + _CONSENT + ',"traits":{"email":"Buyer.%d@Example.com",'
    '"phone":"+1 650 555 %04d"},"page":{"path":"/checkout/thanks",'
    '"url":"https://shop.example/checkout/thanks?gclid=Cj0KCQbench%d","title":"Thank you",'
    '"referrer":"https://shop.example/cart"},"userAgent":"' + _UA + '",'
    '"library":{"name":"bench","version":"1"}},"timestamp":"%s"%s}'
)
_PAGE = (
    '{"type":"page","name":"Product","anonymousId":"anon-%d","messageId":"%s",'
    '"properties":{"path":"/p/%d","url":"https://shop.example/p/%d","title":"Product %d"},'
    '"context":{"consent":' + _CONSENT + ',"page":{"path":"/p/%d",'
    '"url":"https://shop.example/p/%d","title":"Product %d","referrer":""},'
    '"userAgent":"' + _UA + '","library":{"name":"bench","version":"1"}},"timestamp":"%s"%s}'
)
GTAG_MEASUREMENT_ID = "G-BENCH12345"
_GTAG = (
    "/g/collect?v=2&tid=" + GTAG_MEASUREMENT_ID + "&gcs=G111&cid=%d.1731420000&sid=1731425080"
    "&sct=1&seg=1&ul=en-us&dl=https%%3A%%2F%%2Fshop.example%%2Fp%%2F%d&dt=Product&_p=%s"
)


class BodyMaker:
    """Builds request bodies whose every event has a unique messageId ``NONCE-COUNTER``
    (the same shapes as ``bench/ingest.lua`` builds for wrk)."""

    def __init__(self, nonce: str, batch_size: int) -> None:
        self.nonce = nonce
        self.batch_size = batch_size
        self.counter = 0
        self._ts_sec = -1
        self._ts = ""

    def _now(self) -> str:
        sec = int(time.time())
        if sec != self._ts_sec:
            self._ts_sec = sec
            self._ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec))
        return self._ts

    def _event(self, ts: str, extra: str) -> str:
        self.counter += 1
        n = self.counter
        return f'{_EVENT_HEAD}{n % 5000}","messageId":"{self.nonce}-{n}",' + _EVENT_TAIL % (
            n % 1000,
            ts,
            extra,
        )

    def track(self) -> bytes:
        ts = self._now()
        return self._event(ts, f',"sentAt":"{ts}"').encode()

    def batch(self) -> bytes:
        ts = self._now()
        events = ",".join(self._event(ts, "") for _ in range(self.batch_size))
        return f'{{"batch":[{events}],"sentAt":"{ts}"}}'.encode()

    def conversion(self) -> tuple[str, bytes]:
        """The "conversions" mix, alternately: an ``Order Completed`` with revenue, products,
        email and phone traits and a gclid (``/v1/track``), and a page view (``/v1/page``),
        each granting every consent category. 5,000 visitors (``anon-N``), each with its
        own email and phone number, which come back with each of the visitor's purchases,
        as an identified visitor's traits do on all their events."""
        ts = self._now()
        extra = f',"sentAt":"{ts}"'
        self.counter += 1
        n = self.counter
        mid = f"{self.nonce}-{n}"
        if n % 2 == 0:
            return "/v1/track", (
                _PURCHASE
                % (n % 5000, n % 5000, mid, mid, 10 + n % 90, n % 50, n % 50, n % 70, n % 70,
                   5 + n % 20, n % 5000, n % 5000, n, ts, extra)
            ).encode()  # fmt: skip
        p = n % 500
        return "/v1/page", (_PAGE % (n % 5000, mid, p, p, p, p, p, p, ts, extra)).encode()

    def gtag(self) -> str:
        """A gtag hit's path and query (GA4's hits carry no messageId; ``_p`` makes each
        distinct), alternately a page_view and a purchase."""
        self.counter += 1
        n = self.counter
        hit = _GTAG % (n % 5000, n % 500, f"{self.nonce}{n}")
        if n % 2 == 0:
            order = f"T-{self.nonce}{n}"
            return hit + f"&en=purchase&ep.transaction_id={order}&epn.value={10 + n % 90}&cu=USD"
        return hit + "&en=page_view"


# --------------------------------------------------------------------------------------
# Python load generators, each run in its own process (``ingest_bench.py _loadgen ...``) so
# that their CPU does not share an event loop or a GIL with this orchestrating process.
#
# They speak HTTP/1.1 over raw asyncio connections (keep-alive, one request in flight per
# connection) instead of using aiohttp's client: a request then costs the generator a
# fraction of what it costs the server, so at 2,000 req/s the generator's own event loop
# adds little to the measured latency. The answer is timed when its last byte arrives.


class _HttpConn(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, float]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("server closed the connection"))
        self.waiter = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None:
            return
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(self.buf[:head_end]).lower()
        body_start = head_end + 4
        if b"\r\ntransfer-encoding: chunked" in head:
            end = self.buf.find(b"\r\n0\r\n\r\n", body_start - 2)
            if end < 0:
                return
            total = end + 7
        else:
            length = 0
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j > 0 else len(head)])
            total = body_start + length
            if len(self.buf) < total:
                return
        status = int(head[9:12])
        del self.buf[:total]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result((status, self.loop.time()))

    def request(self, payload: bytes) -> asyncio.Future[tuple[int, float]]:
        assert self.transport is not None
        self.waiter = self.loop.create_future()
        self.transport.write(payload)
        return self.waiter


class _HttpPool:
    """At most ``limit`` keep-alive connections; a request waits for a free one."""

    def __init__(self, host: str, port: int, limit: int, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.limit, self.timeout = host, port, limit, timeout
        self.idle: list[_HttpConn] = []
        self.opened = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def _acquire(self) -> _HttpConn:
        while True:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed:
                    return conn
                self.opened -= 1
            if self.opened < self.limit:
                self.opened += 1
                try:
                    _, conn = await self.loop.create_connection(
                        lambda: _HttpConn(self.loop), self.host, self.port
                    )
                except BaseException:
                    self.opened -= 1
                    self._wake()
                    raise
                return conn
            fut = self.loop.create_future()
            self.waiters.append(fut)
            await fut

    def _wake(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _release(self, conn: _HttpConn) -> None:
        if conn.closed:
            self.opened -= 1
        else:
            self.idle.append(conn)
        self._wake()

    async def send(self, payload: bytes) -> tuple[int, float]:
        """(status, loop time the answer was complete)."""
        conn = await self._acquire()
        fut = conn.request(payload)
        handle = self.loop.call_later(self.timeout, self._expire, conn, fut)
        try:
            return await fut
        finally:
            handle.cancel()
            self._release(conn)

    @staticmethod
    def _expire(conn: _HttpConn, fut: asyncio.Future[tuple[int, float]]) -> None:
        if not fut.done():
            fut.set_exception(TimeoutError("no answer in time"))
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


def _request_maker(args: argparse.Namespace) -> Callable[[], bytes]:
    bodies = BodyMaker(args.nonce, args.batch_size)
    host = f"Host: {args.host}:{args.port}\r\nUser-Agent: {_UA}\r\n".encode()
    if args.mode == "gtag":
        return lambda: b"GET %s HTTP/1.1\r\n%s\r\n" % (bodies.gtag().encode(), host)
    heads: dict[str, bytes] = {}

    def head(path: str) -> bytes:
        if path not in heads:
            heads[path] = (
                f"POST {path} HTTP/1.1\r\n".encode()
                + host
                + f"Authorization: {args.auth}\r\n"
                "Content-Type: application/json\r\nContent-Length: ".encode()
            )
        return heads[path]

    if args.mode == "conversions":
        make = bodies.conversion
    elif args.mode == "batch":
        make = lambda: ("/v1/batch", bodies.batch())  # noqa: E731
    else:
        make = lambda: ("/v1/track", bodies.track())  # noqa: E731

    def request() -> bytes:
        path, body = make()
        return b"%s%d\r\n\r\n%s" % (head(path), len(body), body)

    return request


class _Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    def answer(self, status: int, latency: float) -> None:
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if 200 <= status < 300:
            self.latencies.append(latency)

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"latencies": self.latencies, "statuses": self.statuses, "errors": self.errors}


async def _open_loop(args: argparse.Namespace) -> dict[str, Any]:
    """Sends ``rate`` requests/s on a fixed schedule for ``duration`` s, whatever the
    answers do. Latency counts from the scheduled send time, so time spent waiting for a
    free connection or for this process's own loop is included, not omitted."""
    make = _request_maker(args)
    pool = _HttpPool(args.host, args.port, args.connections, args.timeout)
    tally = _Tally()
    loop = asyncio.get_running_loop()
    total = round(args.rate * args.duration)
    lags: list[float] = []

    async def one(payload: bytes, scheduled: float) -> None:
        try:
            status, done = await pool.send(payload)
        except Exception as exc:
            tally.error(exc)
            return
        tally.answer(status, done - scheduled)

    tasks: set[asyncio.Task[None]] = set()
    t0 = loop.time() + 0.05
    sent = 0
    while sent < total:
        now = loop.time()
        due = min(total, int((now - t0) * args.rate) + 1) if now >= t0 else 0
        while sent < due:
            scheduled = t0 + sent / args.rate
            lags.append(now - scheduled)
            task = asyncio.create_task(one(make(), scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(max(0.0, t0 + sent / args.rate - loop.time()))
    send_end = loop.time()
    if tasks:
        await asyncio.wait(tasks, timeout=args.timeout + 5)
    end = loop.time()
    pool.close()
    return {
        "kind": "open",
        "sent": sent,
        **tally.as_dict(),
        "elapsed": end - t0,
        "send_elapsed": send_end - t0,
        "max_send_lag": max(lags, default=0.0),
        "send_lag_p99": percentile(sorted(lags), 99) or 0.0,
    }


async def _closed_loop(args: argparse.Namespace) -> dict[str, Any]:
    """``connections`` workers, each sending its next request when the previous one is
    answered, for ``duration`` s (the fallback when wrk is not installed)."""
    make = _request_maker(args)
    pool = _HttpPool(args.host, args.port, args.connections, args.timeout)
    tally = _Tally()
    loop = asyncio.get_running_loop()
    sent = 0
    start = loop.time()
    deadline = start + args.duration

    async def worker() -> None:
        nonlocal sent
        while loop.time() < deadline:
            payload = make()
            sent += 1
            t = loop.time()
            try:
                status, done = await pool.send(payload)
            except Exception as exc:
                tally.error(exc)
                await asyncio.sleep(0.01)
                continue
            tally.answer(status, done - t)

    await asyncio.gather(*(worker() for _ in range(args.connections)))
    end = loop.time()
    pool.close()
    return {"kind": "closed", "sent": sent, **tally.as_dict(), "elapsed": end - start}


def loadgen_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="ingest_bench.py _loadgen")
    p.add_argument("--kind", choices=("open", "closed"), required=True)
    p.add_argument("--mode", choices=LOAD_MODES, required=True)
    p.add_argument("--host", default=HOST)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--nonce", required=True)
    p.add_argument("--auth", default=AUTH)
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    run = _open_loop if args.kind == "open" else _closed_loop
    result = asyncio.run(run(args))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = ru.ru_utime + ru.ru_stime
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------
# Processes, ports, /proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def proc_status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_ticks(stat_path: str) -> int | None:
    """utime + stime from a /proc stat file (a process's covers all its threads); None when
    it is gone."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def thread_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of a process's main thread (for the servers here: the event loop)."""
    ticks = _cpu_ticks(f"/proc/{pid}/task/{pid}/stat")
    return None if ticks is None else ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    ticks = (_cpu_ticks(f"/proc/{pid}/stat") for pid in pids)
    return sum(t for t in ticks if t is not None) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self.log_path = self.workdir / f"{self.name}.log"
        logf = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        # A session of its own, so that stop() can signal the server and whatever it
        # started, and a Ctrl-C in the terminal reaches this script first.
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logf.close()

    def wait_healthy(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def log_tail(self, n: int = 25) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def rss_mb(self) -> tuple[float | None, float | None]:
        """(VmRSS, VmHWM) in MiB, summed over the server's process tree."""
        split = self.rss_split_mb()
        if split is None:
            return None, None
        (main_rss, main_hwm), (rest_rss, rest_hwm) = split
        return main_rss + rest_rss, main_hwm + rest_hwm

    def rss_split_mb(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """((VmRSS, VmHWM) of the server process itself, (VmRSS, VmHWM) summed over the
        processes it started: for the relay, its warehouse process) in MiB."""
        pids = self.pids()
        if not pids or self.proc is None:
            return None
        main, rest = [self.proc.pid], [p for p in pids if p != self.proc.pid]

        def total(group: list[int], key: str) -> float:
            return sum(proc_status_kb(p, key) for p in group) / 1024

        return (
            (total(main, "VmRSS"), total(main, "VmHWM")),
            (total(rest, "VmRSS"), total(rest, "VmHWM")),
        )

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this script created for it
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            log(f"{self.name} (pid {proc.pid}) did not stop on SIGTERM in 20 s; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def scrape_metrics(server: Server) -> dict[str, float] | None:
    """Prometheus text -> {"name{labels}": value}; None when /metrics does not answer."""
    try:
        with urllib.request.urlopen(server.base + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)(?:\s+\d+)?$", line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = float(m.group(2))
    return out


def metric_sum(
    metrics: dict[str, float] | None, name: str, label: str | None = None
) -> float | None:
    """Sum of every series of ``name`` (optionally only those whose labels contain
    ``label``); None when there is none."""
    if metrics is None:
        return None
    found = None
    for key, value in metrics.items():
        base = key.split("{", 1)[0]
        if base != name:
            continue
        if label is not None and label not in key:
            continue
        found = (found or 0.0) + value
    return found


def spool_depth(server: Server) -> float | None:
    return metric_sum(scrape_metrics(server), "tagrelay_spool_depth", f'forwarder="{FORWARDER}"')


RELAY_COUNTERS: dict[str, tuple[str, str | None]] = {
    "accepted": ("tagrelay_events_accepted_total", None),
    "rejected": ("tagrelay_events_rejected_total", None),
    "delivered": ("tagrelay_forwarder_events_total", 'outcome="delivered"'),
    "dead": ("tagrelay_forwarder_events_total", 'outcome="dead_letter"'),
    "duplicates": ("tagrelay_warehouse_duplicates_total", None),
    "commits": ("tagrelay_spool_commits_total", None),
    "http_sum": ("tagrelay_http_request_duration_seconds_sum", 'route="/v1/'),
    "http_count": ("tagrelay_http_request_duration_seconds_count", 'route="/v1/'),
}


def relay_counters(server: Server) -> dict[str, float | None]:
    """The relay counters the report uses, summed over their labels (None if absent)."""
    m = scrape_metrics(server)
    if m is None:
        return dict.fromkeys(RELAY_COUNTERS) | {"depth": None}
    # A labelled counter has no series until its first increment: absent means 0.
    out: dict[str, float | None] = {
        key: metric_sum(m, name, label) or 0.0 for key, (name, label) in RELAY_COUNTERS.items()
    }
    out["depth"] = metric_sum(m, "tagrelay_spool_depth", f'forwarder="{FORWARDER}"')
    return out


def _delta(
    after: dict[str, float | None], before: dict[str, float | None], key: str
) -> float | None:
    a, b = after.get(key), before.get(key)
    return None if a is None or b is None else a - b


def warehouse_rows(config: Path, data_dir: Path) -> tuple[int | None, str | None]:
    """Rows in the warehouse table via ``tagrelay sql`` (through the running relay's admin
    socket): (count, None) or (None, why not)."""
    exe = REPO / ".venv" / "bin" / "tagrelay"
    cmd = [
        str(exe) if exe.exists() else "tagrelay",
        "sql",
        "--config",
        str(config),
        "--data-dir",
        str(data_dir),
        "--format",
        "csv",
        "select count(*) from events",
    ]
    try:
        out = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"tagrelay sql failed: {exc}"
    if out.returncode != 0:
        return (
            None,
            f"tagrelay sql exited {out.returncode}: {(out.stderr or out.stdout).strip()[-200:]}",
        )
    nums = re.findall(r"\b\d+\b", out.stdout)
    if not nums:
        return None, f"tagrelay sql printed no count: {out.stdout.strip()[-200:]}"
    return int(nums[-1]), None


# --------------------------------------------------------------------------------------
# Running the load


@dataclass
class LoadResult:
    ok_requests: int = 0
    failed: int = 0  # non-2xx answers and socket errors/timeouts
    elapsed: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    # CPU over the run, in % of one core: the server's process tree, the load generator, and
    # everything else on the machine (other work competing for the 2 cores), plus the time
    # the hypervisor took (steal).
    gen_cpu_pct: float | None = None
    gen_workers: int = 1  # wrk threads or generator processes: each can use one core
    server_cpu_pct: float | None = None
    other_cpu_pct: float | None = None
    steal_pct: float | None = None
    # CPU seconds over the run: the server's process tree, and its main thread (the event
    # loop). Per request, they compare runs on a machine whose speed drifts (req/s does not).
    server_cpu_s: float | None = None
    main_cpu_s: float | None = None
    offered_rate: float | None = None  # open loop only
    send_lag_p99_ms: float | None = None  # open loop only: how late the generator sent
    max_send_lag_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    command: str = ""

    @property
    def req_per_s(self) -> float:
        return self.ok_requests / self.elapsed if self.elapsed else 0.0


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


class LoadProcess:
    """A load generator process whose output goes to temporary files and whose CPU time is
    read from its own rusage when this script reaps it (``os.wait4``), so that nothing else
    this script waits for, such as a server that exited, is counted as load."""

    def __init__(self, cmd: list[str]) -> None:
        self.out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by output()
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by output()
        self.proc = subprocess.Popen(
            cmd, stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL
        )
        self.returncode: int | None = None
        self.cpu = 0.0

    def wait(self, timeout: float) -> None:
        """Reaps the process, killing it first if it outlives ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while self.returncode is None:
                pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
                if pid:
                    self._reaped(status, ru)
                elif time.monotonic() > deadline:
                    self.kill()
                else:
                    time.sleep(0.02)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        _, status, ru = os.wait4(self.proc.pid, 0)
        self._reaped(status, ru)

    def _reaped(self, status: int, ru: resource.struct_rusage) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # keeps Popen from waiting on it again
        self.cpu = ru.ru_utime + ru.ru_stime

    def output(self) -> tuple[str, str]:
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
            f.close()
        return texts[0], texts[1]


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


class CpuMeter:
    """CPU used between its creation and ``finish``: the server's tree (from /proc), the
    load generators (given to ``finish``) and the rest of the machine."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.t0 = time.monotonic()
        self.srv0 = cpu_seconds(server.pids())
        self.main0 = thread_cpu_seconds(server.proc.pid) if server.proc else None
        self.busy0, self.steal0 = _machine_cpu()

    def finish(self, res: LoadResult, gen: float) -> None:
        wall = time.monotonic() - self.t0
        busy, steal = _machine_cpu()
        res.gen_cpu_pct = 100 * gen / wall
        res.steal_pct = 100 * (steal - self.steal0) / wall
        pids = self.server.pids()
        if not pids:
            res.notes.append("the server exited during this run: its figures are not valid")
            return
        srv = cpu_seconds(pids) - self.srv0
        res.server_cpu_s = srv
        main = thread_cpu_seconds(self.server.proc.pid) if self.server.proc else None
        if main is not None and self.main0 is not None:
            res.main_cpu_s = main - self.main0
        res.server_cpu_pct = 100 * srv / wall
        res.other_cpu_pct = max(0.0, 100 * (busy - self.busy0 - gen - srv) / wall)


def run_wrk(
    args: argparse.Namespace, server: Server, mode: str, connections: int, duration: float
) -> LoadResult:
    nonce = secrets.token_hex(4)
    cmd = [
        args.wrk,
        f"-t{min(args.threads, connections)}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(BENCH_DIR / "ingest.lua"),
        server.base,
        "--",
        mode,
        str(args.batch_size),
        nonce,
        AUTH,
    ]
    meter = CpuMeter(server)
    wrk = LoadProcess(cmd)
    wrk.wait(timeout=duration + 60)
    res = LoadResult(command=shlex.join(cmd), gen_workers=min(args.threads, connections))
    meter.finish(res, wrk.cpu)
    stdout, stderr = wrk.output()
    m = re.search(r"^WRKJSON (\{.*\})$", stdout, re.M)
    if wrk.returncode != 0 or not m:
        res.notes.append(f"wrk failed (exit {wrk.returncode}): {(stderr or stdout).strip()[-300:]}")
        return res
    w = json.loads(m.group(1))
    socket_errors = w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"]
    res.ok_requests = int(w["requests"] - w["err_status"])
    res.failed = int(w["err_status"] + socket_errors)
    res.elapsed = w["duration_us"] / 1e6
    res.p50_ms, res.p99_ms = w["p50_us"] / 1000, w["p99_us"] / 1000
    if w["err_status"]:
        res.notes.append(f"{w['err_status']:.0f} non-2xx answers")
    if socket_errors:
        res.notes.append(
            f"socket errors: connect {w['err_connect']:.0f}, read {w['err_read']:.0f}, "
            f"write {w['err_write']:.0f}, timeout {w['err_timeout']:.0f}"
        )
    return res


def run_python_load(
    args: argparse.Namespace,
    server: Server,
    kind: str,
    mode: str,
    connections: int,
    duration: float,
    rate: float = 0.0,
) -> LoadResult:
    procs_n = max(1, args.gen_procs)
    base_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_loadgen",
        "--kind",
        kind,
        "--mode",
        mode,
        "--port",
        str(server.port),
        "--duration",
        f"{duration:g}",
        "--batch-size",
        str(args.batch_size),
    ]
    procs = []
    meter = CpuMeter(server)
    shown = ""
    for i in range(procs_n):
        cmd = [
            *base_cmd,
            "--connections",
            str(max(1, connections // procs_n)),
            "--nonce",
            f"{secrets.token_hex(4)}p{i}",
        ]
        if kind == "open":
            cmd += ["--rate", f"{rate / procs_n:g}"]
        shown = shlex.join(cmd) + (
            f"  (x{procs_n} processes, each with its own nonce)" if procs_n > 1 else ""
        )
        procs.append(LoadProcess(cmd))
    results, failures = [], []
    try:
        for p in procs:
            p.wait(timeout=duration + 60)
            stdout, stderr = p.output()
            if p.returncode == 0:
                results.append(json.loads(stdout))
            else:
                failures.append(f"exit {p.returncode}: {stderr.strip()[-300:]}")
    finally:
        for p in procs:
            p.kill()
    res = LoadResult(command=shown, gen_workers=procs_n)
    meter.finish(res, sum(p.cpu for p in procs))
    for f in failures:
        res.notes.append(f"load generator failed: {f}")
    if not results:
        return res
    lat = sorted(x for r in results for x in r["latencies"])
    res.ok_requests = len(lat)
    sent = sum(r["sent"] for r in results)
    res.failed = sent - res.ok_requests
    res.elapsed = max(r["elapsed"] for r in results)
    res.p50_ms = (percentile(lat, 50) or 0) * 1000 if lat else None
    res.p99_ms = (percentile(lat, 99) or 0) * 1000 if lat else None
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    bad = {k: v for k, v in statuses.items() if not k.startswith("2")}
    if bad:
        res.notes.append(
            "non-2xx answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
        )
    if errors:
        res.notes.append(
            "client errors: " + ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
        )
    if kind == "open":
        res.offered_rate = sent / max(r["send_elapsed"] for r in results)
        res.max_send_lag_ms = 1000 * max(r["max_send_lag"] for r in results)
        res.send_lag_p99_ms = 1000 * max(r["send_lag_p99"] for r in results)
        # Rate over the sending window: the tail wait for the last answers is not idle time
        # the server chose.
        res.elapsed = max(r["send_elapsed"] for r in results)
    return res


def closed_loop(
    args: argparse.Namespace, server: Server, mode: str, connections: int, duration: float
) -> LoadResult:
    if args.wrk:
        return run_wrk(args, server, mode, connections, duration)
    return run_python_load(args, server, "closed", mode, connections, duration)


# --------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Row:
    scenario: str
    server: str
    load: LoadResult
    events_per_request: int
    connections: int
    runs: int = 1
    run_rates: list[float] = field(default_factory=list)  # req/s of each run, with --repeat
    expected_events: int = 0  # 2xx answers x events per request, as the load generator saw
    # Relay only, from /metrics: deltas over the run(s).
    spool_end: float | None = None
    spool_after: float | None = None
    drain_secs: float | None = None
    accepted: float | None = None
    rejected: float | None = None
    delivered: float | None = None
    dead_letters: float | None = None
    duplicates: float | None = None
    commits: float | None = None
    http_sum: float | None = None
    http_count: float | None = None
    delivered_per_s: float | None = None
    accepted_since_start: float | None = None  # the counter itself, warm-up included
    rows_after: int | None = None
    rows_error: str | None = None
    rss_mb: float | None = None  # summed over the relay and its warehouse process
    hwm_mb: float | None = None
    # The same two figures for the relay process alone and for its warehouse process.
    relay_rss_mb: float | None = None
    relay_hwm_mb: float | None = None
    warehouse_rss_mb: float | None = None
    warehouse_hwm_mb: float | None = None

    @property
    def events_per_s(self) -> float:
        return self.load.req_per_s * self.events_per_request


def drain(server: Server, max_wait: float) -> tuple[float | None, float | None]:
    """Polls the spool depth until it is 0 or max_wait passes: (depth, seconds waited)."""
    t0 = time.monotonic()
    depth = spool_depth(server)
    while depth is not None and depth > 0 and time.monotonic() - t0 < max_wait:
        time.sleep(0.25)
        depth = spool_depth(server)
    return depth, time.monotonic() - t0


def run_scenario(args: argparse.Namespace, name: str, server: Server) -> Row:
    """One run of one scenario against one server; for the relay, its counters around the
    run and then a wait for the spool to drain."""
    is_relay = server.name == "relay"
    before = relay_counters(server) if is_relay else {}
    if name == "track":
        load = closed_loop(args, server, "track", args.connections, args.duration)
        row = Row(name, server.name, load, 1, args.connections)
    elif name == "batch":
        load = closed_loop(args, server, "batch", args.batch_connections, args.duration)
        row = Row(name, server.name, load, args.batch_size, args.batch_connections)
    else:
        load = run_python_load(
            args, server, "open", "track", args.rate_connections, args.duration, rate=args.rate
        )
        row = Row(name, server.name, load, 1, args.rate_connections)
    row.run_rates = [load.req_per_s]
    row.expected_events = load.ok_requests * row.events_per_request
    if not is_relay:
        return row
    after = relay_counters(server)
    split = server.rss_split_mb()
    if split is not None:
        (row.relay_rss_mb, row.relay_hwm_mb), (row.warehouse_rss_mb, row.warehouse_hwm_mb) = split
        row.rss_mb = row.relay_rss_mb + row.warehouse_rss_mb
        row.hwm_mb = row.relay_hwm_mb + row.warehouse_hwm_mb
    row.spool_end = after["depth"]
    row.accepted = _delta(after, before, "accepted")
    row.rejected = _delta(after, before, "rejected")
    row.delivered = _delta(after, before, "delivered")
    row.dead_letters = _delta(after, before, "dead")
    row.commits = _delta(after, before, "commits")
    row.duplicates = _delta(after, before, "duplicates")
    row.http_sum = _delta(after, before, "http_sum")
    row.http_count = _delta(after, before, "http_count")
    row.accepted_since_start = after["accepted"]
    if load.elapsed:
        if row.delivered is not None:
            row.delivered_per_s = row.delivered / load.elapsed
        elif row.accepted is not None and row.spool_end is not None and before["depth"] is not None:
            row.delivered_per_s = (row.accepted - (row.spool_end - before["depth"])) / load.elapsed
    row.spool_after, row.drain_secs = drain(server, args.drain_secs)
    return row


def _sum(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def combine(runs: list[Row]) -> Row:
    """Several runs (--repeat) of one scenario on one server as one row: the load figures of
    the median run by rate, the relay counters added up, the worst spool depth."""
    if len(runs) == 1:
        return runs[0]
    by_rate = sorted(runs, key=lambda r: r.load.req_per_s)
    median = by_rate[(len(by_rate) - 1) // 2]
    row = Row(
        median.scenario, median.server, median.load, median.events_per_request, median.connections
    )
    row.runs = len(runs)
    row.run_rates = [r.load.req_per_s for r in runs]
    row.expected_events = sum(r.expected_events for r in runs)
    if median.server != "relay":
        return row
    for name in (
        "accepted",
        "rejected",
        "delivered",
        "dead_letters",
        "duplicates",
        "commits",
        "http_sum",
        "http_count",
    ):
        setattr(row, name, _sum([getattr(r, name) for r in runs]))
    ends = [r.spool_end for r in runs if r.spool_end is not None]
    row.spool_end = max(ends) if ends else None
    row.spool_after = runs[-1].spool_after
    drains = [r.drain_secs for r in runs if r.drain_secs is not None]
    row.drain_secs = max(drains) if drains else None
    rates = [r.delivered_per_s for r in runs if r.delivered_per_s is not None]
    row.delivered_per_s = sorted(rates)[(len(rates) - 1) // 2] if rates else None
    row.accepted_since_start = runs[-1].accepted_since_start
    row.rss_mb = runs[-1].rss_mb
    row.relay_rss_mb = runs[-1].relay_rss_mb
    row.warehouse_rss_mb = runs[-1].warehouse_rss_mb
    for name in ("hwm_mb", "relay_hwm_mb", "warehouse_hwm_mb"):
        hwms = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        setattr(row, name, max(hwms) if hwms else None)
    return row


# --------------------------------------------------------------------------------------
# Output


def fmt(v: float | None, spec: str = ",.0f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_report(
    args: argparse.Namespace, rows: list[Row], started: dict[str, bool], relay_cmd: str
) -> None:
    p = print
    p()
    p("tagrelay ingest benchmark")
    p(f"  command : {shlex.join([sys.executable, *sys.argv])}")
    p(
        f"  machine : {os.cpu_count()} cores; load: "
        + (
            f"wrk ({args.wrk}, {args.threads} thread(s))"
            if args.wrk
            else "Python closed-loop generator"
        )
        + f" for closed loops, Python open-loop generator ({args.gen_procs} process(es)) for 'rate'"
    )
    p(f"  relay   : {relay_cmd}")
    p(f"  bare app: bench/bare_app.py on the {args.bare_loop} event loop")
    p(
        f"  each run: {args.duration:g} s; track {args.connections} conn; "
        f"batch {args.batch_connections} conn x {args.batch_size} events; "
        f"rate {args.rate:g} req/s over <= {args.rate_connections} conn"
    )
    for name, ok in started.items():
        if not ok:
            p(f"  !! {name} did not start: no figures for it")
    p()
    hdr = (
        f"{'scenario':<8} {'server':<6} {'req/s':>9} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'fail':>6} {'srv cpu':>7} {'gen cpu':>7} {'other':>6} {'spool end':>9} {'drained':>10} "
        f"{'wh ev/s':>9} {'wh rows':>10} {'rss/peak MB':>12}"
    )
    p(hdr)
    p("-" * len(hdr))
    for r in rows:
        L = r.load
        drained = (
            "-"
            if r.spool_after is None
            else (
                f"0 in {r.drain_secs:.1f}s" if r.spool_after == 0 else f"{r.spool_after:,.0f} left"
            )
        )
        rss = f"{fmt(r.rss_mb)}/{fmt(r.hwm_mb)}" if r.server == "relay" else "-"
        p(
            f"{r.scenario:<8} {r.server:<6} {fmt(L.req_per_s):>9} {fmt(r.events_per_s):>10} "
            f"{fmt(L.p50_ms, '.2f'):>8} {fmt(L.p99_ms, '.2f'):>8} {L.failed:>6} "
            f"{fmt(L.server_cpu_pct, '.0f'):>6}% {fmt(L.gen_cpu_pct, '.0f'):>6}% "
            f"{fmt(L.other_cpu_pct, '.0f'):>5}% "
            f"{fmt(r.spool_end):>9} {drained:>10} {fmt(r.delivered_per_s):>9} "
            f"{fmt(r.rows_after, ','):>10} {rss:>12}"
        )
    p()
    p("notes:")
    notes = [f"  {r.scenario}/{r.server}: {n}" for r in rows for n in row_notes(args, r)]
    p("\n".join(notes) if notes else "  none")
    p()
    p("load commands:")
    seen = set()
    for r in rows:
        key = (r.scenario, r.server)
        if key not in seen and r.load.command:
            seen.add(key)
            p(f"  {r.scenario}/{r.server}: {r.load.command}")
    p()
    print_targets(args, rows)


def row_notes(args: argparse.Namespace, r: Row) -> list[str]:
    """What a reader needs besides the table: whether the load generator kept up, whether
    the counts agree, and what the relay's own metrics say."""
    L = r.load
    out: list[str] = []
    if r.runs > 1:
        out.append(
            f"median of {r.runs} runs; req/s of each: "
            + ", ".join(f"{x:,.0f}" for x in r.run_rates)
        )
    if L.offered_rate is not None:
        lag = (
            f"send lag p99 {L.send_lag_p99_ms:.1f} ms, max {L.max_send_lag_ms:.1f} ms"
            if L.send_lag_p99_ms is not None and L.max_send_lag_ms is not None
            else ""
        )
        behind = L.offered_rate < 0.97 * args.rate
        out.append(
            f"open loop offered {L.offered_rate:,.0f} req/s of {args.rate:g} ({lag})"
            + ("; THE GENERATOR COULD NOT KEEP THE SCHEDULE" if behind else "")
        )
    elif L.gen_cpu_pct is not None and L.gen_cpu_pct >= 90 * L.gen_workers:
        out.append(
            f"load generator at {L.gen_cpu_pct:.0f}% CPU: it may be the bottleneck of this run"
        )
    if L.ok_requests and L.server_cpu_s is not None and r.runs == 1:
        main = (
            f"main thread (event loop) {1e6 * L.main_cpu_s / L.ok_requests:,.0f} us, "
            if L.main_cpu_s is not None
            else ""
        )
        out.append(
            f"CPU per acknowledged request: {main}"
            f"all server processes {1e6 * L.server_cpu_s / L.ok_requests:,.0f} us"
        )
    if L.steal_pct is not None and L.steal_pct >= 5:
        out.append(f"hypervisor steal {L.steal_pct:.0f}% of a core during the run")
    if L.other_cpu_pct is not None and L.other_cpu_pct >= 20:
        out.append(
            f"other processes used {L.other_cpu_pct:.0f}% of a core during the run "
            "(figures disturbed)"
        )
    if r.accepted is not None and r.expected_events:
        # wrk stops with requests in flight, which the relay may still accept: up to one
        # request per connection and run is not a discrepancy.
        allowance = r.connections * r.events_per_request * r.runs
        if abs(r.accepted - r.expected_events) > allowance:
            out.append(
                f"relay counted {r.accepted:,.0f} events accepted, the load generator "
                f"{r.expected_events:,} (2xx x events/request)"
            )
    if r.server == "relay":
        if r.http_count:
            out.append(
                f"relay's own mean handling time {1000 * (r.http_sum or 0) / r.http_count:.2f} ms"
                " (tagrelay_http_request_duration_seconds)"
            )
        if r.commits:
            out.append(f"{(r.accepted or 0) / r.commits:,.1f} events per spool commit")
        if r.rejected:
            out.append(f"{r.rejected:,.0f} events rejected")
        if r.dead_letters:
            out.append(f"{r.dead_letters:,.0f} dead letters")
        if r.duplicates:
            out.append(f"warehouse skipped {r.duplicates:,.0f} duplicate messageIds")
        if r.relay_rss_mb is not None and r.warehouse_rss_mb is not None:
            out.append(
                f"RSS now/peak: relay process {r.relay_rss_mb:,.0f}/{fmt(r.relay_hwm_mb)} MB, "
                f"warehouse process {r.warehouse_rss_mb:,.0f}/{fmt(r.warehouse_hwm_mb)} MB, "
                f"sum {fmt(r.rss_mb)}/{fmt(r.hwm_mb)} MB (the peaks of the two may not "
                "coincide: their sum is an upper bound)"
            )
        if r.rows_error:
            out.append(f"no warehouse row count: {r.rows_error}")
        elif (
            r.rows_after is not None
            and r.accepted_since_start is not None
            and r.rows_after != r.accepted_since_start
        ):
            out.append(
                f"warehouse has {r.rows_after:,} rows, the relay accepted "
                f"{r.accepted_since_start:,.0f} events since it started (warm-up included)"
            )
    out.extend(L.notes)
    return out


def print_targets(args: argparse.Namespace, rows: list[Row]) -> None:
    get = {(r.scenario, r.server): r for r in rows}
    verdicts: list[tuple[bool | None, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")

    t, b = get.get(("track", "relay")), get.get(("track", "bare"))
    if t and b and b.load.req_per_s:
        ratio = t.load.req_per_s / b.load.req_per_s
        verdicts.append(
            (
                ratio >= TARGETS["track_ratio"],
                f"single-event rate relay/bare = {ratio:.2f} (>= {TARGETS['track_ratio']:.2f})",
            )
        )
    else:
        verdicts.append((None, "single-event rate relay/bare (needs track on both)"))
    r = get.get(("batch", "relay"))
    verdicts.append(
        (None, "batch events/s (needs batch on the relay)")
        if not r
        else (
            r.events_per_s >= TARGETS["batch_events_per_s"],
            f"/v1/batch x{args.batch_size}: {r.events_per_s:,.0f} events/s "
            f"(>= {TARGETS['batch_events_per_s']:,})",
        )
    )
    r = get.get(("rate", "relay"))
    if r and r.load.p99_ms is not None:
        achieved = r.load.req_per_s
        ok = (
            r.load.p99_ms <= TARGETS["rate_p99_ms"]
            and achieved >= 0.97 * args.rate
            and r.load.failed == 0
        )
        verdicts.append(
            (
                ok,
                f"p99 at {args.rate:g} req/s: {r.load.p99_ms:.2f} ms "
                f"(<= {TARGETS['rate_p99_ms']:g}), achieved {achieved:,.0f} req/s, "
                f"{r.load.failed} failed",
            )
        )
    else:
        verdicts.append((None, f"p99 at {args.rate:g} req/s (needs rate on the relay)"))
    relay_rows = [x for x in rows if x.server == "relay" and x.hwm_mb is not None]
    if relay_rows:
        peak = max(x.hwm_mb or 0 for x in relay_rows)
        verdicts.append(
            (
                peak <= TARGETS["rss_mb"],
                f"relay peak RSS (VmHWM, relay + warehouse process) {peak:.0f} MB "
                f"(<= {TARGETS['rss_mb']:g})",
            )
        )
        relay_only = [x.relay_hwm_mb for x in relay_rows if x.relay_hwm_mb is not None]
        warehouse_only = [x.warehouse_hwm_mb for x in relay_rows if x.warehouse_hwm_mb is not None]
        if relay_only and warehouse_only:
            # Information, not a second verdict: the target above is judged on the sum.
            verdicts.append(
                (
                    None,
                    f"  of which: relay process peak {max(relay_only):.0f} MB, warehouse "
                    f"process peak {max(warehouse_only):.0f} MB",
                )
            )
    else:
        verdicts.append((None, "relay RSS"))
    kept = []
    for x in rows:
        if x.server != "relay" or x.spool_end is None:
            continue
        accepted = x.accepted or 0
        bound = max(2 * WAREHOUSE_MAX_EVENTS, 0.02 * accepted)
        kept.append((x.scenario, x.spool_end <= bound and x.spool_after == 0, x.spool_end, bound))
    if kept:
        ok = all(k[1] for k in kept)
        detail = "; ".join(
            f"{s}: end {e:,.0f} (<= {bd:,.0f}){'' if k else ' NO'}" for s, k, e, bd in kept
        )
        verdicts.append(
            (ok, f"warehouse keeps up (spool depth at end small, drained to 0): {detail}")
        )
    else:
        verdicts.append((None, "warehouse keeps up (needs tagrelay_spool_depth in /metrics)"))
    print("targets (one relay process):")
    for ok, text in verdicts:
        print(f"  [{verdict(ok)}] {text}")


# --------------------------------------------------------------------------------------


def add_load_options(p: argparse.ArgumentParser) -> None:
    """The options of the load, the runs and the output that ``fanout_bench.py`` shares."""
    p.add_argument(
        "--duration", type=float, default=15.0, help="seconds per scenario and server (default 15)"
    )
    p.add_argument(
        "--connections", type=int, default=64, help="connections for 'track' (default 64)"
    )
    p.add_argument(
        "--rate", type=float, default=2000.0, help="requests/s for 'rate' (default 2000)"
    )
    p.add_argument(
        "--rate-connections",
        type=int,
        default=256,
        help="most connections the open-loop generator may open (default 256)",
    )
    p.add_argument(
        "--gen-procs",
        type=int,
        default=1,
        help="processes for the Python load generators, the load split evenly (default 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="wrk threads (default 1: one core for wrk, one for the server)",
    )
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="closed-loop load: wrk if installed (auto), or the Python generator",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each scenario per server, the servers alternating; ingest_bench.py "
        "reports the median run (default 1)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of untimed load per server first (default 2)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for /healthz (default 60)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (config, data, server logs)",
    )
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ingest_bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_load_options(p)
    p.add_argument(
        "--batch-connections", type=int, default=16, help="connections for 'batch' (default 16)"
    )
    p.add_argument(
        "--batch-size", type=int, default=100, help="events per /v1/batch request (default 100)"
    )
    p.add_argument("--only", choices=("relay", "bare"), help="run against one server only")
    p.add_argument(
        "--bare-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the bare app's event loop (default asyncio, the plain aiohttp app the targets "
        "compare with; the relay serves on uvloop where it is installed)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default all)",
    )
    p.add_argument(
        "--drain-secs",
        type=float,
        default=30.0,
        help="after each relay run, wait at most this long for the spool to drain (default 30)",
    )
    p.add_argument(
        "--relay-cmd",
        help="command starting the relay; {config} {host} {port} {data_dir} are filled in "
        "(default: .venv/bin/tagrelay serve --config {config} --host {host} --port {port} "
        "--data-dir {data_dir})",
    )
    p.add_argument(
        "--no-sql", action="store_true", help="do not count warehouse rows with 'tagrelay sql'"
    )
    p.add_argument(
        "--encryption",
        choices=("off", "on"),
        default="off",
        help="on: the relay encrypts the spool at rest (encryption.keys, a fresh key); "
        "bench/encryption_bench.py compares both (default off)",
    )
    p.add_argument(
        "--spool",
        choices=("sqlite", "jetstream"),
        default="sqlite",
        help="jetstream: the relay's spool on NATS JetStream (a stream of the run's own on "
        "--nats, R1, file storage); bench/jetstream_bench.py compares the two (default sqlite)",
    )
    p.add_argument(
        "--nats", default="nats://127.0.0.1:4222", help="the NATS server for --spool jetstream"
    )
    args = p.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenario_list if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    return args


def interrupt_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so that the servers are stopped."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Also SIGINT: a shell without job control starts background commands with SIGINT
    # ignored, and Python would then never raise KeyboardInterrupt.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)


def find_wrk(args: argparse.Namespace) -> str | None:
    if args.loadgen == "python":
        return None
    path = shutil.which("wrk")
    if path is None:
        msg = (
            "wrk is not installed (Debian/Ubuntu: apt-get install -y wrk); "
            "using the Python closed-loop generator, which may itself be the bottleneck"
        )
        if args.loadgen == "wrk":
            log("--loadgen wrk: " + msg)
        else:
            log(msg)
    return path


def main(argv: list[str]) -> int:
    if argv[:1] == ["_loadgen"]:
        loadgen_main(argv[1:])
        return 0
    args = parse_args(argv)
    args.wrk = find_wrk(args)

    interrupt_on_signals()

    tmp = Path(tempfile.mkdtemp(prefix="tagrelay-bench-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    config = tmp / "tagrelay.yaml"
    if args.encryption == "on":
        os.environ[ENCRYPTION_KEY_ENV] = base64.b64encode(os.urandom(32)).decode()
    config.write_text(
        CONFIG_TEMPLATE.format(
            data_dir=data_dir,
            key=WRITE_KEY,
            forwarder=FORWARDER,
            max_events=WAREHOUSE_MAX_EVENTS,
            encryption=ENCRYPTION_CONFIG if args.encryption == "on" else "",
            spool=(
                JETSTREAM_CONFIG.format(url=args.nats, stream=f"bench_{os.getpid()}")
                if args.spool == "jetstream"
                else ""
            ),
        )
    )
    relay_port, bare_port = free_port(), free_port()
    relay_template = args.relay_cmd or (
        f"{shlex.quote(str(REPO / '.venv' / 'bin' / 'tagrelay'))} serve --config {{config}} "
        "--host {host} --port {port} --data-dir {data_dir}"
    )
    fill = {
        "config": shlex.quote(str(config)),
        "host": HOST,
        "port": str(relay_port),
        "data_dir": shlex.quote(str(data_dir)),
    }
    relay_cmd = relay_template.format(**fill)
    servers: dict[str, Server] = {}
    if args.only in (None, "bare"):
        servers["bare"] = Server(
            "bare",
            [
                sys.executable,
                str(BENCH_DIR / "bare_app.py"),
                "--host",
                HOST,
                "--port",
                str(bare_port),
                "--loop",
                args.bare_loop,
            ],
            bare_port,
            tmp,
        )
    if args.only in (None, "relay"):
        servers["relay"] = Server("relay", shlex.split(relay_cmd), relay_port, tmp)

    rows: list[Row] = []
    started: dict[str, bool] = {}
    interrupted = False
    try:
        for name, srv in servers.items():
            log(f"starting {name}: {shlex.join(srv.cmd)}")
            try:
                srv.start()
                ok = srv.wait_healthy(args.start_timeout)
            except OSError as exc:
                log(f"{name} could not be started: {exc}")
                ok = False
            started[name] = ok
            if not ok:
                log(
                    f"{name} did not become healthy on {srv.base}/healthz; "
                    f"its output:\n{srv.log_tail()}"
                )
                srv.stop()
        live = [s for n, s in servers.items() if started[n]]
        if "relay" in servers and started.get("relay") and spool_depth(servers["relay"]) is None:
            log(
                "relay /metrics has no tagrelay_spool_depth"
                '{forwarder="warehouse"}: no spool figures'
            )
        if args.warmup > 0:
            for srv in live:
                log(f"warm-up {srv.name} ({args.warmup:g} s)")
                closed_loop(args, srv, "track", min(args.connections, 16), args.warmup)
                if srv.name == "relay":
                    drain(srv, args.drain_secs)
        # Per scenario, bare first and then the relay, so that the relay's warehouse drain
        # (which continues after its run) never overlaps another measured run.
        order = sorted(live, key=lambda s: s.name != "bare")
        for scenario in args.scenario_list:
            runs: dict[str, list[Row]] = {srv.name: [] for srv in order}
            for i in range(args.repeat):
                for srv in list(order):
                    tag = f" run {i + 1}/{args.repeat}" if args.repeat > 1 else ""
                    log(f"{scenario} against {srv.name}{tag} ({args.duration:g} s)")
                    one = run_scenario(args, scenario, srv)
                    runs[srv.name].append(one)
                    log(
                        f"  {one.load.req_per_s:,.0f} req/s, p50 {fmt(one.load.p50_ms, '.2f')} ms, "
                        f"p99 {fmt(one.load.p99_ms, '.2f')} ms, {one.load.failed} failed"
                    )
                    if srv.proc is not None and srv.proc.poll() is not None:
                        log(
                            f"{srv.name} exited (code {srv.proc.returncode}) during "
                            f"{scenario}:\n{srv.log_tail()}"
                        )
                        order = [s for s in order if s is not srv]
                        started[srv.name] = False
            for name, srv_runs in runs.items():
                if not srv_runs:
                    continue
                row = combine(srv_runs)
                if name == "relay" and not args.no_sql and started.get("relay"):
                    row.rows_after, row.rows_error = warehouse_rows(config, data_dir)
                rows.append(row)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping the servers")
    finally:
        for srv in servers.values():
            srv.stop()
        if args.spool == "jetstream":
            delete_streams(args.nats, f"bench_{os.getpid()}")
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print_report(args, rows, started, relay_cmd if "relay" in servers else "(not run)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {
                        k: v
                        for k, v in vars(args).items()
                        if isinstance(v, (int, float, str, list, type(None)))
                    },
                    "rows": [
                        {
                            **{k: v for k, v in r.__dict__.items() if k != "load"},
                            "events_per_s": r.events_per_s,
                            "load": {**r.load.__dict__, "req_per_s": r.load.req_per_s},
                        }
                        for r in rows
                    ],
                },
                indent=2,
                default=str,
            )
        )
    if interrupted:
        return 130
    return 0 if all(started.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
