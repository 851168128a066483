"""A real NATS JetStream server for the tests that need one: the server this machine runs
(``.ci/run`` starts it when it is down), at ``TAGRELAY_TEST_NATS_URL`` or the local
default. Each test gets a stream name of its own and deletes its streams afterwards, so
tests never see each other's messages. Without a server the tests skip, unless
``TAGRELAY_REQUIRE_NATS=1`` (CI), where that is a failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

DEFAULT_URL = "nats://127.0.0.1:4222"


async def nats_url() -> str:
    """The URL of a reachable server with JetStream, or skip (fail when required)."""
    import nats

    url = os.environ.get("TAGRELAY_TEST_NATS_URL", DEFAULT_URL)
    try:
        client = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
        try:
            await client.jetstream().account_info()
        finally:
            await client.close()
    except Exception as e:
        message = f"no NATS JetStream at {url}: {type(e).__name__}: {e}"
        if os.environ.get("TAGRELAY_REQUIRE_NATS") == "1":
            pytest.fail(f"{message} (required: TAGRELAY_REQUIRE_NATS=1)", pytrace=False)
        pytest.skip(message)
    return url


def nats_url_sync() -> str:
    return asyncio.run(nats_url())


def stream_name() -> str:
    """A stream name no other test uses."""
    return f"t_{uuid.uuid4().hex[:16]}"


async def delete_streams(url: str, stream: str) -> None:
    """Delete ``stream`` and its dead letters' stream, if they exist."""
    import nats
    from nats.js.errors import NotFoundError

    client = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
    try:
        js = client.jetstream()
        for name in (stream, f"{stream}_dead_letters"):
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)
    finally:
        await client.close()


@asynccontextmanager
async def fresh_stream(url: str) -> AsyncIterator[str]:
    """A stream name of this test's own; its streams are deleted at the end."""
    name = stream_name()
    try:
        yield name
    finally:
        await delete_streams(url, name)
