"""Decompression bombs against one ``tagrelay serve``: what a bomb costs the event loop, and
how long ``/healthz`` waits while four arrive at once.

Starts ``tagrelay serve`` (its own temporary data dir and config, no forwarders) on a free
loopback port, then for each content coding (gzip, deflate, br, zstd) makes one bomb: a
body at most ``limits.max_request_bytes`` long as sent that inflates far past it (br and
zstd: 1 GiB from a few KB; gzip and deflate: about 480 MiB, the most their ~1,000:1 ratio
fits under the limit), and

  alone   sends it ``--rounds`` times, one after the other, to ``/v1/batch`` (every answer
          must be a 413 ``body_too_large``) and to an unknown path (404: the relay reads
          no body there, but the server drains it); prints the relay's CPU per bomb, for
          its main thread (the event loop) and for the whole process (threads included),
          and the median time to the answer;
  four    sends four at once, ``--rounds`` times, while a probe asks ``/healthz`` every
          10 ms on a connection of its own: prints /healthz's median and worst latency.

Targets (issue 12): under 50 ms of event-loop CPU per bomb of any coding, and /healthz
within 250 ms while four bombs arrive at once.

    PYTHONPATH=src .venv/bin/python bench/bomb_bench.py
    PYTHONPATH=src .venv/bin/python bench/bomb_bench.py --rounds 5 --codings br,zstd

The relay is started as ``tagrelay serve`` from the same directory as this Python (so
``PYTHONPATH`` chooses the sources), or with ``--relay-cmd``. Only loopback is used. Exit
status: 0 when the relay started and every bomb got its 413 or 404 (targets met or not), 1
otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import brotli

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from ingest_bench import (  # noqa: E402 - the bench folder is not a package
    HOST,
    Server,
    cpu_seconds,
    free_port,
    thread_cpu_seconds,
)

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd

KEY = "bomb-bench-key"
AUTH = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
LIMIT = 500 * 1024  # limits.max_request_bytes, the default
CONFIG = """\
data_dir: {data_dir}
keys:
  - id: bench
    kind: server
    key: {key}
forwarders: []
logging:
  level: warning
"""
CHUNK = b"\0" * (1 << 20)
CPU_TARGET_MS = 50.0
HEALTHZ_TARGET_MS = 250.0


def log(message: str) -> None:
    print(f"[bomb {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _stream(process: Callable[[bytes], bytes], finish: Callable[[], bytes], mib: int) -> bytes:
    parts = [process(CHUNK) for _ in range(mib)]
    parts.append(finish())
    return b"".join(parts)


def make_bombs(codings: list[str]) -> Iterator[tuple[str, bytes, int]]:
    """(coding, body, inflated MiB) for each coding, compressed as a stream (no GiB in
    memory)."""
    for coding in codings:
        if coding in ("gzip", "deflate"):
            mib = 480
            wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
            z = zlib.compressobj(9, zlib.DEFLATED, wbits)
            body = _stream(z.compress, z.flush, mib)
        elif coding == "br":
            mib = 1024
            b = brotli.Compressor(quality=5)
            body = _stream(b.process, b.finish, mib)
        else:
            mib = 1024
            c = zstd.ZstdCompressor()
            body = _stream(c.compress, c.flush, mib)
        assert len(body) <= LIMIT, (coding, len(body))
        yield coding, body, mib


async def send_bomb(
    session: aiohttp.ClientSession, url: str, coding: str, body: bytes, expected: int
) -> float:
    """Seconds to the answer; raises when it is not ``expected`` with a JSON error."""
    start = time.perf_counter()
    headers = {
        "Authorization": AUTH,
        "Content-Type": "application/json",
        "Content-Encoding": coding,
    }
    async with session.post(url, data=body, headers=headers) as resp:
        answer = await resp.read()
        if resp.status != expected or b'"error"' not in answer:
            raise RuntimeError(f"{coding} bomb answered {resp.status}: {answer[:200]!r}")
    return time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def probe(url: str, stop: asyncio.Event, latencies: list[float]) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            start = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.01)


TARGETS = (("/v1/batch", 413), ("/nope", 404))
"""Where bombs go: an ingest route, which reads the body (413 ``body_too_large``), and an
unknown path, which reads none (404; the server still drains the body after answering)."""


async def run(relay: Server, codings: list[str], rounds: int) -> list[str]:
    assert relay.proc is not None
    pid = relay.proc.pid
    rows: list[str] = []
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for coding, body, mib in make_bombs(codings):
            for path, expected in TARGETS:
                url = relay.base + path
                # alone
                loop_before = thread_cpu_seconds(pid) or 0.0
                all_before = cpu_seconds(relay.pids())
                answers = [
                    await send_bomb(session, url, coding, body, expected) for _ in range(rounds)
                ]
                loop_ms = ((thread_cpu_seconds(pid) or 0.0) - loop_before) * 1000 / rounds
                all_ms = (cpu_seconds(relay.pids()) - all_before) * 1000 / rounds
                # four at once, /healthz probed meanwhile
                latencies: list[float] = []
                stop = asyncio.Event()
                prober = asyncio.create_task(probe(relay.base + "/healthz", stop, latencies))
                while not latencies:
                    await asyncio.sleep(0.005)
                for _ in range(rounds):
                    await asyncio.gather(
                        *(send_bomb(session, url, coding, body, expected) for _ in range(4))
                    )
                stop.set()
                await prober
                rows.append(
                    f"{coding:8} {path:10} {len(body):>9,} {mib:>6,} {loop_ms:>9.1f} "
                    f"{all_ms:>9.1f} {statistics.median(answers) * 1000:>9.1f} "
                    f"{statistics.median(latencies) * 1000:>9.1f} "
                    f"{_percentile(latencies, 0.99) * 1000:>9.1f} {max(latencies) * 1000:>9.1f}"
                )
                log(rows[-1])
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20, help="bombs per coding and mode")
    p.add_argument(
        "--codings", default="gzip,deflate,br,zstd", help="comma-separated (default all four)"
    )
    p.add_argument(
        "--relay-cmd",
        help="command starting the relay; {config} {host} {port} {data_dir} are filled in",
    )
    args = p.parse_args(argv)
    codings = [c.strip() for c in args.codings.split(",") if c.strip()]

    tmp = Path(tempfile.mkdtemp(prefix="tagrelay-bomb-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    config = tmp / "tagrelay.yaml"
    config.write_text(CONFIG.format(data_dir=data_dir, key=KEY))
    port = free_port()
    template = args.relay_cmd or (
        f"{shlex.quote(str(Path(sys.executable).with_name('tagrelay')))} serve "
        "--config {config} --host {host} --port {port} --data-dir {data_dir}"
    )
    cmd = template.format(
        config=shlex.quote(str(config)),
        host=HOST,
        port=port,
        data_dir=shlex.quote(str(data_dir)),
    )
    relay = Server("relay", shlex.split(cmd), port, tmp)
    log(f"starting relay: {cmd}")
    relay.start()
    try:
        if not relay.wait_healthy(30):
            log("the relay did not start:\n" + relay.log_tail())
            return 1
        try:
            rows = asyncio.run(run(relay, codings, args.rounds))
        except RuntimeError as exc:
            log(str(exc))
            return 1
    finally:
        relay.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"decompression bombs against tagrelay serve ({args.rounds} rounds per row)")
    print(f"  command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print()
    print(
        f"{'coding':8} {'path':10} {'sent B':>9} {'MiB':>6} {'loop ms':>9} {'proc ms':>9} "
        f"{'answer ms':>9} {'hz p50':>9} {'hz p99':>9} {'hz max':>9}"
    )
    print("-" * 99)
    for row in rows:
        print(row)
    print()
    print("loop ms / proc ms: CPU per bomb sent alone, event-loop thread / whole relay process")
    print("answer ms: median time from sending a bomb alone to its answer (413, or 404)")
    print("hz p50 / p99 / max: /healthz latency while four bombs at a time arrive")
    print(f"targets: loop ms < {CPU_TARGET_MS:.0f}, hz max < {HEALTHZ_TARGET_MS:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
