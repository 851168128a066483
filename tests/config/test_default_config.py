"""config/tagrelay.yaml, the file a new user starts from, runs as is."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tagrelay.config.loader import load_config, parse_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "tagrelay.yaml"


@pytest.fixture
def empty_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        monkeypatch.delenv(name)


@pytest.mark.usefixtures("empty_environment")
def test_the_default_file_loads_with_an_empty_environment() -> None:
    config = load_config(DEFAULT_CONFIG)

    assert config.data_dir == Path("data")
    browser, server = config.keys
    assert (browser.id, browser.kind, browser.allowed_origins) == ("website", "browser", ["*"])
    assert browser.key.get_secret_value() == "dev-browser-key"
    assert (server.id, server.kind, server.allowed_origins) == ("backend", "server", [])
    assert server.key.get_secret_value() == "dev-server-key"
    (warehouse,) = config.forwarders
    assert (warehouse.id, warehouse.type) == ("warehouse", "warehouse")
    assert (warehouse.batch.max_events, warehouse.batch.max_wait_secs) == (5000, 1.0)


def test_the_keys_come_from_the_environment_when_set() -> None:
    env = {"TAGRELAY_BROWSER_KEY": "prod-browser", "TAGRELAY_SERVER_KEY": "prod-server"}
    config = parse_config(DEFAULT_CONFIG.read_text(encoding="utf-8"), str(DEFAULT_CONFIG), env)
    assert [k.key.get_secret_value() for k in config.keys] == ["prod-browser", "prod-server"]


def test_the_commented_out_examples_are_valid_once_uncommented() -> None:
    # The commented-out sections and the webhook example teach by example: they must stay valid.
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    examples = (
        r"server:|admin:|metrics:|debug:|paths:|identity:|identity_store:|consent:|privacy:|"
        r"- id: my-webhook|  "
    )
    uncommented = re.sub(rf"(?m)^(\s*)# (?={examples})", r"\1", text)
    assert uncommented != text
    env = {"HOOK_URL": "https://hooks.example.com/in", "HOOK_TOKEN": "t", "PORT": "9000"}
    config = parse_config(uncommented, "uncommented", env)
    assert config.server.port == 9000
    assert (config.admin.listen, config.admin.has_token) == ("127.0.0.1:9100", False)
    assert (config.debug.sample_rate, config.debug.buffer_events) == (0, 500)
    assert (config.identity_store.enabled, config.identity_store.ttl_days) == (True, 90)
    assert [f.type for f in config.forwarders] == ["warehouse", "webhook"]
    webhook = config.forwarders[1]
    assert webhook.model_dump()["headers"] == {"Authorization": "Bearer t"}
