"""LogThrottle: the first occurrence logs, repeats within the interval only count."""

from __future__ import annotations

import logging

import pytest

from tagrelay.logthrottle import LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_logs_once_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle = LogThrottle(logging.getLogger("t.throttle"), 60.0, clock=clock)
    caplog.set_level(logging.INFO, "t.throttle")
    assert throttle.log(logging.ERROR, "disk_full", "spool full") is True
    for _ in range(4):
        clock.now += 10
        assert throttle.log(logging.ERROR, "disk_full", "spool full") is False
    clock.now += 30  # 70 s after the first line
    assert throttle.log(logging.ERROR, "disk_full", "spool full", {"path": "x"}) is True
    records = [r for r in caplog.records if r.name == "t.throttle"]
    assert [r.repeated for r in records] == [1, 5]  # type: ignore[attr-defined]
    assert records[1].path == "x"  # type: ignore[attr-defined]


def test_keys_are_throttled_apart(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(logging.getLogger("t.keys"), 60.0, clock=Clock())
    caplog.set_level(logging.INFO, "t.keys")
    assert throttle.log(logging.INFO, "a", "m")
    assert throttle.log(logging.INFO, "b", "m")
    assert not throttle.log(logging.INFO, "a", "m")
    assert len([r for r in caplog.records if r.name == "t.keys"]) == 2


def test_forgets_the_oldest_key_past_max_keys() -> None:
    throttle = LogThrottle(logging.getLogger("t.max"), 60.0, max_keys=2, clock=Clock())
    for key in ("a", "b", "c"):
        assert throttle.log(logging.DEBUG, key, "m")
    assert throttle.log(logging.DEBUG, "a", "m")  # forgotten, so new again
    assert not throttle.log(logging.DEBUG, "c", "m")
