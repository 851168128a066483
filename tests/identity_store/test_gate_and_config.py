"""The gate that holds an enriching forwarder's batch until the identity store's writer has
passed it, and the configuration's rules for the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from tagrelay.forwarders._fleet import WriterGate
from tagrelay.identity_store import IdentityStoreConfig
from tagrelay.metrics import Metrics
from tagrelay.reload import RESTART_ONLY
from tests.support import make_config

META = {"id": "meta", "type": "meta", "pixel_id": "1234567890", "access_token": "t"}


def waits(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "tagrelay_identity_store_waits_total", {"forwarder": "meta", "outcome": outcome}
    )
    return value or 0.0


async def test_a_batch_waits_until_the_writer_passes_its_last_event() -> None:
    metrics = Metrics()
    gate = WriterGate(30.0, metrics)
    gate.moved(10)
    await gate.passed("meta", 10)  # passed already: no wait, nothing counted
    assert waits(metrics, "caught_up") == 0
    waiting = asyncio.create_task(gate.passed("meta", 15))
    await asyncio.sleep(0)
    gate.moved(14)
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.moved(15)
    await asyncio.wait_for(waiting, 5)
    assert waits(metrics, "caught_up") == 1


async def test_a_writer_that_does_not_pass_holds_a_batch_no_longer_than_the_wait() -> None:
    metrics = Metrics()
    gate = WriterGate(0.01, metrics)
    await gate.passed("meta", 1)
    assert waits(metrics, "timeout") == 1
    assert gate._waiters == []


def test_enrich_needs_the_identity_store(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"identity_store\.enabled"):
        make_config(tmp_path, forwarders=[{**META, "enrich": True}])
    config = make_config(
        tmp_path, forwarders=[{**META, "enrich": True}], identity_store={"enabled": True}
    )
    assert config.forwarders[0].enrich is True  # type: ignore[attr-defined]


def test_the_writers_id_is_reserved_while_the_store_is_on(tmp_path: Path) -> None:
    taken = [{**META, "id": "identity_store"}]
    with pytest.raises(ValidationError, match="identity store's own"):
        make_config(tmp_path, forwarders=taken, identity_store={"enabled": True})
    make_config(tmp_path, forwarders=taken)  # free while the store is off


def test_click_id_windows_are_checked_and_capped_by_the_ttl() -> None:
    with pytest.raises(ValidationError, match="not a click id"):
        IdentityStoreConfig(click_id_days={"utm_source": 3})
    config = IdentityStoreConfig(ttl_days=20, click_id_days={"gclid": 60})
    secs = config.click_id_secs()
    assert secs["gclid"] == 20 * 86_400  # never past ttl_days
    assert secs["fbclid"] == 7 * 86_400


def test_the_store_settings_need_a_restart() -> None:
    assert "identity_store" in RESTART_ONLY
