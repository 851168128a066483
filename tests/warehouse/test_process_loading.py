"""The warehouse process's loads: a batch parsed and stored with the cyclic collector paused
(and the collector as it was afterwards, whatever happened), and a checkpoint once the loads
stop."""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tagrelay.warehouse import Warehouse
from tagrelay.warehouse.process import SpoolReaders, _serve, collector_paused, serve_loads


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


def test_the_process_checkpoints_once_loads_stop(tmp_path: Path) -> None:
    database = tmp_path / "w.duckdb"
    wal = tmp_path / "w.duckdb.wal"
    warehouse = Warehouse.open("duckdb", str(database), settings={"checkpoint_threshold": "1GB"})
    relay_end, child_end = multiprocessing.Pipe()
    checkpoints: list[int] = []
    checkpoint = warehouse.checkpoint

    def counted() -> None:
        checkpoints.append(wal.stat().st_size)
        checkpoint()

    warehouse.checkpoint = counted  # type: ignore[method-assign]
    serving = threading.Thread(
        target=serve_loads, args=(child_end, warehouse, SpoolReaders(), 0.2), daemon=True
    )
    serving.start()
    try:
        lines = b"\n".join(orjson.dumps({"messageId": f"m{i}", "n": i}) for i in range(200))
        relay_end.send(("insert", lines))
        assert relay_end.recv()[0] == "ok"
        assert wal.stat().st_size > 0  # the rows are in the log only
        deadline = time.monotonic() + 30
        while not checkpoints and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # no second checkpoint without a new load
        assert len(checkpoints) == 1 and checkpoints[0] > 0
        assert not wal.exists() or wal.stat().st_size == 0
    finally:
        relay_end.close()
        serving.join(10)
        warehouse.close()
    assert not serving.is_alive()
