"""First-party gtag.js / gtm.js: the allow-list (and what a request cannot make the relay
fetch), renamed paths, the memory and disk cache, stale copies when the upstream fails, the
size cap, and how the scripts are served (ETag, 304, gzip, HEAD).

The upstream is ``FakeGoogle``: a small aiohttp app on 127.0.0.1 that records every request
and answers as each test scripts it. Time is a ``FakeClock`` the tests move; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import hdrs, web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from tagrelay.config.google_scripts import GoogleScriptEntry, GoogleScriptsConfig
from tagrelay.web.google_scripts import (
    BROWSER_MAX_AGE_SECS,
    FAILURE_BACKOFF_SECS,
    STALE_MAX_AGE_SECS,
    add_google_script_routes,
)

MAX_BYTES = 4096
TTL = 900
STALE_MAX_AGE = 86_400
START = 1_700_000_000.0


@dataclass
class Seen:
    """One request the fake upstream received."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]


class FakeGoogle:
    """www.googletagmanager.com, as far as the relay can tell. ``mode`` scripts the answers;
    ``version`` changes the script's content; ``etag``/``last_modified`` turn on conditional
    answers; ``gate`` holds every answer until it is set."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.mode = "ok"
        self.version = 1
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.gate: asyncio.Event | None = None
        self.unhang = asyncio.Event()
        self.server: TestServer | None = None
        self.url = ""

    def body(self, request: web.Request) -> bytes:
        return f"/* {request.path}?{request.query_string} v{self.version} */\nvar g=1;\n".encode()

    async def script(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            Seen(request.method, request.path, list(request.query.items()), dict(request.headers))
        )
        if self.gate is not None:
            await self.gate.wait()
        mode = self.mode
        if mode == "status_500":
            return web.Response(status=500, text="backend error")
        if mode == "hang":
            await self.unhang.wait()
            return web.Response(status=503)
        if mode == "html":
            return web.Response(text="<html>captive portal</html>", content_type="text/html")
        if mode == "redirect":
            raise web.HTTPFound("https://evil.test/gtag/js")
        if mode == "too_large":
            return web.Response(body=b"x" * (MAX_BYTES + 1), content_type="text/javascript")
        if mode == "exactly_max":
            return web.Response(body=b"x" * MAX_BYTES, content_type="text/javascript")
        if mode == "too_large_chunked":
            response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/javascript"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            try:
                for _ in range(100):
                    await response.write(b"y" * 1000)
            except ConnectionError:
                return response  # the relay stopped reading, as it should
            await response.write_eof()
            return response
        if mode == "gzip_bomb":
            return web.Response(
                body=gzip.compress(b" " * (MAX_BYTES * 50)),
                headers={hdrs.CONTENT_TYPE: "text/javascript", hdrs.CONTENT_ENCODING: "gzip"},
            )
        headers: dict[str, str] = {}
        if self.etag is not None:
            headers[hdrs.ETAG] = self.etag
            if request.headers.get(hdrs.IF_NONE_MATCH) == self.etag:
                return web.Response(status=304, headers=headers)
        if self.last_modified is not None:
            headers[hdrs.LAST_MODIFIED] = self.last_modified
            if request.headers.get(hdrs.IF_MODIFIED_SINCE) == self.last_modified:
                return web.Response(status=304, headers=headers)
        body = self.body(request)
        if mode == "gzipped":
            body = gzip.compress(body)
            headers[hdrs.CONTENT_ENCODING] = "gzip"
        headers[hdrs.CONTENT_TYPE] = "application/javascript; charset=UTF-8"
        return web.Response(body=body, headers=headers)

    async def unexpected(self, request: web.Request) -> web.Response:
        self.requests.append(
            Seen(request.method, request.path, list(request.query.items()), dict(request.headers))
        )
        return web.Response(status=599, text="unexpected request to the fake upstream")

    async def close(self) -> None:
        """Stop answering: every later connection is refused."""
        self.unhang.set()
        if self.server is not None:
            await self.server.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, secs: float) -> None:
        self.now += secs


class Events:
    """Collects ``on_event(kind, outcome)`` calls."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def record(self, kind: str, outcome: str) -> None:
        self.counts[(kind, outcome)] += 1


@pytest.fixture
async def upstream() -> AsyncIterator[FakeGoogle]:
    fake = FakeGoogle()
    app = web.Application()
    app.router.add_get("/gtag/js", fake.script, allow_head=False)
    app.router.add_get("/gtm.js", fake.script, allow_head=False)
    app.router.add_route("*", "/{tail:.*}", fake.unexpected)
    fake.server = TestServer(app, host="127.0.0.1")
    await fake.server.start_server()
    fake.url = str(fake.server.make_url("/")).rstrip("/")
    yield fake
    await fake.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events() -> Events:
    return Events()


def scripts_config(upstream_url: str, **overrides: Any) -> GoogleScriptsConfig:
    raw: dict[str, Any] = {
        "upstream": upstream_url,
        "ids": [
            {"id": "G-TEST1", "path": "/assets/site.js"},
            {"id": "AW-123456"},
            {"id": "DC-98765"},
            {"id": "GTM-ABC12", "path": "/assets/app.js"},
        ],
        "data_layers": ["shopLayer"],
        "ttl_secs": TTL,
        "max_bytes": MAX_BYTES,
        "timeout_secs": 5,
        "stale_max_age_secs": STALE_MAX_AGE,
    }
    raw.update(overrides)
    return GoogleScriptsConfig.model_validate(raw)


Start = Callable[..., Any]


@pytest.fixture
def start(
    aiohttp_client: Callable[..., Any],
    upstream: FakeGoogle,
    clock: FakeClock,
    events: Events,
    tmp_path: Path,
) -> Start:
    """``await start(**config_overrides)`` -> a TestClient (no automatic decompression) on
    an app serving the scripts from the fake upstream, caching in ``tmp_path``."""

    async def start_app(
        prefix: str = "", cache_dir: Path | None = None, **overrides: Any
    ) -> TestClient[web.Request, web.Application]:
        app = web.Application()
        add_google_script_routes(
            app,
            scripts_config(upstream.url, **overrides),
            prefix,
            cache_dir or tmp_path / "google-scripts",
            on_event=events.record,
            clock=clock,
        )
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            app, auto_decompress=False
        )
        return client

    return start_app


async def body_of(resp: aiohttp.ClientResponse) -> bytes:
    """The script as the browser runs it (the test client does not decompress)."""
    raw = await resp.read()
    return gzip.decompress(raw) if resp.headers.get(hdrs.CONTENT_ENCODING) == "gzip" else raw


def only_request(upstream: FakeGoogle) -> Seen:
    assert len(upstream.requests) == 1, upstream.requests
    return upstream.requests[0]


# ---------------------------------------------------------------------------------------
# The allow-list


@pytest.mark.parametrize(
    ("url", "path", "tag_id"),
    [
        ("/gtag/js?id=G-TEST1", "/gtag/js", "G-TEST1"),
        ("/gtag/js?id=AW-123456", "/gtag/js", "AW-123456"),
        ("/gtag/js?id=DC-98765", "/gtag/js", "DC-98765"),
        ("/gtm.js?id=GTM-ABC12", "/gtm.js", "GTM-ABC12"),
    ],
)
async def test_an_allowed_id_is_fetched_from_the_upstream_and_served(
    start: Start, upstream: FakeGoogle, events: Events, url: str, path: str, tag_id: str
) -> None:
    client = await start()
    resp = await client.get(url)
    assert resp.status == 200
    body = await body_of(resp)
    assert body == f"/* {path}?id={tag_id} v1 */\nvar g=1;\n".encode()
    assert resp.headers[hdrs.CONTENT_TYPE] == "text/javascript; charset=utf-8"
    assert resp.headers[hdrs.CACHE_CONTROL] == f"public, max-age={min(TTL, BROWSER_MAX_AGE_SECS)}"
    assert resp.headers[hdrs.VARY] == "Accept-Encoding"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers[hdrs.ETAG].startswith('"')
    seen = only_request(upstream)
    assert (seen.method, seen.path, seen.query) == ("GET", path, [("id", tag_id)])
    kind = "gtm" if tag_id.startswith("GTM-") else "gtag"
    assert events.counts == {(kind, "miss"): 1}


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("/gtag/js?id=G-OTHER", "id_not_allowed"),
        ("/gtm.js?id=GTM-OTHER", "id_not_allowed"),
        ("/gtag/js?id=GTM-ABC12", "id_not_allowed"),  # a GTM id is not a gtag.js script
        ("/gtm.js?id=G-TEST1", "id_not_allowed"),
        ("/gtag/js", "missing_id"),
        ("/gtag/js?ID=G-TEST1", "missing_id"),
        ("/gtag/js?id=", "malformed_id"),
        ("/gtag/js?id=g-test1", "malformed_id"),
        ("/gtag/js?id=G-TEST1&id=G-TEST1", "malformed_id"),
        ("/gtag/js?id=G-TEST1&id=AW-123456", "malformed_id"),
        ("/gtag/js?id=G-TEST1%0d%0aHost:%20evil.test", "malformed_id"),
        ("/gtag/js?id=G-TEST1%0a", "malformed_id"),
        ("/gtag/js?id=G-TEST1%00", "malformed_id"),
        ("/gtag/js?id=G-TEST1%20", "malformed_id"),
        ("/gtag/js?id=G-TEST1%26id%3DG-EVIL", "malformed_id"),
        ("/gtag/js?id=G-TEST1%23frag", "malformed_id"),
        ("/gtag/js?id=../../etc/passwd", "malformed_id"),
        ("/gtag/js?id=G-TEST1/../../gtm.js", "malformed_id"),
        ("/gtag/js?id=G-TEST1%2F..%2F..%2Fx", "malformed_id"),
        ("/gtag/js?id=https://evil.test/x.js", "malformed_id"),
        ("/gtag/js?id=G-TEST1@evil.test", "malformed_id"),
        ("/gtag/js?id=G-%EF%BC%B4EST1", "malformed_id"),  # a full-width T
        ("/gtag/js?id=G-TEST1&l=otherLayer", "data_layer_not_allowed"),
        ("/gtag/js?id=G-TEST1&l=a.b", "malformed_data_layer"),
        ("/gtag/js?id=G-TEST1&l=x%0aHost:y", "malformed_data_layer"),
        ("/gtag/js?id=G-TEST1&l=", "malformed_data_layer"),
        ("/gtag/js?id=G-TEST1&l=shopLayer&l=dataLayer", "malformed_data_layer"),
        ("/assets/site.js?l=evil%2F..", "malformed_data_layer"),
    ],
)
async def test_anything_but_an_allowed_id_is_a_404_and_never_reaches_the_upstream(
    start: Start, upstream: FakeGoogle, events: Events, url: str, code: str
) -> None:
    client = await start()
    resp = await client.get(url)
    assert resp.status == 404
    assert resp.headers[hdrs.CONTENT_TYPE].startswith("application/json")
    payload = json.loads(await resp.read())
    assert payload["error"] == code
    assert payload["message"]
    assert upstream.requests == []
    kind = "gtm" if url.startswith("/gtm.js") else "gtag"
    assert events.counts == {(kind, "not_allowed"): 1}


async def test_paths_outside_the_routes_are_not_served(start: Start, upstream: FakeGoogle) -> None:
    client = await start()
    for path in (
        "/gtag/js/..%2F..%2Fgtm.js?id=GTM-ABC12",
        "/gtag/js/extra?id=G-TEST1",
        "/gtag?id=G-TEST1",
        "/assets/site.js/x",
        "/gtm.js%3Fid=GTM-ABC12",
    ):
        resp = await client.get(path)
        assert resp.status == 404, path
    assert upstream.requests == []


async def test_the_request_cannot_choose_the_upstream_host_path_or_parameters(
    start: Start, upstream: FakeGoogle
) -> None:
    client = await start()
    resp = await client.get(
        "/gtag/js?id=G-TEST1&l=dataLayer&gtm_auth=secret&gtm_preview=env-5&gtm_cookies_win=x"
        "&cx=c&gtm=45je&url=https%3A%2F%2Fevil.test%2F&upstream=http%3A%2F%2Fevil.test",
        headers={
            "Host": "evil.test",
            "X-Forwarded-Host": "evil.test",
            "X-Forwarded-Proto": "http",
            "Cookie": "_ga=GA1.1.1.1",
            "User-Agent": "browser/1.0",
        },
    )
    assert resp.status == 200
    seen = only_request(upstream)
    assert (seen.path, seen.query) == ("/gtag/js", [("id", "G-TEST1")])
    assert seen.headers["Host"] == upstream.url.removeprefix("http://")
    assert "Cookie" not in seen.headers
    assert "X-Forwarded-Host" not in seen.headers
    assert seen.headers["User-Agent"] == "tagrelay"


async def test_an_allowed_data_layer_name_passes_through_and_is_cached_apart(
    start: Start, upstream: FakeGoogle
) -> None:
    client = await start()
    renamed = await client.get("/gtm.js?id=GTM-ABC12&l=shopLayer")
    default = await client.get("/gtm.js?id=GTM-ABC12")
    assert renamed.status == default.status == 200
    assert await body_of(renamed) != await body_of(default)
    assert [(s.path, s.query) for s in upstream.requests] == [
        ("/gtm.js", [("id", "GTM-ABC12"), ("l", "shopLayer")]),
        ("/gtm.js", [("id", "GTM-ABC12")]),
    ]
    # l=dataLayer is the default: the same script as no l, from the cache.
    same = await client.get("/gtm.js?id=GTM-ABC12&l=dataLayer")
    assert await body_of(same) == await body_of(default)
    assert len(upstream.requests) == 2


# ---------------------------------------------------------------------------------------
# Renamed paths and the prefix


async def test_a_renamed_path_serves_its_ids_script_from_the_same_cache_entry(
    start: Start, upstream: FakeGoogle, events: Events
) -> None:
    client = await start()
    renamed = await client.get("/assets/site.js?id=GTM-ABC12")  # the path decides, not ?id
    assert renamed.status == 200
    assert await body_of(renamed) == b"/* /gtag/js?id=G-TEST1 v1 */\nvar g=1;\n"
    standard = await client.get("/gtag/js?id=G-TEST1")
    assert await body_of(standard) == b"/* /gtag/js?id=G-TEST1 v1 */\nvar g=1;\n"
    gtm = await client.get("/assets/app.js?l=shopLayer")
    assert gtm.status == 200
    assert [(s.path, s.query) for s in upstream.requests] == [
        ("/gtag/js", [("id", "G-TEST1")]),
        ("/gtm.js", [("id", "GTM-ABC12"), ("l", "shopLayer")]),
    ]
    assert events.counts == {("gtag", "miss"): 1, ("gtag", "hit"): 1, ("gtm", "miss"): 1}


async def test_routes_live_under_the_prefix(start: Start, upstream: FakeGoogle) -> None:
    client = await start(prefix="/t")
    assert (await client.get("/t/gtag/js?id=G-TEST1")).status == 200
    assert (await client.get("/t/assets/app.js")).status == 200
    assert (await client.get("/gtag/js?id=G-TEST1")).status == 404
    assert [s.path for s in upstream.requests] == ["/gtag/js", "/gtm.js"]


# ---------------------------------------------------------------------------------------
# The cache


async def test_within_the_ttl_many_requests_make_one_upstream_request(
    start: Start, upstream: FakeGoogle, clock: FakeClock, events: Events
) -> None:
    client = await start()
    upstream.gate = asyncio.Event()
    first = [asyncio.create_task(client.get("/gtag/js?id=G-TEST1")) for _ in range(20)]
    for _ in range(200):
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    upstream.gate.set()
    responses = await asyncio.gather(*first)
    bodies = {await body_of(r) for r in responses}
    assert [r.status for r in responses] == [200] * 20
    assert len(bodies) == 1
    clock.advance(TTL - 1)
    for _ in range(5):
        assert (await client.get("/gtag/js?id=G-TEST1")).status == 200
    only_request(upstream)
    assert events.counts == {("gtag", "miss"): 1, ("gtag", "hit"): 24}


async def test_after_the_ttl_the_script_is_fetched_again(
    start: Start, upstream: FakeGoogle, clock: FakeClock, events: Events
) -> None:
    client = await start()
    old = await client.get("/gtag/js?id=G-TEST1")
    upstream.version = 2
    clock.advance(TTL)
    new = await client.get("/gtag/js?id=G-TEST1")
    assert await body_of(new) == b"/* /gtag/js?id=G-TEST1 v2 */\nvar g=1;\n"
    assert new.headers[hdrs.ETAG] != old.headers[hdrs.ETAG]
    clock.advance(TTL - 1)
    await client.get("/gtag/js?id=G-TEST1")
    assert len(upstream.requests) == 2
    assert events.counts == {("gtag", "miss"): 1, ("gtag", "refreshed"): 1, ("gtag", "hit"): 1}


@pytest.mark.parametrize("validator", ["etag", "last_modified"])
async def test_refreshes_are_conditional_when_the_upstream_gave_a_validator(
    start: Start, upstream: FakeGoogle, clock: FakeClock, events: Events, validator: str
) -> None:
    if validator == "etag":
        upstream.etag = '"upstream-v1"'
    else:
        upstream.last_modified = "Tue, 14 Nov 2023 22:13:20 GMT"
    client = await start()
    first = await client.get("/gtag/js?id=G-TEST1")
    clock.advance(TTL + 1)
    upstream.version = 2  # would change the body if the 304 were ignored
    second = await client.get("/gtag/js?id=G-TEST1")
    assert second.status == 200
    assert await body_of(second) == await body_of(first)
    assert second.headers[hdrs.ETAG] == first.headers[hdrs.ETAG]
    revalidation = upstream.requests[1].headers
    if validator == "etag":
        assert revalidation[hdrs.IF_NONE_MATCH] == '"upstream-v1"'
    else:
        assert revalidation[hdrs.IF_MODIFIED_SINCE] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert hdrs.IF_NONE_MATCH not in upstream.requests[0].headers
    clock.advance(TTL - 1)  # the revalidation restarted the TTL
    await client.get("/gtag/js?id=G-TEST1")
    assert len(upstream.requests) == 2
    assert events.counts == {("gtag", "miss"): 1, ("gtag", "refreshed"): 1, ("gtag", "hit"): 1}


async def test_a_gzipped_upstream_answer_is_stored_decoded(
    start: Start, upstream: FakeGoogle
) -> None:
    upstream.mode = "gzipped"
    client = await start()
    resp = await client.get("/gtag/js?id=G-TEST1", headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    assert hdrs.CONTENT_ENCODING not in resp.headers
    assert await body_of(resp) == b"/* /gtag/js?id=G-TEST1 v1 */\nvar g=1;\n"


# ---------------------------------------------------------------------------------------
# When the upstream fails


async def fail_upstream(upstream: FakeGoogle, failure: str) -> None:
    if failure == "connection_refused":
        await upstream.close()
    else:
        upstream.mode = failure


FAILURES = [
    ("status_500", "upstream_error"),
    ("hang", "upstream_error"),
    ("connection_refused", "upstream_error"),
    ("html", "upstream_error"),
    ("redirect", "upstream_error"),
    ("too_large", "too_large"),
    ("too_large_chunked", "too_large"),
    ("gzip_bomb", "too_large"),
]


@pytest.mark.parametrize(("failure", "counted"), FAILURES)
async def test_a_failing_upstream_gets_the_stale_copy_served_and_counted(
    start: Start,
    upstream: FakeGoogle,
    clock: FakeClock,
    events: Events,
    failure: str,
    counted: str,
) -> None:
    client = await start(timeout_secs=0.2)
    fresh = await client.get("/gtag/js?id=G-TEST1")
    fresh_body = await body_of(fresh)
    clock.advance(TTL + 1)
    await fail_upstream(upstream, failure)
    stale = await client.get("/gtag/js?id=G-TEST1")
    assert stale.status == 200
    assert await body_of(stale) == fresh_body
    assert stale.headers[hdrs.ETAG] == fresh.headers[hdrs.ETAG]
    assert stale.headers[hdrs.CACHE_CONTROL] == f"public, max-age={STALE_MAX_AGE_SECS}"
    assert events.counts == {
        ("gtag", "miss"): 1,
        ("gtag", counted): 1,
        ("gtag", "stale_served"): 1,
    }
    if failure == "redirect":
        assert [s.path for s in upstream.requests] == ["/gtag/js", "/gtag/js"]  # not followed


@pytest.mark.parametrize(("failure", "counted"), FAILURES)
async def test_with_nothing_cached_a_failing_upstream_is_a_502(
    start: Start, upstream: FakeGoogle, events: Events, failure: str, counted: str
) -> None:
    client = await start(timeout_secs=0.2)
    await fail_upstream(upstream, failure)
    resp = await client.get("/gtm.js?id=GTM-ABC12")
    assert resp.status == 502
    assert json.loads(await resp.read())["error"] == "upstream_unavailable"
    assert events.counts == {("gtm", counted): 1, ("gtm", "unavailable"): 1}


async def test_a_script_of_exactly_max_bytes_is_accepted(
    start: Start, upstream: FakeGoogle
) -> None:
    upstream.mode = "exactly_max"
    client = await start()
    resp = await client.get("/gtag/js?id=G-TEST1")
    assert resp.status == 200
    assert len(await body_of(resp)) == MAX_BYTES


async def test_after_a_failure_the_upstream_rests_then_is_tried_again(
    start: Start, upstream: FakeGoogle, clock: FakeClock, events: Events
) -> None:
    client = await start()
    await client.get("/gtag/js?id=G-TEST1")
    clock.advance(TTL + 1)
    upstream.mode = "status_500"
    for _ in range(3):
        assert (await client.get("/gtag/js?id=G-TEST1")).status == 200
    assert len(upstream.requests) == 2  # one failed fetch, then the stale copy alone
    clock.advance(FAILURE_BACKOFF_SECS)
    upstream.mode = "ok"
    upstream.version = 2
    resp = await client.get("/gtag/js?id=G-TEST1")
    assert await body_of(resp) == b"/* /gtag/js?id=G-TEST1 v2 */\nvar g=1;\n"
    assert len(upstream.requests) == 3
    assert events.counts == {
        ("gtag", "miss"): 1,
        ("gtag", "upstream_error"): 1,
        ("gtag", "stale_served"): 3,
        ("gtag", "refreshed"): 1,
    }


async def test_a_copy_older_than_stale_max_age_is_not_served(
    start: Start, upstream: FakeGoogle, clock: FakeClock, events: Events
) -> None:
    client = await start()
    await client.get("/gtag/js?id=G-TEST1")
    upstream.mode = "status_500"
    clock.advance(STALE_MAX_AGE)
    assert (await client.get("/gtag/js?id=G-TEST1")).status == 200
    clock.advance(FAILURE_BACKOFF_SECS)
    assert (await client.get("/gtag/js?id=G-TEST1")).status == 502
    assert events.counts[("gtag", "stale_served")] == 1
    assert events.counts[("gtag", "unavailable")] == 1


async def test_concurrent_requests_share_one_failed_fetch(
    start: Start, upstream: FakeGoogle, clock: FakeClock, events: Events
) -> None:
    client = await start()
    await client.get("/gtag/js?id=G-TEST1")
    clock.advance(TTL + 1)
    upstream.mode = "status_500"
    responses = await asyncio.gather(*(client.get("/gtag/js?id=G-TEST1") for _ in range(10)))
    assert [r.status for r in responses] == [200] * 10
    assert len(upstream.requests) == 2
    assert events.counts[("gtag", "upstream_error")] == 1
    assert events.counts[("gtag", "stale_served")] == 10


# ---------------------------------------------------------------------------------------
# The disk cache


async def test_the_disk_cache_serves_a_new_instance_while_the_upstream_is_down(
    start: Start, upstream: FakeGoogle, clock: FakeClock, events: Events, tmp_path: Path
) -> None:
    first = await start()
    original = await first.get("/gtm.js?id=GTM-ABC12&l=shopLayer")
    original_body = await body_of(original)
    await first.close()
    await upstream.close()

    within_ttl = await start()
    resp = await within_ttl.get("/gtm.js?id=GTM-ABC12&l=shopLayer")
    assert resp.status == 200
    assert await body_of(resp) == original_body
    assert resp.headers[hdrs.ETAG] == original.headers[hdrs.ETAG]
    await within_ttl.close()

    clock.advance(TTL + 1)
    after_ttl = await start()
    resp = await after_ttl.get("/gtm.js?id=GTM-ABC12&l=shopLayer")
    assert resp.status == 200
    assert await body_of(resp) == original_body
    assert resp.headers[hdrs.CACHE_CONTROL] == f"public, max-age={STALE_MAX_AGE_SECS}"
    assert len(upstream.requests) == 1
    assert events.counts == {
        ("gtm", "miss"): 1,
        ("gtm", "hit"): 1,
        ("gtm", "upstream_error"): 1,
        ("gtm", "stale_served"): 1,
    }
    assert sorted(p.name for p in (tmp_path / "google-scripts").iterdir()) == [
        "gtm-GTM-ABC12-l-shopLayer.js",
        "gtm-GTM-ABC12-l-shopLayer.json",
    ]


async def test_a_disk_copy_from_another_upstream_or_damaged_is_ignored(
    aiohttp_client: Callable[..., Any],
    start: Start,
    upstream: FakeGoogle,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    first = await start()
    await first.get("/gtag/js?id=G-TEST1")
    await first.close()
    await upstream.close()

    elsewhere = web.Application()
    add_google_script_routes(
        elsewhere,
        scripts_config("http://127.0.0.1:9"),
        "",
        tmp_path / "google-scripts",
        clock=clock,
    )
    client = await aiohttp_client(elsewhere)
    assert (await client.get("/gtag/js?id=G-TEST1")).status == 502

    (tmp_path / "google-scripts" / "gtag-G-TEST1.js").write_bytes(b"tampered")
    damaged = await start()
    assert (await damaged.get("/gtag/js?id=G-TEST1")).status == 502


async def test_an_unwritable_cache_dir_still_serves_from_memory(
    start: Start, upstream: FakeGoogle, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    client = await start(cache_dir=blocker / "google-scripts")
    for _ in range(2):
        assert (await client.get("/gtag/js?id=G-TEST1")).status == 200
    only_request(upstream)


# ---------------------------------------------------------------------------------------
# To the browser: ETag, 304, gzip, HEAD


async def test_gzip_when_accepted_identity_otherwise(start: Start) -> None:
    client = await start()
    identity = await client.get("/gtag/js?id=G-TEST1", headers={"Accept-Encoding": "identity"})
    zipped = await client.get("/gtag/js?id=G-TEST1", headers={"Accept-Encoding": "gzip, br"})
    refused = await client.get("/gtag/js?id=G-TEST1", headers={"Accept-Encoding": "gzip;q=0"})
    assert hdrs.CONTENT_ENCODING not in identity.headers
    assert zipped.headers[hdrs.CONTENT_ENCODING] == "gzip"
    assert hdrs.CONTENT_ENCODING not in refused.headers
    assert gzip.decompress(await zipped.read()) == await identity.read() == await refused.read()
    assert zipped.headers[hdrs.ETAG] != identity.headers[hdrs.ETAG]
    assert zipped.headers[hdrs.VARY] == identity.headers[hdrs.VARY] == "Accept-Encoding"


async def test_if_none_match_gets_a_304(start: Start, upstream: FakeGoogle) -> None:
    client = await start()
    resp = await client.get("/gtag/js?id=G-TEST1", headers={"Accept-Encoding": "gzip"})
    etag = resp.headers[hdrs.ETAG]
    for if_none_match in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = await client.get(
            "/gtag/js?id=G-TEST1",
            headers={"Accept-Encoding": "gzip", hdrs.IF_NONE_MATCH: if_none_match},
        )
        assert again.status == 304, if_none_match
        assert await again.read() == b""
        assert again.headers[hdrs.ETAG] == etag
        assert again.headers[hdrs.CACHE_CONTROL].startswith("public, max-age=")
    changed = await client.get("/gtag/js?id=G-TEST1", headers={hdrs.IF_NONE_MATCH: '"old"'})
    assert changed.status == 200
    only_request(upstream)


async def test_head_answers_like_get_without_a_body(start: Start, upstream: FakeGoogle) -> None:
    client = await start()
    head = await client.head("/assets/site.js")
    get = await client.get("/assets/site.js")
    assert head.status == get.status == 200
    assert await head.read() == b""
    assert head.headers[hdrs.ETAG] == get.headers[hdrs.ETAG]
    assert head.headers[hdrs.CONTENT_LENGTH] == get.headers[hdrs.CONTENT_LENGTH]
    assert [s.method for s in upstream.requests] == ["GET"]
    assert (await client.head("/gtag/js?id=G-OTHER")).status == 404


# ---------------------------------------------------------------------------------------
# Lifecycle and configuration


async def test_the_client_session_lives_and_dies_with_the_app(
    aiohttp_client: Callable[..., Any], upstream: FakeGoogle, tmp_path: Path
) -> None:
    sessions: list[aiohttp.ClientSession] = []

    def session_factory() -> aiohttp.ClientSession:
        sessions.append(aiohttp.ClientSession())
        return sessions[-1]

    app = web.Application()
    add_google_script_routes(
        app, scripts_config(upstream.url), "", tmp_path, session_factory=session_factory
    )
    assert sessions == []
    client = await aiohttp_client(app)
    assert (await client.get("/gtag/js?id=G-TEST1")).status == 200
    assert len(sessions) == 1 and not sessions[0].closed
    await client.close()
    assert sessions[0].closed


def test_the_defaults() -> None:
    config = GoogleScriptsConfig()
    assert config.upstream == "https://www.googletagmanager.com"
    assert (config.ttl_secs, config.max_bytes, config.timeout_secs) == (900, 2_000_000, 10.0)
    assert config.stale_max_age_secs == 7 * 86_400
    assert config.ids == [] and config.data_layers == []


def test_every_option_is_documented() -> None:
    for model in (GoogleScriptsConfig, GoogleScriptEntry):
        assert (model.__doc__ or "").strip()
        for name, field in model.model_fields.items():
            assert (field.description or "").strip(), f"{model.__name__}.{name}"
            assert field.examples, f"{model.__name__}.{name}"
    example = {
        name: field.examples[0]
        for name, field in GoogleScriptsConfig.model_fields.items()
        if field.examples
    }
    GoogleScriptsConfig.model_validate(example)


@pytest.mark.parametrize(
    "tag_id", ["g-abc", "G-abc1", "UA-12345-1", "GTM-", "G-TEST1\n", "G-TEST 1", "GT-ABC"]
)
def test_malformed_ids_are_rejected(tag_id: str) -> None:
    with pytest.raises(ValidationError):
        GoogleScriptsConfig.model_validate({"ids": [{"id": tag_id}]})


@pytest.mark.parametrize(
    "upstream",
    [
        "ftp://www.googletagmanager.com",
        "https://www.googletagmanager.com/gtag",
        "https://www.googletagmanager.com?x=1",
        "https://user:pw@www.googletagmanager.com",
        "www.googletagmanager.com",
        "",
    ],
)
def test_the_upstream_is_an_origin(upstream: str) -> None:
    with pytest.raises(ValidationError, match="upstream must be an origin"):
        GoogleScriptsConfig.model_validate({"upstream": upstream})


def test_the_upstream_loses_its_trailing_slash() -> None:
    config = GoogleScriptsConfig.model_validate({"upstream": "http://127.0.0.1:8081/"})
    assert config.upstream == "http://127.0.0.1:8081"


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([{"id": "G-A1"}, {"id": "G-A1"}], "more than once"),
        ([{"id": "G-A1", "path": "/s.js"}, {"id": "G-B2", "path": "/s.js"}], "more than one"),
        ([{"id": "G-A1", "path": "/gtm.js"}], "served already"),
        ([{"id": "G-A1", "path": "/a/../b.js"}], "segments"),
        ([{"id": "G-A1", "path": "s.js"}], "pattern"),
    ],
)
def test_ids_and_paths_are_distinct_and_well_formed(ids: list[Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GoogleScriptsConfig.model_validate({"ids": ids})


def test_data_layer_names_are_identifiers() -> None:
    with pytest.raises(ValidationError):
        GoogleScriptsConfig.model_validate({"data_layers": ["a-b"]})
