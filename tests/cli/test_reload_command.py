"""Reloading a running ``tagrelay serve`` (a subprocess) for real: SIGHUP, and the ``tagrelay
reload`` command through the admin socket; a refused file is logged problem by problem,
answered, and counted."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_serve_e2e import free_port

TAGRELAY = [sys.executable, "-m", "tagrelay.cli.main"]


def config_text(tmp_path: Path, keys: dict[str, str], extra: str = "") -> str:
    lines = [
        f"data_dir: {tmp_path / 'data'}",
        "logging: {level: info, format: json}",
        'admin: {listen: "127.0.0.1:0"}',
        "keys:",
        *(f"  - {{id: {kid}, kind: server, key: {value}}}" for kid, value in keys.items()),
    ]
    return "\n".join(lines) + "\n" + extra


class Served:
    def __init__(self, tmp_path: Path, text: str) -> None:
        self.config = tmp_path / "tagrelay.yaml"
        self.config.write_text(text)
        self.data_dir = tmp_path / "data"
        self.port = free_port()
        self.log_path = tmp_path / "serve.log"
        self.log = self.log_path.open("wb")
        command = [*TAGRELAY, "serve", "--config", str(self.config)]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: self.status("/readyz") == 200, "the relay did not become ready")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    def status(self, path: str, key: str | None = None) -> int:
        headers = {"Content-Type": "application/json"}
        data = None
        if key is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
            data = json.dumps({"type": "track", "event": "E", "userId": "u"}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, ConnectionError):
            return 0

    def records(self) -> list[dict[str, Any]]:
        self.log.flush()
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def reload_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TAGRELAY, "reload", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def metrics(self) -> str:
        [line] = [r for r in self.records() if r["msg"] == "admin listening"]
        with urllib.request.urlopen(line["url"] + "/metrics", timeout=5) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        self.log.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[str], Served]]:
    started: list[Served] = []

    def start(text: str) -> Served:
        started.append(Served(tmp_path, text))
        return started[-1]

    yield start
    for relay in started:
        relay.stop()


def test_sighup_reloads_and_tagrelay_reload_reports(
    tmp_path: Path, served: Callable[[str], Served]
) -> None:
    relay = served(config_text(tmp_path, {"backend": "first-secret-key"}))
    assert relay.status("/v1/track", "first-secret-key") == 200

    # SIGHUP: the new key works, the removed one no more.
    relay.config.write_text(config_text(tmp_path, {"backend": "second-secret-key"}))
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for(
        lambda: any(r["msg"] == "configuration reloaded" for r in relay.records()),
        "no reload logged",
    )
    [line] = [r for r in relay.records() if r["msg"] == "configuration reloaded"]
    assert (line["trigger"], line["outcome"], line["changed"]) == ("signal", "applied", "keys")
    assert relay.status("/v1/track", "second-secret-key") == 200
    assert relay.status("/v1/track", "first-secret-key") == 401

    # An invalid file: refused, every problem in the answer and the log, the relay unchanged.
    relay.config.write_text(
        config_text(tmp_path, {"backend": "third-secret-key", "Bad Id": "x-secret-value"})
        + "spool: {synchronous: sometimes}\n"
    )
    done = relay.reload_command()
    assert done.returncode == 1
    assert "not reloaded; the relay runs on as it was" in done.stdout
    assert "keys[1].id" in done.stdout and "spool.synchronous" in done.stdout, done.stdout
    problems = [r for r in relay.records() if r["msg"].startswith("invalid configuration: ")]
    assert len(problems) == 2 and all(r["level"] == "error" for r in problems)
    assert "x-secret-value" not in relay.log_path.read_text() + done.stdout
    assert relay.status("/v1/track", "second-secret-key") == 200

    # tagrelay reload of a valid change; a setting that needs a restart is named.
    relay.config.write_text(
        config_text(tmp_path, {"backend": "second-secret-key", "partner": "partner-secret"})
        + "server: {port: 1}\n"
    )
    done = relay.reload_command("--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert answer["outcome"] == "applied"
    assert answer["keys"]["added"] == ["partner"]
    assert answer["needs_restart"] == ["server.port"]
    assert relay.status("/v1/track", "partner-secret") == 200

    metrics = relay.metrics()
    for outcome, count in (("applied", 2), ("invalid", 1), ("unchanged", 0), ("failed", 0)):
        assert f'tagrelay_config_reload_total{{outcome="{outcome}"}} {count}.0' in metrics


def test_tagrelay_reload_without_a_relay_says_so(tmp_path: Path) -> None:
    config = tmp_path / "tagrelay.yaml"
    config.write_text(config_text(tmp_path, {"backend": "a-server-secret"}))
    done = subprocess.run(
        [*TAGRELAY, "reload", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "no_relay" in done.stderr
