"""What the live debug view costs: ingest and delivery with no view, with a view connected,
and with ``debug.sample_rate`` set; and, in this process, the cost of each capture step.

Starts ``bench/fake_destinations.py`` and ``tagrelay serve`` (one server write key, the
``ga4`` and ``meta`` forwarders to the fakes, so that the delivery process sends real
requests; the admin listener on a free loopback port) and drives ``POST /v1/track`` and
``/v1/page`` with wrk (``bench/ingest.lua``, its ``conversions`` mix) for ``--duration``
seconds per run, closed loop. Runs alternate, ``--repeat`` times:

  no view      nobody watches, sample_rate 0: capture is off
  view         one client reads /debug/stream all along (as the page does): every request,
               event, outbound request, answer and outcome is captured and streamed

and, on a second relay started alongside with ``debug.sample_rate: --sample-rate``
(idle while the other is measured, and the other way round):

  sampled      nobody watches; that fraction of events is captured (by messageId)

For each: requests/s and latency (wrk's), the CPU the relay process and the delivery
process spent per 1,000 requests, the events the forwarders delivered per second during
the run (both forwarders counted), how long the backlog left took to deliver after it (the
next run starts once it is), and what the view received. Then the micro figures: one check
of the rate, one request recorded, one outbound request redacted, in microseconds.

    .venv/bin/python bench/debug_bench.py                  # about 4 minutes
    .venv/bin/python bench/debug_bench.py --duration 5 --repeat 1

A script, not a test: it prints figures and exits 0 (1 when a server did not start or wrk
is missing). Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
WRITE_KEY = "bench-server-key"
AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
TICKS = os.sysconf("SC_CLK_TCK")

CONFIG = """
data_dir: {data_dir}
server: {{host: {host}, port: {port}}}
admin: {{listen: "{host}:{admin_port}"}}
logging: {{level: warning}}
debug: {{sample_rate: {sample_rate}, buffer_events: 500}}
keys:
  - {{id: bench, kind: server, key: {key}}}
forwarders:
  - id: ga4
    type: ga4
    measurement_id: G-BENCH12345
    api_secret: bench-api-secret
    mp_url: http://{host}:{fake_port}/mp/collect
    batch: {{max_events: 100, max_wait_secs: 0.2}}
  - id: meta
    type: meta
    pixel_id: "123456789012345"
    access_token: bench-meta-token
    base_url: http://{host}:{fake_port}
    batch: {{max_events: 100, max_wait_secs: 0.2}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:  # loopback only
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


@contextlib.contextmanager
def started(cmd: list[str], ready_url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(ready_url, proc)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def cpu_secs(pid: int) -> float:
    """User and system CPU of process ``pid`` so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def delivery_pid(relay: int) -> int | None:
    """The delivery process among the relay's children."""
    for task in Path(f"/proc/{relay}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"tagrelay.forwarders._process" in cmdline:
                    return int(child)
    return None


def scrape(admin: str) -> str:
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as resp:  # loopback only
        return str(resp.read().decode())


def delivered(admin: str) -> float:
    """Events the forwarders delivered so far (all forwarders)."""
    return sum(
        float(m.group(1))
        for m in re.finditer(
            r'^tagrelay_forwarder_events_total\{[^}]*outcome="delivered"[^}]*\} (\S+)$',
            scrape(admin),
            re.M,
        )
    )


def behind(admin: str) -> float:
    """Events the forwarders have yet to deliver (all forwarders)."""
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^tagrelay_spool_depth\{[^}]*\} (\S+)$", scrape(admin), re.M)
    )


def drain(admin: str, timeout: float) -> float:
    """Wait until the forwarders have caught up; the seconds it took (``timeout`` at most)."""
    start = time.monotonic()
    while behind(admin) > 0 and time.monotonic() - start < timeout:
        time.sleep(0.25)
    return time.monotonic() - start


@dataclass
class Viewer:
    """A client reading /debug/stream, as the page does, for as long as it runs."""

    url: str
    records: int = 0
    bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            with urllib.request.urlopen(self.url, timeout=30) as resp:  # loopback only
                ready.set()
                while not self._stop.is_set():
                    line = resp.readline()
                    if not line:
                        return
                    self.bytes += len(line)
                    if line.startswith(b"event: ") and line[7:].strip() in (
                        b"request",
                        b"exchange",
                        b"outcome",
                    ):
                        self.records += 1

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        time.sleep(0.5)  # the relay has told the delivery process

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Run:
    scenario: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    relay_cpu_per_1k: float = 0.0
    delivery_cpu_per_1k: float = 0.0
    delivered_per_sec: float = 0.0
    drain_secs: float = 0.0
    view_records: int = 0
    view_mb: float = 0.0
    errors: int = 0


def load(args: argparse.Namespace, base: str, relay: int, admin: str, scenario: str) -> Run:
    viewer = Viewer(admin + "/debug/stream") if scenario == "view" else None
    if viewer is not None:
        viewer.start()
    child = delivery_pid(relay)
    before = (cpu_secs(relay), cpu_secs(child) if child else 0.0, delivered(admin))
    started_at = time.monotonic()
    cmd = [
        args.wrk,
        "-t1",
        f"-c{args.connections}",
        f"-d{args.duration:g}s",
        "--latency",
        "-s",
        str(BENCH_DIR / "ingest.lua"),
        base,
        "--",
        "conversions",
        "1",
        secrets.token_hex(4),
        AUTH,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
    elapsed = time.monotonic() - started_at
    after = (cpu_secs(relay), cpu_secs(child) if child else 0.0, delivered(admin))
    # The backlog left is delivered before the next run (with the view still there).
    drain_secs = drain(admin, args.drain_secs)
    if viewer is not None:
        viewer.stop()
    found = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
    if not found:
        raise RuntimeError(f"wrk failed: {(out.stderr or out.stdout)[-300:]}")
    w = json.loads(found.group(1))
    requests = max(1.0, w["requests"])
    return Run(
        scenario=scenario,
        rps=w["requests"] / (w["duration_us"] / 1e6),
        p50_ms=w["p50_us"] / 1000,
        p99_ms=w["p99_us"] / 1000,
        relay_cpu_per_1k=(after[0] - before[0]) * 1e6 / requests,
        delivery_cpu_per_1k=(after[1] - before[1]) * 1e6 / requests,
        delivered_per_sec=(after[2] - before[2]) / elapsed,
        drain_secs=drain_secs,
        view_records=viewer.records if viewer else 0,
        view_mb=viewer.bytes / 1e6 if viewer else 0.0,
        errors=int(w["err_status"] + w["err_connect"] + w["err_read"] + w["err_timeout"]),
    )


@dataclass
class Relay:
    base: str
    admin: str
    pid: int


def start_relay(
    stack: contextlib.ExitStack, tmp: Path, fake_port: int, sample_rate: float, name: str
) -> Relay:
    port, admin_port = free_port(), free_port()
    config = tmp / f"tagrelay-{name}.yaml"
    config.write_text(
        CONFIG.format(
            data_dir=tmp / f"data-{name}",
            host=HOST,
            port=port,
            admin_port=admin_port,
            key=WRITE_KEY,
            fake_port=fake_port,
            sample_rate=sample_rate,
        )
    )
    cmd = [sys.executable, "-m", "tagrelay.cli.main", "serve", "--config", str(config)]
    base = f"http://{HOST}:{port}"
    proc = stack.enter_context(started(cmd, base + "/readyz", tmp / f"relay-{name}.log"))
    return Relay(base, f"http://{HOST}:{admin_port}", proc.pid)


def relay_runs(args: argparse.Namespace, tmp: Path, fake_port: int) -> list[Run]:
    """The scenarios, in turns: ``no view`` and ``view`` on a relay without sampling,
    ``sampled`` on one with (both run all along, the idle one waiting; each run starts
    once the previous run's backlog is delivered)."""
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        plain = start_relay(stack, tmp, fake_port, 0.0, "plain")
        plan = [("no view", plain), ("view", plain)]
        if args.sample_rate > 0:
            plan.append(
                ("sampled", start_relay(stack, tmp, fake_port, args.sample_rate, "sampled"))
            )
        warm = argparse.Namespace(**{**vars(args), "duration": 2})
        for relay in {r.pid: r for _, r in plan}.values():
            # Imports, caches, the delivery process's first requests.
            load(warm, relay.base, relay.pid, relay.admin, "warm")
        for _ in range(args.repeat):
            for scenario, relay in plan:
                run = load(args, relay.base, relay.pid, relay.admin, scenario)
                print(f"  {scenario:<8} {run.rps:8.0f} req/s", file=sys.stderr)
                runs.append(run)
    return runs


def median_run(runs: list[Run], scenario: str) -> Run | None:
    chosen = sorted((r for r in runs if r.scenario == scenario), key=lambda r: r.rps)
    return chosen[len(chosen) // 2] if chosen else None


def micro() -> list[tuple[str, float]]:
    """Microseconds per call of each capture step, in this process."""
    import orjson

    from tagrelay.capture import DebugHub, sampled
    from tagrelay.forwarders._http import HttpRequest, HttpResponse, captured_exchange

    off = DebugHub()
    on = DebugHub(scrub=lambda text: text.replace("bench-api-secret", "***"))
    event = {
        "type": "track",
        "event": "Order Completed",
        "messageId": "m-1",
        "userId": "u-1",
        "properties": {"revenue": 42.5, "currency": "EUR", "products": [{"sku": "a"}] * 2},
        "context": {"consent": {"analytics": "granted"}, "ip": "203.0.113.7", "page": {}},
    }
    record = {"source": "segment", "key": "bench", "method": "POST", "path": "/v1/track"}
    record |= {"events": [{"messageId": "m-1", "normalized": event}], "status": 200}
    body = orjson.dumps({"client_id": "1.2", "events": [event] * 25})
    request = HttpRequest(
        "POST",
        "http://h/mp/collect?measurement_id=G-1&api_secret=bench-api-secret",
        {"Content-Type": "application/json"},
        body,
    )
    response = HttpResponse(204, {"Date": "x"}, b"")
    steps = {
        "rate check, capture off": lambda: off.rate and None,
        "sampling decision (rate 0.01)": lambda: sampled("m-1234", 0.01),
        "request recorded (1 event)": lambda: on.record("request", record),
        "outbound request redacted (25 events)": lambda: captured_exchange(
            request,
            response,
            ["bench-api-secret"],
            forwarder="ga4",
            message_ids=["m"] * 25,
            started=0.0,
        ),
    }
    figures = []
    for name, step in steps.items():
        number = 200_000 if "check" in name or "sampling" in name else 2_000
        best = min(timeit.repeat(step, number=number, repeat=5)) / number
        figures.append((name, best * 1e6))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds per run (10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument(
        "--sample-rate", type=float, default=0.01, help="the sampled relay's rate (0.01; 0: skip)"
    )
    parser.add_argument(
        "--drain-secs",
        type=float,
        default=120,
        help="after each run, how long to wait for the forwarders to catch up (120)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    args.wrk = shutil.which("wrk")
    if args.wrk is None:
        print("wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="tagrelay-debug-bench-"))
    fake_port = free_port()
    fake_cmd = [sys.executable, str(BENCH_DIR / "fake_destinations.py"), "--port", str(fake_port)]
    try:
        with started(fake_cmd, f"http://{HOST}:{fake_port}/healthz", tmp / "fakes.log"):
            runs = relay_runs(args, tmp, fake_port)
    except RuntimeError as exc:
        print(f"error: {exc} (logs in {tmp})", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    cores = os.cpu_count()
    print(
        f"\nPOST /v1/track and /v1/page (conversions mix), wrk -t1 -c{args.connections}, "
        f"{args.duration:g} s per run, median of {args.repeat}; {cores} cores; forwarders ga4 "
        "and meta in the delivery process\n"
    )
    head = (
        f"{'scenario':<10} {'req/s':>8} {'vs off':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'relay CPU':>10} {'delivery CPU':>13} {'delivered/s':>12} {'drained':>8} "
        f"{'view records':>13}"
    )
    print(head)
    print(
        f"{'':<10} {'':>8} {'':>7} {'':>7} {'':>7} {'ms/1k req':>10} {'ms/1k req':>13} "
        f"{'':>12} {'after s':>8}"
    )
    baseline = median_run(runs, "no view")
    for scenario in ("no view", "view", "sampled"):
        run = median_run(runs, scenario)
        if run is None:
            continue
        ratio = run.rps / baseline.rps if baseline and baseline.rps else 0.0
        view = f"{run.view_records} ({run.view_mb:.1f} MB)" if run.view_records else "-"
        print(
            f"{scenario:<10} {run.rps:8.0f} {ratio:7.2f} {run.p50_ms:7.2f} {run.p99_ms:7.2f} "
            f"{run.relay_cpu_per_1k:10.0f} {run.delivery_cpu_per_1k:13.0f} "
            f"{run.delivered_per_sec:12.0f} {run.drain_secs:8.1f} {view:>13}"
            + (f"  ({run.errors} errors)" if run.errors else "")
        )
    spread = [r.rps for r in runs if r.scenario == "no view"]
    if len(spread) > 1:
        print(
            f"\nno view, runs: {', '.join(f'{r:.0f}' for r in spread)} req/s "
            f"(stdev {statistics.pstdev(spread):.0f})"
        )
    print("\nper call, in this process (best of 5):")
    for name, micros in micro():
        print(f"  {name:<40} {micros:9.3f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
