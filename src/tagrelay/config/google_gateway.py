"""The configuration of the Google tag gateway (``google.gateway``): the paths the relay
forwards to Google's first-party endpoint (``<TAG_ID>.fps.goog``), where the geolocation it
adds comes from, and how long it waits for Google.

``tagrelay.web.gateway`` serves the routes; ``tagrelay.config.models`` mounts
``GoogleGatewayConfig`` at ``google.gateway`` and checks that its paths are free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from pydantic import Field, field_validator, model_validator
from yarl import URL

from tagrelay.config.common import ConfigModel, is_bare_origin

__all__ = [
    "GATEWAY_PATH_PATTERN",
    "GATEWAY_TAG_ID_PATTERN",
    "GatewayGeoConfig",
    "GatewayRoute",
    "GoogleGatewayConfig",
]

GATEWAY_TAG_ID_PATTERN: Final = r"^(G|GT|GTM|AW|DC)-[A-Z0-9]{1,24}$"
GATEWAY_PATH_PATTERN: Final = r"^/[A-Za-z0-9_-]{1,99}$"
"""One path segment, at most 100 characters with its slash (Google's limit), never ``/``."""
HEADER_NAME_PATTERN: Final = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$"
TAG_ID_PLACEHOLDER: Final = "{tag_id}"


class GatewayRoute(ConfigModel):
    """One path of the site forwarded to Google: one per GTM container or Google tag."""

    path: str = Field(
        pattern=GATEWAY_PATH_PATTERN,
        description=(
            "The measurement path, below server.base_path: everything under it (any method) "
            "goes to Google with the path and query kept as sent. One segment; the same path "
            "is set in the tag's Google tag gateway settings."
        ),
        examples=["/metrics"],
    )
    tag_id: str = Field(
        pattern=GATEWAY_TAG_ID_PATTERN,
        description=(
            "The GTM container (GTM-) or Google tag (G-, GT-, AW-, DC-) id the path serves; "
            "it names the upstream host (lower-cased, as {tag_id} in upstream)."
        ),
        examples=["GTM-ABCD1234"],
    )


class GatewayGeoConfig(ConfigModel):
    """Where the visitor's country and region (``X-Forwarded-CountryRegion: US-CA``) come
    from: headers set by the CDN or load balancer in front of the relay (believed only from
    server.trusted_proxies), else a MaxMind-format database. With neither, Google sees no
    geolocation (a warning at start-up): its regional reports and consent defaults then
    follow the relay's own location."""

    country_region_header: str | None = Field(
        None,
        pattern=HEADER_NAME_PATTERN,
        description=(
            "A request header holding the ISO 3166-2 code of country and region in one "
            "value, such as US-CA (or a country alone, such as US)."
        ),
        examples=["X-Geo-Region"],
    )
    country_header: str | None = Field(
        None,
        pattern=HEADER_NAME_PATTERN,
        description="A request header holding the country's ISO 3166-1 alpha-2 code (US).",
        examples=["CF-IPCountry"],
    )
    region_header: str | None = Field(
        None,
        pattern=HEADER_NAME_PATTERN,
        description=(
            "A request header holding the region's ISO 3166-2 subdivision code without the "
            "country (CA), read with country_header."
        ),
        examples=["CF-Region-Code"],
    )
    database: Path | None = Field(
        None,
        description=(
            "A MaxMind-format city database (GeoIP2 or GeoLite2 City, or any .mmdb with "
            "country.iso_code and subdivisions[].iso_code) looked up by the visitor's IP "
            "when no header gave the country. Opened at start-up; a restart reads a new one."
        ),
        examples=["/var/lib/geo/city.mmdb"],
    )

    @model_validator(mode="after")
    def _region_needs_country(self) -> GatewayGeoConfig:
        if self.region_header is not None and self.country_header is None:
            raise ValueError("region_header is read with country_header; set both")
        return self

    @property
    def configured(self) -> bool:
        """Whether any geo source is set."""
        return (
            self.country_region_header is not None
            or self.country_header is not None
            or self.database is not None
        )


class GoogleGatewayConfig(ConfigModel):
    """Google tag gateway for advertisers: the relay as the first-party route of Google's
    tags (scripts and hits under a path of the site's own), keeping a copy of each GA4 and
    Google Ads hit that passes."""

    routes: list[GatewayRoute] = Field(
        default_factory=list,
        description=(
            "The paths forwarded to Google, one per container or tag. Empty: the gateway is "
            "off. Changing them takes a restart."
        ),
        examples=[[{"path": "/metrics", "tag_id": "GTM-ABCD1234"}]],
    )
    upstream: str = Field(
        "https://{tag_id}.fps.goog",
        description=(
            "Google's endpoint: an origin (scheme, host, optional port) in which {tag_id} "
            "is replaced by the route's tag id in lower case. The request's path and query "
            "are appended as sent."
        ),
        examples=["https://{tag_id}.fps.goog"],
    )
    geo: GatewayGeoConfig = Field(
        default_factory=GatewayGeoConfig,
        description="Where the visitor's country and region come from.",
        examples=[{"country_header": "CF-IPCountry", "region_header": "CF-Region-Code"}],
    )
    connect_timeout_secs: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Time limit to connect to Google; past it the answer is a 504 JSON error.",
        examples=[5.0],
    )
    timeout_secs: float = Field(
        10.0,
        gt=0,
        le=300,
        description=(
            "Time limit of each wait for Google's answer: for its headers (past it the "
            "answer is a 504 JSON error), then for each part of its body."
        ),
        examples=[10.0],
    )
    copy_hits: bool = Field(
        True,
        description=(
            "Keep a copy of each GA4 hit (and each Google Ads hit with an event name and a "
            "click id) in the spool for the warehouse and the other forwarders."
        ),
        examples=[True],
    )
    health_check: bool = Field(
        True,
        description=(
            "At start-up, ask each route's <path>/healthy upstream and report the answer on "
            "/readyz (reported only: Google's health never makes the relay unready)."
        ),
        examples=[True],
    )

    @field_validator("upstream")
    @classmethod
    def _origin_template(cls, value: str) -> str:
        problem = (
            "upstream must be an origin such as https://{tag_id}.fps.goog: http or https, a "
            "host (where {tag_id} may stand for the tag id) and an optional port; no path, "
            "query, fragment or credentials"
        )
        try:
            url = URL(value.replace(TAG_ID_PLACEHOLDER, "gtm-abc"))
        except ValueError:
            raise ValueError(problem) from None
        if not is_bare_origin(url):
            raise ValueError(problem)
        return value.rstrip("/")

    @model_validator(mode="after")
    def _distinct_paths(self) -> GoogleGatewayConfig:
        paths = [route.path for route in self.routes]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise ValueError("gateway paths used by more than one route: " + ", ".join(repeated))
        return self

    def upstream_origin(self, tag_id: str) -> str:
        """The origin a route of ``tag_id`` forwards to."""
        return self.upstream.replace(TAG_ID_PLACEHOLDER, tag_id.lower())
