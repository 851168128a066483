"""The warehouse process's load of a batch: parsed and stored with the cyclic collector
paused, and the collector as it was afterwards, whatever happened."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tagrelay.warehouse import Warehouse
from tagrelay.warehouse.process import SpoolReaders, _serve, collector_paused


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


@pytest.mark.usefixtures("collector_on")
def test_a_batch_loads_with_the_collector_paused_and_it_runs_again_after(tmp_path: Path) -> None:
    seen: list[bool] = []
    warehouse = Warehouse.open("duckdb", str(tmp_path / "w.duckdb"))
    insert = warehouse.insert

    def watching(events: list[dict[str, object]]) -> object:
        seen.append(gc.isenabled())
        return insert(events)

    warehouse.insert = watching  # type: ignore[method-assign]
    lines = b"\n".join(orjson.dumps({"messageId": f"m{i}", "type": "track"}) for i in range(3))
    try:
        answer = _serve(warehouse, SpoolReaders(), ("insert", lines))
    finally:
        warehouse.close()
    assert answer[0] == "ok" and answer[1].inserted == 3
    assert seen == [False]
    assert gc.isenabled()


@pytest.mark.usefixtures("collector_on")
def test_the_collector_is_back_after_a_failure() -> None:
    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    was = gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        if was:
            gc.enable()
