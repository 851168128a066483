"""``tagrelay sql``: run a read-only query on the configured warehouse.

While ``tagrelay serve`` runs on the same data directory, DuckDB's file lock keeps every
other process out of the warehouse file, so the query goes through the relay's admin socket
(``<data_dir>/admin.sock``). When no relay is running, the file is opened read-only here.
"""

from __future__ import annotations

import asyncio
import csv
import io
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tagrelay.app import admin_socket_path
from tagrelay.config.models import Config
from tagrelay.errors import QueryTimeout, WarehouseError


async def _via_socket(
    sock: Path, query: str, max_rows: int, timeout_secs: float
) -> dict[str, Any] | None:
    """The relay's answer, or None when no relay listens on ``sock``."""
    try:
        connector = aiohttp.UnixConnector(path=str(sock))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(
                "http://relay/sql",
                json={"sql": query, "max_rows": max_rows, "timeout_secs": timeout_secs},
                # the relay answers query_timeout at timeout_secs; this is for a relay stuck
                timeout=aiohttp.ClientTimeout(total=timeout_secs + 60),
            ) as resp,
        ):
            body: dict[str, Any] = await resp.json(loads=orjson.loads)
            return body
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError):
        return None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        return {
            "error": "relay_disconnected",
            "message": "the relay closed the connection before it answered (is it stopping?)",
        }


LOCK_WAIT_SECS = 5.0
"""How long ``tagrelay sql`` waits for a warehouse file still locked by a stopping relay."""


def _direct(
    config: Config, data_dir: Path, query: str, max_rows: int, timeout_secs: float
) -> dict[str, Any]:
    from tagrelay.forwarders.warehouse import open_warehouse_readonly
    from tagrelay.warehouse import open_when_unlocked

    warehouses = [f for f in config.forwarders if f.type == "warehouse" and f.enabled]
    if not warehouses:
        return {"error": "no_warehouse", "message": "no warehouse forwarder is configured"}
    try:
        wh = open_when_unlocked(
            lambda: open_warehouse_readonly(warehouses[0], data_dir), LOCK_WAIT_SECS
        )
    except WarehouseError as exc:
        return {"error": "no_warehouse", "message": str(exc)}
    try:
        result = wh.query(query, max_rows, timeout_secs)
    except QueryTimeout as exc:
        return {"error": "query_timeout", "message": str(exc)}
    except WarehouseError as exc:
        return {"error": "query_failed", "message": str(exc)}
    finally:
        wh.close()
    return {"columns": result.columns, "rows": result.rows, "truncated": result.truncated}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render(result: dict[str, Any], fmt: str) -> str:
    columns: list[str] = result["columns"]
    rows: list[list[Any]] = result["rows"]
    if fmt == "json":
        records = [dict(zip(columns, row, strict=True)) for row in rows]
        return orjson.dumps(records, default=str, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_cell(v) for v in row] for row in rows])
        return out.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    out_lines = [
        " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    out_lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    out_lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out_lines)


def run_sql(
    config: Config,
    query: str,
    *,
    data_dir: Path | None,
    fmt: str,
    max_rows: int,
    timeout_secs: float = 60.0,
) -> int:
    data_dir = data_dir or config.data_dir
    result = asyncio.run(_via_socket(admin_socket_path(data_dir), query, max_rows, timeout_secs))
    if result is None:
        result = _direct(config, data_dir, query, max_rows, timeout_secs)
    if "error" in result:
        print(f"error: {result['error']}: {result['message']}", file=sys.stderr)
        return 1
    print(render(result, fmt))
    if result.get("truncated"):
        print(f"(truncated to {max_rows} rows; use --max-rows)", file=sys.stderr)
    return 0
