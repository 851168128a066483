"""``server.event_loop``: which loop ``tagrelay serve`` runs on."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tagrelay.cli.serve import loop_name, new_event_loop
from tagrelay.errors import TagrelayError


@pytest.mark.parametrize(
    ("choice", "expected"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_each_choice_gives_its_loop(choice: str, expected: str) -> None:
    loop = new_event_loop(choice)
    try:
        assert loop_name(loop) == expected
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes the import fail
    loop = new_event_loop("auto")
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


def test_asking_for_uvloop_without_it_is_a_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(TagrelayError, match="uvloop is not installed"):
        new_event_loop("uvloop")
