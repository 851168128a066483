"""The Docker image and the compose stack, checked without a Docker engine: the Dockerfile
and compose.yaml parsed and held to what they promise, the image's configuration loaded and
run as the container would run it (its ENV, its CMD, its HEALTHCHECK), the .dockerignore
applied as Docker applies it."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tagrelay.cli.devkeys import DEVELOPMENT_KEYS, refusal
from tagrelay.config.loader import parse_config
from tagrelay.config.models import Config
from tagrelay.errors import ConfigError
from tests.rig import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGE_CONFIG = DEPLOY / "tagrelay.yaml"
PRODUCTION_ENV = {
    "TAGRELAY_BROWSER_KEY": "b-7f3c1e",
    "TAGRELAY_SERVER_KEY": "s-9a2d4b",
    "TAGRELAY_ALLOWED_ORIGIN": "https://www.example.com",
}


# --- the Dockerfile, parsed -------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction, rest in dockerfile():
        if instruction == "FROM":
            found.append([])
        if found:
            found[-1].append((instruction, rest))
    return found


def image_env() -> dict[str, str]:
    """The final stage's ENV, as the container sees it."""
    env: dict[str, str] = {}
    for instruction, rest in stages()[-1]:
        if instruction == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def exec_form(instruction: str) -> list[str]:
    (rest,) = [r for i, r in stages()[-1] if i == instruction]
    if instruction == "HEALTHCHECK":
        rest = rest.split(" CMD ", 1)[1]
    form: list[str] = json.loads(rest)
    return form


def copied_files() -> dict[str, str]:
    """Local source -> destination of each COPY from the build context (not --from)."""
    copies: dict[str, str] = {}
    for instruction, rest in dockerfile():
        if instruction == "COPY" and not rest.startswith("--from"):
            *sources, destination = rest.split()
            copies.update(dict.fromkeys(sources, destination))
    return copies


def test_the_base_image_is_pinned_to_an_exact_release() -> None:
    args = dict(rest.split("=", 1) for instruction, rest in dockerfile() if instruction == "ARG")
    pinned = re.compile(r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?")
    assert pinned.fullmatch(args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    for stage in stages():
        image = stage[0][1].split()[0]
        assert image == "${PYTHON_IMAGE}"


def test_no_wheel_or_build_tree_is_left_in_the_image() -> None:
    final = stages()[-1]
    from_build = [rest for instruction, rest in final if instruction == "COPY" and "--from" in rest]
    # only the virtualenv comes over from the build stage: no /wheels layer to delete later
    assert from_build == ["--from=build /opt/tagrelay /opt/tagrelay"]
    text = " ".join(rest for _, rest in final)
    assert ".whl" not in text and "/wheels" not in text and "pip install" not in text
    build_runs = " ".join(rest for instruction, rest in stages()[0] if instruction == "RUN")
    assert "--no-cache-dir" in build_runs


def test_the_container_runs_serve_with_the_image_config_and_checks_itself() -> None:
    env = image_env()
    copies = copied_files()
    assert copies["deploy/tagrelay.yaml"] == env["TAGRELAY_CONFIG"]
    volumes = [json.loads(r) for i, r in stages()[-1] if i == "VOLUME"]
    assert [env["TAGRELAY_DATA_DIR"]] in volumes
    assert env["TAGRELAY_DEV"] == "0"
    assert exec_form("ENTRYPOINT") == ["tagrelay"]
    assert exec_form("CMD") == ["serve"]  # no flag: the environment says where things are
    assert exec_form("HEALTHCHECK") == ["tagrelay", "health"]
    (user,) = [r for i, r in stages()[-1] if i == "USER"]
    assert user not in ("root", "0")


def test_every_file_the_image_copies_is_in_the_build_context() -> None:
    ignore = dockerignore()
    for source in copied_files():
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative and ".egg-info" not in relative:
                assert not ignored(relative, ignore), f"{relative} is left out by .dockerignore"


# --- .dockerignore, applied as Docker does -----------------------------------------------


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _matches(pattern: str, path: str) -> bool:
    """Docker's matching: ``*`` within a path segment, ``**`` across them; a pattern that
    matches a directory matches everything under it."""
    regex = ""
    parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
    for part in parts:
        if part in ("**", "**/"):
            regex += ".*"
        elif part == "*":
            regex += "[^/]*"
        elif part == "?":
            regex += "[^/]"
        else:
            regex += re.escape(part)
    return re.fullmatch(regex + "(/.*)?", path) is not None


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if _matches(pattern[1:], path):
                result = False
        elif _matches(pattern, path):
            result = True
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        "data/spool.sqlite3",
        "tests/test_readme.py",
        "tests/sdk/node_modules/x/index.js",
        "bench/README.md",
        "config/tagrelay.yaml",
        "deploy/compose.yaml",
        "deploy/.env",
        "src/tagrelay/__pycache__/app.cpython-311.pyc",
        "src/tagrelay.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_leaves_out(path: str) -> None:
    assert ignored(path, dockerignore())


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "src/tagrelay/app.py",
        "templates/p.js",
        "deploy/tagrelay.yaml",
    ],
)
def test_dockerignore_keeps(path: str) -> None:
    assert not ignored(path, dockerignore())


def test_the_matcher_follows_dockers_rules() -> None:
    assert _matches("**/__pycache__", "a/b/__pycache__/x.pyc")
    assert _matches("*", "anything/below")
    assert not _matches("deploy/tagrelay.yaml", "deploy/compose.yaml")
    assert fnmatch.fnmatch("x.pyc", "*.pyc")  # the same single-segment sense


# --- the image's configuration ----------------------------------------------------------


def test_the_image_config_is_a_production_one() -> None:
    config = parse_config(IMAGE_CONFIG.read_text(), str(IMAGE_CONFIG), PRODUCTION_ENV)
    assert config.data_dir == Path("/data")
    assert config.demo.enabled is False
    for key in config.keys:
        assert "*" not in key.allowed_origins
        assert key.key.get_secret_value() not in DEVELOPMENT_KEYS
    assert [k.allowed_origins for k in config.keys if k.kind == "browser"] == [
        ["https://www.example.com"]
    ]
    assert refusal(config, image_env()) == (None, [])
    # the admin listener (/metrics) stays on the container's own loopback unless opened
    assert (config.admin.listen, config.admin.has_token) == ("127.0.0.1:9100", False)


def test_the_image_config_opens_the_admin_listener_only_with_a_token() -> None:
    text = IMAGE_CONFIG.read_text()
    opened = {**PRODUCTION_ENV, "TAGRELAY_ADMIN_LISTEN": "0.0.0.0:9100"}
    with pytest.raises(ConfigError, match=r"no admin\.token"):
        parse_config(text, str(IMAGE_CONFIG), opened)
    token = "t" * 32
    config = parse_config(text, str(IMAGE_CONFIG), {**opened, "TAGRELAY_ADMIN_TOKEN": token})
    assert config.admin.listen == "0.0.0.0:9100"
    assert config.admin.token.get_secret_value() == token


def test_the_image_config_has_no_default_for_a_key_or_an_origin() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(IMAGE_CONFIG.read_text(), str(IMAGE_CONFIG), {})
    message = str(caught.value)
    for name in PRODUCTION_ENV:
        assert f"environment variable {name} is not set" in message


def dev_key_config(env: dict[str, str]) -> Config:
    return parse_config(IMAGE_CONFIG.read_text(), str(IMAGE_CONFIG), {**PRODUCTION_ENV, **env})


def test_development_keys_are_refused_when_tagrelay_dev_is_0() -> None:
    config = dev_key_config({"TAGRELAY_SERVER_KEY": "dev-server-key"})
    why, _ = refusal(config, {"TAGRELAY_DEV": "0"})
    assert why is not None and "backend" in why and "TAGRELAY_DEV=1" in why
    assert "dev-server-key" not in why  # the value is never repeated
    assert refusal(config, {"TAGRELAY_DEV": "1"}) == (None, [])
    assert refusal(config, {}) == (None, ["backend"])  # a checkout: a warning only
    assert refusal(config, {"TAGRELAY_DEV": "yes"})[0] == (
        "TAGRELAY_DEV must be 0 (refuse development keys) or 1 (allow them)"
    )


# --- the container, played without Docker ------------------------------------------------


def container_env(tmp_path: Path, config: Path, **extra: str) -> dict[str, str]:
    """The environment ``docker run`` gives the relay: the image's ENV (its paths mapped to
    this checkout and ``tmp_path``) and the variables passed with ``-e``."""
    env = image_env()
    del env["PATH"]
    env["TAGRELAY_CONFIG"] = str(config)
    env["TAGRELAY_DATA_DIR"] = str(tmp_path / "data")
    return {**os.environ, **env, **extra}


def tagrelay(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("tagrelay")), *args]


@pytest.mark.slow
def test_the_container_starts_answers_its_healthcheck_and_sql_needs_no_flag(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = container_env(
        tmp_path,
        IMAGE_CONFIG,
        **PRODUCTION_ENV,
        PORT=str(port),
        TAGRELAY_BASE_PATH="/t",
        TAGRELAY_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
    )
    log = tmp_path / "container.log"
    with log.open("wb") as out:
        relay = subprocess.Popen(
            tagrelay(*exec_form("CMD")), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        healthcheck = exec_form("HEALTHCHECK")
        for _ in range(200):
            assert relay.poll() is None, "the relay exited:\n" + log.read_text()
            check = subprocess.run(
                tagrelay(*healthcheck[1:]), env=env, capture_output=True, text=True
            )
            if check.returncode == 0:
                break
            time.sleep(0.1)
        assert check.returncode == 0, check.stderr
        assert check.stdout.strip() == f"ok: http://127.0.0.1:{port}/t/healthz"

        sql = subprocess.run(
            tagrelay("sql", "--format", "csv", "select count(*) as n from events"),
            env=env,
            capture_output=True,
            text=True,
        )
        assert sql.returncode == 0, sql.stderr
        assert sql.stdout.splitlines() == ["n", "0"]
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(30)


@pytest.mark.parametrize(
    ("config", "env"),
    [
        # a key variable set to the development value
        (IMAGE_CONFIG, {**PRODUCTION_ENV, "TAGRELAY_BROWSER_KEY": "dev-browser-key"}),
        # the checkout's development config mounted over the image's
        (ROOT / "config" / "tagrelay.yaml", {}),
    ],
    ids=["key-variable", "development-config"],
)
def test_the_container_refuses_development_keys(
    tmp_path: Path, config: Path, env: dict[str, str]
) -> None:
    run_env = container_env(tmp_path, config, **env, PORT=str(free_port()))
    for name in ("TAGRELAY_BROWSER_KEY", "TAGRELAY_SERVER_KEY"):
        if name not in env:
            run_env.pop(name, None)
    done = subprocess.run(
        tagrelay(*exec_form("CMD")), env=run_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "hold a development key" in done.stderr
    assert "TAGRELAY_DEV=1" in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created


# --- compose.yaml ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> local path of the service's bind mounts (``./...`` sources)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def test_compose_runs_the_relay_prometheus_and_grafana_from_pinned_images() -> None:
    services = compose()["services"]
    assert set(services) == {"relay", "prometheus", "grafana"}
    relay = services["relay"]
    assert (DEPLOY / relay["build"]["context"]).resolve() == ROOT
    assert (ROOT / relay["build"]["dockerfile"]).is_file()
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", image), image
    for service in services.values():
        for local in bind_mounts(service).values():
            assert local.exists(), local


def test_compose_gives_the_relay_every_variable_its_config_requires() -> None:
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", IMAGE_CONFIG.read_text()))
    environment = compose()["services"]["relay"]["environment"]
    assert required <= set(environment)
    for name in required:
        # compose refuses to start without it, rather than passing an empty key
        assert re.fullmatch(rf"\$\{{{name}:\?.+\}}", environment[name]), environment[name]
    assert "TAGRELAY_DEV" not in environment


def compose_relay_env() -> dict[str, str]:
    """The relay's environment in compose, a required ``${VAR:?...}`` given a value, an
    optional ``${VAR:-default}`` its default."""
    environment = compose()["services"]["relay"]["environment"]

    def value_of(name: str, value: str) -> str:
        if not value.startswith("${"):
            return value
        if ":-" in value:
            return value[value.index(":-") + 2 : -1]
        return PRODUCTION_ENV.get(name, "x" * 32)

    return {name: value_of(name, str(value)) for name, value in environment.items()}


def compose_prometheus_config() -> tuple[Path, dict[str, Any]]:
    """The local path and the content of the configuration Prometheus runs with."""
    prometheus = compose()["services"]["prometheus"]
    (config_flag,) = [f for f in prometheus["command"] if f.startswith("--config.file=")]
    config_path = Path(config_flag.split("=", 1)[1])
    local = bind_mounts(prometheus)[str(config_path.parent)] / config_path.name
    return local, yaml.safe_load(local.read_text())


def test_prometheus_in_compose_scrapes_the_admin_listener_with_the_token() -> None:
    stack = compose()
    local, config = compose_prometheus_config()
    for rules in config["rule_files"]:
        assert (local.parent / rules).is_file()
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "tagrelay"  # what alerts.yml selects on
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "relay"
    relay = parse_config(IMAGE_CONFIG.read_text(), str(IMAGE_CONFIG), compose_relay_env())
    listen_host, listen_port = relay.admin.listen.rsplit(":", 1)
    assert (listen_host, int(port)) == ("0.0.0.0", int(listen_port))
    assert relay.admin.has_token
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # the token: a compose secret made from the variable the relay reads it from
    credentials = Path(job["authorization"]["credentials_file"])
    assert credentials.parent == Path("/run/secrets")
    assert credentials.name in stack["services"]["prometheus"]["secrets"]
    assert stack["secrets"][credentials.name] == {"environment": "TAGRELAY_ADMIN_TOKEN"}
    assert "${TAGRELAY_ADMIN_TOKEN" in IMAGE_CONFIG.read_text()
    # the admin port is for the stack's network only
    assert all(not p.endswith(":9100") for p in stack["services"]["relay"]["ports"])


def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path) -> None:
    # in full (rule files, token file): a copy whose token file exists here
    from tests.deploy.test_prometheus import binary_or_skip

    promtool = binary_or_skip("promtool")
    local, config = compose_prometheus_config()
    token = tmp_path / "token"
    token.write_text("x" * 32)
    config["scrape_configs"][0]["authorization"]["credentials_file"] = str(token)
    config["rule_files"] = [str(local.parent / rules) for rules in config["rule_files"]]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [promtool, "check", "config", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


def test_grafana_in_compose_loads_the_dashboard_from_prometheus() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tagrelay.yml").read_text())[
        "providers"
    ]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "tagrelay.json").is_file()
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (mounts[str(home.parent)] / home.name).is_file()
    dashboard = json.loads((dashboards / "tagrelay.json").read_text())
    assert dashboard["uid"] == "tagrelay"


# --- the licence --------------------------------------------------------------------------


def test_the_license_file_is_the_one_pyproject_names() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = { text = "Apache-2.0" }' in pyproject
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


def test_the_image_encrypts_the_spool_once_given_a_key() -> None:
    from tagrelay.crypto import generate_key

    text = IMAGE_CONFIG.read_text()
    plain = parse_config(text, str(IMAGE_CONFIG), PRODUCTION_ENV)
    assert plain.encryption.keyring() is None
    new, old = generate_key(), generate_key()
    keyed = parse_config(
        text,
        str(IMAGE_CONFIG),
        {**PRODUCTION_ENV, "TAGRELAY_ENCRYPTION_KEY": new, "TAGRELAY_ENCRYPTION_KEY_OLD": old},
    )
    assert [k.get_secret_value() for k in keyed.encryption.keys] == [new, old]
