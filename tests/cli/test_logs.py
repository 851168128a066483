"""The CLI's log handler writes to the standard error of the moment."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from tagrelay.cli.logs import setup_logging


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.usefixtures("root_logging")
def test_records_go_to_the_stderr_of_the_moment_not_a_closed_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("info", "json")
    first.close()  # as a capturing test's stream is, once that test ends
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("tagrelay.test").info("still heard")
    written = later.getvalue()
    assert '"msg":"still heard"' in written
    assert "Logging error" not in written
