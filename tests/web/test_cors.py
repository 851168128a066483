"""CORS over real HTTP: server keys get no CORS at all and are refused from browsers, on
every ingest family; refused origins and preflights are counted and logged once per
interval."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from tagrelay.appkeys import SPOOL
from tagrelay.metrics import Metrics
from tagrelay.web.auth import MALFORMED_ORIGIN, NO_KEY, CorsRefusals
from tests.support import BROWSER_KEY, SERVER_KEY, basic, metric_value

ALLOWED = "https://www.shop.test"  # the browser key's allowed origin
TID = "G-CORS1"
SECRET = "mp-secret"
GOOGLE = {"measurement_protocol": [{"measurement_id": TID, "api_secret": SECRET}]}


def event(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "E", "userId": "u", **fields}


def server_key_requests() -> list[Any]:
    """(path, headers, body): a server key on each ingest family, in each way it is sent."""
    track = orjson.dumps(event())
    batch = orjson.dumps({"batch": [event()], "writeKey": SERVER_KEY})
    json = {"Content-Type": "application/json"}
    plain = {"Content-Type": "text/plain"}
    cases = [
        ("segment-basic", "/v1/track", {**basic(SERVER_KEY), **json}, track),
        ("segment-body-key", "/v1/track", plain, orjson.dumps(event(writeKey=SERVER_KEY))),
        ("segment-batch", "/v1/batch", plain, batch),
        ("jitsu", "/api/s/track", {"X-Write-Key": SERVER_KEY, **json}, track),
        ("jitsu-s2s", "/api/s/s2s/track", {"X-Write-Key": SERVER_KEY, **json}, track),
        ("relay-script", "/d", plain, batch),
        ("rudder-beacon", f"/beacon/v1/batch?writeKey={SERVER_KEY}", plain, batch),
        (
            "ga4-mp",
            f"/mp/collect?measurement_id={TID}&api_secret={SECRET}",
            json,
            orjson.dumps({"client_id": "1.2", "events": [{"name": "sign_up"}]}),
        ),
    ]
    return [pytest.param(path, headers, body, id=name) for name, path, headers, body in cases]


def cors_headers(resp: Any) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower().startswith("access-control-")}


@pytest.mark.parametrize(("path", "headers", "body"), server_key_requests())
async def test_a_server_key_from_a_backend_gets_no_cors_headers(
    relay: Any, path: str, headers: dict[str, str], body: bytes
) -> None:
    client = await relay(google=GOOGLE)
    resp = await client.post(path, data=body, headers=headers)
    assert resp.status in (200, 204), await resp.text()
    assert cors_headers(resp) == {}
    assert len(await client.app[SPOOL].read(0, 10)) == 1


@pytest.mark.parametrize("origin", [ALLOWED, "https://evil.test", "null"])
@pytest.mark.parametrize(("path", "headers", "body"), server_key_requests())
async def test_a_server_key_from_a_browser_is_refused_without_cors_headers(
    relay: Any, path: str, headers: dict[str, str], body: bytes, origin: str
) -> None:
    client = await relay(google=GOOGLE)
    resp = await client.post(path, data=body, headers={**headers, "Origin": origin})
    assert resp.status == 403
    assert cors_headers(resp) == {}
    answer = await resp.json()
    assert answer["error"] == "server_key_from_browser"
    assert SERVER_KEY not in await resp.text() and SECRET not in await resp.text()
    assert await client.app[SPOOL].read(0, 10) == []
    key = "ga4-mp" if path.startswith("/mp/") else "backend"
    assert metric_value(client.app, "tagrelay_cors_refused_total", {"key": key}) == 1


async def test_debug_measurement_protocol_refuses_browsers_too(relay: Any) -> None:
    client = await relay(google=GOOGLE)
    resp = await client.post(
        f"/debug/mp/collect?measurement_id={TID}&api_secret={SECRET}",
        json={"client_id": "1.2", "events": [{"name": "sign_up"}]},
        headers={"Origin": ALLOWED},
    )
    assert resp.status == 403
    assert cors_headers(resp) == {}


async def test_settings_for_a_server_key_have_no_cors_headers(relay: Any) -> None:
    client = await relay()
    for origin in (ALLOWED, "https://evil.test"):
        resp = await client.get(f"/v1/projects/{SERVER_KEY}/settings", headers={"Origin": origin})
        assert resp.status in (401, 403)
        assert cors_headers(resp) == {}
        assert SERVER_KEY not in await resp.text()
        config = await client.get("/sourceConfig/", headers={**basic(SERVER_KEY), "Origin": origin})
        assert config.status in (401, 403)
        assert cors_headers(config) == {}


async def test_a_browser_key_still_gets_its_origin_reflected(relay: Any) -> None:
    client = await relay()
    resp = await client.post(
        "/v1/track",
        data=orjson.dumps(event()),
        headers={**basic(BROWSER_KEY), "Origin": ALLOWED, "Content-Type": "application/json"},
    )
    assert resp.status == 200
    assert cors_headers(resp) == {
        "Access-Control-Allow-Origin": ALLOWED,
        "Access-Control-Allow-Credentials": "true",
    }


async def test_a_malformed_origin_is_never_reflected(relay: Any) -> None:
    client = await relay(
        keys=[{"id": "open", "kind": "browser", "key": BROWSER_KEY, "allowed_origins": ["*"]}]
    )
    for origin in ("https://a.test; x=1", "https://a.test/path", "not an origin"):
        resp = await client.post(
            "/v1/track",
            data=orjson.dumps(event()),
            headers={**basic(BROWSER_KEY), "Origin": origin, "Content-Type": "application/json"},
        )
        assert resp.status == 403
        assert cors_headers(resp) == {}
        preflight = await client.options("/v1/track", headers={"Origin": origin})
        assert preflight.status == 403
        assert cors_headers(preflight) == {}


async def test_metrics_endpoint_and_sdk_metrics_do_not_reflect_foreign_origins(
    relay: Any,
) -> None:
    client = await relay()
    body = orjson.dumps({"series": []})
    foreign = await client.post("/v1/m", data=body, headers={"Origin": "https://evil.test"})
    assert foreign.status == 200
    assert cors_headers(foreign) == {}
    own = await client.post("/v1/m", data=body, headers={"Origin": ALLOWED})
    assert own.headers["Access-Control-Allow-Origin"] == ALLOWED


# -- refused origins are counted and logged ------------------------------------------------


async def test_refused_preflights_are_counted_and_logged_once(
    relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tagrelay.web.auth")
    client = await relay()
    for _ in range(5):
        resp = await client.options(
            "/v1/track",
            headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"},
        )
        assert resp.status == 403
    assert metric_value(client.app, "tagrelay_cors_refused_total", {"key": NO_KEY}) == 5
    lines = [r for r in caplog.records if r.name == "tagrelay.web.auth"]
    assert len(lines) == 1
    [line] = lines
    assert line.levelno == logging.INFO
    assert (line.key, line.origin, line.repeated) == (NO_KEY, "https://evil.test", 1)  # type: ignore[attr-defined]

    # Another origin is a line of its own; an allowed one is neither counted nor logged.
    await client.options("/v1/track", headers={"Origin": "https://other.test"})
    ok = await client.options("/v1/track", headers={"Origin": ALLOWED})
    assert ok.status == 204
    assert metric_value(client.app, "tagrelay_cors_refused_total", {"key": NO_KEY}) == 6
    assert [r.origin for r in caplog.records if r.name == "tagrelay.web.auth"] == [  # type: ignore[attr-defined]
        "https://evil.test",
        "https://other.test",
    ]


async def test_an_origin_refused_for_a_key_is_counted_by_key(
    relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tagrelay.web.auth")
    client = await relay()
    for _ in range(3):
        resp = await client.post(
            "/v1/track",
            data=orjson.dumps(event()),
            headers={**basic(BROWSER_KEY), "Origin": "https://evil.test"},
        )
        assert resp.status == 403
    assert metric_value(client.app, "tagrelay_cors_refused_total", {"key": "website"}) == 3
    [line] = [r for r in caplog.records if r.name == "tagrelay.web.auth"]
    assert (line.key, line.origin, line.reason) == (
        "website",
        "https://evil.test",
        "origin_not_allowed",
    )  # type: ignore[attr-defined]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_log_is_bounded_by_lines_per_interval_and_says_when_it_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tagrelay.web.auth")
    clock = Clock()
    metrics = Metrics()
    refusals = CorsRefusals(metrics, 60.0, max_origins=8, max_lines=3, clock=clock)
    for i in range(50):
        refusals.record(NO_KEY, f"https://spray{i}.test", "origin_not_allowed")
    refusals.record("website", "https://a.test; x", "origin_not_allowed")
    messages = [r for r in caplog.records if r.name == "tagrelay.web.auth"]
    assert [getattr(r, "origin", None) for r in messages] == [
        "https://spray0.test",
        "https://spray1.test",
        "https://spray2.test",
        None,  # the one line that says more were refused
    ]
    assert metrics.registry.get_sample_value("tagrelay_cors_refused_total", {"key": NO_KEY}) == 50

    caplog.clear()
    clock.now += 61
    refusals.record("website", "https://a.test; x", "origin_not_allowed")
    [line] = caplog.records
    assert line.origin == MALFORMED_ORIGIN  # type: ignore[attr-defined]
