"""The ``tagrelay`` command: ``serve``, ``check``, ``sql``, ``dlq``, ``health``, ``reload``,
``keys``, ``forget`` and ``export``.

Exit codes: 0 success, 1 invalid configuration, failed query or unhealthy relay, 2 usage
error.

Every command finds its configuration file in ``--config``, else in ``$TAGRELAY_CONFIG``,
else in ``config/tagrelay.yaml``; every command that uses the data directory takes it from
``--data-dir``, else ``$TAGRELAY_DATA_DIR``, else the file's ``data_dir``. The Docker image
sets both variables, so ``docker exec <container> tagrelay sql "..."`` needs no flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tagrelay import __version__

DEFAULT_CONFIG = Path("config/tagrelay.yaml")
CONFIG_ENV = "TAGRELAY_CONFIG"
DATA_DIR_ENV = "TAGRELAY_DATA_DIR"


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG),
        help=f"configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
    )


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    env = os.environ.get(DATA_DIR_ENV)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env) if env else None,
        help=f"data directory (overrides data_dir; default: ${DATA_DIR_ENV}, else data_dir)",
    )


def _positive_secs(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 3600, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagrelay", description="First-party tracking relay.")
    parser.add_argument("--version", action="version", version=f"tagrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the relay")
    _add_config(serve)
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    _add_data_dir(serve)

    check = sub.add_parser("check", help="validate the configuration and exit")
    _add_config(check)

    sql = sub.add_parser("sql", help="run a read-only SQL query on the warehouse")
    _add_config(sql)
    _add_data_dir(sql)
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--max-rows", type=int, default=10_000, help="cap on rows returned")
    sql.add_argument(
        "--timeout-secs",
        type=_positive_secs,
        default=60.0,
        help="stop the query after this many seconds (default 60)",
    )
    sql.add_argument("query", help='the SQL query, e.g. "select count(*) from events"')

    reload = sub.add_parser(
        "reload", help="have the running relay read its configuration file again (as SIGHUP)"
    )
    _add_config(reload)
    _add_data_dir(reload)
    reload.add_argument("--format", choices=["text", "json"], default="text")

    health = sub.add_parser(
        "health",
        help="exit 0 if the relay answers its health check (a container's HEALTHCHECK)",
        description="GET /healthz (or /readyz) of the relay that runs with this configuration: "
        "its server.port and server.base_path, on loopback when server.host is a wildcard.",
    )
    _add_config(health)
    health.add_argument("--host", help="address to ask (default: from server.host)")
    health.add_argument("--port", type=int, help="port to ask (default: server.port)")
    health.add_argument(
        "--ready",
        action="store_true",
        help="ask /readyz (spool writable, forwarders started) instead of /healthz",
    )
    health.add_argument(
        "--timeout-secs",
        type=_positive_secs,
        default=3.0,
        help="give up after this many seconds (default 3)",
    )
    for name, text in (
        ("forget", "delete a person from the identity store (an erasure request)"),
        ("export", "print what the identity store holds about a person (an access request)"),
    ):
        person = sub.add_parser(name, help=text, description=text)
        _add_config(person)
        _add_data_dir(person)
        person.add_argument("--user-id", help="the person's userId")
        person.add_argument("--anonymous-id", help="one of the person's anonymousIds")
        person.add_argument("--email", help="an email address the person gave")
    from tagrelay.cli.dlq_args import add_dlq_parser

    add_dlq_parser(sub, _add_config, _add_data_dir)
    add_keys_parser(sub)
    return parser


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="encryption keys: generate one, or rotate to the first")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    actions.add_parser(
        "generate", help="print a new random key (base64 of 32 bytes) for encryption.keys"
    )
    rotate = actions.add_parser(
        "rotate",
        help="re-encrypt the spool and the dead letters under the first of encryption.keys",
        description="Through the running relay when one answers on the data directory's "
        "admin socket (in the background, while it ingests), otherwise on the spool file "
        "directly, holding its lock.",
    )
    _add_config(rotate)
    _add_data_dir(rotate)
    rotate.add_argument("--format", choices=["text", "json"], default="text")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys" and args.keys_command == "generate":
        from tagrelay.cli.keys import run_keys

        return run_keys(None, args)  # no configuration needed
    from tagrelay.config.loader import format_config_error, load_config
    from tagrelay.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        if args.command == "reload":
            # The relay reads the file itself, and refuses it: it logs and counts that, and
            # answers with the problems.
            from tagrelay.cli.reload import reload_invalid

            return reload_invalid(args.config, args.data_dir, args.format, exc)
        print(format_config_error(exc), file=sys.stderr)
        return 1

    if args.command == "check":
        forwarders = ", ".join(f"{f.id} ({f.type})" for f in config.forwarders) or "none"
        print(f"{args.config}: OK; {len(config.keys)} key(s); forwarders: {forwarders}")
        return 0
    if args.command == "serve":
        from tagrelay.cli.serve import serve

        return serve(
            config,
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            config_file=args.config.absolute(),
        )
    if args.command == "reload":
        from tagrelay.cli.reload import run_reload

        return run_reload(args.data_dir or config.data_dir, args.format)
    if args.command == "health":
        from tagrelay.cli.health import run_health

        return run_health(
            config,
            host=args.host,
            port=args.port,
            ready=args.ready,
            timeout_secs=args.timeout_secs,
        )
    if args.command in ("forget", "export"):
        from tagrelay.cli.privacy import run_privacy

        ids = {
            name: value
            for name in ("user_id", "anonymous_id", "email")
            if (value := getattr(args, name))
        }
        if not ids:
            print(
                f"tagrelay {args.command}: give --user-id, --anonymous-id or --email",
                file=sys.stderr,
            )
            return 2
        return run_privacy(config, args.data_dir, args.command, ids)
    if args.command == "dlq":
        from tagrelay.cli.dlq import run_dlq

        return run_dlq(config, args)
    if args.command == "keys":
        from tagrelay.cli.keys import run_keys

        return run_keys(config, args)
    from tagrelay.cli.sql import run_sql

    return run_sql(
        config,
        args.query,
        data_dir=args.data_dir,
        fmt=args.format,
        max_rows=args.max_rows,
        timeout_secs=args.timeout_secs,
    )


if __name__ == "__main__":
    sys.exit(main())
