"""A relay started with the default configuration (config/tagrelay.yaml: the warehouse and
nothing else) holds only what that configuration needs: the other forwarders' modules, and
the libraries only they or encryption use, stay unimported (bench/memory_bench.py says what
that saves). The relay is started in a fresh interpreter, as ``tagrelay serve`` starts it,
so that nothing this test process imported counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tagrelay.forwarders import FORWARDERS

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "tagrelay.yaml"

STARTED_RELAY = """
import asyncio, json, sys
from pathlib import Path

from tagrelay.app import create_app
from tagrelay.cli.serve import start_relay
from tagrelay.config.loader import load_config


async def main() -> None:
    config = load_config(Path(sys.argv[1]))
    app = create_app(config, data_dir=Path(sys.argv[2]))
    runner, _ = await start_relay(app, config, "127.0.0.1", 0)
    try:
        print(json.dumps(sorted(sys.modules)))
    finally:
        await runner.cleanup()


asyncio.run(main())
"""

LIBRARIES_NOT_NEEDED = ("cryptography", "phonenumbers")
"""cryptography: encryption.keys and Google service accounts only; phonenumbers: the ad
forwarders' user data only."""


@pytest.fixture(scope="module")
def modules_of_a_started_relay(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    data_dir = tmp_path_factory.mktemp("data")
    done = subprocess.run(
        [sys.executable, "-c", STARTED_RELAY, str(DEFAULT_CONFIG), str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.slow
def test_the_configured_forwarder_is_imported(modules_of_a_started_relay: set[str]) -> None:
    assert FORWARDERS["warehouse"].__module__ in modules_of_a_started_relay


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(set(FORWARDERS) - {"warehouse"}))
def test_a_forwarder_no_configuration_names_is_not_imported(
    kind: str, modules_of_a_started_relay: set[str]
) -> None:
    assert FORWARDERS[kind].__module__ not in modules_of_a_started_relay


@pytest.mark.slow
@pytest.mark.parametrize("library", LIBRARIES_NOT_NEEDED)
def test_a_library_only_other_options_need_is_not_imported(
    library: str, modules_of_a_started_relay: set[str]
) -> None:
    assert library not in modules_of_a_started_relay
