"""deploy/compose.jetstream.yaml, checked without a Docker engine: three relay replicas on
one NATS JetStream server and one PostgreSQL, with Prometheus scraping every replica and
Grafana; the relay configuration mounted into the replicas valid with the environment
compose gives them, and the two agreeing on the stream's server, the database, the admin
listener and the variables used."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from tagrelay.config.loader import parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.jetstream.yaml"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, each ``${VAR:?...}`` given a value and each
    ``${VAR:-default}`` its default, as compose would with deploy/.env filled in."""
    given = {
        "TAGRELAY_BROWSER_KEY": "b-7f3c1e",
        "TAGRELAY_SERVER_KEY": "s-9a2d4b",
        "TAGRELAY_ALLOWED_ORIGIN": "https://www.example.com",
    }

    def value_of(match: re.Match[str]) -> str:
        name, rest = match.group(1), match.group(2) or ""
        if rest.startswith(":-"):
            return rest[2:]
        return given.get(name, "x" * 32)

    pattern = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)((?::[-?])[^}]*)?\}")
    return {k: pattern.sub(value_of, str(v)) for k, v in service["environment"].items()}


def relay_config() -> tuple[Path, str]:
    relay = compose()["services"]["relay"]
    config_path = Path(relay["environment"]["TAGRELAY_CONFIG"])
    local = bind_mounts(relay)[str(config_path)]
    return local, local.read_text()


def test_three_relay_replicas_nats_postgres_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert set(services) == {"relay", "nats", "postgres", "prometheus", "grafana"}
    relay = services["relay"]
    assert relay["deploy"]["replicas"] == 3
    (ports,) = relay["ports"]
    assert ports == "8081-8083:8080"  # one host port per replica
    assert "-js" in services["nats"]["command"]  # JetStream on, with its store on a volume
    store = services["nats"]["command"][services["nats"]["command"].index("-sd") + 1]
    assert any(v.endswith(":" + store) for v in services["nats"]["volumes"])
    for name in ("nats", "postgres", "prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+(\.\d+)?", image), image
    for service in services.values():
        for local in bind_mounts(service).values():
            assert local.exists(), local


def test_the_replicas_configuration_is_valid_with_the_environment_compose_gives() -> None:
    services = compose()["services"]
    local, text = relay_config()
    config = parse_config(text, str(local), environment(services["relay"]))
    assert config.spool.type == "jetstream"
    (server,) = config.spool.servers
    assert urlsplit(server).hostname == "nats"
    (warehouse,) = config.forwarders
    assert warehouse.dialect == "postgres"  # type: ignore[attr-defined]
    dsn = urlsplit(warehouse.dsn.get_secret_value())  # type: ignore[attr-defined]
    postgres = environment(services["postgres"])
    assert (dsn.hostname, dsn.username, dsn.path) == (
        "postgres",
        postgres["POSTGRES_USER"],
        "/" + postgres["POSTGRES_DB"],
    )
    assert dsn.password == postgres["POSTGRES_PASSWORD"]
    # every variable the configuration uses is given, a secret refused when missing
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text))
    given = services["relay"]["environment"]
    assert used <= set(given)
    for name in used:  # a secret compose refuses to start without, never passed empty
        assert re.search(r"\$\{[A-Z_]+:\?.+\}", given[name]), given[name]


def test_prometheus_scrapes_every_replica_with_the_token(tmp_path: Path) -> None:
    stack = compose()
    prometheus = stack["services"]["prometheus"]
    (flag,) = [f for f in prometheus["command"] if f.startswith("--config.file=")]
    path = Path(flag.split("=", 1)[1])
    local = bind_mounts(prometheus)[str(path.parent)] / path.name
    config = yaml.safe_load(local.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "tagrelay"  # what alerts.yml selects on
    (sd,) = job["dns_sd_configs"]
    relay = parse_config(relay_config()[1], "relay", environment(stack["services"]["relay"]))
    assert sd["names"] == ["relay"] and sd["port"] == int(relay.admin.listen.rsplit(":", 1)[1])
    credentials = Path(job["authorization"]["credentials_file"])
    assert stack["secrets"][credentials.name] == {"environment": "TAGRELAY_ADMIN_TOKEN"}
    assert relay.admin.has_token
    from tests.deploy.test_prometheus import binary_or_skip

    promtool = binary_or_skip("promtool")
    token = tmp_path / "token"
    token.write_text("x" * 32)
    job["authorization"]["credentials_file"] = str(token)
    config["rule_files"] = [str(local.parent / rules) for rules in config["rule_files"]]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [promtool, "check", "config", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
