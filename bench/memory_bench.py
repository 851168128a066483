"""Memory benchmark: what ``tagrelay serve`` and every process it starts hold, at idle,
at the peak of a load, and once the load has drained.

Starts ``tagrelay serve`` with a configuration (default: ``config/tagrelay.yaml``, the one a
new user runs) in a temporary data directory on a free 127.0.0.1 port, in a session of its
own, and finds its processes: the relay, its spool writer, its warehouse process and
whatever else it starts (every process of that session, and every descendant of the relay).
For each, from ``/proc/PID/smaps_rollup``:

  RSS   resident pages mapped by the process, each counted in full in every process that
        maps it: the code of libpython, of DuckDB's ``_duckdb*.so`` and of every other
        shared library is counted once per process that touched it;
  PSS   RSS with each page divided by the number of processes mapping it: the PSS of all
        the processes of the machine adds up to the memory they use;
  USS   pages mapped by this process alone (private clean + private dirty): what its exit
        gives back;
  anon  RSS of anonymous memory (heaps, Python objects, DuckDB's buffers);
  file  RSS of file-backed pages (code and read-only data of the interpreter and of the
        extension modules: clean, re-readable from disk, reclaimable by the kernel).

Three moments:

  idle   after start-up, once ``--settle-secs`` have passed;
  peak   the highest value of each figure sampled every ``--interval`` s while the load
         runs (``--scenario`` for ``--duration`` s, ingest_bench.py's load: wrk with
         bench/ingest.lua if installed, else its Python generator) and until the warehouse
         spool has drained; the sum's peak is the highest sum at one sample, and VmHWM
         (the kernel's peak RSS since start, between samples too) is printed beside it;
  after  ``--settle-secs`` after the spool has drained.

    PYTHONPATH=src .venv/bin/python bench/memory_bench.py
    PYTHONPATH=src .venv/bin/python bench/memory_bench.py --scenario track --duration 10
    PYTHONPATH=src .venv/bin/python bench/memory_bench.py --config my.yaml --json out.json

The relay is ``python -m tagrelay.cli.main`` of this interpreter, so ``PYTHONPATH=src``
measures the source tree it is run from. The configuration is copied with four changes:
``data_dir`` (the temporary directory), ``admin.listen`` (a free port), ``metrics.public``
(the spool depth is read from the public ``/metrics``) and one more server write key, the
one the load generators send. Only loopback addresses are used. Exit status: 0 when the
relay started and the run ended; 1 when it did not start or exited during the run; 130 on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _alternating import uptime  # noqa: E402 - the bench folder is not a package
from ingest_bench import (  # noqa: E402
    HOST,
    REPO,
    WRITE_KEY,
    LoadResult,
    Server,
    closed_loop,
    drain,
    find_wrk,
    free_port,
    interrupt_on_signals,
    log,
    proc_status_kb,
    process_tree,
)

DEFAULT_CONFIG = REPO / "config" / "tagrelay.yaml"
TARGETS_MB = {"idle": 100.0, "peak": 150.0}
"""Issue 19: the RSS summed over the relay's processes, at idle and under load."""

FIGURES = ("rss", "pss", "uss", "anon", "file")


@dataclass
class Footprint:
    """One process's memory at one moment, in KiB (``FIGURES``)."""

    rss: int = 0
    pss: int = 0
    uss: int = 0
    anon: int = 0
    file: int = 0

    def plus(self, other: Footprint) -> Footprint:
        return Footprint(*(getattr(self, f) + getattr(other, f) for f in FIGURES))

    def highest(self, other: Footprint) -> Footprint:
        return Footprint(*(max(getattr(self, f), getattr(other, f)) for f in FIGURES))


def footprint(pid: int) -> Footprint | None:
    """The process's figures from ``/proc/PID/smaps_rollup``; None when it is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                number = rest.split()
                if number and number[0].isdigit():
                    values[key] = int(number[0])
    except OSError:
        return None
    if "Rss" not in values:
        return None  # a zombie: no memory left to read
    return Footprint(
        rss=values["Rss"],
        pss=values["Pss"],
        uss=values["Private_Clean"] + values["Private_Dirty"],
        anon=values["Anonymous"],
        file=values["Rss"] - values["Anonymous"],
    )


def _process_group(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def relay_processes(root: int) -> list[int]:
    """The relay and every process it started: its descendants, and the members of its
    process group (the session ingest_bench.Server gives it), the relay first."""
    found = set(process_tree(root))
    found.update(
        int(e) for e in os.listdir("/proc") if e.isdigit() and _process_group(int(e)) == root
    )
    return [root, *sorted(found - {root})]


def role(pid: int, root: int) -> str:
    """A short name for one of the relay's processes, from its command line."""
    if pid == root:
        return "relay"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return f"pid {pid}"
    line = " ".join(argv)
    for marker, name in (
        ("writer_child", "spool writer"),
        ("tagrelay.warehouse.process", "warehouse"),
        ("tagrelay.forwarders._process", "delivery"),
    ):
        if marker in line:
            return name
    return Path(argv[0]).name if argv else f"pid {pid}"


@dataclass
class Moment:
    """Every process's figures at one moment (or their peaks over a stretch), by role."""

    processes: dict[str, Footprint] = field(default_factory=dict)
    total: Footprint = field(default_factory=Footprint)
    hwm_kb: dict[str, int] = field(default_factory=dict)
    """VmHWM by process (peak rows only; their sum is an upper bound of the sum's peak,
    as the processes need not peak at once)."""


def named_processes(root: int) -> dict[str, int]:
    """The relay's processes by role (two of one role told apart by their pid)."""
    named: dict[str, int] = {}
    for pid in relay_processes(root):
        name = role(pid, root)
        named[f"{name} {pid}" if name in named else name] = pid
    return named


def measure(root: int) -> Moment:
    moment = Moment()
    for name, pid in named_processes(root).items():
        fp = footprint(pid)
        if fp is not None:
            moment.processes[name] = fp
            moment.total = moment.total.plus(fp)
    return moment


class PeakSampler:
    """Samples the relay's processes every ``interval`` s on a thread of its own until
    stopped; keeps each process's highest figures and the highest sum."""

    def __init__(self, root: int, interval: float) -> None:
        self.root = root
        self.interval = interval
        self.peak = Moment()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        # The kernel's own peak, which also sees what happened between two samples.
        for name, pid in named_processes(self.root).items():
            self.peak.hwm_kb[name] = proc_status_kb(pid, "VmHWM")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = measure(self.root)
        self.samples += 1
        for name, fp in now.processes.items():
            old = self.peak.processes.get(name)
            self.peak.processes[name] = fp if old is None else old.highest(fp)
        self.peak.total = self.peak.total.highest(now.total)


def bench_config(source: Path, data_dir: Path) -> str:
    """The configuration to run: ``source`` with the changes the module docstring lists."""
    config: dict[str, Any] = yaml.safe_load(source.read_text()) or {}
    config["data_dir"] = str(data_dir)
    config["admin"] = {**(config.get("admin") or {}), "listen": f"{HOST}:0"}
    config["metrics"] = {**(config.get("metrics") or {}), "public": True}
    config["keys"] = [
        *(config.get("keys") or []),
        {"id": "memory-bench", "kind": "server", "key": WRITE_KEY},
    ]
    return yaml.safe_dump(config, sort_keys=False)


def events_per_s(args: argparse.Namespace, load: LoadResult) -> float:
    return load.req_per_s * (args.batch_size if args.scenario == "batch" else 1)


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def print_report(
    args: argparse.Namespace,
    moments: dict[str, Moment],
    load: LoadResult | None,
    drained: tuple[float | None, float | None],
    loadavg: tuple[str, str],
    relay_cmd: str,
) -> None:
    p = print
    p()
    p("tagrelay memory benchmark")
    p(f"  command : {shlex.join([sys.executable, *sys.argv])}")
    p(f"  relay   : {relay_cmd}")
    p(f"  config  : {args.config} (data_dir, admin.listen, metrics.public and a key changed)")
    p(f"  load    : {args.scenario} for {args.duration:g} s; {load.command if load else '-'}")
    p(f"  before  : {loadavg[0]}")
    p(f"  after   : {loadavg[1]}")
    p()
    hdr = (
        f"{'moment':<6} {'process':<14} {'RSS':>7} {'PSS':>7} {'USS':>7} "
        f"{'anon':>7} {'file':>7} {'VmHWM':>7}   (MiB)"
    )
    p(hdr)
    p("-" * len(hdr))
    for name, moment in moments.items():
        rows = [*moment.processes.items(), ("sum", moment.total)]
        for process, fp in rows:
            hwm = moment.hwm_kb.get(process)
            if process == "sum" and moment.hwm_kb:
                hwm = sum(moment.hwm_kb.values())
            p(
                f"{name:<6} {process:<14} {mb(fp.rss):>7} {mb(fp.pss):>7} {mb(fp.uss):>7} "
                f"{mb(fp.anon):>7} {mb(fp.file):>7} {mb(hwm) if hwm is not None else '-':>7}"
            )
        p()
    if load is not None:
        depth, secs = drained
        p(
            f"load: {events_per_s(args, load):,.0f} events/s acknowledged ({load.failed} failed); "
            + (
                f"the warehouse spool drained {secs:.1f} s after the load"
                if depth == 0 and secs is not None
                else f"spool depth {depth} after {secs} s"
            )
        )
        for note in load.notes:
            p(f"  note: {note}")
    p("targets (issue 19, RSS summed over the relay's processes):")
    for name, limit in TARGETS_MB.items():
        moment = moments.get(name)
        if moment is None:
            continue
        value = moment.total.rss / 1024
        verdict = "met" if value < limit else "NOT met"
        p(f"  {name:<5} RSS sum {value:6.1f} MiB < {limit:.0f}: {verdict}")


FLOOR_STEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "spool writer": (("-I", "-S"), ("sqlite3",)),
    "relay": ((), ("asyncio", "aiohttp.web", "pydantic", "tagrelay.cli.serve")),
    "warehouse": ((), ("duckdb", "duckdb.connect", "tagrelay.warehouse.process")),
}
"""``--floor``: per process, its interpreter's flags (the spool writer runs isolated, with
the standard library only) and the steps measured one after the other: modules imported,
and ``duckdb.connect`` (a new database file)."""

_FLOOR_CHILD = """
import sys
for step in sys.argv[1:]:
    if step == "duckdb.connect":
        import duckdb, tempfile
        folder = tempfile.TemporaryDirectory()
        connection = duckdb.connect(folder.name + "/floor.duckdb")
    elif step != "python":
        __import__(step)
    print(step, flush=True)
    sys.stdin.readline()
"""
"""The child of ``floor_steps``: nothing imported before the first figures but ``sys``."""


def floor_steps(flags: tuple[str, ...], steps: tuple[str, ...]) -> list[tuple[str, Footprint]]:
    """A fresh interpreter with ``flags`` takes ``steps`` one by one; its figures after the
    bare start and after each step (read while it waits for the next)."""
    child = subprocess.Popen(
        [sys.executable, *flags, "-c", _FLOOR_CHILD, "python", *steps],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    figures = []
    try:
        for _ in range(len(steps) + 1):
            step = child.stdout.readline().strip()
            fp = footprint(child.pid)
            if not step or fp is None:
                raise SystemExit(f"the floor step after {figures[-1:]} failed")
            figures.append((step, fp))
            child.stdin.write("\n")
            child.stdin.flush()
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    return figures


def print_floor() -> None:
    """What each process holds before it does anything of its own: the interpreter, then
    each library it cannot start without, measured step by step."""
    print()
    print("tagrelay memory floor (a fresh interpreter per process, one step at a time)")
    print(f"  load average: {uptime()}")
    hdr = f"{'process':<13} {'step':<28} {'RSS':>7} {'+RSS':>6} {'USS':>7} {'anon':>7} {'file':>7}"
    print(hdr)
    print("-" * len(hdr))
    for process, (flags, steps) in FLOOR_STEPS.items():
        previous = 0
        for step, fp in floor_steps(flags, steps):
            label = f"python {' '.join(flags)}".strip() if step == "python" else step
            print(
                f"{process:<13} {label:<28} {mb(fp.rss):>7} {mb(fp.rss - previous):>6} "
                f"{mb(fp.uss):>7} {mb(fp.anon):>7} {mb(fp.file):>7}"
            )
            previous = fp.rss
        print()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="memory_bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="configuration to run")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load (default 15)")
    p.add_argument(
        "--scenario",
        choices=("track", "batch"),
        default="batch",
        help="the load: single events on /v1/track over --connections, or batches on "
        "/v1/batch over --batch-connections (default batch)",
    )
    p.add_argument("--connections", type=int, default=64, help="connections for track (64)")
    p.add_argument("--batch-connections", type=int, default=16, help="connections for batch (16)")
    p.add_argument("--batch-size", type=int, default=100, help="events per batch request (100)")
    p.add_argument(
        "--settle-secs",
        type=float,
        default=5.0,
        help="seconds after start-up and after the drain before measuring (default 5)",
    )
    p.add_argument(
        "--interval", type=float, default=0.25, help="seconds between samples under load"
    )
    p.add_argument(
        "--drain-secs",
        type=float,
        default=60.0,
        help="how long to wait for the warehouse spool to drain (default 60)",
    )
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="wrk if installed (auto), or ingest_bench.py's Python generator",
    )
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--gen-procs", type=int, default=1, help="processes for the Python generator (1)"
    )
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds for /healthz")
    p.add_argument("--idle-only", action="store_true", help="measure at idle only, with no load")
    p.add_argument(
        "--floor",
        action="store_true",
        help="print instead what each process holds once its interpreter and the libraries "
        "it cannot do without are loaded (no relay is started)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.floor:
        print_floor()
        return 0
    args.wrk = None if args.idle_only else find_wrk(args)
    interrupt_on_signals()
    tmp = Path(tempfile.mkdtemp(prefix="tagrelay-membench-"))
    data_dir = tmp / "data"
    config = tmp / "tagrelay.yaml"
    config.write_text(bench_config(args.config, data_dir))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tagrelay.cli.main",
        "serve",
        "--config",
        str(config),
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    relay = Server("relay", cmd, port, tmp)
    moments: dict[str, Moment] = {}
    load: LoadResult | None = None
    drained: tuple[float | None, float | None] = (None, None)
    before = uptime()
    status = 0
    try:
        log(f"starting the relay: {shlex.join(cmd)}")
        relay.start()
        if not relay.wait_healthy(args.start_timeout):
            log(f"the relay did not become healthy; its output:\n{relay.log_tail()}")
            return 1
        assert relay.proc is not None
        root = relay.proc.pid
        time.sleep(args.settle_secs)
        moments["idle"] = measure(root)
        if not args.idle_only:
            log(f"{args.scenario} load for {args.duration:g} s")
            with PeakSampler(root, args.interval) as sampler:
                mode_connections = (
                    args.connections if args.scenario == "track" else args.batch_connections
                )
                load = closed_loop(args, relay, args.scenario, mode_connections, args.duration)
                drained = drain(relay, args.drain_secs)
            moments["peak"] = sampler.peak
            log(f"{sampler.samples} samples; drained: {drained}")
            time.sleep(args.settle_secs)
            moments["after"] = measure(root)
        if relay.proc.poll() is not None:
            log(f"the relay exited during the run:\n{relay.log_tail()}")
            status = 1
    except KeyboardInterrupt:
        log("interrupted; stopping the relay")
        status = 130
    finally:
        relay.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if moments:
        print_report(args, moments, load, drained, (before, uptime()), shlex.join(cmd))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "moments": {name: asdict(m) for name, m in moments.items()},
                    "events_per_s": events_per_s(args, load) if load else None,
                    "drained": drained,
                    "load_average": [before, uptime()],
                },
                indent=2,
            )
        )
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
