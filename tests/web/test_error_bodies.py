"""Every error answer of the relay's routes is JSON ``{"error", "message"}``: a table of
requests that got aiohttp's plain text before (``Maximum request body size 512000
exceeded.``), and the errors aiohttp raises inside a handler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tagrelay.app import create_app
from tests.support import SERVER_KEY, basic, make_config

TID = "G-8XK2MS9Q4T"
SECRET = "mp-secret-1"
GOOGLE = {
    "collect": {"measurement_ids": [TID]},
    "measurement_protocol": [{"measurement_id": TID, "api_secret": SECRET}],
}
TOO_LARGE = b"x" * (500 * 1024 + 1)
MP = f"?measurement_id={TID}&api_secret={SECRET}"

CASES = [
    # name, method, path, headers, body, status, error
    ("mp body too large", "POST", "/mp/collect" + MP, {}, TOO_LARGE, 413, "body_too_large"),
    (
        "mp debug body too large",
        "POST",
        "/debug/mp/collect" + MP,
        {},
        TOO_LARGE,
        413,
        "body_too_large",
    ),
    ("sdk metrics body too large", "POST", "/v1/m", {}, TOO_LARGE, 413, "body_too_large"),
    (
        "gtag hit body too large",
        "POST",
        f"/g/collect?v=2&tid={TID}&cid=1.2",
        {},
        TOO_LARGE,
        413,
        "body_too_large",
    ),
    (
        "mp body that is not the zstd it claims",
        "POST",
        "/mp/collect" + MP,
        {"Content-Encoding": "zstd"},
        b"{}",
        400,
        "invalid_body_encoding",
    ),
    (
        "sdk metrics that are not the brotli they claim",
        "POST",
        "/v1/m",
        {"Content-Encoding": "br"},
        b'{"series": []}',
        400,
        "invalid_body_encoding",
    ),
    (
        "ingest body too large",
        "POST",
        "/v1/batch",
        {**basic(SERVER_KEY), "Content-Type": "application/json"},
        TOO_LARGE,
        413,
        "body_too_large",
    ),
    ("unknown path", "GET", "/nope", {}, None, 404, "not_found"),
    ("wrong method", "DELETE", "/healthz", {}, None, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "error"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_error_answers_are_json(
    relay: Any,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None,
    status: int,
    error: str,
) -> None:
    client = await relay(google=GOOGLE)
    resp = await client.request(method, path, headers=headers, data=body)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json", await resp.text()
    answer = await resp.json()
    assert answer["error"] == error
    assert answer["message"]


@pytest.mark.parametrize(
    ("exc", "status", "error"),
    [
        (web.HTTPRequestEntityTooLarge(max_size=10, actual_size=11), 413, "body_too_large"),
        (web.HTTPBadRequest(text="bad header"), 400, "bad_request"),
        (web.HTTPUnprocessableEntity(), 422, "unprocessable_entity"),
        (web.HTTPServiceUnavailable(), 503, "service_unavailable"),
    ],
)
async def test_aiohttp_errors_raised_in_a_handler_answer_json(
    tmp_path: Path, aiohttp_client: Any, exc: web.HTTPException, status: int, error: str
) -> None:
    app = create_app(make_config(tmp_path), admin_socket=False)

    async def raising(request: web.Request) -> web.Response:
        raise exc

    app.router.add_get("/raises", raising)
    client = await aiohttp_client(app)
    resp = await client.get("/raises")
    assert resp.status == status
    assert resp.content_type == "application/json", await resp.text()
    answer = await resp.json()
    assert answer["error"] == error
    assert answer["message"]


async def test_a_redirect_raised_in_a_handler_stays_a_redirect(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    app = create_app(make_config(tmp_path), admin_socket=False)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/healthz")

    app.router.add_get("/moved", redirect)
    client = await aiohttp_client(app)
    resp = await client.get("/moved", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/healthz"
