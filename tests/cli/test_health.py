"""``tagrelay health`` against a real ``tagrelay serve``: it asks the port and base path of
the configuration it is given, and ``TAGRELAY_CONFIG`` / ``TAGRELAY_DATA_DIR`` stand in for
``--config`` / ``--data-dir`` in every command (as the Docker image sets them)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tagrelay.cli.health import health_url
from tagrelay.config.models import Config
from tests.rig import free_port, relay_process

TAGRELAY = [sys.executable, "-m", "tagrelay.cli.main"]
SERVER_KEY = "health-server-key"


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TAGRELAY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def write_config(path: Path, data_dir: Path, port: int, base_path: str = "") -> Path:
    path.write_text(
        f"""
data_dir: {data_dir}
server: {{host: 127.0.0.1, port: {port}, base_path: "{base_path}"}}
keys:
  - {{id: backend, kind: server, key: {SERVER_KEY}}}
admin: {{listen: "127.0.0.1:0"}}
logging: {{level: info, format: json}}
forwarders:
  - {{id: warehouse, type: warehouse, batch: {{max_events: 10, max_wait_secs: 0.1}}}}
"""
    )
    return path


@pytest.fixture
def relay_under_t(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A relay on a free port under the base path /t; yields its config and port."""
    port = free_port()
    config = write_config(tmp_path / "tagrelay.yaml", tmp_path / "data", port, "/t")
    with relay_process(config, port, "/t", tmp_path / "serve.log"):
        yield config, port


@pytest.mark.slow
def test_health_asks_the_configured_port_under_the_base_path(
    relay_under_t: tuple[Path, int],
) -> None:
    config, port = relay_under_t

    done = run(["health", "--config", str(config)])

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok: http://127.0.0.1:{port}/t/healthz"

    ready = run(["health", "--config", str(config), "--ready"])
    assert ready.returncode == 0, ready.stderr
    assert ready.stdout.strip() == f"ok: http://127.0.0.1:{port}/t/readyz"


@pytest.mark.slow
def test_health_fails_when_the_relay_is_elsewhere(
    relay_under_t: tuple[Path, int], tmp_path: Path
) -> None:
    _, port = relay_under_t
    # the same relay asked without its base path: a 404, not a pass
    no_base = write_config(tmp_path / "no-base.yaml", tmp_path / "data", port)
    done = run(["health", "--config", str(no_base)])
    assert done.returncode == 1
    assert f"unhealthy: http://127.0.0.1:{port}/healthz: HTTP 404" in done.stderr

    nobody = write_config(tmp_path / "nobody.yaml", tmp_path / "data", free_port(), "/t")
    done = run(["health", "--config", str(nobody)])
    assert done.returncode == 1
    assert "unhealthy:" in done.stderr and "refused" in done.stderr.lower()


@pytest.mark.slow
def test_tagrelay_config_and_data_dir_from_the_environment(tmp_path: Path) -> None:
    # The file names one data directory, the environment another: the environment wins, for
    # serve and for sql alike, and neither command is given a flag.
    port = free_port()
    config = write_config(tmp_path / "tagrelay.yaml", tmp_path / "not-this-one", port)
    env = {"TAGRELAY_CONFIG": str(config), "TAGRELAY_DATA_DIR": str(tmp_path / "data")}
    tagrelay = Path(sys.executable).with_name("tagrelay")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(tagrelay), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    try:
        health = ["health", "--ready", "--timeout-secs", "1"]
        for _ in range(300):
            if process.poll() is not None:
                raise AssertionError("serve exited:\n" + log.read_text())
            if run(health, env).returncode == 0:
                break
        else:
            raise AssertionError("the relay did not become ready:\n" + log.read_text())

        done = run(["sql", "--format", "csv", "select count(*) as n from events"], env)

        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["n", "0"]
        assert (tmp_path / "data" / "admin.sock").exists()
        assert not (tmp_path / "not-this-one").exists()
    finally:
        process.terminate()
        process.wait(20)


def test_flags_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tagrelay.cli.main import build_parser

    monkeypatch.setenv("TAGRELAY_CONFIG", "/from/env.yaml")
    monkeypatch.setenv("TAGRELAY_DATA_DIR", "/from/env")
    args = build_parser().parse_args(["sql", "select 1"])
    assert (args.config, args.data_dir) == (Path("/from/env.yaml"), Path("/from/env"))
    args = build_parser().parse_args(["sql", "--config", "a.yaml", "--data-dir", "d", "select 1"])
    assert (args.config, args.data_dir) == (Path("a.yaml"), Path("d"))
    for command in (["dlq", "list"], ["dlq", "show", "1"], ["dlq", "purge", "--older-than", "1d"]):
        args = build_parser().parse_args(command)
        assert (args.config, args.data_dir) == (Path("/from/env.yaml"), Path("/from/env"))

    monkeypatch.delenv("TAGRELAY_CONFIG")
    monkeypatch.delenv("TAGRELAY_DATA_DIR")
    args = build_parser().parse_args(["serve"])
    assert (args.config, args.data_dir) == (Path("config/tagrelay.yaml"), None)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:9000/healthz"),
        ("::", "http://[::1]:9000/healthz"),
        ("10.1.2.3", "http://10.1.2.3:9000/healthz"),
        ("::1", "http://[::1]:9000/healthz"),
        ("relay.internal", "http://relay.internal:9000/healthz"),
    ],
)
def test_a_wildcard_listener_is_asked_on_loopback(host: str, url: str) -> None:
    keys = [{"id": "b", "kind": "server", "key": "k"}]
    config = Config.model_validate({"server": {"host": host, "port": 9000}, "keys": keys})
    assert health_url(config) == url
