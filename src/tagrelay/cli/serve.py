"""``tagrelay serve``: run the relay until SIGTERM or SIGINT, then shut down gracefully."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from tagrelay.app import create_app, freeze_after_startup
from tagrelay.cli.logs import setup_logging
from tagrelay.config.models import Config
from tagrelay.errors import TagrelayError

log = logging.getLogger("tagrelay")


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """The loop ``server.event_loop`` asks for: uvloop's for ``uvloop`` (an error when it is
    not installed) and for ``auto`` when it is installed; asyncio's own otherwise."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise TagrelayError(
                    "server.event_loop is uvloop, but uvloop is not installed "
                    "(pip install uvloop, or set event_loop to auto or asyncio)"
                ) from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def serve(config: Config, *, host: str | None, port: int | None, data_dir: Path | None) -> int:
    setup_logging(config.logging.level, config.logging.format)
    app = create_app(config, data_dir=data_dir)
    freeze_after_startup(app)
    host = host or config.server.host
    port = config.server.port if port is None else port
    try:
        loop = new_event_loop(config.server.event_loop)
    except TagrelayError as exc:
        log.error("tagrelay could not start: %s", exc)
        return 1
    log.info(
        "tagrelay listening",
        extra={
            "host": host,
            "port": port,
            "data_dir": str(data_dir or config.data_dir),
            "event_loop": loop_name(loop),
        },
    )
    # run_app handles SIGINT/SIGTERM: stop accepting, let in-flight requests finish (their
    # spool commits included) for up to shutdown_timeout, then run the cleanup contexts.
    try:
        web.run_app(
            app,
            loop=loop,
            host=host,
            port=port,
            shutdown_timeout=config.server.shutdown_timeout_secs,
            access_log=None,
            print=None,
        )
    except TagrelayError as exc:
        # Start-up problems an operator must fix (data directory in use, warehouse locked).
        log.error("tagrelay could not start: %s", exc)
        return 1
    except OSError as exc:
        log.error("tagrelay could not listen on %s:%s: %s", host, port, exc)
        return 1
    log.info("tagrelay stopped")
    return 0
