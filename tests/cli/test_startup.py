"""``tagrelay serve`` as a subprocess: start-up errors say what is wrong (a data directory
that cannot be written is not an address that cannot be bound), "listening" is logged once
the port is bound, and the admin listener with a token from the environment works over real
HTTP without the token reaching the log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TAGRELAY = [sys.executable, "-m", "tagrelay.cli.main"]
TOKEN = "e2e-admin-token-1f9a7c3e5b"


def write_config(tmp_path: Path, data_dir: Path, admin: str = '{listen: "127.0.0.1:0"}') -> Path:
    config = tmp_path / "tagrelay.yaml"
    config.write_text(
        f"""
data_dir: {data_dir}
keys:
  - {{id: backend, kind: server, key: startup-server-key}}
logging: {{level: debug, format: json}}
admin: {admin}
"""
    )
    return config


def serve(config: Path, port: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TAGRELAY, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def held_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.slow
@pytest.mark.parametrize("where", ["under_a_file", "in_proc", "read_only"])
def test_an_unwritable_data_directory_is_reported_as_such(tmp_path: Path, where: str) -> None:
    if where == "under_a_file":
        (tmp_path / "a-file").write_text("")
        data_dir = tmp_path / "a-file" / "data"
    elif where == "in_proc":
        data_dir = Path("/proc/tagrelay-data")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only directory")
        data_dir = tmp_path / "read-only"
        data_dir.mkdir(mode=0o500)
    out = serve(write_config(tmp_path, data_dir))
    assert out.returncode == 1
    assert f"the data directory {data_dir} is not writable" in out.stderr
    assert "could not listen" not in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_port_in_use_is_reported_as_such(tmp_path: Path) -> None:
    with held_port() as taken:
        port = taken.getsockname()[1]
        out = serve(write_config(tmp_path, tmp_path / "data"), port)
    assert out.returncode == 1
    assert f"could not listen on 127.0.0.1:{port}" in out.stderr
    assert "data directory" not in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_an_admin_port_in_use_is_reported_as_such(tmp_path: Path) -> None:
    with held_port() as taken:
        port = taken.getsockname()[1]
        config = write_config(tmp_path, tmp_path / "data", f'{{listen: "127.0.0.1:{port}"}}')
        out = serve(config)
    assert out.returncode == 1
    assert f"the admin listener could not listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


class Relay:
    """``tagrelay serve`` on free ports (port 0), its JSON log read as it is written."""

    def __init__(self, config: Path, tmp_path: Path, **env: str) -> None:
        self.log_path = tmp_path / "serve.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*TAGRELAY, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )

    def records(self) -> list[dict[str, Any]]:
        text = self.log_path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait_for(self, message: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if record["msg"] == message:
                    return record
            assert self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.02)
        raise AssertionError(f"no {message!r} in the log:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in started:
        relay.stop()


def request(
    url: str, headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, str, Any]:
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, resp.read().decode(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.mark.slow
def test_listening_is_logged_once_the_ports_are_bound(tmp_path: Path, relays: list[Relay]) -> None:
    relay = Relay(write_config(tmp_path, tmp_path / "data"), tmp_path)
    relays.append(relay)
    listening = relay.wait_for("tagrelay listening")
    # Port 0 was asked for: the line names the port bound, which answers at once.
    assert listening["port"] > 0
    status, _, _ = request(f"http://127.0.0.1:{listening['port']}/healthz")
    assert status == 200
    admin = relay.wait_for("admin listening")
    assert listening["admin"] == admin["url"]
    status, text, _ = request(admin["url"] + "/metrics")
    assert status == 200 and "tagrelay_up 1.0" in text
    status, _, _ = request(f"http://127.0.0.1:{listening['port']}/metrics")
    assert status == 404, "metrics are not public by default"


@pytest.mark.slow
def test_an_admin_token_from_the_environment_guards_the_real_listener(
    tmp_path: Path, relays: list[Relay]
) -> None:
    config = write_config(
        tmp_path, tmp_path / "data", '{listen: "127.0.0.1:0", token: "${TAGRELAY_ADMIN_TOKEN:-}"}'
    )
    relay = Relay(config, tmp_path, TAGRELAY_ADMIN_TOKEN=TOKEN)
    relays.append(relay)
    relay.wait_for("tagrelay listening")
    admin = relay.wait_for("admin listening")
    assert admin["token"] == "required"
    url = admin["url"]

    assert request(url + "/metrics")[0] == 401
    assert request(url + "/metrics", {"Authorization": f"Bearer {TOKEN}x"})[0] == 401
    status, text, _ = request(url + "/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and "tagrelay_build_info" in text
    assert request(url + "/readyz")[0] == 200

    form = urllib.parse.urlencode({"token": TOKEN, "next": "/metrics"}).encode()
    status, _, headers = request(url + "/login", data=form)
    assert status == 303
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    assert "HttpOnly" in headers["Set-Cookie"]
    status, text, _ = request(url + "/metrics", {"Cookie": cookie})
    assert status == 200 and "tagrelay_up 1.0" in text
    wrong = urllib.parse.urlencode({"token": "not-" + TOKEN}).encode()
    assert request(url + "/login", data=wrong)[0] == 401

    relay.stop()
    log = relay.log_path.read_text()
    assert "admin login refused" in log and "admin request refused" in log
    assert TOKEN not in log, "the token never appears in the log, even at debug level"
