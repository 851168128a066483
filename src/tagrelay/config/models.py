"""The configuration schema. These models are its documentation: the JSON Schema
(``tagrelay.config.schema``) and the README's reference are generated from them.

A file is loaded by ``tagrelay.config.loader``, which interpolates ``${VAR}`` and reports
every validation problem with its key path and line.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, SecretStr, field_validator, model_validator

from tagrelay.config.common import ConfigModel, ForwarderConfigBase
from tagrelay.forwarders import FORWARDERS

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ServerConfig(ConfigModel):
    """The HTTP listener."""

    host: str = Field("0.0.0.0", description="Address to listen on.", examples=["0.0.0.0"])
    port: int = Field(8080, ge=0, le=65535, description="TCP port to listen on.", examples=[8080])
    trusted_proxies: list[IPNetwork] = Field(
        default_factory=lambda: [
            ipaddress.ip_network("127.0.0.1/32"),
            ipaddress.ip_network("::1/128"),
        ],
        description=(
            "Peers (CIDR) whose X-Forwarded-For / X-Real-IP headers are believed. The client IP "
            "is the right-most address in X-Forwarded-For that is not itself a trusted proxy."
        ),
        examples=[["10.0.0.0/8", "127.0.0.1/32"]],
    )
    shutdown_timeout_secs: float = Field(
        10.0,
        gt=0,
        description=(
            "On SIGTERM/SIGINT, how long in-flight requests and forwarder batches may take."
        ),
        examples=[10.0],
    )


class WriteKeyConfig(ConfigModel):
    """A write key: the credential an SDK or backend sends with its events."""

    id: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="Name of the key; used in logs and metrics instead of the secret.",
        examples=["website"],
    )
    kind: Literal["browser", "server"] = Field(
        description=(
            "browser: public, used by pages, restricted by allowed_origins; server: a secret, "
            "may set context.ip and context.userAgent and use /api/s/s2s/*."
        ),
        examples=["browser"],
    )
    key: SecretStr = Field(
        min_length=1, description="The key value itself.", examples=["${TAGRELAY_BROWSER_KEY}"]
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description=(
            "Browser keys only: origins allowed to send with this key (CORS). '*' allows any "
            "origin; 'https://*.example.com' allows subdomains. Empty allows same-origin only."
        ),
        examples=[["https://www.example.com", "https://*.example.com"]],
    )

    @model_validator(mode="after")
    def _origins_only_for_browser(self) -> WriteKeyConfig:
        if self.kind == "server" and self.allowed_origins:
            raise ValueError(
                "allowed_origins applies to browser keys only; server keys are not for pages"
            )
        return self


class LimitsConfig(ConfigModel):
    """Input limits; anything over them is rejected with a 4xx and counted."""

    max_event_bytes: int = Field(
        32 * 1024, ge=256, description="Largest single event (serialized JSON).", examples=[32768]
    )
    max_request_bytes: int = Field(
        500 * 1024,
        ge=1024,
        description="Largest request body after decompression.",
        examples=[512000],
    )
    max_batch_events: int = Field(
        2500, ge=1, description="Most events in one batch request.", examples=[2500]
    )
    max_nesting_depth: int = Field(
        16, ge=2, le=200, description="Deepest object/array nesting inside an event.", examples=[16]
    )


class SpoolConfig(ConfigModel):
    """The durable SQLite queue between ingestion and forwarders."""

    synchronous: Literal["full", "normal"] = Field(
        "full",
        description=(
            "full: every commit is fsynced before the 2xx (survives power loss); normal: "
            "survives a process crash, not a power loss."
        ),
        examples=["full"],
    )
    max_size_mb: int = Field(
        0,
        ge=0,
        description="Cap on the spool file; when full, ingestion answers 503. 0 means no cap.",
        examples=[2048],
    )
    prune_interval_secs: float = Field(
        1.0, gt=0, description="How often delivered events are deleted.", examples=[1.0]
    )


class LoggingConfig(ConfigModel):
    """Log output (stderr)."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level logged.", examples=["info"]
    )
    format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: text on a terminal, JSON lines otherwise.", examples=["auto"]
    )


def _forwarder_union() -> Any:
    models = tuple(cls.config_model for cls in FORWARDERS.values())
    return Annotated[Union[models], Field(discriminator="type")]  # noqa: UP007


if TYPE_CHECKING:
    # The union is built from the registry at run time, which mypy cannot follow.
    # Statically, an item of ``Config.forwarders`` is what every member has in common.

    class ForwarderConfig(ForwarderConfigBase):
        type: str

else:
    ForwarderConfig = _forwarder_union()


class Config(ConfigModel):
    """The whole configuration file."""

    data_dir: Path = Field(
        Path("data"),
        description="Directory for the spool, the embedded warehouse and the admin socket. "
        "Relative paths are relative to the working directory.",
        examples=["/var/lib/tagrelay"],
    )
    server: ServerConfig = Field(
        default_factory=ServerConfig, description="The HTTP listener.", examples=[{"port": 8080}]
    )
    keys: list[WriteKeyConfig] = Field(
        min_length=1,
        description="Write keys accepted on the ingest endpoints.",
        examples=[
            [{"id": "website", "kind": "browser", "key": "wk_123", "allowed_origins": ["*"]}]
        ],
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig,
        description="Input limits.",
        examples=[{"max_event_bytes": 32768}],
    )
    spool: SpoolConfig = Field(
        default_factory=SpoolConfig,
        description="The durable queue.",
        examples=[{"synchronous": "full"}],
    )
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig, description="Logging.", examples=[{"level": "info"}]
    )
    forwarders: list[ForwarderConfig] = Field(
        default_factory=list,
        description="Destinations; each has a type: " + ", ".join(sorted(FORWARDERS)) + ".",
        examples=[[{"id": "warehouse", "type": "warehouse"}]],
    )

    @field_validator("keys")
    @classmethod
    def _unique_keys(cls, keys: list[WriteKeyConfig]) -> list[WriteKeyConfig]:
        seen_ids: set[str] = set()
        seen_values: set[str] = set()
        for key in keys:
            if key.id in seen_ids:
                raise ValueError(f"key id {key.id!r} is used twice")
            value = key.key.get_secret_value()
            if value in seen_values:
                raise ValueError(f"key {key.id!r} has the same value as another key")
            seen_ids.add(key.id)
            seen_values.add(value)
        return keys

    @field_validator("forwarders")
    @classmethod
    def _unique_forwarders(cls, forwarders: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for fwd in forwarders:
            if fwd.id in seen:
                raise ValueError(f"forwarder id {fwd.id!r} is used twice")
            seen.add(fwd.id)
        return forwarders
