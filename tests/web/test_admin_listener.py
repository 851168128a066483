"""The admin listener, through real HTTP: a relay from ``create_app`` with its admin listener
on a free loopback port, asked with a client as Prometheus, curl or a browser would.

Without a token it answers loopback requests only; with one, every route but the health
checks and the login form needs the token, as a Bearer header or through the login form's
session cookie; the token never reaches a log line. /metrics is there, and on the public
port only with ``metrics.public``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from tagrelay.app import create_app
from tagrelay.cli.logs import JsonFormatter
from tagrelay.config.loader import load_config
from tagrelay.errors import ConfigError
from tagrelay.web.admin_listener import ADMIN_LISTENER, SESSION_COOKIE
from tests.support import make_config

TOKEN = "admin-token-7c0f51d2e8a94b36"


@pytest.fixture
async def start(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    """``await start(**config_overrides)`` -> (the public TestClient, the admin URL)."""

    async def started(**overrides: Any) -> tuple[TestClient, str]:
        admin = {"listen": "127.0.0.1:0", **overrides.pop("admin", {})}
        config = make_config(tmp_path, admin=admin, **overrides)
        app = create_app(config, admin_socket=False, admin_listener=True)
        client: TestClient = await aiohttp_client(app)
        return client, app[ADMIN_LISTENER].url

    return started


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # An unsafe cookie jar: it keeps cookies for IP-address hosts (127.0.0.1), as browsers do.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def get(
    http: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, str, aiohttp.ClientResponse]:
    async with http.get(url, allow_redirects=False, **kwargs) as resp:
        return resp.status, await resp.text(), resp


async def test_without_a_token_metrics_and_the_admin_routes_answer_on_loopback(
    start: Any, http: aiohttp.ClientSession
) -> None:
    _, admin = await start()
    status, text, _ = await get(http, admin + "/metrics")
    assert status == 200
    assert "tagrelay_up 1.0" in text
    for path in ("/healthz", "/readyz"):
        assert (await get(http, admin + path))[0] == 200
    # The admin socket's routes are there too: /sql answers (no warehouse runs here).
    async with http.post(admin + "/sql", json={"sql": "select 1"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "no_warehouse"
    # The index lists what is there.
    status, page, _ = await get(http, admin + "/")
    assert status == 200 and "/metrics" in page


async def test_without_a_token_a_request_naming_another_host_is_refused(
    start: Any, http: aiohttp.ClientSession
) -> None:
    """A page whose DNS name points at 127.0.0.1 (DNS rebinding) reaches the port, but its
    requests carry its own name as Host."""
    _, admin = await start()
    status, text, _ = await get(http, admin + "/metrics", headers={"Host": "evil.example"})
    assert status == 403 and "host_not_allowed" in text
    status, _, _ = await get(http, admin + "/metrics", headers={"Host": "localhost:9100"})
    assert status == 200


async def test_metrics_are_not_on_the_public_port_by_default(start: Any) -> None:
    client, _ = await start()
    assert (await client.get("/metrics")).status == 404
    for path in ("/healthz", "/readyz"):
        assert (await client.get(path)).status == 200


async def test_metrics_public_serves_them_on_the_public_port_too(
    start: Any, http: aiohttp.ClientSession
) -> None:
    client, admin = await start(metrics={"public": True})
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert "tagrelay_up 1.0" in await resp.text()
    assert (await get(http, admin + "/metrics"))[0] == 200


async def test_the_token_is_required_as_a_bearer_header(
    start: Any, http: aiohttp.ClientSession
) -> None:
    _, admin = await start(admin={"token": TOKEN})
    status, text, resp = await get(http, admin + "/metrics")
    assert status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "unauthorized" in text
    wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "x"}
    assert (await get(http, admin + "/metrics", headers=wrong))[0] == 401
    assert (await get(http, admin + "/metrics", headers={"Authorization": "Bearer "}))[0] == 401
    basic = {"Authorization": "Basic " + TOKEN}
    assert (await get(http, admin + "/metrics", headers=basic))[0] == 401
    status, text, _ = await get(
        http, admin + "/metrics", headers={"Authorization": "Bearer " + TOKEN}
    )
    assert status == 200 and "tagrelay_up 1.0" in text
    async with http.post(
        admin + "/sql", json={"sql": "select 1"}, headers={"Authorization": "bearer " + TOKEN}
    ) as resp:
        assert resp.status == 404, "the scheme's case does not matter"
    async with http.post(admin + "/sql", json={"sql": "select 1"}) as resp:
        assert resp.status == 401
    # With a token, any Host is fine (the token is the gate): a reverse proxy may name it.
    status, _, _ = await get(
        http,
        admin + "/metrics",
        headers={"Authorization": "Bearer " + TOKEN, "Host": "admin.example.com"},
    )
    assert status == 200


async def test_health_checks_need_no_token(start: Any, http: aiohttp.ClientSession) -> None:
    _, admin = await start(admin={"token": TOKEN})
    for path in ("/healthz", "/readyz"):
        assert (await get(http, admin + path))[0] == 200


async def test_the_login_form_sets_an_http_only_session_cookie(
    start: Any, http: aiohttp.ClientSession
) -> None:
    _, admin = await start(admin={"token": TOKEN})
    # A browser asking for a page is sent to the form, and back after it.
    status, _, resp = await get(http, admin + "/metrics", headers={"Accept": "text/html"})
    assert status == 303
    assert resp.headers["Location"] == "/login?next=/metrics"
    status, form, _ = await get(http, admin + "/login?next=/metrics")
    assert status == 200 and 'type="password"' in form and 'value="/metrics"' in form

    async with http.post(
        admin + "/login",
        data={"token": "not-the-token-at-all", "next": "/metrics"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 401
        assert "not the admin token" in await resp.text()
        assert SESSION_COOKIE not in resp.cookies

    async with http.post(
        admin + "/login", data={"token": TOKEN, "next": "/metrics"}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/metrics"
        set_cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie
    assert "SameSite=Strict" in set_cookie
    assert TOKEN not in set_cookie, "the cookie never holds the token"

    status, text, _ = await get(http, admin + "/metrics")
    assert status == 200 and "tagrelay_up 1.0" in text
    async with http.post(admin + "/sql", json={"sql": "select 1"}) as resp:
        assert resp.status == 404, "the session lets the admin API in"

    # A forged cookie, or a cookie after logging out, is refused.
    cookie = http.cookie_jar.filter_cookies(URL(admin))[SESSION_COOKIE].value
    expires, nonce, _mac = cookie.split(".")
    forged = {"Cookie": f"{SESSION_COOKIE}={int(expires) + 3600}.{nonce}.{_mac}"}
    async with aiohttp.ClientSession() as fresh:
        assert (await get(fresh, admin + "/metrics", headers=forged))[0] == 401
    async with http.post(admin + "/logout", allow_redirects=False) as resp:
        assert resp.status == 303
    async with aiohttp.ClientSession() as fresh:
        replayed = {"Cookie": f"{SESSION_COOKIE}={cookie}"}
        assert (await get(fresh, admin + "/metrics", headers=replayed))[0] == 401


async def test_after_login_only_paths_of_the_listener_are_followed(
    start: Any, http: aiohttp.ClientSession
) -> None:
    _, admin = await start(admin={"token": TOKEN})
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        async with http.post(
            admin + "/login", data={"token": TOKEN, "next": target}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/"


async def test_a_change_through_the_session_from_another_origin_is_refused(
    start: Any, http: aiohttp.ClientSession
) -> None:
    _, admin = await start(admin={"token": TOKEN})
    async with http.post(admin + "/login", data={"token": TOKEN}, allow_redirects=False):
        pass
    async with http.post(
        admin + "/sql", json={"sql": "select 1"}, headers={"Origin": "https://evil.example"}
    ) as resp:
        assert resp.status == 403
    async with http.post(admin + "/sql", json={"sql": "select 1"}, headers={"Origin": admin}) as r:
        assert r.status == 404, "its own pages may"


async def test_the_token_never_appears_in_a_log_line(
    start: Any, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, admin = await start(admin={"token": TOKEN})
    await get(http, admin + "/metrics", headers={"Authorization": "Bearer " + TOKEN})
    await get(http, admin + "/metrics", headers={"Authorization": "Bearer " + TOKEN + "0"})
    async with http.post(admin + "/login", data={"token": TOKEN + "0"}):
        pass
    async with http.post(admin + "/login", data={"token": TOKEN}):
        pass
    await get(http, admin + "/metrics")
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any("admin listening" in line for line in lines)
    assert any("refused" in line for line in lines), "the refusals are logged"
    assert not [line for line in lines if TOKEN in line]


async def test_admin_listener_off(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> None:
    config = make_config(tmp_path, admin={"enabled": False})
    app = create_app(config, admin_socket=False, admin_listener=True)
    client: TestClient = await aiohttp_client(app)
    assert ADMIN_LISTENER not in app
    assert (await client.get("/healthz")).status == 200


def write(tmp_path: Path, admin: str) -> Path:
    path = tmp_path / "tagrelay.yaml"
    path.write_text(f"keys:\n  - {{id: backend, kind: server, key: k}}\nadmin: {admin}\n")
    return path


@pytest.mark.parametrize(
    "admin",
    [
        '{listen: "0.0.0.0:9100"}',
        '{listen: "[::]:9100", token: ""}',
        '{listen: "10.1.2.3:9100"}',
        '{listen: "admin.internal:9100"}',
    ],
)
def test_a_listener_beyond_loopback_without_a_token_is_refused_at_load(
    tmp_path: Path, admin: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, admin))
    [problem] = caught.value.problems
    assert problem.path == "admin"
    assert "not a loopback address" in problem.message
    assert "admin.token" in problem.message


@pytest.mark.parametrize(
    "admin",
    [
        '{listen: "127.0.0.1:9100"}',
        '{listen: "[::1]:9100"}',
        '{listen: "localhost:0"}',
        f'{{listen: "0.0.0.0:9100", token: "{TOKEN}"}}',
        '{listen: "0.0.0.0:9100", enabled: false}',
    ],
)
def test_loopback_or_a_token_is_accepted(tmp_path: Path, admin: str) -> None:
    load_config(write(tmp_path, admin))


@pytest.mark.parametrize(
    ("admin", "expected"),
    [
        ('{listen: "9100"}', "not host:port"),
        ('{listen: "::1:9100"}', "in brackets"),
        ('{listen: "127.0.0.1:99999"}', "not host:port"),
        ('{token: "short-token"}', "at least 16"),
    ],
)
def test_bad_admin_settings_are_explained(tmp_path: Path, admin: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, admin))
    assert expected in str(caught.value)
    assert "short-token" not in str(caught.value), "a token is never echoed"


async def test_a_taken_admin_port_is_a_clear_start_up_error(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    from tagrelay.errors import ListenError

    holder = web.Application()
    runner = web.AppRunner(holder)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        config = make_config(tmp_path, admin={"listen": f"127.0.0.1:{port}"})
        app = create_app(config, admin_socket=False, admin_listener=True)
        with pytest.raises(
            ListenError, match=f"admin listener could not listen on 127.0.0.1:{port}"
        ):
            await aiohttp_client(app)
    finally:
        await runner.cleanup()
