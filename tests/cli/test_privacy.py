"""``tagrelay forget`` and ``tagrelay export`` on the identity store: through a running
relay's admin socket and without one; the person goes with every linked id, other people
stay, the raw file no longer holds the forgotten email, and the audit line names kinds of
id and counts, never the ids."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tagrelay.app import create_app
from tagrelay.cli.main import main
from tagrelay.config.loader import load_config
from tagrelay.identity_store import FILE_NAME
from tests.support import BROWSER_KEY, SERVER_KEY, basic, wait_idle

GRANTED = {"analytics": "granted", "ads": "granted", "ad_user_data": "granted"}


def write_config(tmp_path: Path, *, encrypted: bool = False) -> Path:
    key = base64.b64encode(os.urandom(32)).decode()
    encryption = f"encryption: {{keys: [{key}]}}" if encrypted else ""
    cfg = tmp_path / "tagrelay.yaml"
    cfg.write_text(
        f"""
data_dir: {tmp_path / "data"}
keys:
  - {{id: website, kind: browser, key: {BROWSER_KEY}, allowed_origins: ["*"]}}
  - {{id: backend, kind: server, key: {SERVER_KEY}}}
identity_store: {{enabled: true}}
{encryption}
"""
    )
    return cfg


def identify(user_id: str, anonymous_id: str, email: str) -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": user_id,
        "anonymousId": anonymous_id,
        "traits": {"email": email},
        "context": {"consent": GRANTED, "clickIds": {"gclid": f"gclid-{user_id}"}},
    }


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = await asyncio.to_thread(main, list(argv))
    out = capsys.readouterr()
    return code, orjson.loads(out.out) if out.out.strip() else None, out.err


async def record(client: Any, *people: tuple[str, str, str]) -> None:
    batch = [identify(*person) for person in people]
    resp = await client.post("/v1/batch", json={"batch": batch}, headers=basic(SERVER_KEY))
    assert resp.status == 200, await resp.text()
    await wait_idle(client.app)


async def test_forget_and_export_through_the_running_relay(
    tmp_path: Path,
    aiohttp_client: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = write_config(tmp_path, encrypted=True)
    client = await aiohttp_client(create_app(load_config(cfg)))
    await record(
        client,
        ("user-a", "anon-a", "alice@example.com"),
        ("user-b", "anon-b", "bob@example.com"),
    )
    code, answer, err = await run(capsys, "export", "--config", str(cfg), "--user-id", "user-a")
    assert code == 0, err
    (person,) = answer["stores"]["identity_store"]["persons"]
    assert person["user_data"]["email"]["value"] == "alice@example.com"
    assert set(person["anonymous_ids"]) == {"anon-a"}
    assert person["click_ids"]["gclid"]["value"] == "gclid-user-a"

    with caplog.at_level(logging.INFO, logger="tagrelay.audit"):
        code, answer, err = await run(
            capsys, "forget", "--config", str(cfg), "--anonymous-id", "anon-a"
        )
    assert code == 0, err
    assert answer == {"stores": {"identity_store": {"persons": 1, "ids": 3}}}
    (line,) = [r for r in caplog.records if r.name == "tagrelay.audit"]
    assert line.getMessage() == "erasure request"
    assert vars(line)["by"] == "anonymous_id"
    assert "anon-a" not in str(vars(line))

    code, answer, _ = await run(
        capsys, "export", "--config", str(cfg), "--email", "ALICE@example.com"
    )
    assert answer == {"stores": {"identity_store": {"persons": []}}}
    code, answer, _ = await run(capsys, "export", "--config", str(cfg), "--user-id", "user-b")
    assert [
        p["user_data"]["email"]["value"] for p in answer["stores"]["identity_store"]["persons"]
    ] == ["bob@example.com"]


async def test_forget_without_a_relay_opens_the_store_itself(
    tmp_path: Path, aiohttp_client: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)  # plaintext: the grep below can see what is there
    client = await aiohttp_client(create_app(load_config(cfg), admin_socket=False))
    await record(
        client,
        ("user-c", "anon-c", "carol@example.com"),
        ("user-d", "anon-d", "dave@example.com"),
    )
    await client.close()
    code, answer, err = await run(
        capsys, "forget", "--config", str(cfg), "--email", "carol@example.com"
    )
    assert code == 0, err
    assert answer == {"stores": {"identity_store": {"persons": 1, "ids": 3}}}
    data_dir = tmp_path / "data"
    raw = b"".join(p.read_bytes() for p in data_dir.iterdir() if p.name.startswith(FILE_NAME))
    assert b"carol@example.com" not in raw and b"anon-c" not in raw
    assert b"dave@example.com" in raw


async def test_forget_needs_an_id_and_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    code, _, err = await run(capsys, "forget", "--config", str(cfg))
    assert code == 2 and "--user-id" in err
    cfg.write_text(cfg.read_text().replace("identity_store: {enabled: true}", ""))
    code, _, err = await run(capsys, "export", "--config", str(cfg), "--user-id", "u")
    assert code == 1 and "identity_store.enabled is false" in err
