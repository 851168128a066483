"""``tagrelay privacy report``: the data map follows the configuration (encryption,
retention, the identity store, hash_pii, each forwarder's fields and consent), from the
file when no relay runs and from the running relay's configuration through its admin
socket; the forwarders' rows come from the tables they send by."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tagrelay.app import create_app
from tagrelay.cli.main import main
from tagrelay.config.loader import load_config
from tagrelay.forwarders._user_data import PLATFORM_CLICK_IDS, RULES
from tagrelay.privacy.report import build_report, render_text
from tests.support import SERVER_KEY, make_config

META = {"id": "meta", "type": "meta", "pixel_id": "123456789012345", "access_token": "tok"}
GA4 = {"id": "ga4", "type": "ga4", "measurement_id": "G-ABC123", "api_secret": "secret"}
HOOK = {"id": "hook", "type": "webhook", "endpoint": "https://hooks.example.com/x"}
WAREHOUSE = {"id": "warehouse", "type": "warehouse"}


def store(report: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [s for s in report["stores"] if s["store"] == name]
    return found


def fields(report: dict[str, Any], forwarder: str) -> dict[str, str]:
    (found,) = [f for f in report["forwarders"] if f["forwarder"] == forwarder]
    return dict(found["fields"])


def test_the_report_follows_the_configuration(tmp_path: Path) -> None:
    plain = build_report(make_config(tmp_path, forwarders=[WAREHOUSE, META, GA4, HOOK]))
    assert plain["encryption_at_rest"] is False
    assert store(plain, "spool")["encrypted"].startswith("no")
    assert "identity_store" not in [s["store"] for s in plain["stores"]]
    assert store(plain, "warehouse (warehouse)")["kept"].startswith("until deleted")
    assert "30 days" in store(plain, "dead_letters")["kept"]
    assert fields(plain, "warehouse") == {"every field of the event": "plain"}
    assert "email" not in fields(plain, "ga4")
    assert fields(plain, "hook") == {"every field of the event": "plain"}

    key = base64.b64encode(os.urandom(32)).decode()
    changed = build_report(
        make_config(
            tmp_path,
            encryption={"keys": [key]},
            identity_store={"enabled": True, "ttl_days": 30},
            dead_letters={"retention_days": 7},
            forwarders=[
                {**WAREHOUSE, "hash_pii": True, "hash_pii_salt": "s" * 16, "retention_days": 90},
                {**META, "requires_consent": ["ads", "analytics"]},
                {**GA4, "send_user_data": True},
            ],
        )
    )
    assert changed["encryption_at_rest"] is True
    assert store(changed, "spool")["encrypted"].startswith("AES-256-GCM")
    assert "30 days" in store(changed, "identity_store")["kept"]
    assert "7 days" in store(changed, "dead_letters")["kept"]
    assert "90 days" in store(changed, "warehouse (warehouse)")["kept"]
    assert fields(changed, "warehouse")["traits.email"].startswith("hashed")
    (meta,) = [f for f in changed["forwarders"] if f["forwarder"] == "meta"]
    assert meta["requires_consent"] == ["ads", "analytics"]
    assert fields(changed, "ga4")["email"] == "hashed (ad_user_data granted)"
    assert "hook" not in [f["forwarder"] for f in changed["forwarders"]]


def test_an_ad_forwarders_fields_are_its_platforms_row_of_the_user_data_table(
    tmp_path: Path,
) -> None:
    report = build_report(make_config(tmp_path, forwarders=[META]))
    meta = fields(report, "meta")
    for name, rule in RULES["meta"].items():
        assert meta[name].startswith("hashed" if rule.hashed else "plain"), name
    for click_id in PLATFORM_CLICK_IDS["meta"]:
        assert meta[click_id] == "plain"
    assert meta["email"] == "hashed (ad_user_data granted)"
    assert meta["user_agent"] == "plain"
    text = render_text(report)
    assert "meta (meta)" in text and "hashed (ad_user_data granted)" in text


async def test_the_command_reads_the_running_relay_or_the_file(
    tmp_path: Path, aiohttp_client: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "tagrelay.yaml"
    cfg.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        f"keys: [{{id: backend, kind: server, key: {SERVER_KEY}}}]\n"
        "identity_store: {enabled: true}\n"
    )

    async def report() -> dict[str, Any]:
        code = await asyncio.to_thread(
            main, ["privacy", "report", "--config", str(cfg), "--format", "json"]
        )
        out = capsys.readouterr()
        assert code == 0, out.err
        return dict(orjson.loads(out.out))

    offline = await report()
    assert offline["from"].startswith("the configuration file")
    assert "identity_store" in [s["store"] for s in offline["stores"]]

    client = await aiohttp_client(create_app(load_config(cfg)))
    # The file changes, the relay runs on with what it started with.
    cfg.write_text(cfg.read_text().replace("identity_store: {enabled: true}\n", ""))
    running = await report()
    assert running["from"] == "the running relay's configuration"
    assert "identity_store" in [s["store"] for s in running["stores"]]
    await client.close()
    assert "identity_store" not in [s["store"] for s in (await report())["stores"]]

    code = await asyncio.to_thread(main, ["privacy", "report", "--config", str(cfg)])
    text = capsys.readouterr().out
    assert code == 0 and "Where personal data is stored" in text and "spool:" in text
