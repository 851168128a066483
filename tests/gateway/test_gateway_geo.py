"""``X-Forwarded-CountryRegion`` from each geo source: the CDN's headers (from a trusted
proxy only) and a MaxMind-format database built here; counted by source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from tagrelay.config.google_gateway import GatewayGeoConfig
from tagrelay.errors import StartupError
from tagrelay.gateway.geo import Geo, GeoLookup
from tests.gateway.conftest import FakeGoogle
from tests.support import metric_value


def city_database(path: Path) -> Path:
    """A small city database: 203.0.113.0/24 in Sao Paulo (BR-SP), 198.51.100.0/24 in
    France with no region, 192.0.2.0/24 a record without a country."""
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City")
    writer.insert_network(
        IPSet(["203.0.113.0/24"]),
        {
            "country": {"iso_code": "BR", "names": {"en": "Brazil"}},
            "subdivisions": [{"iso_code": "SP", "names": {"en": "Sao Paulo"}}],
            "city": {"names": {"en": "Sao Paulo"}},
        },
    )
    writer.insert_network(IPSet(["198.51.100.0/24"]), {"country": {"iso_code": "FR"}})
    writer.insert_network(IPSet(["192.0.2.0/24"]), {"continent": {"code": "EU"}})
    writer.to_db_file(str(path))
    return path


def geo_counted(client: Any, source: str) -> float:
    return metric_value(client.app, "tagrelay_gateway_geo_total", {"source": source})


async def test_a_country_region_header_from_a_trusted_proxy(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay(gateway={"geo": {"country_region_header": "X-Geo-Region"}})
    await client.get("/metrics/", headers={"X-Geo-Region": "us-ca"})
    [seen] = google.hits()
    assert seen.headers["X-Forwarded-CountryRegion"] == "US-CA"
    assert "X-Geo-Region" not in seen.headers  # the CDN's header stays with the relay
    assert geo_counted(client, "header") == 1


async def test_country_and_region_headers_are_joined(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    geo = {"country_header": "CF-IPCountry", "region_header": "CF-Region-Code"}
    client = await gateway_relay(gateway={"geo": geo})
    await client.get("/metrics/", headers={"CF-IPCountry": "DE", "CF-Region-Code": "BY"})
    await client.get("/metrics/", headers={"CF-IPCountry": "JP"})
    await client.get("/metrics/", headers={"CF-IPCountry": "XX", "CF-Region-Code": "BY"})
    by_region, country_only, unknown = google.hits()
    assert by_region.headers["X-Forwarded-CountryRegion"] == "DE-BY"
    assert "X-Forwarded-Country" not in by_region.headers
    assert country_only.headers["X-Forwarded-Country"] == "JP"
    assert "X-Forwarded-CountryRegion" not in country_only.headers
    assert "X-Forwarded-CountryRegion" not in unknown.headers
    assert "X-Forwarded-Country" not in unknown.headers
    assert (geo_counted(client, "header"), geo_counted(client, "none")) == (2, 1)


async def test_geo_headers_from_an_untrusted_peer_are_ignored(
    gateway_relay: Any, google: FakeGoogle
) -> None:
    client = await gateway_relay(
        server={"trusted_proxies": ["10.0.0.0/8"]},
        google={
            "gateway": {
                "routes": [{"path": "/metrics", "tag_id": "GTM-ABCD1234"}],
                "upstream": google.upstream,
                "geo": {"country_region_header": "X-Geo-Region"},
            }
        },
    )
    await client.get("/metrics/", headers={"X-Geo-Region": "US-CA"})
    [seen] = google.hits()
    assert "X-Forwarded-CountryRegion" not in seen.headers
    assert "X-Geo-Region" not in seen.headers
    assert geo_counted(client, "none") == 1


async def test_the_database_places_the_visitor_by_ip(
    gateway_relay: Any, google: FakeGoogle, tmp_path: Path
) -> None:
    database = city_database(tmp_path / "city.mmdb")
    client = await gateway_relay(
        gateway={"geo": {"country_region_header": "X-Geo-Region", "database": str(database)}}
    )
    # Through the trusted proxy (127.0.0.1) the visitor is the X-Forwarded-For address.
    await client.get("/metrics/", headers={"X-Forwarded-For": "203.0.113.7"})
    await client.get("/metrics/", headers={"X-Forwarded-For": "198.51.100.9"})
    await client.get("/metrics/", headers={"X-Forwarded-For": "192.0.2.1"})
    await client.get("/metrics/", headers={"X-Forwarded-For": "2001:db8::1"})
    # A CDN header wins over the database.
    await client.get(
        "/metrics/", headers={"X-Forwarded-For": "203.0.113.7", "X-Geo-Region": "CA-QC"}
    )
    sao_paulo, france, no_country, ipv6, by_header = google.hits()
    assert sao_paulo.headers["X-Forwarded-CountryRegion"] == "BR-SP"
    assert france.headers["X-Forwarded-Country"] == "FR"
    for seen in (no_country, ipv6):
        assert "X-Forwarded-CountryRegion" not in seen.headers
        assert "X-Forwarded-Country" not in seen.headers
    assert by_header.headers["X-Forwarded-CountryRegion"] == "CA-QC"
    assert [geo_counted(client, s) for s in ("header", "database", "none")] == [1, 2, 2]


async def test_without_a_geo_source_a_warning_at_start_up(
    gateway_relay: Any, google: FakeGoogle, caplog: pytest.LogCaptureFixture
) -> None:
    client = await gateway_relay()
    warnings = [r.getMessage() for r in caplog.records if r.name == "tagrelay.web.gateway"]
    assert any("no geo source" in message for message in warnings)
    await client.get("/metrics/")
    await client.get("/metrics/")
    assert geo_counted(client, "none") == 2
    assert sum("no geo source" in r.getMessage() for r in caplog.records) == 1


def test_a_region_header_needs_a_country_header() -> None:
    with pytest.raises(ValueError, match="country_header"):
        GatewayGeoConfig(region_header="CF-Region-Code")


def test_lookups_check_and_upper_case_the_values() -> None:
    lookup = GeoLookup(GatewayGeoConfig(country_region_header="X-Geo"))
    assert lookup.lookup("1.2.3.4", {"X-Geo": "br-sp"}, True) == Geo("header", "BR", "SP")
    assert lookup.lookup("1.2.3.4", {"X-Geo": "US"}, True) == Geo("header", "US", None)
    for value in ("USA-CA", "U1-CA", "", "T1", "XX-CA"):
        assert lookup.lookup("1.2.3.4", {"X-Geo": value}, True) == Geo("none"), value
    assert lookup.lookup("1.2.3.4", {"X-Geo": "US-CALIF"}, True) == Geo("header", "US", None)
    assert lookup.lookup("1.2.3.4", {"X-Geo": "us-ca"}, False) == Geo("none")


def test_a_database_that_cannot_be_read_stops_the_start_up(tmp_path: Path) -> None:
    broken = tmp_path / "city.mmdb"
    broken.write_bytes(b"not a database")
    for path in (broken, tmp_path / "missing.mmdb"):
        with pytest.raises(StartupError, match="cannot be read as a MaxMind database"):
            GeoLookup(GatewayGeoConfig(database=path))
