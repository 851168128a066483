"""``tagrelay dlq`` against a running relay (its admin socket) and, stopped, against the
spool file: dead letters made by failing fake destinations, listed, shown, replayed once
the fake recovers (it receives exactly those events, once), kept when the replay fails
again, filtered, purged by age, pruned by retention, and counted."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tagrelay.app import create_app
from tagrelay.appkeys import SPOOL
from tagrelay.cli.main import main
from tagrelay.config.loader import load_config
from tagrelay.forwarders._http import SCRUBBED
from tagrelay.spool import sqlite as spool_module
from tests.support import Recorder, basic, metric_value, recording_server, wait_idle

SERVER_KEY = "dlq-server-key"
TOKEN = "hook-s3cret-token"
DAY_MS = 86_400_000


def write_config(
    tmp_path: Path,
    hook: str,
    other: str,
    extra: str = "",
    hook_enabled: bool = True,
    hook_filter: str = "{}",
) -> Path:
    cfg = tmp_path / "tagrelay.yaml"
    cfg.write_text(
        f"""
data_dir: {tmp_path / "data"}
keys:
  - {{id: backend, kind: server, key: {SERVER_KEY}}}
spool: {{prune_interval_secs: 0.05}}
forwarders:
  - id: hook
    type: webhook
    enabled: {str(hook_enabled).lower()}
    endpoint: {hook}
    headers: {{Authorization: "Bearer {TOKEN}"}}
    batch: {{max_events: 10, max_wait_secs: 0}}
    filter: {hook_filter}
  - id: other
    type: webhook
    endpoint: {other}
    batch: {{max_events: 10, max_wait_secs: 0}}
    retry: {{max_attempts: 1, max_age_secs: 0.001}}
{extra}
"""
    )
    return cfg


class Rig:
    """Two fake destinations (``hook``, ``other``), the config file naming them, and the
    relay once started."""

    def __init__(
        self, tmp_path: Path, hook: Recorder, other: Recorder, client_factory: Any
    ) -> None:
        self.tmp_path = tmp_path
        self.hook = hook
        self.other = other
        self.cfg = write_config(tmp_path, hook.url, other.url)
        self._client_factory = client_factory
        self.client: TestClient | None = None

    def configure(
        self, extra: str = "", *, hook_enabled: bool = True, hook_filter: str = "{}"
    ) -> None:
        self.cfg = write_config(
            self.tmp_path, self.hook.url, self.other.url, extra, hook_enabled, hook_filter
        )

    async def start(self) -> TestClient:
        self.client = await self._client_factory(create_app(load_config(self.cfg)))
        return self.client

    @property
    def app(self) -> Any:
        assert self.client is not None
        return self.client.app

    async def stop(self) -> None:
        assert self.client is not None
        await self.client.close()
        self.client = None

    async def post(self, *message_ids: str) -> None:
        assert self.client is not None
        batch = [
            {"type": "track", "event": "Order Completed", "messageId": m, "userId": "u1"}
            for m in message_ids
        ]
        resp = await self.client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
        assert resp.status == 200, await resp.text()
        await wait_idle(self.app)

    async def dead_hook(self, *message_ids: str, body: bytes = b'{"error": "invalid"}') -> None:
        """``message_ids`` dead-lettered at ``hook`` (a 400); ``other`` takes them."""
        self.hook.script = [(400, {}, body)] * 5
        await self.post(*message_ids)
        self.hook.script = []

    async def dlq(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        """``tagrelay dlq ARGS`` (the real command, in a thread: it runs its own loop)."""
        argv = ["dlq", args[0], "--config", str(self.cfg), *args[1:]]
        code = await asyncio.to_thread(main, argv)
        out = capsys.readouterr()
        return code, out.out, out.err

    async def listed(self, capsys: pytest.CaptureFixture[str], *args: str) -> list[Any]:
        code, out, err = await self.dlq(capsys, "list", "--format", "json", *args)
        assert code == 0, err
        found: list[Any] = orjson.loads(out)
        return found


@pytest.fixture
async def rig(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> AsyncIterator[Rig]:
    async with (
        recording_server("hook", ["/hook"], "/hook") as hook,
        recording_server("other", ["/other"], "/other") as other,
    ):
        rig = Rig(tmp_path, hook, other, aiohttp_client)
        yield rig
        if rig.client is not None:
            await rig.stop()


def sent(rec: Recorder) -> list[str]:
    """The messageIds of every event the fake received, in order."""
    return [e["messageId"] for r in rec.requests for e in orjson.loads(r["body"])["batch"]]


def stored(app: Any, forwarder: str) -> float:
    return metric_value(app, "tagrelay_dead_letters_stored", {"forwarder": forwarder})


def replayed(app: Any, forwarder: str, outcome: str) -> float:
    labels = {"forwarder": forwarder, "outcome": outcome}
    return metric_value(app, "tagrelay_dead_letters_replayed_total", labels)


async def test_list_and_show_in_every_format_without_a_secret(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    await rig.start()
    echo = orjson.dumps({"error": "invalid event", "request_auth": f"Bearer {TOKEN}"}) + b" " * 8
    long_body = echo + b"x" * 300
    await rig.dead_hook("m1", "m2", body=long_body)

    code, table, _ = await rig.dlq(capsys, "list")
    assert code == 0
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")][:4] == [
        "id",
        "forwarder",
        "dead_at",
        "reason",
    ]
    assert len(lines) == 2 + 2 + 1  # header, rule, two rows, count
    assert "status_4xx" in lines[2] and "hook" in lines[2] and "m1" in lines[2]
    detail_cell = lines[2].split(" | ")[-1].strip()
    assert detail_cell.endswith("...") and len(detail_cell) <= 60  # long details are cut

    found = await rig.listed(capsys)
    assert [(d["forwarder"], d["message_id"], d["reason"]) for d in found] == [
        ("hook", "m1", "status_4xx"),
        ("hook", "m2", "status_4xx"),
    ]
    assert found[0]["attempts"] == 1 and found[0]["event"] == "Order Completed"
    assert found[0]["detail"].startswith("HTTP 400: ") and "x" * 300 in found[0]["detail"]

    code, text, _ = await rig.dlq(capsys, "list", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["message_id"] for r in rows] == ["m1", "m2"]
    assert rows[1]["id"] == str(found[1]["id"]) and rows[1]["detail"] == found[1]["detail"]

    code, text, _ = await rig.dlq(capsys, "show", str(found[1]["id"]))
    assert code == 0
    assert f"id:         {found[1]['id']}" in text and "reason:     status_4xx" in text
    assert '"messageId": "m2"' in text and "x" * 300 in text  # show prints it all
    code, text, _ = await rig.dlq(capsys, "show", str(found[1]["id"]), "--format", "json")
    shown = orjson.loads(text)
    assert shown["payload"]["messageId"] == "m2" and shown["payload"]["userId"] == "u1"

    code, _, err = await rig.dlq(capsys, "show", "999")
    assert code == 1 and "error: not_found: no dead letter with id 999" in err

    assert SCRUBBED in found[0]["detail"]  # the destination echoed the token
    every_output = table + orjson.dumps(found).decode() + text
    assert TOKEN not in every_output


async def test_replay_delivers_them_once_the_destination_recovers(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    await rig.start()
    await rig.dead_hook("m1", "m2", "m3")
    assert sent(rig.hook) == ["m1", "m2", "m3"]  # the try that failed
    assert stored(rig.app, "hook") == 3 and stored(rig.app, "other") == 0
    rig.hook.requests.clear()
    rig.other.requests.clear()

    code, out, err = await rig.dlq(capsys, "replay", "--forwarder", "hook")

    assert code == 0, err
    assert out.strip() == "hook: 3 selected, 3 delivered, 0 dropped, 0 failed again, 0 skipped"
    assert sorted(sent(rig.hook)) == ["m1", "m2", "m3"]
    assert rig.other.requests == []  # to that forwarder only
    assert await rig.listed(capsys) == []
    assert stored(rig.app, "hook") == 0
    assert replayed(rig.app, "hook", "delivered") == 3

    code, out, _ = await rig.dlq(capsys, "replay", "--forwarder", "hook")
    assert code == 0 and out.strip() == "no dead letters match"
    assert sorted(sent(rig.hook)) == ["m1", "m2", "m3"]  # once


async def test_a_replay_that_fails_again_keeps_them_with_the_new_reason(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    await rig.start()
    await rig.dead_hook("m1", "m2")
    before = await rig.listed(capsys)
    rig.hook.script = [(400, {}, b'{"error": "still invalid"}')]

    code, out, _ = await rig.dlq(capsys, "replay", "--forwarder", "hook")

    assert code == 1
    assert "hook: 2 selected, 0 delivered, 0 dropped, 2 failed again, 0 skipped" in out
    assert 'failed again: status_4xx (2): HTTP 400: {"error": "still invalid"}' in out
    after = await rig.listed(capsys)
    assert [d["id"] for d in after] == [d["id"] for d in before]
    assert [d["attempts"] for d in after] == [2, 2]
    assert {d["detail"] for d in after} == {'HTTP 400: {"error": "still invalid"}'}
    assert all(a["dead_at_ms"] >= b["dead_at_ms"] for a, b in zip(after, before, strict=True))
    assert stored(rig.app, "hook") == 2
    assert replayed(rig.app, "hook", "failed") == 2


async def test_a_destination_asking_to_retry_stops_the_replay_of_its_dead_letters(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    await rig.start()
    await rig.dead_hook(*(f"m{i}" for i in range(25)))  # three batches of at most 10
    rig.hook.requests.clear()
    rig.hook.script = [(503, {}, b"down for maintenance")]

    code, out, _ = await rig.dlq(capsys, "replay", "--forwarder", "hook", "--format", "json")

    assert code == 1
    [report] = orjson.loads(out)
    assert (report["failed"], report["skipped"], report["skips"]) == (10, 15, {"not_tried": 15})
    assert report["failures"] == [
        {"reason": "status_5xx", "events": 10, "detail": "HTTP 503: down for maintenance"}
    ]
    assert len(rig.hook.requests) == 1  # one try, not one per batch
    found = await rig.listed(capsys)
    assert len(found) == 25
    assert sorted(d["attempts"] for d in found) == [1] * 15 + [2] * 10
    assert replayed(rig.app, "hook", "skipped") == 15


async def test_filters_choose_what_is_listed_and_replayed(
    rig: Rig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.start()
    real_now = spool_module._now_ms
    monkeypatch.setattr(spool_module, "_now_ms", lambda: real_now() - 3 * 3600 * 1000)
    await rig.dead_hook("old1", "old2")  # dead three hours ago
    monkeypatch.setattr(spool_module, "_now_ms", real_now)
    rig.hook.script = [(400, {}, b"no")] * 5
    rig.other.script = [(503, {}, b"busy")] * 5
    await rig.post("new1", "new2")  # dead now at both: status_4xx at hook, max_age at other
    rig.hook.script = []
    rig.other.script = []

    everything = await rig.listed(capsys)
    assert [(d["forwarder"], d["message_id"], d["reason"]) for d in everything] == [
        ("hook", "old1", "status_4xx"),
        ("hook", "old2", "status_4xx"),
        ("hook", "new1", "status_4xx"),
        ("hook", "new2", "status_4xx"),
        ("other", "new1", "max_age"),
        ("other", "new2", "max_age"),
    ]
    ids = [d["id"] for d in everything]
    recent = await rig.listed(capsys, "--since", "2h")
    assert [d["id"] for d in recent] == ids[2:]
    assert [d["id"] for d in await rig.listed(capsys, "--reason", "max_age")] == ids[4:]
    assert [d["id"] for d in await rig.listed(capsys, "--forwarder", "other")] == ids[4:]
    assert [
        d["id"] for d in await rig.listed(capsys, "--forwarder", "hook", "--since", "2h")
    ] == ids[2:4]
    assert [d["id"] for d in await rig.listed(capsys, "--ids", f"{ids[0]},{ids[5]}")] == [
        ids[0],
        ids[5],
    ]
    code, _, err = await rig.dlq(capsys, "list", "--limit", "2")
    assert code == 0 and "(the first 2; use --limit" in err
    rig.hook.requests.clear()
    rig.other.requests.clear()

    code, _, _ = await rig.dlq(capsys, "replay", "--ids", str(ids[0]), str(ids[5]))
    assert code == 0
    assert sent(rig.hook) == ["old1"] and sent(rig.other) == ["new2"]
    code, _, _ = await rig.dlq(capsys, "replay", "--reason", "max_age")
    assert code == 0
    assert sent(rig.hook) == ["old1"] and sent(rig.other) == ["new2", "new1"]
    code, _, _ = await rig.dlq(capsys, "replay", "--since", "2h")
    assert code == 0
    assert sent(rig.hook) == ["old1", "new1", "new2"]
    assert [d["message_id"] for d in await rig.listed(capsys)] == ["old2"]

    code, _, err = await rig.dlq(capsys, "replay")
    assert code == 1 and "say which dead letters" in err


async def test_purge_deletes_by_age_with_or_without_a_relay(
    rig: Rig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.configure("dead_letters: {retention_days: 365}")  # the maintenance leaves them be
    await rig.start()
    real_now = spool_module._now_ms
    monkeypatch.setattr(spool_module, "_now_ms", lambda: real_now() - 40 * DAY_MS)
    await rig.dead_hook("ancient1", "ancient2")
    monkeypatch.setattr(spool_module, "_now_ms", lambda: real_now() - 20 * DAY_MS)
    await rig.dead_hook("old1", "old2")
    monkeypatch.setattr(spool_module, "_now_ms", real_now)
    await rig.dead_hook("new1")
    assert stored(rig.app, "hook") == 5

    code, out, _ = await rig.dlq(capsys, "purge", "--older-than", "30d")

    assert code == 0 and out.strip() == "purged 2 dead letters"
    assert [d["message_id"] for d in await rig.listed(capsys)] == ["old1", "old2", "new1"]
    assert stored(rig.app, "hook") == 3

    await rig.stop()  # the spool file, opened by the command itself
    found = await rig.listed(capsys)
    assert [d["message_id"] for d in found] == ["old1", "old2", "new1"]
    code, text, _ = await rig.dlq(capsys, "show", str(found[2]["id"]), "--format", "json")
    assert code == 0 and orjson.loads(text)["payload"]["messageId"] == "new1"
    code, out, _ = await rig.dlq(capsys, "purge", "--older-than", "7d", "--forwarder", "other")
    assert code == 0 and out.strip() == "purged 0 dead letters"
    code, out, _ = await rig.dlq(capsys, "purge", "--older-than", "7d")
    assert code == 0 and out.strip() == "purged 2 dead letters"
    code, _, err = await rig.dlq(capsys, "replay", "--forwarder", "hook")
    assert code == 1 and "error: no_relay: " in err

    client = await rig.start()  # the relay opens the purged spool as usual
    assert [d["message_id"] for d in await rig.listed(capsys)] == ["new1"]
    assert stored(client.app, "hook") == 1


async def test_dead_letters_past_their_retention_are_pruned(
    rig: Rig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.configure("dead_letters: {retention_days: 30}")
    await rig.start()
    real_now = spool_module._now_ms
    monkeypatch.setattr(spool_module, "_now_ms", lambda: real_now() - 31 * DAY_MS)
    await rig.dead_hook("expired1", "expired2")
    monkeypatch.setattr(spool_module, "_now_ms", lambda: real_now() - 29 * DAY_MS)
    await rig.dead_hook("kept")
    monkeypatch.setattr(spool_module, "_now_ms", real_now)

    spool = rig.app[SPOOL]
    deadline = time.monotonic() + 20
    while spool.dead_letter_counts() != {"hook": 1}:
        assert time.monotonic() < deadline, spool.dead_letter_counts()
        await asyncio.sleep(0.05)
    assert [d["message_id"] for d in await rig.listed(capsys)] == ["kept"]
    assert stored(rig.app, "hook") == 1 and stored(rig.app, "other") == 0
    assert metric_value(rig.app, "tagrelay_dead_letters_expired_total") == 2  # counted


async def test_dead_letters_of_a_forwarder_no_longer_running_are_skipped_and_kept(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    await rig.start()
    await rig.dead_hook("m1")
    await rig.stop()
    rig.configure(hook_enabled=False)
    await rig.start()
    assert stored(rig.app, "hook") == 1  # still stored, though the forwarder is off
    code, out, _ = await rig.dlq(capsys, "replay", "--forwarder", "hook")
    assert code == 1
    assert "skipped: not_running (1)" in out
    assert [d["message_id"] for d in await rig.listed(capsys)] == ["m1"]


async def test_dead_letters_the_forwarder_would_not_send_now_are_skipped_and_kept(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    await rig.start()
    await rig.dead_hook("m1", "m2")
    await rig.stop()
    rig.configure(hook_filter="{exclude_events: [Order Completed]}")
    await rig.start()
    rig.hook.requests.clear()
    code, out, _ = await rig.dlq(capsys, "replay", "--forwarder", "hook")
    assert code == 1
    assert "skipped: filtered (2)" in out
    assert rig.hook.requests == []
    assert [d["message_id"] for d in await rig.listed(capsys)] == ["m1", "m2"]
    assert replayed(rig.app, "hook", "skipped") == 2


def test_durations_and_times() -> None:
    from argparse import ArgumentTypeError

    from tagrelay.cli.dlq_args import parse_duration, parse_ids, parse_since

    assert parse_duration("30d") == 30 * 86_400
    assert parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    assert parse_since("2024-01-02T03:04:05Z") == parse_since("2024-01-02T03:04:05")
    assert abs(parse_since("2h") - (time.time() - 7200)) < 60
    assert parse_ids("3,4, 7") == [3, 4, 7]
    for bad in ("30", "2 days", "-1d"):
        with pytest.raises(ArgumentTypeError):
            parse_duration(bad)
    with pytest.raises(ArgumentTypeError):
        parse_since("yesterday")


async def test_encrypted_dead_letters_are_listed_shown_and_replayed_with_the_keys(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    from tagrelay.crypto import generate_key

    key = generate_key()
    rig.configure(f'encryption: {{keys: ["{key}"]}}')
    await rig.start()
    echo = b'{"error": "unknown customer echo.me@example.com"}'
    await rig.dead_hook("enc1", "enc2", body=echo)
    listed = await rig.listed(capsys, "--forwarder", "hook")
    assert [d["message_id"] for d in listed] == ["enc1", "enc2"]
    assert "echo.me@example.com" in listed[0]["detail"]
    spool_files = b"".join(
        p.read_bytes() for p in (rig.tmp_path / "data").glob("spool.sqlite3*") if p.is_file()
    )
    assert b"echo.me@example.com" not in spool_files and b"Order Completed" not in spool_files

    code, _, err = await rig.dlq(capsys, "replay", "--ids", str(listed[0]["id"]))
    assert code == 0, err
    assert sent(rig.hook)[-1] == "enc1"
    await rig.stop()

    # No relay: the command opens them itself, with the configuration's keys.
    found = await rig.listed(capsys)
    assert [d["message_id"] for d in found] == ["enc2"]
    code, text, _ = await rig.dlq(capsys, "show", str(found[0]["id"]), "--format", "json")
    assert code == 0 and orjson.loads(text)["payload"]["messageId"] == "enc2"
    rig.configure(f'encryption: {{keys: ["{generate_key()}"]}}')
    code, _, err = await rig.dlq(capsys, "list")
    assert code == 1 and "error: encryption: " in err and key not in err
