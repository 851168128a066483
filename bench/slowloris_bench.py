"""Slow and idle clients against ``tagrelay serve``: are they closed, and does /healthz stay fast?

Opens N slowloris connections (a request head sent a byte a second), N slow bodies (a whole
head, then the body a byte a second) and N idle keep-alive connections (one request answered,
then nothing), all at once. It counts how many of each are still open 1 s after each of the
relay's time limits has passed (for the last connection opened), and how long each lived,
while it times ``GET /healthz`` on a new connection every 0.2 s.

By default it starts its own relay (``tagrelay serve`` on a free port of 127.0.0.1, a
temporary data directory, the time limits given here); ``--url`` points it at one already
running (then pass that relay's limits, which only decide when the counts are printed).

    .venv/bin/python bench/slowloris_bench.py                       # the production defaults
    .venv/bin/python bench/slowloris_bench.py --slowloris 2000 --slow-bodies 500 --idle 5000

It exits 0 whatever the figures are (1 when the relay did not start). Traffic goes to the
relay's address only, and the run ends after the longest limit plus ``--margin``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

CONFIG = """\
data_dir: {data_dir}
admin: {{listen: "127.0.0.1:0"}}
keys:
  - {{id: backend, kind: server, key: bench-server-key}}
logging: {{level: warning, format: json}}
server:
  header_timeout_secs: {header}
  body_timeout_secs: {body}
  keepalive_timeout_secs: {keepalive}
  max_connections: {max_connections}
"""


SERVE = [sys.executable, "-m", "tagrelay.cli.main", "serve"]
AUTH = b"Authorization: Basic " + base64.b64encode(b"bench-server-key:") + b"\r\n"


@dataclass
class Kind:
    name: str
    limit: float
    opened: int = 0
    failed: int = 0
    lifetimes: list[float] = field(default_factory=list)
    """Of each connection the server closed: from its opening to its close."""

    def still_open(self) -> int:
        return self.opened - len(self.lifetimes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_own_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def wait_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: Kind, opened_at: float
) -> None:
    """Read until the server closes (``writer`` is held here: a StreamWriter that is
    garbage-collected closes its connection)."""
    try:
        while await reader.read(65536):
            pass
    except (ConnectionError, OSError):
        pass
    kind.lifetimes.append(time.monotonic() - opened_at)
    writer.close()


async def drip(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """A byte every ``every`` seconds, until the data ends or the server hangs up."""
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every)
    except (ConnectionError, OSError):
        pass


async def open_one(host: str, port: int, kind: Kind, tasks: set[asyncio.Task[None]]) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        kind.failed += 1
        return
    opened_at = time.monotonic()
    kind.opened += 1
    head = f"POST /v1/track HTTP/1.1\r\nHost: {host}\r\n".encode()
    if kind.name == "slowloris":
        writer.write(head)
        tasks.add(asyncio.create_task(drip(writer, b"X-Slow: a\r\n" * 1000, 1.0)))
    elif kind.name == "slow body":
        # With a valid key: the route reads the body (a refused request would not).
        writer.write(
            head + AUTH + b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        tasks.add(asyncio.create_task(drip(writer, b"x" * 100_000, 1.0)))
    else:  # idle keep-alive: one request answered, then nothing
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
    tasks.add(asyncio.create_task(wait_closed(reader, writer, kind, opened_at)))


async def probe(host: str, port: int, latencies: list[float], stop: asyncio.Event) -> None:
    """``GET /healthz`` on a new connection every 0.2 s; a failure counts as 10 s."""
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    while not stop.is_set():
        began = time.perf_counter()
        try:
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(request)
                answer = await reader.read()
                writer.close()
            ok = answer.startswith(b"HTTP/1.1 200")
        except (TimeoutError, OSError):
            ok = False
        latencies.append(time.perf_counter() - began if ok else 10.0)
        await asyncio.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, host: str, port: int) -> None:
    kinds = [
        Kind("slowloris", args.header_timeout),
        Kind("slow body", args.body_timeout),
        Kind("idle", args.keepalive_timeout),
    ]
    counts = {"slowloris": args.slowloris, "slow body": args.slow_bodies, "idle": args.idle}
    tasks: set[asyncio.Task[None]] = set()
    latencies: list[float] = []
    stop = asyncio.Event()
    start = time.monotonic()
    prober = asyncio.create_task(probe(host, port, latencies, stop))
    # Open in rounds that fit the listen backlog, all kinds interleaved.
    plan = [k for k in kinds for _ in range(counts[k.name])]
    plan = [plan[i] for i in sorted(range(len(plan)), key=lambda i: (i % 97, i))]
    for i in range(0, len(plan), 100):
        await asyncio.gather(*(open_one(host, port, k, tasks) for k in plan[i : i + 100]))
    all_open = time.monotonic()
    opened_in = all_open - start
    print(f"opened {sum(k.opened for k in kinds)} connections in {opened_in:.1f} s", end="")
    print(f" ({sum(k.failed for k in kinds)} failed to connect)")

    # Counted 1 s after each limit has passed for the last connection opened.
    checkpoints = sorted({k.limit for k in kinds} | {max(k.limit for k in kinds) + args.margin})
    rows: list[tuple[float, list[int]]] = []
    for at in checkpoints:
        await asyncio.sleep(max(0.0, all_open + at + 1.0 - time.monotonic()))
        rows.append((at + 1.0, [k.still_open() for k in kinds]))
    stop.set()
    await prober
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    print()
    print(f"{'':>22}" + "".join(f"{k.name:>12}" for k in kinds))
    print(f"{'limit (s)':>22}" + "".join(f"{k.limit:>12g}" for k in kinds))
    print(f"{'opened':>22}" + "".join(f"{k.opened:>12}" for k in kinds))
    for after, still in rows:
        label = f"still open at +{after:g} s"
        print(f"{label:>22}" + "".join(f"{n:>12}" for n in still))
    for label, pick in (("lifetime median (s)", statistics.median), ("lifetime max (s)", max)):
        cells = [f"{pick(k.lifetimes):.1f}" if k.lifetimes else "-" for k in kinds]
        print(f"{label:>22}" + "".join(f"{c:>12}" for c in cells))
    print()
    if latencies:
        print(
            f"/healthz meanwhile: {len(latencies)} probes, median "
            f"{statistics.median(latencies) * 1000:.1f} ms, p99 "
            f"{percentile(latencies, 0.99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms, "
            f"failed {sum(1 for v in latencies if v >= 10.0)}"
        )


def start_relay(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = workdir / "tagrelay.yaml"
    config.write_text(
        CONFIG.format(
            data_dir=workdir / "data",
            header=args.header_timeout,
            body=args.body_timeout,
            keepalive=args.keepalive_timeout,
            max_connections=args.max_connections,
        )
    )
    log = (workdir / "relay.log").open("wb")
    relay = subprocess.Popen(
        [*SERVE, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if relay.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return relay, port
        except OSError:
            time.sleep(0.1)
    relay.kill()
    raise SystemExit(f"the relay did not start; see {workdir / 'relay.log'}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running relay (default: start one)")
    parser.add_argument("--slowloris", type=int, default=2000)
    parser.add_argument("--slow-bodies", type=int, default=500)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--body-timeout", type=float, default=30.0)
    parser.add_argument("--keepalive-timeout", type=float, default=75.0)
    parser.add_argument("--max-connections", type=int, default=10_000)
    parser.add_argument("--margin", type=float, default=5.0, help="seconds after the last limit")
    args = parser.parse_args()
    needed = args.slowloris + args.slow_bodies + args.idle + 100
    if raise_own_limit() < needed:
        print(f"the open-files limit is below the {needed} connections asked for", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="slowloris-bench-") as tmp:
        relay = None
        if args.url:
            url = urllib.parse.urlsplit(args.url)
            host, port = url.hostname or "127.0.0.1", url.port or 80
        else:
            try:
                relay, port = start_relay(args, Path(tmp))
            except SystemExit as exc:
                print(exc, file=sys.stderr)
                return 1
            host = "127.0.0.1"
        try:
            asyncio.run(run(args, host, port))
        except KeyboardInterrupt:
            return 130
        finally:
            if relay is not None:
                os.killpg(relay.pid, signal.SIGTERM)
                try:
                    relay.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(relay.pid, signal.SIGKILL)
                    relay.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
