"""``tagrelay dlq``'s arguments (the standard library only: building the parser of every
``tagrelay`` command imports this; the command itself is ``cli.dlq``)."""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``30d``, ``1w`` in seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30s, 15m, 2h, 30d or 1w, got {text!r}"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_since(text: str) -> float:
    """A duration back from now, or an ISO 8601 time (UTC unless it says otherwise): the
    time it names, in seconds since the epoch."""
    if _DURATION.match(text):
        return time.time() - parse_duration(text)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration (2h, 7d) or an ISO 8601 time, got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def parse_ids(text: str) -> list[int]:
    """``3``, or ``3,4,7``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ids such as 3 or 3,4,7, got {text!r}") from None


def add_dlq_parser(sub: Any, add_config: Any, add_data_dir: Any) -> None:
    """``tagrelay dlq ...`` on the subcommands ``sub`` of the main parser; ``add_config``
    and ``add_data_dir`` add ``--config`` and ``--data-dir`` (their environment defaults)."""
    dlq = sub.add_parser("dlq", help="list, show, replay or purge dead letters")
    commands = dlq.add_subparsers(dest="dlq_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_config(p)
        add_data_dir(p)

    def selectors(p: argparse.ArgumentParser) -> None:
        p.add_argument("--forwarder", help="only this forwarder's dead letters")
        p.add_argument("--reason", help="only those with this reason (status_4xx, max_age, ...)")
        p.add_argument(
            "--since",
            type=parse_since,
            help="only those dead since: a duration back from now (2h, 7d) or an ISO time",
        )
        p.add_argument(
            "--ids",
            type=parse_ids,
            nargs="+",
            help="only these ids (3 4 7, or 3,4,7)",
        )

    listing = commands.add_parser("list", help="list dead letters, oldest first")
    common(listing)
    selectors(listing)
    listing.add_argument("--format", choices=["table", "json", "csv"], default="table")
    listing.add_argument(
        "--limit", type=int, default=1000, help="most dead letters listed (default 1000)"
    )

    show = commands.add_parser("show", help="show one dead letter, its event included")
    common(show)
    show.add_argument("id", type=int)
    show.add_argument("--format", choices=["text", "json"], default="text")

    replay = commands.add_parser(
        "replay",
        help="deliver dead letters again, each to its own forwarder, through the running relay",
    )
    common(replay)
    selectors(replay)
    replay.add_argument("--format", choices=["text", "json"], default="text")

    purge = commands.add_parser("purge", help="delete dead letters older than an age")
    common(purge)
    purge.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        help="delete those dead longer ago than this (30d, 12h)",
    )
    purge.add_argument("--forwarder", help="only this forwarder's dead letters")
