"""The ``tagrelay`` command: ``serve``, ``check``, ``sql`` and ``dlq``.

Exit codes: 0 success, 1 invalid configuration or failed query, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tagrelay import __version__

DEFAULT_CONFIG = Path("config/tagrelay.yaml")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"configuration file (default: {DEFAULT_CONFIG})",
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
    serve.add_argument("--data-dir", type=Path, help="data directory (overrides data_dir)")

    check = sub.add_parser("check", help="validate the configuration and exit")
    _add_config(check)

    sql = sub.add_parser("sql", help="run a read-only SQL query on the warehouse")
    _add_config(sql)
    sql.add_argument("--data-dir", type=Path, help="data directory (overrides data_dir)")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--max-rows", type=int, default=10_000, help="cap on rows returned")
    sql.add_argument(
        "--timeout-secs",
        type=_positive_secs,
        default=60.0,
        help="stop the query after this many seconds (default 60)",
    )
    sql.add_argument("query", help='the SQL query, e.g. "select count(*) from events"')

    from tagrelay.cli.dlq_args import add_dlq_parser

    add_dlq_parser(sub, _add_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tagrelay.config.loader import format_config_error, load_config
    from tagrelay.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(format_config_error(exc), file=sys.stderr)
        return 1

    if args.command == "check":
        forwarders = ", ".join(f"{f.id} ({f.type})" for f in config.forwarders) or "none"
        print(f"{args.config}: OK; {len(config.keys)} key(s); forwarders: {forwarders}")
        return 0
    if args.command == "serve":
        from tagrelay.cli.serve import serve

        return serve(config, host=args.host, port=args.port, data_dir=args.data_dir)
    if args.command == "dlq":
        from tagrelay.cli.dlq import run_dlq

        return run_dlq(config, args)
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
