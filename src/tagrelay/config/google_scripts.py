"""The configuration of first-party gtag.js and gtm.js (``google.scripts``): which tag ids
the relay serves, under which renamed paths, and how it caches them.

``tagrelay.web.google_scripts`` serves them; ``tagrelay.config.models`` mounts
``GoogleScriptsConfig`` at ``google.scripts``.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, field_validator, model_validator
from yarl import URL

from tagrelay.config.common import ConfigModel, is_bare_origin

__all__ = [
    "DATA_LAYER_PATTERN",
    "RENAMED_PATH_PATTERN",
    "TAG_ID_PATTERN",
    "UPSTREAM_PATHS",
    "GoogleScriptEntry",
    "GoogleScriptsConfig",
    "ScriptKind",
    "kind_of",
]

ScriptKind = Literal["gtag", "gtm"]

TAG_ID_PATTERN: Final = r"^(G|AW|DC|GTM)-[A-Z0-9]{1,24}$"
DATA_LAYER_PATTERN: Final = r"^[A-Za-z_$][A-Za-z0-9_$]{0,63}$"
RENAMED_PATH_PATTERN: Final = r"^(/[A-Za-z0-9._~-]+)+$"

UPSTREAM_PATHS: Final[dict[ScriptKind, str]] = {"gtag": "/gtag/js", "gtm": "/gtm.js"}
"""The path of each script, upstream and on the relay (below ``server.base_path``)."""


def kind_of(tag_id: str) -> ScriptKind:
    """Which script serves a tag id: gtm.js for ``GTM-`` ids, gtag.js for the others."""
    return "gtm" if tag_id.startswith("GTM-") else "gtag"


class GoogleScriptEntry(ConfigModel):
    """A tag id the relay serves the script of, and optionally a renamed path for it."""

    id: str = Field(
        pattern=TAG_ID_PATTERN,
        description=(
            "A Google tag id: G- (GA4), AW- (Google Ads) and DC- (Floodlight) ids are served "
            "as gtag.js, GTM- ids as gtm.js."
        ),
        examples=["G-ABC123XYZ9"],
    )
    path: str | None = Field(
        None,
        pattern=RENAMED_PATH_PATTERN,
        description=(
            "An extra path (below server.base_path) serving this id's script with no query "
            "string, so that blocklist rules on /gtag/js and /gtm.js miss it."
        ),
        examples=["/assets/site.js"],
    )

    @field_validator("path")
    @classmethod
    def _no_dot_segments(cls, path: str | None) -> str | None:
        if path is not None and any(part in (".", "..") for part in path.split("/")):
            raise ValueError("a renamed path may not contain . or .. segments")
        return path

    @property
    def kind(self) -> ScriptKind:
        return kind_of(self.id)


class GoogleScriptsConfig(ConfigModel):
    """First-party gtag.js and gtm.js: Google's scripts proxied from the relay's origin,
    cached in memory and on disk, for the allowed tag ids only."""

    upstream: str = Field(
        "https://www.googletagmanager.com",
        description=(
            "Origin the scripts are fetched from: scheme, host and optional port; no path. "
            "The request path and id are added by the relay."
        ),
        examples=["https://www.googletagmanager.com"],
    )
    ids: list[GoogleScriptEntry] = Field(
        default_factory=list,
        description="The tag ids served; any other id is answered 404 without an upstream fetch.",
        examples=[[{"id": "G-ABC123XYZ9", "path": "/assets/site.js"}, {"id": "GTM-K7X2P9Q"}]],
    )
    data_layers: list[Annotated[str, Field(pattern=DATA_LAYER_PATTERN)]] = Field(
        default_factory=list,
        description=(
            "Renamed dataLayer names a request may choose with ?l= (passed upstream); "
            "dataLayer itself is always allowed. Any other l is answered 404."
        ),
        examples=[["shopLayer"]],
    )
    ttl_secs: int = Field(
        900,
        ge=1,
        le=7 * 86_400,
        description="How long a fetched script is served before it is fetched (revalidated) again.",
        examples=[900],
    )
    max_bytes: int = Field(
        2_000_000,
        ge=1024,
        description=(
            "Largest script accepted from the upstream (after decompression); a bigger one is "
            "refused and counted as too_large."
        ),
        examples=[2_000_000],
    )
    timeout_secs: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Time limit of one upstream fetch, body included.",
        examples=[10.0],
    )
    stale_max_age_secs: int = Field(
        7 * 86_400,
        ge=0,
        description=(
            "While the upstream fails, a cached copy fetched (or revalidated) less than this "
            "long ago is served instead of an error."
        ),
        examples=[604_800],
    )

    @field_validator("upstream")
    @classmethod
    def _origin_only(cls, value: str) -> str:
        problem = (
            "upstream must be an origin such as https://www.googletagmanager.com: http or "
            "https, a host and an optional port; no path, query, fragment or credentials"
        )
        try:
            url = URL(value)
            origin = url.origin()
        except ValueError:
            raise ValueError(problem) from None
        if not is_bare_origin(url):
            raise ValueError(problem)
        return str(origin)

    @model_validator(mode="after")
    def _distinct(self) -> GoogleScriptsConfig:
        ids = [entry.id for entry in self.ids]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError("tag ids listed more than once: " + ", ".join(repeated))
        paths = [entry.path for entry in self.ids if entry.path is not None]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise ValueError("renamed paths used by more than one id: " + ", ".join(repeated))
        for path in paths:
            if path in UPSTREAM_PATHS.values():
                raise ValueError(f"{path} is served already; a renamed path must differ")
        return self
