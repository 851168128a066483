"""The data directory is private: a relay started on a fresh directory under a permissive
umask (022, the usual default) creates it 0700 and every file in it 0600 (the spool, its
WAL files and lock, the warehouse and its WAL, the admin socket, the Google script cache);
files an older relay left readable are tightened; a directory the relay did not create is
left alone, with one warning."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tagrelay.app import create_app
from tagrelay.appkeys import warehouse_of
from tagrelay.datadir import private_dir, private_file
from tagrelay.spool.sqlite import SqliteSpool
from tests.support import SERVER_KEY, basic, fake_server, make_config, wait_idle


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes_under(root: Path) -> dict[str, int]:
    """Relative path -> permission bits of ``root`` and of everything under it."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def loose(modes: dict[str, int], root: Path) -> dict[str, str]:
    """The entries whose mode is not 0700 (directories) or 0600 (anything else)."""
    wrong = {}
    for name, mode in modes.items():
        expected = 0o700 if (root / name).is_dir() else 0o600
        if mode != expected:
            wrong[name] = oct(mode)
    return wrong


@pytest.fixture
async def fake_google() -> AsyncIterator[str]:
    async def script(request: web.Request) -> web.Response:
        return web.Response(text="/* gtag */", content_type="application/javascript")

    async with fake_server("Google", {"/gtag/js": script}, method="GET") as server:
        yield str(server.make_url("")).rstrip("/")


async def test_a_relay_on_a_new_data_dir_keeps_every_file_to_its_user(
    tmp_path: Path,
    aiohttp_client: Callable[..., Any],
    fake_google: str,
    permissive_umask: None,
) -> None:
    data_dir = tmp_path / "var" / "tagrelay"
    config = make_config(
        tmp_path,
        data_dir=str(data_dir),
        forwarders=[
            {
                "id": "warehouse",
                "type": "warehouse",
                "batch": {"max_events": 10, "max_wait_secs": 0},
            }
        ],
        google={"scripts": {"upstream": fake_google, "ids": [{"id": "G-ABC123XYZ9"}]}},
    )
    app = create_app(config)  # with the admin socket
    client = await aiohttp_client(app)
    for i in range(20):
        resp = await client.post(
            "/v1/track",
            json={"type": "track", "event": "Signed Up", "messageId": f"m{i}", "userId": "u1"},
            headers=basic(SERVER_KEY),
        )
        assert resp.status == 200
    assert (await client.get("/gtag/js?id=G-ABC123XYZ9")).status == 200
    await wait_idle(app)
    warehouse = warehouse_of(app)
    assert warehouse is not None
    assert (await asyncio.to_thread(warehouse.query, "select count(*) from events")).rows == [(20,)]
    for _ in range(100):  # the script's disk copy is written after the answer
        if any((data_dir / "google-scripts").glob("*.json")):
            break
        await asyncio.sleep(0.02)

    running = modes_under(data_dir)
    await client.close()
    stopped = modes_under(data_dir)

    # what there is to protect while the relay runs, and that it is all private
    assert {
        "spool.sqlite3",
        "spool.sqlite3-wal",
        "spool.sqlite3-shm",
        "spool.sqlite3.lock",
        "warehouse.duckdb",
        "warehouse.duckdb.wal",
        "admin.sock",
        "google-scripts",
    } <= set(running)
    assert any(name.startswith("google-scripts/") for name in running)
    assert loose(running, data_dir) == {}
    assert loose(stopped, data_dir) == {}
    # the levels created above the data directory are the relay's too
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o700


async def test_files_an_older_relay_left_readable_are_tightened(
    tmp_path: Path, permissive_umask: None
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    first = SqliteSpool(data_dir / "spool.sqlite3")
    await first.open()
    await first.append([(1, b'{"messageId":"m1"}')])
    await first.close()
    for path in data_dir.iterdir():
        path.chmod(0o644)

    spool = SqliteSpool(data_dir / "spool.sqlite3")
    await spool.open()
    try:
        await spool.append([(2, b'{"messageId":"m2"}')])
        assert loose(modes_under(data_dir), data_dir) == {}
    finally:
        await spool.close()


def test_a_directory_the_relay_did_not_create_is_left_alone_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, permissive_umask: None
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    caplog.set_level(logging.WARNING, logger="tagrelay.datadir")

    private_dir(shared)
    private_dir(shared)
    private_file(shared / "spool.sqlite3")

    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "spool.sqlite3").stat().st_mode) == 0o600
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert str(shared) in warnings[0] and "chmod 700" in warnings[0]


def test_the_relays_own_directory_is_tightened(tmp_path: Path, permissive_umask: None) -> None:
    cache = tmp_path / "google-scripts"
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)

    private_dir(cache, owned=True)

    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
