"""The visitor's country and region for Google, from the CDN in front of the relay or from
a MaxMind-format database (``google.gateway.geo``).

Google's gateway reads ``X-Forwarded-CountryRegion: <ISO 3166-2>`` (``US-CA``); its
``?validate_geo=healthy`` check answers ``ok`` only when the header arrives, and without it
Google places every visitor where the relay is (regional reports, consent-mode regional
defaults). :class:`GeoLookup` gives, for one request, the headers to add and the source
they came from (the ``source`` label of ``tagrelay_gateway_geo_total``):

==========  ==============================================================================
header      ``country_region_header`` (``US-CA``), or ``country_header`` with
            ``region_header`` (``US`` + ``CA``), sent by a trusted proxy
            (``server.trusted_proxies``); from any other peer they are ignored, since a
            visitor could set them
database    the ``database`` looked up by the visitor's IP (``country.iso_code`` and the
            first ``subdivisions[].iso_code``)
none        neither: no geo header goes to Google
==========  ==============================================================================

A country without a region is sent as ``X-Forwarded-Country`` alone (the other form Google
reads). Values are checked (two letters, a region of one to three letters or digits) and
upper-cased; anything else counts as not known (Cloudflare's ``XX`` and ``T1`` included).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import maxminddb

from tagrelay.config.google_gateway import GatewayGeoConfig
from tagrelay.errors import StartupError

__all__ = ["COUNTRY_HEADER", "COUNTRY_REGION_HEADER", "GEO_SOURCES", "Geo", "GeoLookup"]

COUNTRY_REGION_HEADER: Final = "X-Forwarded-CountryRegion"
COUNTRY_HEADER: Final = "X-Forwarded-Country"

GeoSource = Literal["header", "database", "none"]
GEO_SOURCES: Final[tuple[GeoSource, ...]] = ("header", "database", "none")

_COUNTRY: Final = re.compile(r"[A-Za-z]{2}")
_REGION: Final = re.compile(r"[A-Za-z0-9]{1,3}")
_NOT_A_COUNTRY: Final = frozenset({"XX", "T1", "ZZ"})


@dataclass(frozen=True, slots=True)
class Geo:
    """Where a visitor is, as far as the relay knows."""

    source: GeoSource
    country: str | None = None
    region: str | None = None

    def headers(self) -> dict[str, str]:
        """The geo headers for Google."""
        if self.country is None:
            return {}
        if self.region is None:
            return {COUNTRY_HEADER: self.country}
        return {COUNTRY_REGION_HEADER: f"{self.country}-{self.region}"}


NO_GEO: Final = Geo("none")


def _country(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not _COUNTRY.fullmatch(value):
        return None
    value = value.upper()
    return None if value in _NOT_A_COUNTRY else value


def _region(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value.upper() if _REGION.fullmatch(value) else None


def _from_record(record: Any) -> tuple[str | None, str | None]:
    if not isinstance(record, dict):
        return None, None
    country_entry = record.get("country")
    country = _country(country_entry.get("iso_code")) if isinstance(country_entry, dict) else None
    region = None
    subdivisions = record.get("subdivisions")
    if country is not None and isinstance(subdivisions, list) and subdivisions:
        first = subdivisions[0]
        if isinstance(first, dict) and isinstance(first.get("iso_code"), str):
            region = _region(first["iso_code"])
    return country, region


class GeoLookup:
    """The configured geo sources (see the module docstring). ``close`` releases the
    database."""

    def __init__(self, config: GatewayGeoConfig) -> None:
        self.country_region_header = config.country_region_header
        self.country_header = config.country_header
        self.region_header = config.region_header
        self.database_path: Path | None = config.database
        self._reader: maxminddb.Reader | None = None
        if config.database is not None:
            try:
                self._reader = maxminddb.open_database(str(config.database))
            except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
                raise StartupError(
                    f"google.gateway.geo.database {config.database} cannot be read as a "
                    f"MaxMind database ({type(exc).__name__}: {exc}); give the path of a "
                    ".mmdb file (GeoLite2 or GeoIP2 City) or remove the option"
                ) from None

    @property
    def configured(self) -> bool:
        return (
            self.country_region_header is not None
            or self.country_header is not None
            or self._reader is not None
        )

    @property
    def own_headers(self) -> tuple[str, ...]:
        """The request headers the relay reads the geolocation from (not sent upstream)."""
        names = (self.country_region_header, self.country_header, self.region_header)
        return tuple(name for name in names if name is not None)

    def lookup(self, ip: str | None, headers: Mapping[str, str], trusted_peer: bool) -> Geo:
        """The visitor's geo: from the headers when ``trusted_peer`` (the request came
        through a trusted proxy), else from the database by ``ip``."""
        if trusted_peer:
            if self.country_region_header is not None:
                value = headers.get(self.country_region_header, "")
                country_text, _, region_text = value.strip().partition("-")
                country = _country(country_text)
                if country is not None:
                    return Geo("header", country, _region(region_text) if region_text else None)
            if self.country_header is not None:
                country = _country(headers.get(self.country_header))
                if country is not None:
                    region = (
                        _region(headers.get(self.region_header))
                        if self.region_header is not None
                        else None
                    )
                    return Geo("header", country, region)
        if self._reader is not None and ip is not None:
            try:
                record = self._reader.get(ipaddress.ip_address(ip))
            except ValueError:
                record = None
            country, region = _from_record(record)
            if country is not None:
                return Geo("database", country, region)
        return NO_GEO

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
