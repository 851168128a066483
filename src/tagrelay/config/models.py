"""The configuration schema. These models are its documentation: the JSON Schema
(``tagrelay.config.schema``) and the README's reference are generated from them.

A file is loaded by ``tagrelay.config.loader``, which interpolates ``${VAR}`` and reports
every validation problem with its key path and line.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from tagrelay.config.common import ConfigModel, ForwarderConfigBase, LazyUnion
from tagrelay.config.google_gateway import GoogleGatewayConfig
from tagrelay.config.google_scripts import GoogleScriptsConfig
from tagrelay.crypto import CryptoError, Keyring
from tagrelay.forwarders import FORWARDERS
from tagrelay.forwarders._http import header_secrets
from tagrelay.identity_store.config import IDENTITY_WRITER_ID, IdentityStoreConfig
from tagrelay.pipeline.host import valid_host_name

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
    base_path: str = Field(
        "",
        pattern=r"^(/[A-Za-z0-9._~-]+)*$",
        description=(
            "Mount every route under this path prefix, for a same-origin deployment behind "
            "the site's own proxy or CDN (www.example.com/t/...). Empty mounts at the root."
        ),
        examples=["/t"],
    )
    shutdown_timeout_secs: float = Field(
        10.0,
        gt=0,
        description=(
            "On SIGTERM/SIGINT, how long in-flight requests and forwarder batches may take."
        ),
        examples=[10.0],
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description=(
            "The event loop that serves HTTP. auto: uvloop where it is installed (it is a "
            "dependency on Linux and macOS; ~10% more single-event requests per second, see "
            "bench/README.md), else asyncio's own. uvloop: fail at start-up without it."
        ),
        examples=["auto"],
    )
    header_timeout_secs: float = Field(
        10.0,
        gt=0,
        description=(
            "How long a client may take to send a whole request head (request line and "
            "headers): from the connection opening for its first request, from the first "
            "byte for the next ones on a kept-alive connection. A client still sending "
            "after that (slowloris) is disconnected and counted "
            "(tagrelay_connections_closed{reason=header_timeout}). A head is one or two "
            "packets: 10 s covers the slowest mobile networks."
        ),
        examples=[10.0],
    )
    body_timeout_secs: float = Field(
        30.0,
        gt=0,
        description=(
            "How long a client may take to send a request body, from the end of its head. "
            "A body still arriving after that (a trickle) is cut off, the connection closed "
            "and counted (reason=body_timeout). A time limit, not a minimum rate: it bounds "
            "how long any one request can hold a connection however it paces its bytes. A "
            "body of limits.max_request_bytes (500 KB) needs ~17 KB/s to arrive in 30 s; "
            "event batches are usually a few KB."
        ),
        examples=[30.0],
    )
    keepalive_timeout_secs: float = Field(
        75.0,
        gt=0,
        description=(
            "How long a kept-alive connection may wait for its next request before the relay "
            "closes it (reason=idle_timeout). Behind a load balancer, keep it above the "
            "balancer's own idle timeout (AWS ALB: 60 s; Google Cloud: 600 s), or the "
            "balancer may send a request on a connection the relay is closing."
        ),
        examples=[75.0],
    )
    max_connections: int = Field(
        10_000,
        ge=1,
        description=(
            "Most client connections open at once. A connection beyond it is answered 503 "
            "with Retry-After and closed at once, and counted (reason=over_capacity), so a "
            "load balancer can try another replica instead of waiting. Lowered at start-up "
            "(with a warning) to what the open-files limit leaves after a reserve for the "
            "relay's own files and outgoing connections."
        ),
        examples=[10_000],
    )
    listen_backlog: int = Field(
        1024,
        ge=1,
        le=65535,
        description=(
            "Connections the kernel queues before the relay accepts them. A burst of new "
            "connections beyond it waits for the client's SYN retry (a second or more); the "
            "kernel caps it at net.core.somaxconn (4096 on current Linux)."
        ),
        examples=[1024],
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
            "browser: public, used by pages, restricted by allowed_origins; server: a secret "
            "for backends, may set context.ip and context.userAgent and use /api/s/s2s/*; "
            "never answered with CORS headers, and refused (403) in a request that carries "
            "an Origin header, as browsers' requests do."
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
    hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Browser keys only: host names (no scheme, no port) whose keyless requests take "
            "this key, as Jitsu maps a domain to its stream. A request to /api/s/* or to "
            "paths.events that presents no write key, sent to one of these hosts, is "
            "accepted with this key (its allowed_origins still apply). A host belongs to "
            "one key at most."
        ),
        examples=[["data.example.com"]],
    )

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        names: list[str] = []
        invalid: list[str] = []
        for host in hosts:
            name = host.lower().removesuffix(".")
            if not valid_host_name(name):
                invalid.append(repr(host))
            elif name in names:
                raise ValueError(f"host {name!r} is listed twice")
            names.append(name)
        if invalid:
            raise ValueError(
                f"not host names: {', '.join(invalid)} (expected letters, digits, hyphens and "
                "dots, like data.example.com; no scheme, port, path or IP address)"
            )
        return names

    @model_validator(mode="after")
    def _origins_only_for_browser(self) -> WriteKeyConfig:
        if self.kind == "server" and self.allowed_origins:
            raise ValueError(
                "allowed_origins applies to browser keys only; server keys are not for pages"
            )
        if self.kind == "server" and self.hosts:
            raise ValueError(
                "hosts applies to browser keys only: a keyless request must never be taken "
                "as sent with a server key (a secret)"
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
        description="Largest request body, both as sent and after decompression.",
        examples=[512000],
    )
    max_batch_events: int = Field(
        2500, ge=1, description="Most events in one batch request.", examples=[2500]
    )
    max_nesting_depth: int = Field(
        16, ge=2, le=200, description="Deepest object/array nesting inside an event.", examples=[16]
    )


JETSTREAM_FIELDS = (
    "servers",
    "stream",
    "replicas",
    "max_age_secs",
    "max_bytes",
    "duplicate_window_secs",
    "ack_wait_secs",
)
"""The ``spool`` keys that apply to ``type: jetstream`` only."""


class SpoolConfig(ConfigModel):
    """The durable queue between ingestion and forwarders: SQLite in the data directory
    (the default), or a NATS JetStream stream shared by several replicas."""

    type: Literal["sqlite", "jetstream"] = Field(
        "sqlite",
        description=(
            "sqlite: a file in data_dir, for one relay on a persistent disk (the fastest). "
            "jetstream: a NATS JetStream stream that several replicas share, each "
            "forwarder a durable pull consumer of it, so that any replica delivers any "
            "event and a replica's death loses nothing acknowledged (see the README's "
            "'Running more than one replica')."
        ),
        examples=["jetstream"],
    )
    servers: list[str] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"],
        min_length=1,
        description="type: jetstream: the NATS servers to connect to (any of them will do).",
        examples=[["nats://nats-0.nats:4222", "nats://nats-1.nats:4222"]],
    )
    stream: str = Field(
        "tagrelay",
        pattern=r"^[A-Za-z0-9_-]{1,32}$",
        description=(
            "type: jetstream: the stream's name. Its subject is <stream>.events and its "
            "dead letters go to the stream <stream>_dead_letters (subjects "
            "<stream>_dead_letters.<forwarder>), so that relays with streams of their own "
            "share a server. Created at start-up when missing, checked when present."
        ),
        examples=["tagrelay"],
    )
    replicas: int = Field(
        1,
        ge=1,
        le=5,
        description=(
            "type: jetstream: copies of each event the NATS cluster keeps (file storage); "
            "3 survives the loss of one NATS server."
        ),
        examples=[3],
    )
    max_age_secs: float = Field(
        7 * 86_400.0,
        gt=0,
        description=(
            "type: jetstream: events older than this leave the stream, delivered or not "
            "(the backlog a long outage of a destination may build up)."
        ),
        examples=[604_800],
    )
    max_bytes: int = Field(
        0,
        ge=0,
        description=(
            "type: jetstream: cap on the stream's size; when full, ingestion answers 503. "
            "0 means no cap (the server's limits apply)."
        ),
        examples=[10_737_418_240],
    )
    duplicate_window_secs: float = Field(
        600.0,
        gt=0,
        description=(
            "type: jetstream: an event whose messageId the stream took within this window "
            "is acknowledged but not stored again, whichever replica it reached (the "
            "server keeps every id of the window in memory)."
        ),
        examples=[600],
    )
    ack_wait_secs: float = Field(
        30.0,
        gt=0,
        description=(
            "type: jetstream: how long a replica may hold a batch without word before the "
            "stream hands it to another replica. A replica that is still working on it "
            "(retrying, waiting for it to fill) tells the stream so in time; a replica "
            "that died has its batches redelivered after this."
        ),
        examples=[30],
    )

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
    dedup_window_secs: float = Field(
        86_400.0,
        ge=0,
        description=(
            "An event whose messageId was stored within this window is acknowledged but not "
            "stored again, so SDK resends reach each forwarder once (see dedup_max_ids). "
            "0 turns deduplication off."
        ),
        examples=[86_400],
    )
    dedup_max_ids: int = Field(
        250_000,
        ge=1,
        description=(
            "Most messageIds remembered for deduplication (about 80 bytes of memory each); "
            "at high volume this, not the window, bounds how far back a resend is caught."
        ),
        examples=[250_000],
    )
    forget_cursor_after_secs: float = Field(
        86_400.0,
        ge=0,
        description=(
            "How long the spool keeps the cursor of a forwarder that was removed (or "
            "disabled), by a reload or between two runs: if it comes back within this "
            "time it resumes where it stopped, and the events it has not delivered are "
            "kept for it meanwhile (they count towards max_size_mb). 0 forgets the "
            "cursor at once."
        ),
        examples=[86_400],
    )

    @model_validator(mode="after")
    def _jetstream_keys_for_jetstream(self) -> SpoolConfig:
        if self.type != "jetstream":
            # Compared with the defaults, not ``model_fields_set``: a configuration dumped
            # and validated again (a reload does) names every field.
            fields = type(self).model_fields
            given = [
                name
                for name in JETSTREAM_FIELDS
                if getattr(self, name) != fields[name].get_default(call_default_factory=True)
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to type: jetstream only; set type: jetstream "
                    "or remove them"
                )
        return self


class DeadLettersConfig(ConfigModel):
    """The events forwarders gave up on, kept in the spool for ``tagrelay dlq``."""

    retention_days: float = Field(
        30.0,
        gt=0,
        description=(
            "Dead letters older than this (since they last died: a replay that fails again "
            "starts it over) are deleted by the relay's maintenance, so that the table does "
            "not grow forever. tagrelay dlq purge deletes sooner."
        ),
        examples=[30],
    )


class LoggingConfig(ConfigModel):
    """Log output (stderr)."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level logged.", examples=["info"]
    )
    format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: text on a terminal, JSON lines otherwise.", examples=["auto"]
    )


class DeliveryConfig(ConfigModel):
    """Where the forwarders that call HTTP APIs run."""

    process: bool = Field(
        True,
        description=(
            "Run the forwarders that call HTTP APIs (every type but the warehouse, which has "
            "a process of its own) in child processes, the delivery processes (ga4 in one of "
            "its own, the others together): they read their batches from the spool file "
            "themselves, so turning events into each platform's requests never holds the "
            "interpreter that answers clients. false: "
            "they run on a thread of the relay's process (fewer processes; ingest then "
            "slows down by the time delivery takes, see bench/README.md)."
        ),
        examples=[True],
    )
    niceness: int = Field(
        5,
        ge=0,
        le=19,
        description=(
            "How much lower the delivery process's CPU priority is than the relay's "
            "(nice(2)): when the machine's cores are all busy, answering clients comes "
            "first and delivery, whose backlog waits on disk in the spool, takes what is "
            "left; on an idle core it runs at full speed either way. 0: the same priority."
        ),
        examples=[5],
    )


ADMIN_TOKEN_MIN_CHARS = 16


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (an IPv6 address in brackets: ``[::1]:9100``) as its host and port;
    ValueError when it is not one."""
    host, sep, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{listen!r}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{listen!r}: write an IPv6 address in brackets, like [::1]:9100")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{listen!r} is not host:port, like 127.0.0.1:9100")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, as written) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


class AdminConfig(ConfigModel):
    """The admin listener: a second HTTP listener, apart from the public one, for
    /metrics, the admin API (what ``tagrelay sql`` uses) and, with them, /healthz and
    /readyz."""

    enabled: bool = Field(
        True,
        description=(
            "Run the admin listener. false: none (metrics are then served only with "
            "metrics.public)."
        ),
        examples=[True],
    )
    listen: str = Field(
        "127.0.0.1:9100",
        description=(
            "host:port to listen on (an IPv6 address in brackets: [::1]:9100; port 0 "
            "takes a free port, logged at start-up). Without a token only a loopback "
            "address (127.0.0.1, ::1, localhost) is accepted."
        ),
        examples=["127.0.0.1:9100"],
    )
    token: SecretStr = Field(
        SecretStr(""),
        description=(
            "The admin token; empty: none. When set, every admin request but /healthz and "
            f"/readyz needs it, at least {ADMIN_TOKEN_MIN_CHARS} characters (openssl rand "
            "-hex 32): as an 'Authorization: Bearer <token>' header (Prometheus: "
            "authorization: {credentials: ...}), or typed once into the login form at "
            "/login, which sets an HttpOnly session cookie. Compared in constant time; "
            "never logged."
        ),
        examples=["${TAGRELAY_ADMIN_TOKEN:-}"],
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        split_listen(listen)
        return listen

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr) -> SecretStr:
        length = len(token.get_secret_value())
        if 0 < length < ADMIN_TOKEN_MIN_CHARS:
            raise ValueError(
                f"the admin token is {length} characters long; use at least "
                f"{ADMIN_TOKEN_MIN_CHARS} (openssl rand -hex 32 makes one)"
            )
        return token

    @model_validator(mode="after")
    def _loopback_without_token(self) -> AdminConfig:
        host, _ = split_listen(self.listen)
        if self.enabled and not self.has_token and not is_loopback(host):
            raise ValueError(
                f"admin.listen {self.listen!r} is not a loopback address, and no admin.token "
                "is set: anyone who reaches it could read the metrics and query the "
                "warehouse. Set admin.token (e.g. token: ${TAGRELAY_ADMIN_TOKEN}), or listen "
                "on 127.0.0.1"
            )
        return self

    @property
    def has_token(self) -> bool:
        return bool(self.token.get_secret_value())

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


class MetricsConfig(ConfigModel):
    """Where the Prometheus metrics are served."""

    public: bool = Field(
        False,
        description=(
            "Also serve /metrics on the public listener (under server.base_path), as "
            "before the admin listener existed. false: only on the admin listener, so "
            "that visitors cannot read the relay's counters."
        ),
        examples=[False],
    )


class DebugConfig(ConfigModel):
    """The live debug view (/debug on the admin listener): what it captures when nobody
    watches, and how much it keeps."""

    sample_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description=(
            "Fraction of events captured while no debug view is open (by messageId, so an "
            "event is captured with its deliveries or not at all), so that the view opens "
            "on recent examples. 0: nothing is captured until a view connects, and capture "
            "costs nothing; while one is open every event is captured."
        ),
        examples=[0.0],
    )
    buffer_events: int = Field(
        500,
        ge=10,
        le=100_000,
        description=(
            "How many events the capture keeps in memory (a ring: the oldest go first), "
            "with as many delivery records (outcomes, outbound requests and answers)."
        ),
        examples=[500],
    )


PUBLIC_PATH = r"^(/[A-Za-z0-9._~-]+)+$"
RESERVED_PATHS = (
    "/v1",
    "/api",
    "/g",
    "/mp",
    "/debug",
    "/gtag",
    "/gtm.js",
    "/beacon",
    "/sourceConfig",
    "/analytics.js",
    "/analytics-next",
    "/healthz",
    "/readyz",
    "/metrics",
)
"""Paths of built-in endpoints (and everything below them), which renamed paths avoid."""


class PathsConfig(ConfigModel):
    """Public paths of the relay's own script and endpoints, below ``server.base_path``.
    Rename them freely: blocklists match well-known paths, and none of the defaults
    contains event, track, collect, beacon, analytics, gtm or pixel."""

    script: str = Field(
        "/p.js", pattern=PUBLIC_PATH, description="The tracking script.", examples=["/p.js"]
    )
    events: str = Field(
        "/d",
        pattern=PUBLIC_PATH,
        description="Where the tracking script sends its events (POST).",
        examples=["/d"],
    )
    identity: str = Field(
        "/id",
        pattern=PUBLIC_PATH,
        description="GET: the visitor's server-set anonymous id (sets or renews its cookie).",
        examples=["/id"],
    )
    demo: str = Field(
        "/demo",
        pattern=PUBLIC_PATH,
        description="The demo page, when demo.enabled is set.",
        examples=["/demo"],
    )

    @model_validator(mode="after")
    def _distinct(self) -> PathsConfig:
        paths = [self.script, self.events, self.identity, self.demo]
        if len(set(paths)) != len(paths):
            raise ValueError("script, events, identity and demo need different paths")
        reserved = RESERVED_PATHS
        for path in paths:
            if any(path == r or path.startswith(r + "/") for r in reserved):
                raise ValueError(f"{path!r} is taken by a built-in endpoint")
        return self


class ScriptConfig(ConfigModel):
    """The first-party tracking script served at ``paths.script``."""

    global_name: str = Field(
        "tagrelay",
        pattern=r"^[A-Za-z_$][A-Za-z0-9_$]{0,40}$",
        description="The window property the script's API lives on (window.tagrelay).",
        examples=["tagrelay"],
    )
    auto_page: bool = Field(
        True,
        description=(
            "Send a page view on load and on every single-page-app navigation "
            '(a script tag\'s data-auto-page="false" turns it off for that page).'
        ),
        examples=[True],
    )
    cookieless: bool = Field(
        False,
        description=(
            "Cookieless by default: the script stores nothing in the browser and the relay "
            "sets no cookie; every page load is a new anonymous visitor."
        ),
        examples=[False],
    )
    cache_max_age_secs: int = Field(
        300,
        ge=0,
        description="Cache-Control max-age of the script (it is revalidated by ETag after).",
        examples=[300],
    )
    jitsu_compat: bool = Field(
        False,
        description=(
            "The script also answers to Jitsu's browser API, so that pages carrying Jitsu's "
            "snippet (its script tag loading p.js with data-write-key) work unchanged: "
            "window.jitsu (track, page, identify, group, reset, user, configure), the "
            "jitsuQ queue, data-init-only, data-onload, data-user-id, data-debug, data-namespace, "
            "data-privacy-dont-send, data-privacy-disable-user-ids, and the ids Jitsu kept "
            "in its cookies. Adds about 0.5 KB gzipped to the script (2.0 to 2.5 KB), hence "
            "off unless a site comes from Jitsu."
        ),
        examples=[True],
    )


ConsentState = Literal["granted", "denied"]


class ConsentDefaults(ConfigModel):
    """Consent assumed for a category an event says nothing about."""

    analytics: ConsentState = Field(
        "granted", description="Analytics storage.", examples=["granted"]
    )
    ads: ConsentState = Field(
        "granted", description="Advertising storage (ad_storage).", examples=["granted"]
    )
    ad_user_data: ConsentState = Field(
        "granted",
        description="Sending user data to advertising platforms.",
        examples=["granted"],
    )
    ad_personalization: ConsentState = Field(
        "granted", description="Personalized advertising.", examples=["granted"]
    )


class ConsentConfig(ConfigModel):
    """Consent state carried on every event (``context.consent``) and obeyed by the relay
    and its forwarders (each forwarder's ``requires_consent``)."""

    default: ConsentDefaults = Field(
        default_factory=ConsentDefaults,
        description=(
            "Consent for categories an event does not state. In regions that require opt-in, "
            "set these to denied."
        ),
        examples=[{"analytics": "granted", "ads": "denied"}],
    )
    analytics_denied: Literal["anonymize", "keep"] = Field(
        "anonymize",
        description=(
            "When an event denies analytics: anonymize sets no identity cookie and drops its "
            "identifiers (anonymousId, userId, IP, client and click ids); the event is still "
            "stored and counted. keep changes nothing."
        ),
        examples=["anonymize"],
    )
    honor_gpc: bool = Field(
        True,
        description=(
            "Treat Global Privacy Control (the Sec-GPC: 1 header, or the script's "
            "navigator.globalPrivacyControl) as denying ads, ad_user_data and "
            "ad_personalization."
        ),
        examples=[True],
    )


class IdentityConfig(ConfigModel):
    """Server-set first-party cookies: the visitor id, click ids and browser ids."""

    enabled: bool = Field(
        True,
        description="Set and read identity cookies on browser-key requests.",
        examples=[True],
    )
    cookie_name: str = Field(
        "tr_aid",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name of the HttpOnly cookie holding the visitor's anonymous id.",
        examples=["tr_aid"],
    )
    cookie_domain: str = Field(
        "auto",
        pattern=r"^(auto|host|\.?[A-Za-z0-9.-]+)$",
        description=(
            "auto: the registrable domain of the request's host (data.example.com -> "
            "example.com), so the site's other hosts share the cookie; host: no Domain "
            "attribute; or a domain name."
        ),
        examples=["auto"],
    )
    max_age_days: int = Field(
        400,
        ge=1,
        le=400,
        description="Cookie lifetime, renewed on every visit (browsers cap it at 400 days).",
        examples=[400],
    )
    click_ids: bool = Field(
        True,
        description=(
            "Capture ad click ids (gclid, fbclid, ttclid, msclkid, ...) from landing URLs "
            "into a cookie and attach them to the visitor's later events (context.clickIds)."
        ),
        examples=[True],
    )
    meta_cookies: bool = Field(
        True,
        description=(
            "Set Meta's _fbc (from fbclid) and _fbp (when absent) as first-party cookies."
        ),
        examples=[True],
    )
    cookie_keeper: list[str] = Field(
        default_factory=list,
        description=(
            "Vendor cookies re-set by the relay as server-set cookies with the identity "
            "cookie's lifetime, so that browsers' caps on script-set cookies do not shorten "
            "them. A trailing * matches a prefix."
        ),
        examples=[["_ga", "_ga_*", "_fbp", "_fbc", "_gcl_aw", "_ttp"]],
    )

    @field_validator("cookie_keeper")
    @classmethod
    def _cookie_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}\*?", name):
                raise ValueError(f"{name!r} is not a cookie name (a trailing * is allowed)")
        return names


class PrivacyConfig(ConfigModel):
    """What the relay removes before anything is stored or forwarded."""

    truncate_ip: bool = Field(
        False,
        description="Zero the last octet of IPv4 addresses and keep only the /48 of IPv6 ones.",
        examples=[True],
    )


class EncryptionConfig(ConfigModel):
    """Encryption at rest (AES-256-GCM) of the personal data the relay keeps on disk."""

    keys: list[SecretStr] = Field(
        default_factory=list,
        description=(
            "Base64-encoded 32-byte keys, normally from the environment. Empty: nothing is "
            "encrypted. The first key encrypts, every key decrypts: to rotate, put a new key "
            "first and keep the old ones until `tagrelay keys rotate` has re-encrypted "
            "everything under it (tagrelay_encryption_backlog_events at 0). Make one with "
            "`tagrelay keys generate`. Needs a restart to change. A spool holding data "
            "under a key not listed here does not start."
        ),
        examples=[["${TAGRELAY_KEY:-}"], ["${TAGRELAY_KEY_NEW}", "${TAGRELAY_KEY_OLD}"]],
    )

    @field_validator("keys")
    @classmethod
    def _valid_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        texts = [key.get_secret_value() for key in keys if key.get_secret_value().strip()]
        if texts:
            try:
                Keyring.from_texts(texts)
            except CryptoError as exc:
                raise ValueError(str(exc)) from None
        return [SecretStr(text) for text in texts]

    def keyring(self) -> Keyring | None:
        """The keyring, or None when no key is configured (encryption off)."""
        if not self.keys:
            return None
        return Keyring.from_texts([key.get_secret_value() for key in self.keys])


class SegmentSdkConfig(ConfigModel):
    """Segment's analytics-next browser library, served first-party."""

    library_dir: Path | None = Field(
        None,
        description=(
            "A directory holding analytics-next's UMD build (the npm package's dist/umd: "
            "standalone.js and its chunks). When set, the relay serves it where Segment's "
            "snippet loads it (/analytics.js/v1/<writeKey>/analytics.min.js, chunks under "
            "/analytics-next/bundles/), so the vendor's snippet works with _cdn set to the "
            "relay."
        ),
        examples=["/opt/analytics-next/dist/umd"],
    )
    metrics_sample_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "metrics.sampleRate in the settings the relay serves: how often analytics-next "
            "posts its own usage metrics to /v1/m (counted, never stored). 0 turns them off."
        ),
        examples=[0.0],
    )


class SdksConfig(ConfigModel):
    """What the vendors' SDKs fetch from their own servers, answered by the relay."""

    segment: SegmentSdkConfig = Field(
        default_factory=SegmentSdkConfig,
        description="Segment analytics-next.",
        examples=[{"library_dir": "/opt/analytics-next/dist/umd"}],
    )


MEASUREMENT_ID = r"^G-[A-Z0-9]{1,24}$"


class MeasurementProtocolSecret(ConfigModel):
    """A GA4 Measurement Protocol credential accepted on ``/mp/collect``."""

    measurement_id: str = Field(
        pattern=MEASUREMENT_ID, description="The GA4 stream's measurement id.", examples=["G-XXXX"]
    )
    api_secret: SecretStr = Field(
        min_length=1,
        description="The stream's Measurement Protocol API secret your backends send.",
        examples=["${GA4_API_SECRET}"],
    )


class GoogleCollectConfig(ConfigModel):
    """gtag's hits (``/g/collect``), sent to the relay by ``server_container_url``."""

    measurement_ids: list[str] = Field(
        default_factory=list,
        description=(
            "GA4 measurement ids whose hits the relay accepts; a hit for any other id is "
            "refused (403). Empty: /g/collect is off."
        ),
        examples=[["G-XXXX"]],
    )

    @field_validator("measurement_ids")
    @classmethod
    def _ids(cls, ids: list[str]) -> list[str]:
        for value in ids:
            if not re.fullmatch(MEASUREMENT_ID, value):
                raise ValueError(f"{value!r} is not a GA4 measurement id (G-XXXX)")
        return ids


class GoogleConfig(ConfigModel):
    """Google Analytics 4 and Google's tag scripts, first-party."""

    scripts: GoogleScriptsConfig = Field(
        default_factory=GoogleScriptsConfig,
        description="gtag.js and gtm.js proxied, cached and renamable.",
        examples=[{"ids": [{"id": "G-XXXX", "path": "/assets/site.js"}]}],
    )
    collect: GoogleCollectConfig = Field(
        default_factory=GoogleCollectConfig,
        description="The /g/collect endpoint for gtag's hits.",
        examples=[{"measurement_ids": ["G-XXXX"]}],
    )
    gateway: GoogleGatewayConfig = Field(
        default_factory=GoogleGatewayConfig,
        description=(
            "Google tag gateway: paths of the site forwarded to Google's first-party "
            "endpoint, with a copy of each GA4 and Google Ads hit kept."
        ),
        examples=[{"routes": [{"path": "/metrics", "tag_id": "GTM-ABCD1234"}]}],
    )
    server_client_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description=(
            "The name of an HttpOnly cookie in which the relay keeps the visitor's GA client "
            "id (like sGTM's FPID), used for gtag hits it re-sends and for Measurement "
            "Protocol events alike; it outlives gtag's script-set _ga. Unset: off."
        ),
        examples=["FPID"],
    )
    measurement_protocol: list[MeasurementProtocolSecret] = Field(
        default_factory=list,
        description=(
            "Credentials accepted on /mp/collect (GA4 Measurement Protocol from backends). "
            "Empty: /mp/collect is off."
        ),
        examples=[[{"measurement_id": "G-XXXX", "api_secret": "${GA4_API_SECRET}"}]],
    )


class DemoConfig(ConfigModel):
    """A demo page (``paths.demo``) that loads the script and fires events."""

    enabled: bool = Field(
        False, description="Serve the demo page. Turn it off in production.", examples=[True]
    )
    key: str = Field(
        "",
        description="Id of the browser key the demo page sends with; empty: the first one.",
        examples=["website"],
    )


def _forwarder_config_model(kind: str) -> type[ForwarderConfigBase]:
    return FORWARDERS[kind].config_model


if TYPE_CHECKING:
    # The union is looked up in the registry at run time, which mypy cannot follow.
    # Statically, an item of ``Config.forwarders`` is what every member has in common.

    class ForwarderConfig(ForwarderConfigBase):
        type: str

else:
    # Each type's config model (and its forwarder's module) is imported when a file
    # names the type: see ``LazyUnion``.
    ForwarderConfig = Annotated[
        ForwarderConfigBase, LazyUnion("type", FORWARDERS, _forwarder_config_model)
    ]


class Config(ConfigModel):
    """The whole configuration file."""

    data_dir: Path = Field(
        Path("data"),
        description="Directory for the spool, the embedded warehouse and the admin socket. "
        "Relative paths are relative to the working directory. Created with mode 0700, and "
        "every file the relay creates in it 0600 (they hold personal data); a directory that "
        "already exists keeps its mode, with a warning if other users can read it.",
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
    dead_letters: DeadLettersConfig = Field(
        default_factory=DeadLettersConfig,
        description="How long dead letters are kept.",
        examples=[{"retention_days": 30}],
    )
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig, description="Logging.", examples=[{"level": "info"}]
    )
    paths: PathsConfig = Field(
        default_factory=PathsConfig,
        description="Public paths of the script and the relay's own endpoints.",
        examples=[{"script": "/p.js"}],
    )
    script: ScriptConfig = Field(
        default_factory=ScriptConfig,
        description="The tracking script.",
        examples=[{"global_name": "tagrelay"}],
    )
    identity: IdentityConfig = Field(
        default_factory=IdentityConfig,
        description="Server-set identity, click-id and browser-id cookies.",
        examples=[{"cookie_domain": "auto"}],
    )
    consent: ConsentConfig = Field(
        default_factory=ConsentConfig,
        description="Consent defaults and enforcement.",
        examples=[{"default": {"ads": "denied"}}],
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig,
        description="Privacy transformations.",
        examples=[{"truncate_ip": True}],
    )
    encryption: EncryptionConfig = Field(
        default_factory=EncryptionConfig,
        description="Encryption at rest of personal data on disk.",
        examples=[{"keys": ["${TAGRELAY_KEY}"]}],
    )
    identity_store: IdentityStoreConfig = Field(
        default_factory=IdentityStoreConfig,
        description=(
            "What the relay remembers per visitor and user for ad forwarders with enrich: true."
        ),
        examples=[{"enabled": True, "ttl_days": 90}],
    )
    google: GoogleConfig = Field(
        default_factory=GoogleConfig,
        description="GA4 (gtag hits, Measurement Protocol) and first-party Google scripts.",
        examples=[{"collect": {"measurement_ids": ["G-XXXX"]}}],
    )
    sdks: SdksConfig = Field(
        default_factory=SdksConfig,
        description="Settings documents and libraries for Segment and RudderStack SDKs.",
        examples=[{"segment": {"library_dir": "/opt/analytics-next/dist/umd"}}],
    )
    demo: DemoConfig = Field(
        default_factory=DemoConfig, description="The demo page.", examples=[{"enabled": True}]
    )
    admin: AdminConfig = Field(
        default_factory=AdminConfig,
        description="The admin listener: /metrics and the admin API, apart from ingest.",
        examples=[{"listen": "127.0.0.1:9100", "token": "${TAGRELAY_ADMIN_TOKEN:-}"}],
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig,
        description="Where /metrics is served.",
        examples=[{"public": False}],
    )
    debug: DebugConfig = Field(
        default_factory=DebugConfig,
        description="The live debug view on the admin listener.",
        examples=[{"sample_rate": 0, "buffer_events": 500}],
    )
    delivery: DeliveryConfig = Field(
        default_factory=DeliveryConfig,
        description="Where the HTTP forwarders run.",
        examples=[{"process": True}],
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
        host_owner: dict[str, str] = {}
        for key in keys:
            if key.id in seen_ids:
                raise ValueError(f"key id {key.id!r} is used twice")
            value = key.key.get_secret_value()
            if value in seen_values:
                raise ValueError(f"key {key.id!r} has the same value as another key")
            for host in key.hosts:
                if host in host_owner:
                    raise ValueError(
                        f"host {host!r} is claimed by keys {host_owner[host]!r} and {key.id!r}; "
                        "a host maps to one key"
                    )
                host_owner[host] = key.id
            seen_ids.add(key.id)
            seen_values.add(value)
        return keys

    @model_validator(mode="after")
    def _demo_key_exists(self) -> Config:
        if self.demo.enabled:
            browser = [k.id for k in self.keys if k.kind == "browser"]
            if not browser:
                raise ValueError("demo.enabled needs a browser key in keys")
            if self.demo.key and self.demo.key not in browser:
                raise ValueError(
                    f"demo.key {self.demo.key!r} is not a browser key; browser keys: "
                    + ", ".join(browser)
                )
        return self

    @model_validator(mode="after")
    def _script_paths_are_free(self) -> Config:
        taken = {self.paths.script, self.paths.events, self.paths.identity, self.paths.demo}
        reserved = RESERVED_PATHS
        for entry in self.google.scripts.ids:
            path = entry.path
            if path is None:
                continue
            if path in taken or any(path == r or path.startswith(r + "/") for r in reserved):
                raise ValueError(
                    f"google.scripts path {path!r} for {entry.id} is taken by another endpoint"
                )
            taken.add(path)
        return self

    @model_validator(mode="after")
    def _gateway_paths_are_free(self) -> Config:
        # A gateway path owns everything below it: nothing else may start there, and it
        # may not start inside a built-in endpoint. /metrics is free while the relay's own
        # metrics stay off the public listener (metrics.public).
        others = [self.paths.script, self.paths.events, self.paths.identity, self.paths.demo]
        others += [e.path for e in self.google.scripts.ids if e.path is not None]
        reserved = [r for r in RESERVED_PATHS if not (r == "/metrics" and not self.metrics.public)]
        for route in self.google.gateway.routes:
            path = route.path
            if any(path == r or path.startswith(r + "/") for r in reserved) or any(
                other == path or other.startswith(path + "/") for other in others
            ):
                raise ValueError(
                    f"google.gateway path {path!r} is taken by another endpoint"
                    + (" (metrics.public serves /metrics)" if path == "/metrics" else "")
                )
        return self

    @model_validator(mode="after")
    def _identity_store_fits(self) -> Config:
        problems = []
        for fwd in self.forwarders:
            if self.identity_store.enabled and fwd.id == IDENTITY_WRITER_ID:
                problems.append(
                    f"forwarder id {IDENTITY_WRITER_ID!r} is the identity store's own while "
                    "identity_store.enabled: choose another"
                )
            if getattr(fwd, "enrich", False) and not self.identity_store.enabled:
                problems.append(
                    f"forwarders.{fwd.id}.enrich reads the identity store: set "
                    "identity_store.enabled: true"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def secrets(self) -> list[str]:
        """Every secret of the configuration: the values of its ``SecretStr`` fields (write
        keys, the admin token, API secrets, forwarders' tokens) and of the headers a
        forwarder is told to send (a webhook's). For what must never show them: the debug
        view scrubs them out of all it shows, as a last guard."""
        found: list[str] = []
        _collect_secrets(self, found)
        return sorted({s for s in found if s})

    def demo_key(self) -> WriteKeyConfig | None:
        """The browser key the demo page uses."""
        for key in self.keys:
            if key.kind == "browser" and (not self.demo.key or key.id == self.demo.key):
                return key
        return None

    @field_validator("forwarders")
    @classmethod
    def _unique_forwarders(cls, forwarders: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for fwd in forwarders:
            if fwd.id in seen:
                raise ValueError(f"forwarder id {fwd.id!r} is used twice")
            seen.add(fwd.id)
        return forwarders


def _collect_secrets(value: Any, found: list[str], name: str = "") -> None:
    if isinstance(value, SecretStr):
        found.append(value.get_secret_value())
    elif isinstance(value, ConfigModel):
        for field_name in type(value).model_fields:
            _collect_secrets(getattr(value, field_name), found, field_name)
    elif isinstance(value, dict):
        for item in value.values():
            if name == "headers" and isinstance(item, str):
                found.extend(header_secrets(item))
            else:
                _collect_secrets(item, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _collect_secrets(item, found)
