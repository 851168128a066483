"""``tagrelay serve``: run the relay until SIGTERM or SIGINT, then shut down gracefully;
SIGHUP reloads the configuration file (``tagrelay.reload``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from pathlib import Path

from aiohttp import web

from tagrelay.app import create_app, freeze_after_startup
from tagrelay.appkeys import METRICS
from tagrelay.cli.devkeys import refusal
from tagrelay.cli.logs import setup_logging
from tagrelay.config.models import Config
from tagrelay.datadir import ensure_writable
from tagrelay.errors import DataDirError, ListenError, StartupError, TagrelayError
from tagrelay.reload import RELOADER
from tagrelay.web.admin_listener import ADMIN_LISTENER
from tagrelay.web.connections import ConnectionGuard, GuardedSite

log = logging.getLogger("tagrelay")

RESERVED_FILES = 256
"""Open files kept out of ``server.max_connections``: the spool, the warehouse, logs, the
admin socket and the forwarders' outgoing connections (up to 100)."""


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


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one (every connection is a file; the
    usual soft limit of 1024 is far below what a relay holds). Returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an infinite soft limit for files; its ceiling is fs.nr_open.
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            return soft
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft  # macOS caps it below the hard limit: keep what there is
    return target


def connection_cap(config: Config, open_files: int) -> int:
    """``server.max_connections``, lowered to what ``open_files`` leaves after the reserve."""
    room = max(open_files - RESERVED_FILES, 1)
    if config.server.max_connections <= room:
        return config.server.max_connections
    log.warning(
        "server.max_connections is above what the open-files limit allows; lowered",
        extra={
            "max_connections": config.server.max_connections,
            "open_files_limit": open_files,
            "lowered_to": room,
        },
    )
    return room


async def start_relay(
    app: web.Application,
    config: Config,
    host: str,
    port: int,
    *,
    max_connections: int | None = None,
    handle_signals: bool = False,
) -> tuple[web.AppRunner, GuardedSite]:
    """Start ``app`` (its start-up contexts) and listen on ``host:port`` with the
    connection guards of ``config.server`` (``ListenError`` when the address cannot be
    bound; the start-up contexts raise their own errors). Stop with ``runner.cleanup()``,
    which stops accepting, lets in-flight requests finish (their spool commits included)
    for up to ``shutdown_timeout_secs``, then runs the cleanup contexts.

    aiohttp's request-handler arguments go to ``AppRunner`` here (or to the app's
    ``handler_args``); the guarded handlers receive them all."""
    runner = web.AppRunner(
        app,
        handle_signals=handle_signals,
        shutdown_timeout=config.server.shutdown_timeout_secs,
        access_log=None,
    )
    await runner.setup()
    try:
        guard = ConnectionGuard(config.server, app[METRICS], max_connections=max_connections)
        site = GuardedSite(runner, host, port, guard, backlog=config.server.listen_backlog)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                f"could not listen on {host}:{port}: {exc.strerror or exc} (change server.host "
                "and server.port, or --host and --port)"
            ) from exc
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


def serve(
    config: Config,
    *,
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    config_file: Path | None = None,
) -> int:
    """Run the relay; ``config_file`` is where ``config`` came from, read again on SIGHUP."""
    setup_logging(config.logging.level, config.logging.format)
    refused, dev_keys = refusal(config, os.environ)
    if refused:
        log.error("tagrelay will not start: %s", refused)
        return 1
    if dev_keys:
        log.warning(
            "write keys hold development keys: fine on your own machine, never in production",
            extra={"keys": dev_keys},
        )
    try:
        ensure_writable(data_dir or config.data_dir)
    except DataDirError as exc:
        log.error("tagrelay could not start: %s", exc)
        return 1
    try:
        app = create_app(config, data_dir=data_dir, admin_listener=True)
    except StartupError as exc:  # a file the configuration names cannot be used
        log.error("tagrelay could not start: %s", exc)
        return 1
    reloader = app[RELOADER]
    reloader.config_file = config_file
    freeze_after_startup(app)
    host = host or config.server.host
    port = config.server.port if port is None else port
    try:
        loop = new_event_loop(config.server.event_loop)
    except TagrelayError as exc:
        log.error("tagrelay could not start: %s", exc)
        return 1
    open_files = raise_open_files_limit()
    max_connections = connection_cap(config, open_files)

    async def run() -> None:
        runner, site = await start_relay(
            app, config, host, port, max_connections=max_connections, handle_signals=True
        )
        admin = app.get(ADMIN_LISTENER)
        reloads: set[asyncio.Task[object]] = set()

        def reload_on_signal() -> None:
            task = loop.create_task(reloader.reload("signal"))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        if config_file is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_on_signal)
        try:
            log.info(
                "tagrelay listening",
                extra={
                    "host": host,
                    "port": site.port,
                    "data_dir": str(data_dir or config.data_dir),
                    "event_loop": loop_name(loop),
                    "open_files_limit": open_files,
                    "max_connections": max_connections,
                    "admin": admin.url if admin is not None and admin.port else "off",
                },
            )
            await asyncio.Event().wait()  # until SIGINT/SIGTERM raise GracefulExit
        finally:
            if config_file is not None:
                loop.remove_signal_handler(signal.SIGHUP)
            await asyncio.gather(*reloads, return_exceptions=True)  # not half done
            await runner.cleanup()

    # As aiohttp's run_app: SIGINT/SIGTERM raise GracefulExit out of the loop; the main task
    # is then cancelled, and its cleanup shuts down gracefully.
    asyncio.set_event_loop(loop)
    main = loop.create_task(run())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    except TagrelayError as exc:
        # Start-up problems an operator must fix (an address in use, the data directory in
        # use by another relay, the warehouse locked).
        log.error("tagrelay could not start: %s", exc)
        return 1
    except OSError as exc:
        # A file the start-up could not open or create (the listeners' own errors are
        # ListenError): what and where is in the exception.
        log.error("tagrelay could not start: %s", exc)
        return 1
    finally:
        _finish(loop, main)
    log.info("tagrelay stopped")
    return 0


def _finish(loop: asyncio.AbstractEventLoop, main: asyncio.Task[None]) -> None:
    """Cancel the main task (its cleanup runs) and whatever else is left, then close."""
    try:
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
    finally:
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        if rest:
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
