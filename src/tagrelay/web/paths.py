"""The routes at the paths the configuration names (``paths.script``, ``paths.events``,
``paths.identity``), which a reload may rename while the relay runs.

aiohttp freezes its router once the application starts: no route can be added or removed
after that. So these routes are not registered one by one: one resource,
``ConfiguredPaths``, is, and it dispatches on a table of the current paths, which a reload
replaces whole (``set_routes``; one assignment, so a request sees the old table or the new
one, never a mix). Its canonical path has a placeholder, so the router asks it last, after
every route of a fixed path: a configured path can never hide a built-in endpoint (the
configuration keeps them apart anyway, ``config.models.RESERVED_PATHS``).

Each path of the table is an aiohttp ``PlainResource`` of its own, outside the router, so a
request matched here is what it was when the path was a route of the router: its method
checked (405 with ``Allow`` for another), its ``match_info.route`` named by its path (the
``route`` label of ``tagrelay_http_request_duration_seconds``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import AbstractResource, PlainResource, ResourceRoute, _InfoDict
from yarl import URL

from tagrelay import __version__
from tagrelay.config.models import Config
from tagrelay.web.ingest import IngestService, Route
from tagrelay.web.script import build_script, script_handler

__all__ = ["ConfiguredPaths", "configured_routes"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SCRIPT_EVENTS_ROUTE = Route("tagrelay", host_keys=True)
"""The relay's own events path: a keyless request takes the browser key claiming its host
(``keys[].hosts``), as on Jitsu's browser routes."""


def configured_routes(
    config: Config, service: IngestService, version: str = __version__
) -> dict[str, dict[str, Handler]]:
    """The handlers of the configured paths, by path (below ``server.base_path``) and
    method: the tracking script (built here: it names ``paths.events``), the events it
    sends, and the visitor's id."""
    script = script_handler(build_script(config, version), config.script.cache_max_age_secs)
    events = functools.partial(service.handle, route=SCRIPT_EVENTS_ROUTE, path_name="")
    return {
        config.paths.script: {hdrs.METH_GET: script, hdrs.METH_HEAD: script},
        config.paths.events: {hdrs.METH_POST: events, hdrs.METH_OPTIONS: service.preflight},
        config.paths.identity: {
            hdrs.METH_GET: service.identity_handler,
            hdrs.METH_OPTIONS: service.preflight,
        },
    }


class ConfiguredPaths(AbstractResource):
    """One resource of the router for every configured path (see the module docstring).
    Register it with ``router.register_resource``; fill it with ``set_routes``."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self._prefix = prefix
        self._table: dict[str, PlainResource] = {}

    def set_routes(self, routes: Mapping[str, Mapping[str, Handler]]) -> None:
        """Serve ``routes`` (handlers by path below the prefix, then by method) from now on,
        in place of the previous ones."""
        table: dict[str, PlainResource] = {}
        for path, methods in routes.items():
            resource = PlainResource(self._prefix + path)
            for method, handler in methods.items():
                resource.add_route(method, handler)
            table[self._prefix + path] = resource
        self._table = table

    @property
    def paths(self) -> list[str]:
        """The full paths served now."""
        return list(self._table)

    async def resolve(
        self, request: web.Request
    ) -> tuple[web.UrlMappingMatchInfo | None, set[str]]:
        resource = self._table.get(request.rel_url.path_safe)
        if resource is None:
            return None, set()
        return await resource.resolve(request)

    @property
    def canonical(self) -> str:
        # The placeholder puts this resource under the prefix in the router's index, where
        # it is asked after every fixed path.
        return self._prefix + "/{configured_path}"

    def url_for(self, **kwargs: str) -> URL:
        raise RuntimeError("the configured paths are found through the configuration")

    def add_prefix(self, prefix: str) -> None:
        self._prefix = prefix + self._prefix
        self.set_routes({})

    def get_info(self) -> _InfoDict:
        return {"formatter": self.canonical}

    def raw_match(self, path: str) -> bool:
        return path in self._table

    def __len__(self) -> int:
        return sum(len(resource) for resource in self._table.values())

    def __iter__(self) -> Iterator[ResourceRoute]:
        for resource in list(self._table.values()):
            yield from resource
