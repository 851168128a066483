"""End to end through the real ``tagrelay`` command: ``serve`` as a subprocess, events over
HTTP, rows out of the embedded warehouse with ``tagrelay sql``, a SIGKILL in the middle."""

from __future__ import annotations

import base64
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tagrelay.cli.serve import RESERVED_FILES

SEED_QUERY = (
    "select * from events where context_page_path = '/signup' "
    "and timestamp > now() - interval '1 day'"
)
SERVER_KEY = "e2e-server-key"
TAGRELAY = [sys.executable, "-m", "tagrelay.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


KEY_ENV = "TAGRELAY_E2E_KEY"
"""The encryption key of the encrypted variants, from the environment as in production."""
EMAIL = "e2e.person@example.com"


@pytest.fixture(params=["plaintext", "encrypted"])
def encryption(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """None, or the key the relay (and the commands run next to it) get from the
    environment (``encryption.keys: ["${TAGRELAY_E2E_KEY}"]``)."""
    if request.param == "plaintext":
        monkeypatch.delenv(KEY_ENV, raising=False)
        return None
    from tagrelay.crypto import generate_key

    key = generate_key()
    monkeypatch.setenv(KEY_ENV, key)
    return key


def write_config(tmp_path: Path, max_wait_secs: float, encryption: str | None = None) -> Path:
    cfg = tmp_path / "tagrelay.yaml"
    keys = f'encryption: {{keys: ["${{{KEY_ENV}}}"]}}' if encryption else ""
    cfg.write_text(
        f"""
data_dir: {tmp_path / "data"}
keys:
  - {{id: backend, kind: server, key: {SERVER_KEY}}}
logging: {{level: info, format: json}}
admin: {{listen: "127.0.0.1:0"}}
{keys}
forwarders:
  - id: warehouse
    type: warehouse
    batch: {{max_events: 1000, max_wait_secs: {max_wait_secs}}}
"""
    )
    return cfg


def serve_command(config: Path, port: int) -> list[str]:
    return [*TAGRELAY, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]


class Relay:
    def __init__(self, config: Path, tmp_path: Path) -> None:
        self.config = config
        self.port = free_port()
        self.log = (tmp_path / f"serve-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            serve_command(config, self.port),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}"
            try:
                with urllib.request.urlopen(self.url("/readyz"), timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        raise AssertionError("the relay did not become ready")

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        auth = base64.b64encode(f"{SERVER_KEY}:".encode()).decode()
        req = urllib.request.Request(
            self.url(path),
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def log_records(self) -> list[dict[str, Any]]:
        self.log.flush()
        text = Path(self.log.name).read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def admin_url(self) -> str:
        """The admin listener's URL, as its start-up line says (admin.listen has port 0)."""
        line = next(r for r in self.log_records() if r["msg"] == "admin listening")
        url: str = line["url"]
        return url

    def metrics(self) -> str:
        """/metrics, from the admin listener (the public port has none by default)."""
        with urllib.request.urlopen(self.admin_url() + "/metrics", timeout=5) as resp:
            text: str = resp.read().decode()
            return text

    def children(self) -> list[int]:
        tasks = Path(f"/proc/{self.proc.pid}/task")  # a child belongs to the starting thread
        return [
            int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()
        ]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()


def alive(pid: int) -> bool:
    """Running, and not a zombie (an orphan's zombie is reaped by init, not by this test)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in started:
        if relay.proc.poll() is None:
            relay.proc.kill()
            relay.proc.wait()


def sql(config: Path, query: str, fmt: str = "json") -> Any:
    out = subprocess.run(
        [
            *TAGRELAY,
            "sql",
            "--config",
            str(config),
            "--format",
            fmt,
            "--max-rows",
            "1000000",
            query,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if fmt == "json" else out.stdout


def wait_rows(config: Path, query: str, expected: int, timeout: float = 20.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = sql(config, query)
        if len(rows) >= expected:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"expected {expected} rows, have {len(rows)}")


def signup_batch(n: int, prefix: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    events = []
    for i in range(n):
        events.append(
            {
                "type": "track",
                "event": "Signed Up",
                "messageId": f"{prefix}-{i}",
                "anonymousId": f"anon-{i}",
                "properties": {"plan": "pro", "seats": i},
                "traits": {"email": EMAIL},
                "context": {"page": {"path": "/signup", "url": "https://shop.test/signup"}},
                "timestamp": now.isoformat(),
            }
        )
    old = (now - timedelta(days=3)).isoformat()
    events.append(
        {
            "type": "track",
            "event": "Signed Up",
            "messageId": f"{prefix}-old",
            "anonymousId": "anon-old",
            "timestamp": old,
            "context": {"page": {"path": "/signup"}},
        }
    )
    events.append(
        {
            "type": "page",
            "messageId": f"{prefix}-home",
            "anonymousId": "anon-home",
            "context": {"page": {"path": "/"}},
        }
    )
    return {"batch": events}


def spool_bytes(tmp_path: Path) -> bytes:
    """The spool's files as they are on disk (database, WAL, shared memory)."""
    return b"".join(
        path.read_bytes() for path in (tmp_path / "data").glob("spool.sqlite3*") if path.is_file()
    )


@pytest.mark.slow
def test_acknowledged_events_survive_sigkill_and_reach_the_warehouse(
    tmp_path: Path, relays: list[Relay], encryption: str | None
) -> None:
    # A long batch wait: the warehouse cannot have taken the events before the kill.
    config = write_config(tmp_path, max_wait_secs=3, encryption=encryption)
    first = Relay(config, tmp_path)
    relays.append(first)
    status, body = first.post("/v1/batch", signup_batch(40, "k"))
    assert (status, body["accepted"]) == (200, 42)
    children = first.children()
    assert len(children) == 2, "the spool's commit process and the warehouse process"
    if encryption:
        # The key reaches the processes that read the spool through their sockets, not
        # their command lines; on disk the events are sealed, WAL included.
        for pid in children:
            assert encryption.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert EMAIL.encode() not in spool_bytes(tmp_path)
        assert b"Signed Up" not in spool_bytes(tmp_path)
    else:
        assert EMAIL.encode() in spool_bytes(tmp_path)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    # Orphaned, both see their socket close and exit by themselves.
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in children)

    # Nothing had been loaded yet: whatever shows up later came from the spool.
    assert sql(config, "select count(*) as n from events")[0]["n"] == 0

    second = Relay(config, tmp_path)
    relays.append(second)
    rows = wait_rows(config, SEED_QUERY, 40)
    assert sorted(r["message_id"] for r in rows) == sorted(f"k-{i}" for i in range(40))
    assert {r["event"] for r in rows} == {"Signed Up"}
    assert {r["properties_plan"] for r in rows} == {"pro"}
    total = sql(config, "select count(*) as n from events")[0]["n"]
    assert total == 42, "the old signup and the home page view are stored too"

    # A resend of the same batch (an SDK retrying) makes no new rows.
    status, _ = second.post("/v1/batch", signup_batch(40, "k"))
    assert status == 200
    time.sleep(3.5)
    assert sql(config, "select count(*) as n from events")[0]["n"] == 42

    metrics = second.metrics()
    assert 'tagrelay_spool_depth{forwarder="warehouse"} 0.0' in metrics
    assert second.stop(signal.SIGTERM) == 0
    if encryption:
        assert encryption not in Path(second.log.name).read_text()
        assert EMAIL.encode() not in spool_bytes(tmp_path)

    # With the relay stopped, the CLI opens the warehouse itself.
    table = sql(
        config, "select event, count(*) as n from events group by event order by event", fmt="table"
    )
    assert "Signed Up" in table and "41" in table


@pytest.mark.slow
def test_sigterm_flushes_the_batch_in_progress(tmp_path: Path, relays: list[Relay]) -> None:
    config = write_config(tmp_path, max_wait_secs=30)
    relay = Relay(config, tmp_path)
    relays.append(relay)
    status, _ = relay.post("/v1/batch", signup_batch(5, "t"))
    assert status == 200
    assert relay.stop(signal.SIGTERM) == 0
    assert sql(config, "select count(*) as n from events")[0]["n"] == 7
    log = (tmp_path / f"serve-{relay.port}.log").read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(r["msg"] == "tagrelay stopped" for r in records)
    assert SERVER_KEY not in log, "keys never appear in logs"
    # server.event_loop is auto and uvloop is a dependency: the relay served on it
    listening = next(r for r in records if r["msg"] == "tagrelay listening")
    assert listening["event_loop"] == "uvloop"
    # the soft open-files limit was raised to the hard one, and is reported
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        assert listening["open_files_limit"] == hard
    assert listening["max_connections"] == min(
        10_000, listening["open_files_limit"] - RESERVED_FILES
    )


@pytest.mark.slow
def test_check_reports_config_errors_with_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys: []\nforwarders:\n  - {id: x, type: nope}\n")
    out = subprocess.run(
        [*TAGRELAY, "check", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "nope" in out.stderr and "warehouse" in out.stderr and "webhook" in out.stderr
    good = write_config(tmp_path, 1)
    ok = subprocess.run(
        [*TAGRELAY, "check", "--config", str(good)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert os.path.basename(good) in ok.stdout


@pytest.mark.slow
def test_a_second_relay_on_the_same_data_dir_refuses_to_start(
    tmp_path: Path, relays: list[Relay]
) -> None:
    config = write_config(tmp_path, max_wait_secs=1)
    relays.append(Relay(config, tmp_path))
    out = subprocess.run(
        serve_command(config, free_port()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "another tagrelay process is using" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_every_event_acknowledged_before_a_sigterm_under_load_is_stored(
    tmp_path: Path, relays: list[Relay], encryption: str | None
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    config = write_config(tmp_path, max_wait_secs=0.2, encryption=encryption)
    relay = Relay(config, tmp_path)
    relays.append(relay)
    acknowledged: list[str] = []

    def sender(worker: int) -> None:
        for i in range(10_000):
            message_id = f"w{worker}-{i}"
            body = {"type": "track", "event": "Load", "anonymousId": "a", "messageId": message_id}
            try:
                status, _ = relay.post("/v1/track", body)
            except (urllib.error.URLError, ConnectionError, OSError):
                return  # the relay stopped listening
            if status == 200:
                acknowledged.append(message_id)
            elif status != 503:
                raise AssertionError(f"unexpected status {status}")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(sender, w) for w in range(8)]
        time.sleep(1.5)
        assert relay.stop(signal.SIGTERM) == 0
        for future in futures:
            future.result()
    assert len(acknowledged) > 50

    second = Relay(config, tmp_path)
    relays.append(second)
    rows = wait_rows(config, "select message_id from events", len(acknowledged))
    stored = {r["message_id"] for r in rows}
    assert set(acknowledged) <= stored


def test_serve_decodes_bodies_as_the_app_does(tmp_path: Path, relays: list[Relay]) -> None:
    """``tagrelay serve`` makes its server from the app's own settings: aiohttp inflates
    nothing, every body goes through web.bodies (tests/web/test_bodies.py has the matrix)."""
    import brotli

    relay = Relay(write_config(tmp_path, max_wait_secs=0.2), tmp_path)
    relays.append(relay)
    auth = "Basic " + base64.b64encode(f"{SERVER_KEY}:".encode()).decode()

    def post(path: str, body: bytes, coding: str) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            relay.url(path),
            data=body,
            method="POST",
            headers={
                "Authorization": auth,
                "Content-Type": "application/json",
                "Content-Encoding": coding,
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            assert err.headers["Content-Type"] == "application/json"
            return err.code, json.loads(err.read())

    batch = json.dumps(signup_batch(1, "serve-br")).encode()
    assert post("/v1/batch", brotli.compress(batch), "br")[0] == 200
    for path in ("/v1/track", "/v1/m"):
        status, answer = post(path, b'{"series": []}', "zstd")
        assert (status, answer["error"]) == (400, "invalid_body_encoding"), path
    bomb = brotli.compress(b" " * (64 << 20), quality=5)
    status, answer = post("/v1/batch", bomb, "br")
    assert (status, answer["error"]) == (413, "body_too_large")
    assert post("/nope", bomb, "br")[0] == 404
    with urllib.request.urlopen(relay.url("/healthz"), timeout=10) as resp:
        assert resp.status == 200


OLD_KEY_ENV = "TAGRELAY_E2E_OLD_KEY"


def write_rotating_config(tmp_path: Path) -> Path:
    """A warehouse, and a webhook to a closed port: its cursor keeps every event in the
    spool (it retries), so that rotation has them to re-encrypt."""
    cfg = tmp_path / "rotating.yaml"
    cfg.write_text(
        f"""
data_dir: {tmp_path / "data"}
keys:
  - {{id: backend, kind: server, key: {SERVER_KEY}}}
logging: {{level: info, format: json}}
admin: {{listen: "127.0.0.1:0"}}
encryption: {{keys: ["${{{KEY_ENV}:-}}", "${{{OLD_KEY_ENV}:-}}"]}}
forwarders:
  - {{id: warehouse, type: warehouse, batch: {{max_events: 1000, max_wait_secs: 0.2}}}}
  - {{id: hook, type: webhook, endpoint: "http://127.0.0.1:{free_port()}/down"}}
"""
    )
    return cfg


def keys_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TAGRELAY, "keys", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def refused_start(config: Path) -> str:
    out = subprocess.run(
        serve_command(config, free_port()), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    return out.stderr


@pytest.mark.slow
def test_keys_rotate_through_the_running_relay_then_the_old_key_can_go(
    tmp_path: Path, relays: list[Relay], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tagrelay.crypto import generate_key

    old, new = generate_key(), generate_key()
    config = write_rotating_config(tmp_path)
    monkeypatch.setenv(KEY_ENV, old)
    first = Relay(config, tmp_path)
    relays.append(first)
    assert first.post("/v1/batch", signup_batch(40, "r"))[0] == 200
    wait_rows(config, "select message_id from events", 42)
    assert first.stop(signal.SIGTERM) == 0

    # The new key first, the old one after it: the relay reads both.
    monkeypatch.setenv(KEY_ENV, new)
    monkeypatch.setenv(OLD_KEY_ENV, old)
    second = Relay(config, tmp_path)
    relays.append(second)
    assert 'tagrelay_encryption_backlog_events{state="old_key",store="spool"} 42.0' in (
        second.metrics()
    )
    out = keys_command(config, "rotate", "--format", "json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["via"] == "the running relay"
    assert answer["reencrypted"]["spool"] == 42 and answer["left"] == {}
    metrics = second.metrics()
    assert 'tagrelay_encryption_backlog_events{state="old_key",store="spool"} 0.0' in metrics
    assert 'tagrelay_encryption_reencrypted_events_total{store="spool"} 42.0' in metrics
    assert second.stop(signal.SIGTERM) == 0
    for secret in (old, new):
        assert secret not in Path(second.log.name).read_text()
        assert secret not in out.stdout + out.stderr

    # The old key is no longer needed; alone, it no longer opens the spool.
    monkeypatch.delenv(OLD_KEY_ENV)
    third = Relay(config, tmp_path)
    relays.append(third)
    assert third.stop(signal.SIGTERM) == 0
    monkeypatch.setenv(KEY_ENV, old)
    assert "which encryption.keys does not hold" in refused_start(config)
    monkeypatch.delenv(KEY_ENV)
    assert "encryption.keys is empty" in refused_start(config)
    assert EMAIL.encode() not in spool_bytes(tmp_path)


def test_keys_generate_prints_a_new_key_without_a_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tagrelay.crypto import decode_key

    monkeypatch.setenv("TAGRELAY_CONFIG", "/nonexistent/tagrelay.yaml")
    out = subprocess.run(
        [*TAGRELAY, "keys", "generate"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert len(decode_key(out.stdout.strip())) == 32
