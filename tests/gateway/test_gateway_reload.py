"""A reload keeps the gateway's routes as they started: they are registered once, and the
reload names ``google.gateway`` among the settings that need a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tagrelay.app import create_app
from tagrelay.config.loader import load_config
from tagrelay.reload import RELOADER
from tagrelay.web.gateway import GATEWAY
from tests.gateway.conftest import FakeGoogle, loopback_connector
from tests.support import SERVER_KEY


async def test_changed_routes_need_a_restart_and_the_old_ones_serve_on(
    tmp_path: Path, aiohttp_client: Callable[..., Any], google: FakeGoogle
) -> None:
    def raw(path: str) -> dict[str, Any]:
        return {
            "data_dir": str(tmp_path / "data"),
            "keys": [{"id": "backend", "kind": "server", "key": SERVER_KEY}],
            "google": {
                "gateway": {
                    "routes": [{"path": path, "tag_id": "GTM-ABCD1234"}],
                    "upstream": google.upstream,
                    "health_check": False,
                }
            },
        }

    file = tmp_path / "tagrelay.yaml"
    file.write_text(yaml.safe_dump(raw("/metrics")))
    app = create_app(load_config(file), admin_socket=False)
    app[RELOADER].config_file = file
    app[GATEWAY].connector_factory = loopback_connector
    client = await aiohttp_client(app)

    file.write_text(yaml.safe_dump(raw("/gtg")))
    report = await app[RELOADER].reload("test")
    assert report.outcome == "unchanged"
    assert report.needs_restart == ["google.gateway"]
    assert (await client.get("/metrics/?id=GTM-ABCD1234")).status == 200
    assert (await client.get("/gtg/?id=GTM-ABCD1234")).status == 404
    assert [seen.raw_path for seen in google.hits()] == ["/metrics/?id=GTM-ABCD1234"]
