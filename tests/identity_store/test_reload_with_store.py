"""A reload while the identity store is on: its writer is no configured forwarder, so a
reload neither reports, stops nor retires it, a forwarder added with enrich: true is gated
on it, and a change of identity_store itself waits for a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tagrelay.appkeys import SPOOL, WORKERS
from tagrelay.identity_store import IDENTITY_WRITER_ID
from tests.support import Recorder, wait_idle
from tests.test_reload import base_config, hook, hooks, start_relay

__all__ = ["hooks", "start_relay"]  # the fixtures, used by name


async def test_the_writer_runs_on_through_reloads(
    tmp_path: Path, start_relay: Any, hooks: tuple[Recorder, Recorder]
) -> None:
    one, two = hooks
    raw = base_config(tmp_path, identity_store={"enabled": True}, forwarders=[hook(one, "one")])
    relay = await start_relay(raw)
    assert await relay.send("a1", "a2") == 200
    await wait_idle(relay.app)
    writer = relay.app[WORKERS][IDENTITY_WRITER_ID]
    assert writer.status()["position"] == relay.app[SPOOL].head

    raw["forwarders"] = [hook(two, "two")]
    report = await relay.reload(raw)
    assert report.forwarders == {"added": ["two"], "removed": ["one"], "changed": []}
    assert relay.app[WORKERS][IDENTITY_WRITER_ID] is writer  # not restarted
    assert IDENTITY_WRITER_ID in relay.app[SPOOL].positions()

    raw["identity_store"] = {"enabled": True, "ttl_days": 30}
    report = await relay.reload(raw)
    assert "identity_store" in report.needs_restart
    assert relay.app[WORKERS][IDENTITY_WRITER_ID] is writer

    assert await relay.send("b1") == 200
    await wait_idle(relay.app)
    assert writer.status()["position"] == relay.app[SPOOL].head
