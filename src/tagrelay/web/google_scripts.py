"""First-party gtag.js and gtm.js: Google's tag scripts, proxied, cached and renamable.

Blocklists match ``/gtag/js`` and ``/gtm.js?id=GTM-`` on any host, and browsers treat a
script from the site's own origin better than one from www.googletagmanager.com. The relay
therefore serves those scripts itself, for the tag ids its configuration allows
(``google.scripts.ids``), under the well-known paths and under a renamed path per id:

- ``GET {prefix}/gtag/js?id=G-XXXX`` (also ``AW-`` and ``DC-`` ids) is
  ``{upstream}/gtag/js?id=G-XXXX``;
- ``GET {prefix}/gtm.js?id=GTM-XXXX`` is ``{upstream}/gtm.js?id=GTM-XXXX``;
- ``GET {prefix}{path}`` for an entry ``{id: G-XXXX, path: /assets/site.js}`` serves that id's
  script (gtag for ``G-``/``AW-``/``DC-``, gtm for ``GTM-``) without any query string.

HEAD works on each. An id that is not allowed, missing, repeated or malformed gets a 404 JSON
``{"error": code, "message": text}`` and never reaches the upstream.

What a site changes
-------------------
gtag.js, with the relay at ``https://data.example.com`` (or mounted at
``https://www.example.com/t``: then that is the origin to use everywhere below)::

    <script async src="https://data.example.com/assets/site.js"></script>
    <script>
      window.dataLayer = window.dataLayer || [];
      function gtag(){dataLayer.push(arguments);}
      gtag('js', new Date());
      gtag('config', 'G-XXXX', {server_container_url: 'https://data.example.com'});
    </script>

``server_container_url`` (``transport_url`` is its older name; either works) makes GA4 send
its hits to ``<that URL>/g/collect``: the relay's GA4 endpoint. ``src`` may equally be
``https://data.example.com/gtag/js?id=G-XXXX``; the renamed path is what blocklists miss.

gtm.js: in the GTM snippet, replace ``'https://www.googletagmanager.com/gtm.js?id='+i+dl``
with ``'https://data.example.com/gtm.js?id='+i+dl``, or with the renamed path:
``'https://data.example.com/assets/app.js'+(l!='dataLayer'?'?l='+l:'')``. In the container,
set ``server_container_url`` on the Google tag (the GA4 configuration) as above. The
``<noscript>`` iframe (``ns.html``) is not proxied.

Query parameters
----------------
The upstream URL is built from ``upstream`` in the configuration, the script's fixed path and
the validated id only; nothing in the request chooses the host or the path, and the browser's
headers and cookies are not forwarded. One parameter passes through: ``l``, the name of a
renamed dataLayer, when it is ``dataLayer`` (the default, sent upstream as no parameter at all)
or one of ``data_layers`` in the configuration. Any other ``l`` is a 404. Every other
parameter (``gtm_auth``, ``gtm_preview``, ``gtm_cookies_win``, ``cx``, ``gtm``, cache busters)
is ignored: GTM environments and preview load from Google directly, and each accepted variant
is a separate cache entry, so the set of variants stays as small as the configuration.

Caching
-------
Each (id, data layer) has one cached version in memory and in ``cache_dir`` (the script and a
small JSON sidecar, written atomically; a copy from another ``upstream`` is ignored). A
version is fresh for ``ttl_secs`` after it was fetched or revalidated upstream (with
``If-None-Match`` / ``If-Modified-Since`` when the upstream gave an ETag or a Last-Modified).
A request for an expired or missing version fetches it; concurrent requests for the same
script wait for that one fetch. The response is read in chunks and abandoned past
``max_bytes``. When the fetch fails (connection error, timeout, a status other than 200, a
type that is not JavaScript, too large), a copy fetched less than ``stale_max_age_secs`` ago is
served and the upstream is not asked again for ``FAILURE_BACKOFF_SECS``; with no such copy the
answer is a 502 JSON. The disk copy survives a restart: a relay started while the upstream is
unreachable still serves it (as stale once its TTL is over).

Each version is gzipped once; the browser gets gzip or identity by ``Accept-Encoding``, a
strong ETag per representation (a hash of the content), a 304 on ``If-None-Match``, and
``Cache-Control: public, max-age=min(ttl_secs, BROWSER_MAX_AGE_SECS)`` (``STALE_MAX_AGE_SECS``
for a stale copy, so browsers come back soon after the upstream does).

Outcomes (``on_event(kind, outcome)``, ``kind`` is ``gtag`` or ``gtm``)
----------------------------------------------------------------------
One per browser request: ``hit`` (served from the cache without a fetch of its own, also after
waiting for another request's fetch), ``miss`` (nothing was cached; fetched), ``refreshed``
(an expired copy was fetched again or revalidated), ``stale_served``, ``unavailable`` (the
502), ``not_allowed`` (the 404). One per failed upstream fetch: ``upstream_error`` or
``too_large``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal

import aiohttp
from aiohttp import hdrs, web
from multidict import MultiMapping
from yarl import URL

from tagrelay.config.google_scripts import (
    DATA_LAYER_PATTERN,
    TAG_ID_PATTERN,
    UPSTREAM_PATHS,
    GoogleScriptsConfig,
    ScriptKind,
)
from tagrelay.datadir import open_private, private_dir
from tagrelay.web.script import accepts_gzip, etag_matches, strong_etag

__all__ = [
    "BROWSER_MAX_AGE_SECS",
    "FAILURE_BACKOFF_SECS",
    "STALE_MAX_AGE_SECS",
    "GoogleScripts",
    "Rejection",
    "ScriptKey",
    "Served",
    "add_google_script_routes",
    "default_session_factory",
]

log = logging.getLogger(__name__)

FetchFailure = Literal["upstream_error", "too_large"]

DEFAULT_DATA_LAYER: Final = "dataLayer"
CONTENT_TYPE: Final = "text/javascript; charset=utf-8"
JAVASCRIPT_TYPES: Final = frozenset(
    {
        "text/javascript",
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "text/ecmascript",
    }
)

BROWSER_MAX_AGE_SECS: Final = 900
"""Cap on the browser's max-age for a fresh script (Google's own is 900 s)."""
STALE_MAX_AGE_SECS: Final = 60
"""The browser's max-age for a stale copy."""
FAILURE_BACKOFF_SECS: Final = 10.0
"""After a failed fetch, requests for that script get the stale copy (or the 502) without
asking the upstream again for this long: a hanging upstream does not hold every request."""
READ_CHUNK_BYTES: Final = 64 * 1024

_TAG_ID = re.compile(TAG_ID_PATTERN.removesuffix("$"))
_DATA_LAYER = re.compile(DATA_LAYER_PATTERN.removesuffix("$"))


# ---------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class ScriptKey:
    """One cached script: a tag id and the data layer it was requested with."""

    kind: ScriptKind
    tag_id: str
    data_layer: str | None
    """None for the default ``dataLayer``."""

    def upstream_url(self, upstream: URL) -> URL:
        query = {"id": self.tag_id}
        if self.data_layer is not None:
            query["l"] = self.data_layer
        return upstream.with_path(UPSTREAM_PATHS[self.kind]).with_query(query)

    def file_stem(self) -> str:
        # Safe as a file name: the id and the layer name were checked against their patterns.
        stem = f"{self.kind}-{self.tag_id}"
        return stem if self.data_layer is None else f"{stem}-l-{self.data_layer}"


@dataclass(frozen=True)
class Rejection:
    """Why a request names no servable script (-> 404)."""

    code: str
    message: str


@dataclass(frozen=True)
class _Version:
    """A cached script as served: both representations, their ETags, and its provenance."""

    body: bytes
    gzipped: bytes
    etag: str
    gzip_etag: str
    fetched_at: float
    """Clock time of the last fetch or revalidation upstream (wall clock: kept on disk)."""
    upstream_etag: str | None
    upstream_last_modified: str | None


@dataclass
class _Slot:
    version: _Version | None = None
    loaded: bool = False
    """Whether the disk copy has been looked for."""
    failed_at: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class Served:
    """What one request gets: a version (None: 502) and its outcome."""

    version: _Version | None
    outcome: str
    fresh: bool


def _build_version(
    body: bytes,
    fetched_at: float,
    upstream_etag: str | None,
    upstream_last_modified: str | None,
) -> _Version:
    """Gzip and hash ``body`` (blocking: run in a thread)."""
    return _Version(
        body=body,
        gzipped=gzip.compress(body, compresslevel=9, mtime=0),
        etag=strong_etag(body),
        gzip_etag=strong_etag(body, "-gz"),
        fetched_at=fetched_at,
        upstream_etag=upstream_etag,
        upstream_last_modified=upstream_last_modified,
    )


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(open_private(temporary, os.O_WRONLY | os.O_TRUNC), "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def default_session_factory() -> aiohttp.ClientSession:
    """The HTTP client for upstream fetches (created and closed with the application)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=20, ttl_dns_cache=300),
        headers={hdrs.USER_AGENT: "tagrelay"},
    )


def _ignore_event(kind: str, outcome: str) -> None:
    pass


Handler = Callable[[web.Request], Awaitable[web.Response]]


class GoogleScripts:
    """The allow-list, the two-level cache and the upstream fetches behind the routes."""

    def __init__(
        self,
        config: GoogleScriptsConfig,
        cache_dir: Path,
        *,
        on_event: Callable[[str, str], None] = _ignore_event,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self._on_event = on_event
        self._clock = clock
        self._upstream = URL(config.upstream)
        self._allowed: dict[ScriptKind, frozenset[str]] = {
            kind: frozenset(e.id for e in config.ids if e.kind == kind) for kind in UPSTREAM_PATHS
        }
        self._data_layers = frozenset(config.data_layers)
        self._slots: dict[ScriptKey, _Slot] = {}
        self._session: aiohttp.ClientSession | None = None
        self.browser_max_age_secs = min(config.ttl_secs, BROWSER_MAX_AGE_SECS)

    # -- lifecycle

    def client_session_ctx(
        self, session_factory: Callable[[], aiohttp.ClientSession]
    ) -> Callable[[web.Application], AsyncIterator[None]]:
        """A ``cleanup_ctx`` item: the client session lives as long as the application."""

        async def client_session(app: web.Application) -> AsyncIterator[None]:
            session = self._session = session_factory()
            try:
                yield
            finally:
                self._session = None
                await session.close()

        return client_session

    # -- requests

    def resolve(
        self, kind: ScriptKind, query: MultiMapping[str], tag_id: str | None = None
    ) -> ScriptKey | Rejection:
        """The script a request names: ``tag_id`` for a renamed path, else its one ``id``
        parameter, which must be an allowed id of ``kind``; plus its ``l`` parameter."""
        if tag_id is None:
            ids = query.getall("id", [])
            if not ids:
                return Rejection("missing_id", "the id query parameter is required")
            if len(ids) > 1:
                return Rejection("malformed_id", "give exactly one id query parameter")
            tag_id = ids[0]
            if not _TAG_ID.fullmatch(tag_id):
                return Rejection("malformed_id", "id is not a Google tag id (G-, AW-, DC-, GTM-)")
            if tag_id not in self._allowed[kind]:
                return Rejection(
                    "id_not_allowed", f"this id is not in google.scripts.ids for {kind}"
                )
        layers = query.getall("l", [])
        if len(layers) > 1:
            return Rejection("malformed_data_layer", "give at most one l query parameter")
        layer = layers[0] if layers else None
        if layer == DEFAULT_DATA_LAYER:
            layer = None
        elif layer is not None and layer not in self._data_layers:
            if not _DATA_LAYER.fullmatch(layer):
                return Rejection("malformed_data_layer", "l is not a JavaScript identifier")
            return Rejection("data_layer_not_allowed", "l is not in google.scripts.data_layers")
        return ScriptKey(kind, tag_id, layer)

    def handler(self, kind: ScriptKind, tag_id: str | None = None) -> Handler:
        """The GET/HEAD handler of ``/gtag/js`` or ``/gtm.js`` (``tag_id`` None: from the
        query) or of a renamed path (``tag_id`` fixed)."""

        async def serve_google_script(request: web.Request) -> web.Response:
            key = self.resolve(kind, request.query, tag_id)
            if isinstance(key, Rejection):
                self._on_event(kind, "not_allowed")
                return _error_response(404, key.code, key.message)
            served = await self.get(key)
            self._on_event(kind, served.outcome)
            if served.version is None:
                return _error_response(
                    502,
                    "upstream_unavailable",
                    "the script could not be fetched from the upstream and no copy is cached",
                )
            max_age = self.browser_max_age_secs if served.fresh else STALE_MAX_AGE_SECS
            return _script_response(request, served.version, max_age)

        return serve_google_script

    async def get(self, key: ScriptKey) -> Served:
        """The version to serve for ``key``: cached when fresh, else fetched (one fetch at a
        time per key), else a stale copy when the fetch fails, else none."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots.setdefault(key, _Slot())
        version = slot.version
        if version is not None and self._is_fresh(version, self._clock()):
            return Served(version, "hit", fresh=True)
        async with slot.lock:
            if not slot.loaded:
                slot.version = await asyncio.to_thread(self._load, key)
                slot.loaded = True
            version = slot.version
            now = self._clock()
            if version is not None and self._is_fresh(version, now):
                return Served(version, "hit", fresh=True)
            backing_off = (
                slot.failed_at is not None and 0 <= now - slot.failed_at < FAILURE_BACKOFF_SECS
            )
            if not backing_off:
                result = await self._fetch(key, version)
                if isinstance(result, _Version):
                    slot.version = result
                    slot.failed_at = None
                    return Served(result, "miss" if version is None else "refreshed", fresh=True)
                slot.failed_at = self._clock()
                self._on_event(key.kind, result)
            if version is not None and now - version.fetched_at <= self.config.stale_max_age_secs:
                return Served(version, "stale_served", fresh=False)
            return Served(None, "unavailable", fresh=False)

    def _is_fresh(self, version: _Version, now: float) -> bool:
        # A copy from the future (the clock went back) is treated as expired, not as fresh.
        return 0 <= now - version.fetched_at < self.config.ttl_secs

    # -- upstream

    async def _fetch(self, key: ScriptKey, previous: _Version | None) -> _Version | FetchFailure:
        if self._session is None:
            raise RuntimeError("the application has not started: no HTTP client session")
        url = key.upstream_url(self._upstream)
        headers: dict[str, str] = {}
        if previous is not None:
            if previous.upstream_etag:
                headers[hdrs.IF_NONE_MATCH] = previous.upstream_etag
            if previous.upstream_last_modified:
                headers[hdrs.IF_MODIFIED_SINCE] = previous.upstream_last_modified
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_secs)
        try:
            async with self._session.get(
                url, headers=headers, allow_redirects=False, timeout=timeout
            ) as response:
                if response.status == 304 and previous is not None and headers:
                    body = previous.body
                    upstream_etag = response.headers.get(hdrs.ETAG, previous.upstream_etag)
                    last_modified = previous.upstream_last_modified
                elif response.status != 200:
                    return self._failed(key, "upstream_error", f"status {response.status}")
                elif response.content_type not in JAVASCRIPT_TYPES:
                    return self._failed(key, "upstream_error", "not JavaScript")
                else:
                    read = await self._read_capped(response)
                    if read is None:
                        return self._failed(key, "too_large", f"over {self.config.max_bytes} B")
                    if not read:
                        return self._failed(key, "upstream_error", "empty body")
                    body = read
                    upstream_etag = response.headers.get(hdrs.ETAG)
                    last_modified = response.headers.get(hdrs.LAST_MODIFIED)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._failed(key, "upstream_error", type(exc).__name__)
        if previous is not None and previous.body == body:
            # Revalidated (304) or fetched unchanged: same representations, new age.
            version = replace(
                previous,
                fetched_at=self._clock(),
                upstream_etag=upstream_etag,
                upstream_last_modified=last_modified,
            )
            await self._save(key, version, body_changed=False)
            return version
        version = await asyncio.to_thread(
            _build_version, body, self._clock(), upstream_etag, last_modified
        )
        await self._save(key, version, body_changed=True)
        return version

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes | None:
        """The body, or None as soon as it exceeds ``max_bytes`` (the rest is not read)."""
        limit = self.config.max_bytes
        declared = response.content_length
        if (
            declared is not None
            and declared > limit
            and hdrs.CONTENT_ENCODING not in response.headers
        ):
            return None
        body = bytearray()
        async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

    def _failed(self, key: ScriptKey, failure: FetchFailure, detail: str) -> FetchFailure:
        log.warning(
            "could not fetch a Google script; serving the cached copy if there is one",
            extra={"kind": key.kind, "tag_id": key.tag_id, "reason": failure, "detail": detail},
        )
        return failure

    # -- disk

    def _paths(self, key: ScriptKey) -> tuple[Path, Path]:
        stem = key.file_stem()
        return self.cache_dir / f"{stem}.js", self.cache_dir / f"{stem}.json"

    def _load(self, key: ScriptKey) -> _Version | None:
        """The disk copy of ``key`` (blocking: run in a thread), if it is whole and comes
        from the configured upstream."""
        script_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_bytes())
            body = script_path.read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable cached Google script", extra={"error": str(exc)})
            return None
        if not (
            isinstance(meta, dict)
            and meta.get("upstream_url") == str(key.upstream_url(self._upstream))
            and meta.get("sha256") == hashlib.sha256(body).hexdigest()
            and isinstance(meta.get("fetched_at"), int | float)
        ):
            return None
        etag, last_modified = meta.get("upstream_etag"), meta.get("upstream_last_modified")
        return _build_version(
            body,
            float(meta["fetched_at"]),
            etag if isinstance(etag, str) else None,
            last_modified if isinstance(last_modified, str) else None,
        )

    async def _save(self, key: ScriptKey, version: _Version, *, body_changed: bool) -> None:
        try:
            await asyncio.to_thread(self._write, key, version, body_changed)
        except OSError as exc:
            log.warning(
                "could not write a Google script to the disk cache; serving it from memory",
                extra={"path": str(self.cache_dir), "error": str(exc)},
            )

    def _write(self, key: ScriptKey, version: _Version, body_changed: bool) -> None:
        script_path, meta_path = self._paths(key)
        private_dir(self.cache_dir, owned=True)
        if body_changed or not script_path.exists():
            _write_atomically(script_path, version.body)
        meta = {
            "upstream_url": str(key.upstream_url(self._upstream)),
            "fetched_at": version.fetched_at,
            "sha256": hashlib.sha256(version.body).hexdigest(),
            "upstream_etag": version.upstream_etag,
            "upstream_last_modified": version.upstream_last_modified,
        }
        _write_atomically(meta_path, json.dumps(meta).encode())


# ---------------------------------------------------------------------------------------
# Responses


def _error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": code, "message": message},
        status=status,
        headers={hdrs.CACHE_CONTROL: "no-store", "X-Content-Type-Options": "nosniff"},
    )


def _script_response(request: web.Request, version: _Version, max_age: int) -> web.Response:
    gzipped = accepts_gzip(request.headers.get(hdrs.ACCEPT_ENCODING))
    headers = {
        hdrs.CACHE_CONTROL: f"public, max-age={max_age}",
        hdrs.VARY: "Accept-Encoding",
        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: "*",
        "X-Content-Type-Options": "nosniff",
        hdrs.ETAG: version.gzip_etag if gzipped else version.etag,
    }
    if_none_match = request.headers.get(hdrs.IF_NONE_MATCH)
    if if_none_match is not None and etag_matches(if_none_match, (version.etag, version.gzip_etag)):
        return web.Response(status=304, headers=headers)
    headers[hdrs.CONTENT_TYPE] = CONTENT_TYPE
    if gzipped:
        headers[hdrs.CONTENT_ENCODING] = "gzip"
    return web.Response(body=version.gzipped if gzipped else version.body, headers=headers)


# ---------------------------------------------------------------------------------------
# Wiring


def add_google_script_routes(
    app: web.Application,
    config: GoogleScriptsConfig,
    prefix: str,
    cache_dir: Path,
    *,
    on_event: Callable[[str, str], None] = _ignore_event,
    session_factory: Callable[[], aiohttp.ClientSession] = default_session_factory,
    clock: Callable[[], float] = time.time,
) -> GoogleScripts:
    """Serve the allowed Google scripts (GET and HEAD) at ``prefix + /gtag/js``,
    ``prefix + /gtm.js`` and each entry's renamed path, caching them in ``cache_dir``.

    Call it while building the application: it appends to ``app.cleanup_ctx`` the context
    that creates the upstream client session (``session_factory``, on the application's
    loop) and closes it on shutdown. ``on_event(kind, outcome)`` receives the outcomes listed
    in the module docstring; ``clock`` returns wall-clock seconds (cache ages survive a
    restart). Returns the service behind the routes.
    """
    scripts = GoogleScripts(config, cache_dir, on_event=on_event, clock=clock)
    app.cleanup_ctx.append(scripts.client_session_ctx(session_factory))
    for kind, path in UPSTREAM_PATHS.items():
        app.router.add_get(prefix + path, scripts.handler(kind), allow_head=True)
    for entry in config.ids:
        if entry.path is not None:
            app.router.add_get(
                prefix + entry.path, scripts.handler(entry.kind, entry.id), allow_head=True
            )
    return scripts
