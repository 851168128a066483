"""Request bodies on every route that reads one (web.bodies): each content coding decoded,
a body that is not what its Content-Encoding says a 4xx JSON error with its reason (never a
500), a decompression bomb a 413 JSON while the relay keeps serving."""

from __future__ import annotations

import asyncio
import functools
import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import brotli
import orjson
import pytest

from tagrelay.errors import IngestError
from tagrelay.web.bodies import decode_body
from tests.support import BROWSER_KEY, SERVER_KEY, basic, metric_value

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd

TID = "G-8XK2MS9Q4T"
CID = "1938271044.1731420000"
SECRET = "mp-secret-1"
GOOGLE = {
    "collect": {"measurement_ids": [TID]},
    "measurement_protocol": [{"measurement_id": TID, "api_secret": SECRET}],
}
LIMIT = 500 * 1024  # limits.max_request_bytes' default
AUTH = {**basic(SERVER_KEY), "Content-Type": "application/json"}
TRACK = {"type": "track", "event": "Signed Up", "anonymousId": "a-1"}
MP = {"client_id": CID, "events": [{"name": "sign_up", "params": {"method": "email"}}]}


@dataclass(frozen=True)
class Endpoint:
    path: str
    body: bytes
    headers: dict[str, str]
    ok: int  # the status of an accepted body


ENDPOINTS = {
    "segment track": Endpoint("/v1/track", orjson.dumps(TRACK), AUTH, 200),
    "segment batch": Endpoint("/v1/batch", orjson.dumps({"batch": [TRACK]}), AUTH, 200),
    "jitsu": Endpoint(
        "/api/s/track",
        orjson.dumps({"event": "x", "anonymousId": "a", "writeKey": BROWSER_KEY}),
        {"Content-Type": "application/json"},
        200,
    ),
    "jitsu s2s": Endpoint("/api/s/s2s/track", orjson.dumps(TRACK), AUTH, 200),
    "own script": Endpoint(
        "/d",
        orjson.dumps({"writeKey": BROWSER_KEY, "batch": [TRACK]}),
        {"Content-Type": "text/plain"},
        200,
    ),
    "rudderstack beacon": Endpoint("/beacon/v1/batch", orjson.dumps({"batch": [TRACK]}), AUTH, 200),
    "analytics-next metrics": Endpoint(
        "/v1/m", orjson.dumps({"series": []}), {"Content-Type": "text/plain"}, 200
    ),
    "gtag collect": Endpoint(
        f"/g/collect?v=2&tid={TID}&cid={CID}&dl=https%3A%2F%2Fwww.shop.test%2F",
        b"en=page_view\nen=scroll&epn.percent=90",
        {"Content-Type": "text/plain"},
        204,
    ),
    "measurement protocol": Endpoint(
        f"/mp/collect?measurement_id={TID}&api_secret={SECRET}",
        orjson.dumps(MP),
        {"Content-Type": "application/json"},
        204,
    ),
    "measurement protocol debug": Endpoint(
        f"/debug/mp/collect?measurement_id={TID}&api_secret={SECRET}",
        orjson.dumps(MP),
        {"Content-Type": "application/json"},
        200,
    ),
}


def _zstd(data: bytes) -> bytes:
    return bytes(zstd.compress(data))


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": _zstd,
}


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@functools.cache
def bomb(coding: str) -> bytes:
    """A body of ``coding`` that inflates to 32 MiB of spaces (at most a few KB sent, except
    gzip and deflate, whose ratio stops near 1,000:1)."""
    inflated = b" " * (32 << 20)
    if coding == "br":
        return bytes(brotli.compress(inflated, quality=5))
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(inflated, compresslevel=9)
    if coding == "deflate":
        return zlib.compress(inflated, 9)
    return _zstd(inflated)


async def _json_error(resp: Any) -> dict[str, Any]:
    assert resp.content_type == "application/json", (resp.status, await resp.text())
    body: dict[str, Any] = await resp.json()
    assert set(body) >= {"error", "message"}, body
    return body


@pytest.mark.parametrize("name", ENDPOINTS)
async def test_every_content_coding_is_decoded_on_every_route(relay: Any, name: str) -> None:
    client = await relay(google=GOOGLE)
    endpoint = ENDPOINTS[name]
    bodies = {coding: encode(endpoint.body) for coding, encode in ENCODERS.items()}
    bodies["deflate (raw, as some clients send it)"] = raw_deflate(endpoint.body)
    bodies["gzip, br"] = brotli.compress(gzip.compress(endpoint.body))
    bodies["identity"] = endpoint.body
    bodies["GZIP"] = gzip.compress(endpoint.body)
    for label, body in bodies.items():
        coding = label.split(" (")[0]
        resp = await client.post(
            endpoint.path, data=body, headers={**endpoint.headers, "Content-Encoding": coding}
        )
        assert resp.status == endpoint.ok, (label, await resp.text())
        if name == "measurement protocol debug":
            assert await resp.json() == {"validationMessages": []}, label


MISMATCHED = {
    # Content-Encoding -> the reason of a plain JSON body sent with it
    "gzip": "invalid_body_encoding",
    "x-gzip": "invalid_body_encoding",
    "deflate": "invalid_body_encoding",
    "br": "invalid_body_encoding",
    "zstd": "invalid_body_encoding",
    "gzip, br": "invalid_body_encoding",
    "compress": "unsupported_content_encoding",
    "gzip, gzip, gzip": "unsupported_content_encoding",
}


@pytest.mark.parametrize("name", ENDPOINTS)
async def test_a_body_that_is_not_its_content_encoding_is_a_4xx_with_a_reason(
    relay: Any, name: str
) -> None:
    client = await relay(google=GOOGLE)
    endpoint = ENDPOINTS[name]
    cases = {coding: (endpoint.body, reason) for coding, reason in MISMATCHED.items()}
    # a valid stream cut short, and one followed by something else
    cases["gzip (cut short)"] = (gzip.compress(endpoint.body)[:-6], "invalid_body_encoding")
    cases["br (cut short)"] = (brotli.compress(endpoint.body)[:-2], "invalid_body_encoding")
    cases["zstd (cut short)"] = (_zstd(endpoint.body)[:-3], "invalid_body_encoding")
    cases["deflate (trailing data)"] = (
        zlib.compress(endpoint.body) + b"x",
        "invalid_body_encoding",
    )
    answers = {}
    for label, (body, _) in cases.items():
        coding = label.split(" (")[0]
        resp = await client.post(
            endpoint.path, data=body, headers={**endpoint.headers, "Content-Encoding": coding}
        )
        error = await _json_error(resp)
        answers[label] = (resp.status, error["error"])
        assert error["message"], label
    expected = {
        label: (415 if reason == "unsupported_content_encoding" else 400, reason)
        for label, (_, reason) in cases.items()
    }
    assert answers == expected


async def test_refused_bodies_are_counted_by_reason(relay: Any) -> None:
    client = await relay(google=GOOGLE)
    for _ in range(2):
        await client.post("/v1/track", data=b"{}", headers={**AUTH, "Content-Encoding": "zstd"})
    await client.post(
        "/mp/collect?measurement_id=" + TID + "&api_secret=" + SECRET,
        data=b"{}",
        headers={"Content-Encoding": "br"},
    )
    count = functools.partial(metric_value, client.app, "tagrelay_events_rejected_total")
    assert count({"source": "segment", "reason": "invalid_body_encoding"}) == 2
    assert count({"source": "ga4_mp", "reason": "invalid_body_encoding"}) == 1


@pytest.mark.parametrize("name", ENDPOINTS)
async def test_bombs_of_every_coding_are_413_json(relay: Any, name: str) -> None:
    client = await relay(google=GOOGLE)
    endpoint = ENDPOINTS[name]
    answers = {}
    for coding in ENCODERS:
        resp = await client.post(
            endpoint.path,
            data=bomb(coding),
            headers={**endpoint.headers, "Content-Encoding": coding},
        )
        answers[coding] = (resp.status, (await _json_error(resp))["error"])
    assert answers == {coding: (413, "body_too_large") for coding in ENCODERS}


async def test_the_relay_keeps_serving_while_bombs_arrive(relay: Any) -> None:
    """Four bombs of each coding at once, with /healthz asked meanwhile: every bomb is
    answered 413 JSON and /healthz answers (how fast: bench/bomb_bench.py)."""
    client = await relay()
    for coding in ENCODERS:
        bombs = [
            client.post(
                "/v1/batch", data=bomb(coding), headers={**AUTH, "Content-Encoding": coding}
            )
            for _ in range(4)
        ]
        answers = await asyncio.gather(*bombs, client.get("/healthz"))
        *bomb_answers, health = answers
        assert health.status == 200
        for resp in bomb_answers:
            assert resp.status == 413
            assert (await _json_error(resp))["error"] == "body_too_large"
        # the connections the bombs came on still serve
        resp = await client.post("/v1/track", data=orjson.dumps(TRACK), headers=AUTH)
        assert resp.status == 200


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_decoding_stops_at_the_limit(coding: str) -> None:
    body = ENCODERS[coding](b"x" * 1000)
    assert decode_body(body, [coding], 1000) == b"x" * 1000
    with pytest.raises(IngestError) as refused:
        decode_body(body, [coding], 999)
    assert (refused.value.status, refused.value.code) == (413, "body_too_large")
