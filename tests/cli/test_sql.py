"""``tagrelay sql`` with no relay running: it opens the warehouse file itself, read-only, and
stops a query at ``--timeout-secs`` with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from tagrelay.cli.main import main
from tagrelay.warehouse import Warehouse


@pytest.fixture
def config(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    Warehouse.open("duckdb", str(data_dir / "warehouse.duckdb")).close()
    cfg = tmp_path / "tagrelay.yaml"
    cfg.write_text(
        f"data_dir: {data_dir}\n"
        "keys:\n  - {id: backend, kind: server, key: k}\n"
        "forwarders:\n  - {id: warehouse, type: warehouse}\n"
    )
    return cfg


def test_a_query_past_timeout_secs_is_stopped_with_a_clear_error(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "sql",
            "--config",
            str(config),
            "--timeout-secs",
            "0.2",
            "select count(*) from range(1000000000000)",
        ]
    )

    assert code == 1
    err = capsys.readouterr().err
    assert "error: query_timeout: the query ran longer than 0.2 s and was stopped" in err


def test_timeout_secs_must_be_positive(config: Path) -> None:
    with pytest.raises(SystemExit):
        main(["sql", "--config", str(config), "--timeout-secs", "0", "select 1"])
