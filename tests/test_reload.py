"""Hot reload (``tagrelay.reload``): a running relay reads its configuration file again and
applies it. Through real HTTP, the real spool and the delivery process, with local recording
fakes as destinations: keys and origins, renamed paths, forwarders added, removed (their
cursor kept, resumed when they come back), changed (restarted on their cursor) and started
from the earliest event; an invalid file leaves everything as it was and every problem is
reported; settings that need a restart are named and kept; a forwarder that does not start
is a ``failed`` reload."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from tagrelay.app import create_app
from tagrelay.appkeys import DELIVERY_LOOP, SPOOL, WORKERS
from tagrelay.config.loader import load_config
from tagrelay.forwarders._process import RemoteForwarder
from tagrelay.reload import RELOADER, ReloadReport
from tagrelay.web.admin import build_admin_app
from tests.support import (
    BROWSER_KEY,
    SERVER_KEY,
    Recorder,
    basic,
    metric_value,
    recording_server,
    wait_idle,
)


def base_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "keys": [
            {
                "id": "website",
                "kind": "browser",
                "key": BROWSER_KEY,
                "allowed_origins": ["https://www.shop.test"],
            },
            {"id": "backend", "kind": "server", "key": SERVER_KEY},
        ],
        "forwarders": [],
    }
    raw.update(overrides)
    return raw


def hook(rec: Recorder, fid: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": fid,
        "type": "webhook",
        "endpoint": rec.url,
        "batch": {"max_events": 50, "max_wait_secs": 0.02},
        "retry": {"initial_backoff_secs": 0.05, "max_backoff_secs": 0.2},
        **extra,
    }


def received(rec: Recorder) -> list[str]:
    """The messageIds a recording webhook destination got, in order."""
    return [e["messageId"] for r in rec.requests for e in orjson.loads(r["body"])["batch"]]


async def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.02)


class Relay:
    """A relay made by ``create_app`` from a configuration file, which the test rewrites
    and has the relay reload."""

    def __init__(self, client: TestClient, file: Path) -> None:
        self.client = client
        self.file = file

    @property
    def app(self) -> web.Application:
        return self.client.app

    def write(self, raw: dict[str, Any]) -> None:
        self.file.write_text(yaml.safe_dump(raw))

    async def reload(self, raw: dict[str, Any] | None = None) -> ReloadReport:
        if raw is not None:
            self.write(raw)
        return await self.app[RELOADER].reload("test")

    async def send(self, *message_ids: str, key: str = SERVER_KEY) -> int:
        batch = [
            {"type": "track", "event": "Signed Up", "userId": "u-1", "messageId": m}
            for m in message_ids
        ]
        response = await self.client.post("/v1/batch", json={"batch": batch}, headers=basic(key))
        return response.status


@pytest.fixture
async def start_relay(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    async def start(raw: dict[str, Any]) -> Relay:
        file = tmp_path / "tagrelay.yaml"
        file.write_text(yaml.safe_dump(raw))
        app = create_app(load_config(file), admin_socket=False)
        app[RELOADER].config_file = file
        return Relay(await aiohttp_client(app), file)

    return start


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[Recorder, Recorder]]:
    async with (
        recording_server("webhook one", ["/one"], "/one") as one,
        recording_server("webhook two", ["/two"], "/two") as two,
    ):
        yield one, two


def reloads(app: web.Application, outcome: str) -> float:
    return metric_value(app, "tagrelay_config_reload_total", {"outcome": outcome})


# -- keys and origins ----------------------------------------------------------------------


async def test_a_changed_key_takes_effect_and_the_old_value_is_refused(
    tmp_path: Path, start_relay: Any
) -> None:
    raw = base_config(tmp_path)
    relay = await start_relay(raw)
    assert await relay.send("before") == 200

    raw["keys"][1]["key"] = "a-new-server-secret"
    report = await relay.reload(raw)

    assert report.outcome == "applied"
    assert report.keys == {"added": [], "removed": [], "changed": ["backend"]}
    assert await relay.send("old-value") == 401
    assert await relay.send("new-value", key="a-new-server-secret") == 200
    assert reloads(relay.app, "applied") == 1
    assert "a-new-server-secret" not in orjson.dumps(report.as_json()).decode()


async def test_a_removed_key_is_refused(tmp_path: Path, start_relay: Any) -> None:
    raw = base_config(tmp_path)
    relay = await start_relay(raw)
    assert await relay.send("before") == 200

    del raw["keys"][1]
    report = await relay.reload(raw)

    assert report.keys["removed"] == ["backend"]
    response = await relay.client.post(
        "/v1/track", json={"type": "track", "event": "E", "userId": "u"}, headers=basic(SERVER_KEY)
    )
    assert response.status == 401
    assert (await response.json())["error"] == "unknown_key"
    # The browser key, unchanged, still works.
    assert await relay.send("browser", key=BROWSER_KEY) == 200


async def test_an_added_origin_is_allowed(tmp_path: Path, start_relay: Any) -> None:
    raw = base_config(tmp_path)
    relay = await start_relay(raw)
    preflight = {"Origin": "https://blog.shop.test", "Access-Control-Request-Method": "POST"}
    assert (await relay.client.options("/v1/track", headers=preflight)).status == 403

    raw["keys"][0]["allowed_origins"].append("https://blog.shop.test")
    assert (await relay.reload(raw)).changed == ["keys"]

    response = await relay.client.options("/v1/track", headers=preflight)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://blog.shop.test"


# -- paths ---------------------------------------------------------------------------------


async def test_renamed_paths_are_served_at_once_and_the_old_ones_no_more(
    tmp_path: Path, start_relay: Any
) -> None:
    raw = base_config(tmp_path)
    relay = await start_relay(raw)
    client = relay.client
    event = {"writeKey": BROWSER_KEY, "batch": [{"type": "page", "anonymousId": "a-1"}]}
    assert (await client.post("/d", json=event)).status == 200
    assert (await client.get("/p.js")).status == 200

    raw["paths"] = {"script": "/assets/app.js", "events": "/collect-here", "identity": "/me"}
    report = await relay.reload(raw)
    assert report.outcome == "applied"
    assert sorted(report.changed) == ["paths.events", "paths.identity", "paths.script"]

    for old in ("/d", "/p.js", "/id"):
        assert (await client.get(old)).status == 404, old
    response = await client.post("/collect-here", json=event)
    assert response.status == 200
    assert (await client.get("/collect-here")).status == 405  # a path of the relay: POST
    script = await client.get("/assets/app.js")
    assert script.status == 200
    assert "/collect-here" in await script.text(), "the script sends to the renamed path"
    assert (await client.head("/assets/app.js")).status == 200
    assert (await client.get("/me")).status == 200
    # Timed under the path's own route name.
    labels = {"route": "/collect-here", "method": "POST", "status_class": "2xx"}
    assert metric_value(relay.app, "tagrelay_http_request_duration_seconds_count", labels) == 1


# -- forwarders ----------------------------------------------------------------------------


async def test_a_removed_forwarder_keeps_its_cursor_and_resumes_when_it_comes_back(
    tmp_path: Path, start_relay: Any, hooks: tuple[Recorder, Recorder]
) -> None:
    one, two = hooks
    raw = base_config(tmp_path, forwarders=[hook(one, "one"), hook(two, "two")])
    relay = await start_relay(raw)
    assert await relay.send("a1", "a2") == 200
    await wait_idle(relay.app)

    raw["forwarders"] = [hook(one, "one")]
    report = await relay.reload(raw)
    assert report.forwarders == {"added": [], "removed": ["two"], "changed": []}
    assert list(relay.app[WORKERS]) == ["one"]
    assert await relay.send("b1", "b2", "b3") == 200
    await wait_for(lambda: received(one) == ["a1", "a2", "b1", "b2", "b3"])
    assert received(two) == ["a1", "a2"]

    raw["forwarders"] = [hook(one, "one"), hook(two, "two")]
    report = await relay.reload(raw)
    assert report.forwarders["added"] == ["two"]
    await wait_idle(relay.app)
    await wait_for(lambda: received(two) == ["a1", "a2", "b1", "b2", "b3"])


async def test_a_removed_forwarder_is_forgotten_after_forget_cursor_after_secs(
    tmp_path: Path, start_relay: Any, hooks: tuple[Recorder, Recorder]
) -> None:
    one, two = hooks
    spool = {"forget_cursor_after_secs": 0, "prune_interval_secs": 0.05}
    raw = base_config(tmp_path, spool=spool, forwarders=[hook(one, "one"), hook(two, "two")])
    relay = await start_relay(raw)
    assert await relay.send("a1") == 200
    await wait_idle(relay.app)

    raw["forwarders"] = [hook(one, "one")]
    await relay.reload(raw)
    await wait_for(lambda: "two" not in relay.app[SPOOL].positions())
    assert await relay.send("b1") == 200
    await wait_idle(relay.app)
    await asyncio.sleep(0.2)  # maintenance rounds: the cursor is deleted, b1 pruned

    raw["forwarders"] = [hook(one, "one"), hook(two, "two")]
    await relay.reload(raw)
    assert await relay.send("c1") == 200
    await wait_for(lambda: received(two) == ["a1", "c1"])  # a new cursor, at the head


async def test_a_new_forwarder_starts_at_the_head_or_with_start_earliest_at_the_oldest_event(
    tmp_path: Path, start_relay: Any, hooks: tuple[Recorder, Recorder]
) -> None:
    one, two = hooks
    # A slow pruning round, so that the spool still holds what was sent before.
    raw = base_config(tmp_path, spool={"prune_interval_secs": 3600})
    relay = await start_relay(raw)
    assert await relay.send("e1", "e2", "e3") == 200

    raw["forwarders"] = [hook(one, "head"), hook(two, "earliest", start="earliest")]
    report = await relay.reload(raw)
    assert sorted(report.forwarders["added"]) == ["earliest", "head"]
    assert await relay.send("e4") == 200
    await wait_idle(relay.app)

    await wait_for(lambda: received(two) == ["e1", "e2", "e3", "e4"])
    await wait_for(lambda: received(one) == ["e4"])


async def test_a_changed_forwarder_restarts_on_its_cursor_with_its_new_settings(
    tmp_path: Path, start_relay: Any, hooks: tuple[Recorder, Recorder]
) -> None:
    one, _ = hooks
    raw = base_config(tmp_path, forwarders=[hook(one, "one", headers={"X-Version": "1"})])
    relay = await start_relay(raw)
    assert await relay.send("a1") == 200
    await wait_idle(relay.app)
    before = relay.app[WORKERS]["one"]

    raw["forwarders"] = [hook(one, "one", headers={"X-Version": "2"})]
    report = await relay.reload(raw)
    assert report.forwarders == {"added": [], "removed": [], "changed": ["one"]}
    assert relay.app[WORKERS]["one"] is not before
    assert await relay.send("a2") == 200
    await wait_idle(relay.app)

    await wait_for(lambda: received(one) == ["a1", "a2"])
    assert [r["headers"]["X-Version"] for r in one.requests] == ["1", "2"]


async def test_after_a_crash_the_delivery_process_starts_with_the_reloaded_forwarders(
    tmp_path: Path, start_relay: Any, hooks: tuple[Recorder, Recorder]
) -> None:
    one, two = hooks
    raw = base_config(tmp_path, forwarders=[hook(one, "one")])
    relay = await start_relay(raw)
    raw["forwarders"] = [hook(one, "one"), hook(two, "two")]
    await relay.reload(raw)
    forwarder = relay.app[WORKERS]["two"].forwarder
    assert isinstance(forwarder, RemoteForwarder)
    process = forwarder.process
    assert [f.id for f in process.spec.forwarders] == ["one", "two"]

    async def kill() -> None:
        await process.close()  # as if it had died: the next delivery starts it again

    await relay.app[DELIVERY_LOOP].call(kill())
    assert await relay.send("x1") == 200
    await wait_for(lambda: received(one) == ["x1"] and received(two) == ["x1"])
    assert process.starts == 2


# -- what is not applied -------------------------------------------------------------------


async def test_an_invalid_file_changes_nothing_and_every_problem_is_reported(
    tmp_path: Path,
    start_relay: Any,
    hooks: tuple[Recorder, Recorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    one, _ = hooks
    raw = base_config(tmp_path, forwarders=[hook(one, "one")])
    relay = await start_relay(raw)
    bad = base_config(tmp_path, forwarders=[hook(one, "Bad Id")])
    bad["keys"][1] = {"id": "backend", "kind": "server", "key": "new-secret", "colour": "red"}
    bad["limits"] = {"max_batch_events": 0}

    with caplog.at_level(logging.INFO, logger="tagrelay.reload"):
        report = await relay.reload(bad)

    assert report.outcome == "invalid"
    text = "\n".join(report.problems)
    assert "keys[1].colour" in text or "keys.1.colour" in text, text
    assert "forwarders[0].id" in text or "forwarders.0.id" in text, text
    assert "limits.max_batch_events" in text, text
    assert len(report.problems) == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for problem in report.problems:
        assert any(problem in line for line in errors), problem
    assert reloads(relay.app, "invalid") == 1
    assert reloads(relay.app, "applied") == 0
    # Still the old configuration: the old key, the forwarder.
    assert await relay.send("still") == 200
    assert await relay.send("new", key="new-secret") == 401
    await wait_for(lambda: received(one) == ["still"])
    assert relay.app[RELOADER].config.keys[1].key.get_secret_value() == SERVER_KEY


async def test_settings_that_need_a_restart_are_named_and_kept_and_the_rest_applied(
    tmp_path: Path, start_relay: Any
) -> None:
    raw = base_config(tmp_path)
    relay = await start_relay(raw)
    changed = base_config(
        tmp_path / "elsewhere",
        server={"port": 9999},
        spool={"synchronous": "normal"},
    )
    changed["keys"][1]["key"] = "another-server-key"

    report = await relay.reload(changed)

    assert report.outcome == "applied"
    assert sorted(report.needs_restart) == ["data_dir", "server.port", "spool.synchronous"]
    assert report.changed == ["keys"]
    config = relay.app[RELOADER].config
    assert config.server.port == 8080 and config.data_dir == tmp_path / "data"
    assert await relay.send("e", key="another-server-key") == 200

    # Only settings that need a restart: nothing to apply.
    only = {**changed, "server": {"port": 9998}}
    report = await relay.reload(only)
    assert report.outcome == "unchanged"
    assert "server.port" in report.needs_restart


async def test_the_same_file_again_is_unchanged(tmp_path: Path, start_relay: Any) -> None:
    relay = await start_relay(base_config(tmp_path))
    report = await relay.reload()
    assert (report.outcome, report.changed, report.needs_restart) == ("unchanged", [], [])
    assert reloads(relay.app, "unchanged") == 1


async def test_a_forwarder_that_does_not_start_fails_the_reload_and_the_rest_is_applied(
    tmp_path: Path, start_relay: Any, hooks: tuple[Recorder, Recorder]
) -> None:
    one, _ = hooks
    (tmp_path / "a-file").write_text("not a directory")
    raw = base_config(tmp_path)
    relay = await start_relay(raw)
    broken = {"id": "broken", "type": "warehouse", "path": str(tmp_path / "a-file" / "w.duckdb")}
    raw["forwarders"] = [hook(one, "one"), broken]
    raw["keys"][1]["key"] = "rotated-server-key"

    report = await relay.reload(raw)

    assert report.outcome == "failed"
    [problem] = report.problems
    assert problem.startswith("forwarders.broken: did not start")
    assert list(relay.app[WORKERS]) == ["one"]
    assert [f.id for f in relay.app[RELOADER].config.forwarders] == ["one"]
    assert await relay.send("k", key="rotated-server-key") == 200
    await wait_for(lambda: received(one) == ["k"])
    assert reloads(relay.app, "failed") == 1
    # The same file again tries it again.
    assert (await relay.reload()).outcome == "failed"


async def test_a_changed_forwarder_that_does_not_start_runs_on_with_its_previous_settings(
    tmp_path: Path, start_relay: Any
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    warehouse = {"id": "wh", "type": "warehouse", "batch": {"max_wait_secs": 0.02}}
    raw = base_config(tmp_path, forwarders=[warehouse])
    relay = await start_relay(raw)
    raw["forwarders"] = [{**warehouse, "path": str(tmp_path / "a-file" / "w.duckdb")}]

    report = await relay.reload(raw)

    assert report.outcome == "failed"
    assert relay.app[RELOADER].config.forwarders[0].path == "warehouse.duckdb"  # type: ignore[attr-defined]
    assert await relay.send("w1") == 200
    await wait_idle(relay.app)
    assert relay.app[WORKERS]["wh"].config.path == "warehouse.duckdb"  # type: ignore[attr-defined]


# -- the admin API -------------------------------------------------------------------------


async def test_post_reload_on_the_admin_api_answers_what_it_did(
    tmp_path: Path, start_relay: Any, aiohttp_client: Callable[..., Any]
) -> None:
    raw = base_config(tmp_path)
    relay = await start_relay(raw)
    admin = await aiohttp_client(build_admin_app(relay.app))

    raw["keys"].append({"id": "partner", "kind": "server", "key": "partner-secret"})
    relay.write(raw)
    response = await admin.post("/reload")
    assert response.status == 200
    body = await response.json()
    assert body["outcome"] == "applied"
    assert body["keys"] == {"added": ["partner"], "removed": [], "changed": []}
    assert "partner-secret" not in await response.text()

    relay.write({**raw, "keys": "not a list"})
    response = await admin.post("/reload")
    assert response.status == 422
    body = await response.json()
    assert body["outcome"] == "invalid" and body["problems"]
