"""Fan-out benchmark: the relay delivering to every forwarder at once, against fast fakes.

Starts, on free loopback ports:

  bare       bench/bare_app.py (reads the body, answers 204): the ceiling;
  warehouse  tagrelay serve with the warehouse forwarder alone (as ingest_bench.py runs it);
  fanout     tagrelay serve with the warehouse and the --forwarders chosen (ga4, meta,
             tiktok, google_ads: each only when ``tagrelay.forwarders.FORWARDERS`` has it);
  fakes      bench/fake_destinations.py: GA4, Meta, TikTok and Google Ads (and its token
             endpoint), answering at once and counting what they receive;

and drives the three servers with the same load, one after the other (bare, warehouse,
fanout, repeated with --repeat):

  track  closed loop, --connections connections (wrk with bench/ingest.lua, else Python);
  rate   open loop at --rate events/s (ingest_bench.py's Python generator).

The events (``--events conversions``, the default) alternate an ``Order Completed`` with
revenue, currency, products, email and phone traits and a gclid (/v1/track) and a page view
(/v1/page), granting every consent category; ``--events gtag`` sends GA4 hits to
/g/collect instead (the issue's GA4-only case, with ``--forwarders ga4``).

For each relay run it prints the ingest rate, and per forwarder: the events that left its
queue and those delivered per second while the load lasted, its spool depth when the load
stopped, the seconds until that depth reached 0, and what the fake received. Then the
targets of issue 13. ``--profile`` also samples the fan-out relay with py-spy during its
runs and prints where its threads spend their time.

    PYTHONPATH=src .venv/bin/python bench/fanout_bench.py
    PYTHONPATH=src .venv/bin/python bench/fanout_bench.py --scenarios track --forwarders ga4 \\
        --events gtag

Exit status: 0 when every server started and the scenarios ran (whether or not the targets
were met); 1 when a server did not start or stopped; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from ingest_bench import (  # noqa: E402 - the bench folder is not a package
    GTAG_MEASUREMENT_ID,
    HOST,
    WRITE_KEY,
    LoadResult,
    Server,
    add_load_options,
    closed_loop,
    cpu_seconds,
    find_wrk,
    fmt,
    free_port,
    interrupt_on_signals,
    log,
    run_python_load,
    scrape_metrics,
)

ALL_FORWARDERS = ("warehouse", "ga4", "meta", "tiktok", "google_ads")
SCENARIOS = ("track", "rate")
SERVERS = ("bare", "warehouse", "fanout")
KEEP_UP_EVENTS = 2000
"""A forwarder keeps up when its spool depth at the end of a run is at most this (a second
of arrivals at 2,000 events/s) or 2% of the events accepted in the run, and then drains."""
TARGETS = {"ingest_ratio": 0.90, "delivered_share": 0.50, "rate": 2000.0}

# Each destination's fake, as the forwarder's config points at it ({fake} is its base URL).
FORWARDER_CONFIGS: dict[str, dict[str, Any]] = {
    "warehouse": {"batch": {"max_events": 1000, "max_wait_secs": 0.5}},
    "ga4": {
        "measurement_id": GTAG_MEASUREMENT_ID,
        "api_secret": "bench-secret",
        "mp_url": "{fake}/mp/collect",
        "collect_url": "{fake}/g/collect",
    },
    "meta": {"pixel_id": "123456789012345", "access_token": "bench-token", "base_url": "{fake}"},
    "tiktok": {
        "pixel_code": "CBENCH1234567890",
        "access_token": "bench-token",
        "base_url": "{fake}",
    },
    "google_ads": {
        "customer_id": "123-456-7890",
        "developer_token": "bench-developer-token",
        "oauth": {
            "client_id": "bench.apps.googleusercontent.com",
            "client_secret": "bench-secret",
            "refresh_token": "bench-refresh-token",
        },
        "token_url": "{fake}/token",
        "base_url": "{fake}",
        "conversions": [
            {
                "event": "Order Completed",
                "conversion_action": "customers/1234567890/conversionActions/987654321",
            }
        ],
    },
}
# Which counters of the fakes each forwarder's deliveries land in.
FAKE_COUNTERS = {
    "ga4": ("ga4_mp", "ga4_collect"),
    "meta": ("meta",),
    "tiktok": ("tiktok",),
    "google_ads": ("google_ads",),
}


def registered_forwarders() -> set[str]:
    """The forwarder types this checkout's relay knows (run with PYTHONPATH=src)."""
    from tagrelay.forwarders import FORWARDERS

    return set(FORWARDERS)


RELAY_SETTINGS: list[tuple[str, str, Any]] = []
"""``--relay-set SECTION.OPTION=VALUE``: top-level settings of both relays' configs."""


def relay_config(data_dir: Path, forwarders: list[str], fake: str) -> str:
    """The relay's config as JSON (which YAML reads): one server key, GA4 hits of the
    bench's property accepted on /g/collect, and the forwarders, each named by its type."""

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{fake}", fake)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    sections: dict[str, Any] = {}
    for section, option, value in RELAY_SETTINGS:
        sections.setdefault(section, {})[option] = value
    return json.dumps(
        {
            **sections,
            "data_dir": str(data_dir),
            # /metrics on the relay's own port, read after each run; the admin listener on
            # a free port, so that relays can run side by side.
            "metrics": {"public": True},
            "admin": {"listen": "127.0.0.1:0"},
            "keys": [{"id": "backend", "kind": "server", "key": WRITE_KEY}],
            "google": {"collect": {"measurement_ids": [GTAG_MEASUREMENT_ID]}},
            "forwarders": [
                {"id": kind, "type": kind, **fill(FORWARDER_CONFIGS[kind])} for kind in forwarders
            ],
        },
        indent=2,
    )


def fake_counts(fakes: Server) -> dict[str, dict[str, int]]:
    try:
        with urllib.request.urlopen(fakes.base + "/counts", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except (urllib.error.URLError, OSError):
        return {}


# --------------------------------------------------------------------------------------
# Per-forwarder figures from the relay's /metrics


def _series(m: dict[str, float], name: str, *labels: str) -> float:
    """Sum of the series of ``name`` whose label text holds every one of ``labels``
    (absent: 0, as a labelled counter has no series before its first increment)."""
    return sum(
        v
        for k, v in m.items()
        if k.split("{", 1)[0] == name and all(label in k for label in labels)
    )


def forwarder_state(server: Server, forwarders: list[str]) -> dict[str, dict[str, float]] | None:
    """Per forwarder: depth, and the counters of events leaving its queue (out, delivered,
    dropped, dead); plus ``_relay``: accepted events."""
    m = scrape_metrics(server)
    if m is None:
        return None
    out: dict[str, dict[str, float]] = {
        "_relay": {"accepted": _series(m, "tagrelay_events_accepted_total")}
    }
    for f in forwarders:
        fl = f'forwarder="{f}"'
        out[f] = {
            "depth": _series(m, "tagrelay_spool_depth", fl),
            "out": _series(m, "tagrelay_forwarder_events_total", fl),
            "delivered": _series(m, "tagrelay_forwarder_events_total", fl, 'outcome="delivered"'),
            "dropped": _series(m, "tagrelay_forwarder_events_total", fl, 'outcome="dropped"')
            + _series(m, "tagrelay_forwarder_events_total", fl, 'outcome="filtered"'),
            "dead": _series(m, "tagrelay_forwarder_events_total", fl, 'outcome="dead_letter"'),
            "retries": _series(m, "tagrelay_forwarder_retries_total", fl),
        }
    return out


def drain_all(server: Server, forwarders: list[str], max_wait: float) -> dict[str, float | None]:
    """Polls every forwarder's spool depth until all are 0 or ``max_wait`` passes: the
    seconds each took to reach 0 (None: not within ``max_wait``)."""
    t0 = time.monotonic()
    done: dict[str, float | None] = dict.fromkeys(forwarders)
    while True:
        state = forwarder_state(server, forwarders)
        now = time.monotonic() - t0
        if state is not None:
            for f in forwarders:
                if done[f] is None and state[f]["depth"] == 0:
                    done[f] = now
        if all(v is not None for v in done.values()) or now >= max_wait or state is None:
            return done
        time.sleep(0.1)


# --------------------------------------------------------------------------------------
# Runs


@dataclass
class ForwarderRow:
    forwarder: str
    out_per_s: float
    delivered_per_s: float
    dropped: float
    dead: float
    retries: float
    depth_end: float
    drained_secs: float | None
    fake_events: int | None  # what the fakes received during the run and its drain
    fake_requests: int | None


@dataclass
class Run:
    scenario: str
    server: str
    load: LoadResult
    loadavg: float
    accepted: float | None = None
    relay_cpu_s: float | None = None  # the relay process alone (all its threads)
    fakes_cpu_pct: float | None = None
    forwarders: list[ForwarderRow] = field(default_factory=list)
    profile: str | None = None


def run_load(args: argparse.Namespace, scenario: str, server: Server) -> LoadResult:
    if scenario == "track":
        return closed_loop(args, server, args.events, args.connections, args.duration)
    return run_python_load(
        args, server, "open", args.events, args.rate_connections, args.duration, rate=args.rate
    )


def start_profile(args: argparse.Namespace, server: Server, path: Path) -> subprocess.Popen[bytes]:
    assert server.proc is not None
    cmd = [
        args.py_spy,
        "record",
        "--pid",
        str(server.proc.pid),
        "--duration",
        f"{max(1, int(args.duration))}",
        "--format",
        "raw",
        "--threads",
        "--nonblocking",
        *(["--gil"] if args.profile == "gil" else []),
        "--output",
        str(path),
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )


def run_one(
    args: argparse.Namespace,
    scenario: str,
    server: Server,
    forwarders: list[str],
    fakes: Server,
    workdir: Path,
) -> Run:
    is_relay = server.name != "bare"
    before = forwarder_state(server, forwarders) if is_relay else None
    fakes_before = fake_counts(fakes) if is_relay else {}
    relay_cpu0 = cpu_seconds([server.proc.pid]) if is_relay and server.proc else None
    fakes_cpu0, t0 = cpu_seconds(fakes.pids()), time.monotonic()
    profiler = None
    profile_path = workdir / f"profile-{scenario}-{time.monotonic_ns()}.txt"
    if args.profile and server.name == "fanout":
        profiler = start_profile(args, server, profile_path)
    load = run_load(args, scenario, server)
    run = Run(scenario, server.name, load, os.getloadavg()[0])
    run.fakes_cpu_pct = 100 * (cpu_seconds(fakes.pids()) - fakes_cpu0) / (time.monotonic() - t0)
    if not is_relay:
        return run
    after = forwarder_state(server, forwarders)
    if relay_cpu0 is not None and server.proc is not None:
        run.relay_cpu_s = cpu_seconds([server.proc.pid]) - relay_cpu0
    if profiler is not None:
        try:
            profiler.wait(timeout=args.duration + 30)
        except subprocess.TimeoutExpired:
            profiler.kill()
            profiler.wait()
        if profile_path.exists():
            run.profile = summarize_profile(profile_path, args.duration)
    drained = drain_all(server, forwarders, args.drain_secs)
    if before is None or after is None:
        return run
    fakes_after = fake_counts(fakes)
    elapsed = load.elapsed or args.duration
    run.accepted = after["_relay"]["accepted"] - before["_relay"]["accepted"]
    for f in forwarders:
        a, b = after[f], before[f]
        received = requests = None
        if f in FAKE_COUNTERS:

            def got(key: str, f: str = f) -> int:
                return sum(
                    fakes_after.get(c, {}).get(key, 0) - fakes_before.get(c, {}).get(key, 0)
                    for c in FAKE_COUNTERS[f]
                )

            received, requests = got("events"), got("requests")
        run.forwarders.append(
            ForwarderRow(
                forwarder=f,
                out_per_s=(a["out"] - b["out"]) / elapsed,
                delivered_per_s=(a["delivered"] - b["delivered"]) / elapsed,
                dropped=a["dropped"] - b["dropped"],
                dead=a["dead"] - b["dead"],
                retries=a["retries"] - b["retries"],
                depth_end=a["depth"],
                drained_secs=drained[f],
                fake_events=received,
                fake_requests=requests,
            )
        )
    return run


# --------------------------------------------------------------------------------------
# Profile: py-spy's raw (collapsed) stacks, one line "frame;frame;... count" per stack.

THREAD_KINDS = {
    "MainThread": "MainThread (event loop: ingest)",
    "tagrelay-delivery": "tagrelay-delivery (every forwarder's worker)",
}


def thread_kind(first_frame: str) -> str:
    """A stack's thread, from py-spy's ``thread (ID): NAME`` frame; the threads of one
    executor (``ThreadPoolExecutor-0_3``) as one."""
    name = first_frame.split("): ", 1)[1] if "): " in first_frame else first_frame
    name = re.sub(r"_\d+$", "", name)
    return THREAD_KINDS.get(name, name)


def summarize_profile(path: Path, duration: float, top: int = 12) -> str:
    """Per thread kind, its share of a core; the files most of each thread's samples pass
    through (inclusive) and the functions they are in (self)."""
    threads: collections.Counter[str] = collections.Counter()
    by_file: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    by_func: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        kind = thread_kind(frames[0])
        total += count
        threads[kind] += count
        files = set()
        for frame in frames[1:]:
            start, end = frame.rfind("("), frame.rfind(":")
            if 0 <= start < end:
                files.add(frame[start + 1 : end])
        for f in files:
            by_file[kind][f] += count
        by_func[kind][frames[-1]] += count
    if not total:
        return "  (py-spy recorded no samples)"
    rate = total / max(duration, 1e-9)
    lines = [f"  {total:,} samples ({rate:,.0f}/s; 100 per second is one core busy)"]
    for kind, n in threads.most_common():
        lines.append(f"  {kind}: {n / duration:.0f}% of a core ({100 * n / total:.0f}% of samples)")
        lines.append("    through (inclusive): " + ", ".join(
            f"{Path(f).name} {100 * c / n:.0f}%" for f, c in by_file[kind].most_common(top)
        ))  # fmt: skip
        lines.append("    in (self):")
        lines.extend(
            f"      {100 * c / n:4.1f}%  {func}" for func, c in by_func[kind].most_common(top)
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Report


def print_report(
    args: argparse.Namespace,
    runs: list[Run],
    forwarders: list[str],
    missing: list[str],
    loadavg: tuple[float, float],
) -> None:
    p = print
    p()
    p("tagrelay fan-out benchmark")
    p(f"  command  : {shlex.join([sys.executable, *sys.argv])}")
    p(
        f"  machine  : {os.cpu_count()} cores, load average {loadavg[0]:.2f} at the start, "
        f"{loadavg[1]:.2f} at the end (other jobs share the machine)"
    )
    p(f"  fanout   : {', '.join(forwarders)}")
    if missing:
        p(f"  left out : {', '.join(missing)} (not in tagrelay.forwarders.FORWARDERS here)")
    p(
        f"  load     : {args.events} events; track {args.connections} conn "
        f"({'wrk' if args.wrk else 'Python'}), rate {args.rate:g} events/s; "
        f"{args.duration:g} s per run"
    )
    p()
    hdr = (
        f"{'scenario':<8} {'server':<9} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>8} {'fail':>5} "
        f"{'srv cpu':>7} {'relay cpu':>9} {'loop us/ev':>10} {'fakes cpu':>9} {'loadavg':>7}"
    )
    p(hdr)
    p("-" * len(hdr))
    for r in runs:
        L = r.load
        relay_pct = 100 * r.relay_cpu_s / L.elapsed if r.relay_cpu_s and L.elapsed else None
        loop_us = 1e6 * L.main_cpu_s / L.ok_requests if L.main_cpu_s and L.ok_requests else None
        p(
            f"{r.scenario:<8} {r.server:<9} {fmt(L.req_per_s):>9} {fmt(L.p50_ms, '.2f'):>7} "
            f"{fmt(L.p99_ms, '.2f'):>8} {L.failed:>5} {fmt(L.server_cpu_pct, '.0f'):>6}% "
            f"{fmt(relay_pct, '.0f'):>8}% {fmt(loop_us):>10} {fmt(r.fakes_cpu_pct, '.0f'):>8}% "
            f"{r.loadavg:>7.2f}"
        )
    p()
    p("per forwarder, while the load lasted (out: left the queue, delivered or dropped by its")
    p("rules; fake ev, fake req: what the fake destination received during the run and its")
    p("drain)")
    hdr = (
        f"{'scenario':<8} {'server':<9} {'forwarder':<10} {'arrived/s':>9} {'out/s':>8} "
        f"{'deliv/s':>8} {'dropped':>8} {'dead':>5} {'retries':>7} {'depth end':>9} "
        f"{'drained':>9} {'fake ev':>8} {'fake req':>8}"
    )
    p(hdr)
    p("-" * len(hdr))
    for r in runs:
        arrived = r.accepted / r.load.elapsed if r.accepted and r.load.elapsed else None
        for f in r.forwarders:
            drained = "-" if f.drained_secs is None else f"{f.drained_secs:.1f}s"
            if f.drained_secs is None:
                drained = f">{args.drain_secs:g}s"
            p(
                f"{r.scenario:<8} {r.server:<9} {f.forwarder:<10} {fmt(arrived):>9} "
                f"{fmt(f.out_per_s):>8} {fmt(f.delivered_per_s):>8} {fmt(f.dropped):>8} "
                f"{fmt(f.dead):>5} {fmt(f.retries):>7} {fmt(f.depth_end):>9} {drained:>9} "
                f"{fmt(f.fake_events):>8} {fmt(f.fake_requests):>8}"
            )
    notes = [f"  {r.scenario}/{r.server}: {n}" for r in runs for n in r.load.notes]
    if notes:
        p()
        p("notes:")
        p("\n".join(notes))
    for r in runs:
        if r.profile:
            p()
            p(
                f"profile of the fanout relay during {r.scenario} (py-spy, {args.duration:g} s, "
                f"{'samples holding the GIL' if args.profile == 'gil' else 'busy threads'}):"
            )
            p(r.profile)
    p()
    print_targets(args, runs)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def print_targets(args: argparse.Namespace, runs: list[Run]) -> None:
    def verdict(ok: bool | None) -> str:
        return "n/a    " if ok is None else ("met    " if ok else "not met")

    def rates(scenario: str, server: str) -> list[float]:
        return [r.load.req_per_s for r in runs if r.scenario == scenario and r.server == server]

    lines: list[tuple[bool | None, str]] = []
    wh, fo, bare = (rates("track", s) for s in ("warehouse", "fanout", "bare"))
    # Run i of each server ran next to run i of the others: compare within a round.
    ratios = [f / w for w, f in zip(wh, fo, strict=False) if w]
    if ratios:
        ratio = _median(ratios) or 0.0
        pairs = ", ".join(f"{f:,.0f}/{w:,.0f}" for w, f in zip(wh, fo, strict=False))
        bare_text = f"; bare app {', '.join(f'{x:,.0f}' for x in bare)}" if bare else ""
        lines.append(
            (
                ratio >= TARGETS["ingest_ratio"],
                f"saturating ingest with fan-out >= {TARGETS['ingest_ratio']:.0%} of the "
                f"warehouse alone: {pairs} events/s = "
                f"{', '.join(f'{x:.0%}' for x in ratios)} (median {ratio:.0%}){bare_text}",
            )
        )
    else:
        lines.append((None, "saturating ingest ratio (needs track on warehouse and fanout)"))
    for r in (r for r in runs if r.scenario == "track" and r.server == "fanout"):
        arrived = (r.accepted or 0) / r.load.elapsed if r.load.elapsed else 0
        slow = [f for f in r.forwarders if f.out_per_s < TARGETS["delivered_share"] * arrived]
        detail = ", ".join(f"{f.forwarder} {f.out_per_s / arrived:.0%}" for f in r.forwarders)
        lines.append(
            (
                bool(arrived) and not slow,
                f"under saturating load every forwarder takes >= "
                f"{TARGETS['delivered_share']:.0%} of what arrives ({arrived:,.0f}/s): {detail}",
            )
        )
    for r in (r for r in runs if r.scenario == "rate" and r.server == "fanout"):
        bound = max(KEEP_UP_EVENTS, 0.02 * (r.accepted or 0))
        behind = [
            f for f in r.forwarders if f.depth_end > bound or f.drained_secs is None or f.dead > 0
        ]
        offered = r.load.req_per_s
        held = offered >= 0.97 * args.rate and r.load.failed == 0
        detail = ", ".join(
            f"{f.forwarder} depth {f.depth_end:,.0f}" + (" NO" if f in behind else "")
            for f in r.forwarders
        )
        lines.append(
            (
                held and not behind and args.rate >= TARGETS["rate"],
                f"every forwarder keeps up at {args.rate:g} events/s (ingest achieved "
                f"{offered:,.0f}/s, {r.load.failed} failed; depth at the end <= "
                f"{bound:,.0f}, drained, no dead letters): {detail}",
            )
        )
    print("targets (issue 13):")
    for ok, text in lines:
        print(f"  [{verdict(ok)}] {text}")


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fanout_bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_load_options(p)
    p.add_argument(
        "--forwarders",
        default=",".join(ALL_FORWARDERS),
        help="the fan-out relay's forwarders, comma-separated, each kept only if registered "
        f"(default {','.join(ALL_FORWARDERS)}; the warehouse is always there)",
    )
    p.add_argument(
        "--events",
        choices=("conversions", "gtag"),
        default="conversions",
        help="purchases and page views on /v1/track and /v1/page (default), or GA4 hits on "
        "/g/collect",
    )
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="track, rate or both (default both)"
    )
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"which of {','.join(SERVERS)} to run (default all)",
    )
    p.add_argument(
        "--drain-secs", type=float, default=60.0, help="longest wait for the spools to drain"
    )
    p.add_argument(
        "--profile",
        choices=("cpu", "gil"),
        help="sample the fanout relay with py-spy during its runs (py-spy next to Python, or "
        "on PATH) and print where its threads spend their time: every sample of a busy "
        "thread (cpu), or only those holding the GIL (gil)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FORWARDER.OPTION=VALUE",
        help="change a forwarder's option in both relays' configs, VALUE read as YAML "
        "(ga4.max_concurrent_requests=16, meta.batch={max_events: 500}); repeatable",
    )
    p.add_argument(
        "--relay-set",
        action="append",
        default=[],
        metavar="SECTION.OPTION=VALUE",
        help="change a top-level setting in both relays' configs, VALUE read as YAML "
        "(delivery.niceness=0, delivery.process=false); repeatable",
    )
    p.add_argument(
        "--relay-cmd",
        help="command starting a relay; {config} {host} {port} {data_dir} are filled in "
        "(default: this Python, -m tagrelay.cli.main serve ...)",
    )
    args = p.parse_args(argv)
    args.scenario_list = [s for s in args.scenarios.split(",") if s]
    args.server_list = [s for s in args.servers.split(",") if s]
    for chosen, allowed in ((args.scenario_list, SCENARIOS), (args.server_list, SERVERS)):
        if not set(chosen) <= set(allowed):
            p.error(f"choose from {','.join(allowed)}, not {','.join(chosen)}")
    for item in args.set:
        target, eq, value = item.partition("=")
        forwarder, dot, option = target.partition(".")
        if not (eq and dot and forwarder in FORWARDER_CONFIGS and option):
            p.error(f"--set {item!r}: expected FORWARDER.OPTION=VALUE, FORWARDER one of "
                    f"{','.join(FORWARDER_CONFIGS)}")  # fmt: skip
        FORWARDER_CONFIGS[forwarder][option] = yaml.safe_load(value)
    for item in args.relay_set:
        target, eq, value = item.partition("=")
        section, dot, option = target.partition(".")
        if not (eq and dot and section and option):
            p.error(f"--relay-set {item!r}: expected SECTION.OPTION=VALUE")
        RELAY_SETTINGS.append((section, option, yaml.safe_load(value)))
    args.batch_size = 1  # what ingest_bench's load functions read
    args.py_spy = None
    if args.profile:
        args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(args.py_spy).exists():
            p.error("--profile needs py-spy (pip install py-spy)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.wrk = find_wrk(args)
    known = registered_forwarders()
    wanted = ["warehouse", *(f for f in args.forwarders.split(",") if f and f != "warehouse")]
    forwarders = [f for f in wanted if f in known and f in FORWARDER_CONFIGS]
    missing = [f for f in wanted if f not in forwarders]
    if missing:
        log(f"not registered here, left out: {', '.join(missing)}")

    interrupt_on_signals()
    loadavg_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="tagrelay-fanout-"))
    fake_port = free_port()
    fakes = Server(
        "fakes",
        [sys.executable, str(BENCH_DIR / "fake_destinations.py"), "--port", str(fake_port)],
        fake_port,
        tmp,
    )
    servers: dict[str, Server] = {}
    per_relay = {"warehouse": ["warehouse"], "fanout": forwarders}
    for name in args.server_list:
        port = free_port()
        if name == "bare":
            servers[name] = Server(
                name,
                [sys.executable, str(BENCH_DIR / "bare_app.py"), "--port", str(port)],
                port,
                tmp,
            )
            continue
        data_dir = tmp / f"data-{name}"
        data_dir.mkdir()
        config = tmp / f"{name}.yaml"
        config.write_text(relay_config(data_dir, per_relay[name], fakes.base))
        fill = {"config": str(config), "host": HOST, "port": str(port), "data_dir": str(data_dir)}
        if args.relay_cmd:
            cmd = shlex.split(args.relay_cmd.format(**{k: shlex.quote(v) for k, v in fill.items()}))
        else:
            cmd = [sys.executable, "-m", "tagrelay.cli.main", "serve", "--config", fill["config"]]
            cmd += ["--host", HOST, "--port", fill["port"], "--data-dir", fill["data_dir"]]
        servers[name] = Server(name, cmd, port, tmp)

    runs: list[Run] = []
    ok = True
    interrupted = False
    try:
        for srv in (fakes, *servers.values()):
            log(f"starting {srv.name}: {shlex.join(srv.cmd)}")
            srv.start()
            if not srv.wait_healthy(args.start_timeout):
                log(f"{srv.name} did not become healthy; its output:\n{srv.log_tail()}")
                ok = False
        if not ok:
            return 1
        for srv in servers.values():
            if args.warmup > 0:
                log(f"warm-up {srv.name} ({args.warmup:g} s)")
                closed_loop(args, srv, args.events, 16, args.warmup)
                if srv.name != "bare":
                    drain_all(srv, per_relay[srv.name], args.drain_secs)
        for scenario in args.scenario_list:
            for i in range(args.repeat):
                for srv in servers.values():
                    tag = f" run {i + 1}/{args.repeat}" if args.repeat > 1 else ""
                    log(f"{scenario} against {srv.name}{tag} ({args.duration:g} s)")
                    fwd = per_relay.get(srv.name, [])
                    run = run_one(args, scenario, srv, fwd, fakes, tmp)
                    runs.append(run)
                    log(
                        f"  {run.load.req_per_s:,.0f} events/s, p99 "
                        f"{fmt(run.load.p99_ms, '.2f')} ms, load average {run.loadavg:.2f}"
                    )
                    if srv.proc is not None and srv.proc.poll() is not None:
                        log(f"{srv.name} exited during {scenario}:\n{srv.log_tail()}")
                        ok = False
                        raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = ok
        log("stopping the servers")
    finally:
        for srv in (*servers.values(), fakes):
            srv.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_report(args, runs, forwarders, missing, (loadavg_start, os.getloadavg()[0]))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {**r.__dict__, "load": {**r.load.__dict__, "req_per_s": r.load.req_per_s}}
                    for r in runs
                ],
                indent=2,
                default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o),
            )
        )
    if interrupted:
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
