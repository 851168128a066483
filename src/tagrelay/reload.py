"""Hot reload: on ``SIGHUP`` (``cli.serve``) or ``tagrelay reload`` (``POST /reload`` on the
admin API, ``web.admin_reload``), the relay reads its configuration file again and applies
what changed while it runs, without dropping a request or an event::

    read and validate (config.loader)    invalid: nothing changes; every problem is logged,
                                         answered and counted (outcome ``invalid``)
    settings that need a restart         kept as they are, named in the log and the answer
      (``RESTART_ONLY``: the listeners,
      data_dir, the spool's storage, ...)
    forwarders (forwarders._fleet)       removed: stopped after their batch in flight, their
                                         cursors kept; changed: worker restarted on its
                                         cursor; new: from the head (or ``start: earliest``)
    the debug view's settings, and the   capture.DebugHub.configure: the sample rate, the
    secrets it scrubs                    rings' size, every secret of the new file
    keys, origins, limits, pipeline      IngestService.reconfigure: for the requests from now
    paths.script, .events, .identity     web.paths.ConfiguredPaths: a new table of routes
    GA4 endpoints, SDK settings,         their owners' ``reconfigure``; maintenance reads
    log level, maintenance periods       the current configuration each round

Requests in flight finish with what they started with; events already acknowledged are on
disk and stay there for the forwarders that had them to deliver. Reloads run one at a time.
Each one is counted in ``tagrelay_config_reload_total{outcome}``: ``applied``, ``unchanged``
(nothing a reload applies changed), ``invalid``, ``failed`` (valid, but part of it could not
be applied: a forwarder that did not start; the rest was applied).

The file is the one the relay started with (``Reloader.config_file``), and ``${VAR}`` in it
reads the relay's environment, which a reload cannot change.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from tagrelay.appkeys import CAPTURE, CONFIG, DELIVERY_LOOP, FLEET, INGEST, METRICS, WORKERS
from tagrelay.config.common import ConfigModel, ForwarderConfigBase
from tagrelay.config.loader import format_config_error, load_config
from tagrelay.config.models import Config
from tagrelay.errors import ConfigError
from tagrelay.forwarders._http import scrub_secrets
from tagrelay.pipeline.run import Pipeline
from tagrelay.web.google import GoogleEndpoints
from tagrelay.web.paths import ConfiguredPaths, configured_routes
from tagrelay.web.sdks import SdkEndpoints

__all__ = ["RELOADER", "RESTART_ONLY", "ReloadReport", "Reloader", "changed_settings"]

log = logging.getLogger(__name__)

RESTART_ONLY = (
    "data_dir",
    "server.host",
    "server.port",
    "server.base_path",
    "server.shutdown_timeout_secs",
    "server.event_loop",
    "server.header_timeout_secs",
    "server.body_timeout_secs",
    "server.keepalive_timeout_secs",
    "server.max_connections",
    "server.listen_backlog",
    "limits.max_request_bytes",
    "spool.synchronous",
    "spool.max_size_mb",
    "spool.dedup_window_secs",
    "spool.dedup_max_ids",
    "spool.type",
    "spool.servers",
    "spool.stream",
    "spool.replicas",
    "spool.max_age_secs",
    "spool.max_bytes",
    "spool.duplicate_window_secs",
    "spool.ack_wait_secs",
    "logging.format",
    "paths.demo",
    "demo",
    "google.scripts",
    "google.gateway",
    "admin",
    "metrics",
    "delivery",
    "encryption",
    "identity_store",
)
"""Settings a running relay cannot take: its listeners and their connection handling, the
data directory and how the spool stores, where the forwarders run, the routes registered
once (the demo page, Google's scripts, the Google tag gateway, /metrics). A reload leaves
them as they are and says so; the rest of the file is applied."""

RESTART_TO_TOGGLE = ("google.collect.measurement_ids", "google.measurement_protocol")
"""Lists a reload may change but not empty or fill: their endpoint's routes exist only when
they were set at start-up."""

PIPELINE_SETTINGS = (
    "server.trusted_proxies",
    "limits",
    "consent",
    "identity",
    "privacy",
    "google.server_client_id",
)
"""What ``pipeline.run.Pipeline`` is made from."""


def _get(model: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        model = getattr(model, name)
    return model


def _with(model: BaseModel, dotted: str, value: Any) -> Any:
    """``model`` with the setting at ``dotted`` set to ``value`` (models are frozen)."""
    name, _, rest = dotted.partition(".")
    if rest:
        value = _with(getattr(model, name), rest, value)
    return model.model_copy(update={name: value})


def changed_settings(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ between ``old`` and ``new``, as deep as
    both are sections (a list, such as ``keys``, is one setting). Names only, never values
    (some are secrets)."""
    changed: list[str] = []
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if isinstance(before, ConfigModel) and type(before) is type(after):
            changed += changed_settings(before, after, f"{prefix}{name}.")
        else:
            changed.append(prefix + name)
    return changed


def _by_id(items: list[Any]) -> dict[str, Any]:
    return {item.id: item for item in items}


def _id_changes(old: list[Any], new: list[Any]) -> dict[str, list[str]]:
    before, after = _by_id(old), _by_id(new)
    return {
        "added": [i for i in after if i not in before],
        "removed": [i for i in before if i not in after],
        "changed": [i for i in after if i in before and after[i] != before[i]],
    }


def _enabled(config: Config) -> list[ForwarderConfigBase]:
    return [f for f in config.forwarders if f.enabled]


@dataclass
class ReloadReport:
    """What a reload did: the answer of ``POST /reload`` and the fields of its log line."""

    outcome: str
    config_file: str | None = None
    problems: list[str] = field(default_factory=list)
    """invalid: every problem of the file; failed: what could not be applied."""
    needs_restart: list[str] = field(default_factory=list)
    """Settings the file changes that take effect only after a restart."""
    changed: list[str] = field(default_factory=list)
    """The settings applied (dotted names)."""
    keys: dict[str, list[str]] = field(default_factory=dict)
    """Write key ids added, removed and changed."""
    forwarders: dict[str, list[str]] = field(default_factory=dict)
    """Forwarder ids added, removed and changed (restarted)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "config_file": self.config_file,
            "problems": self.problems,
            "needs_restart": self.needs_restart,
            "changed": self.changed,
            "keys": self.keys,
            "forwarders": self.forwarders,
        }


class Reloader:
    """Reloads the configuration of a running relay (see the module docstring) and holds
    the configuration in effect (``config``: the one it started with, then each reload's,
    less what needs a restart)."""

    def __init__(
        self,
        app: web.Application,
        *,
        paths: ConfiguredPaths,
        google: GoogleEndpoints,
        sdks: SdkEndpoints,
        config_file: Path | None = None,
    ) -> None:
        self.app = app
        self.config: Config = app[CONFIG]
        self.paths = paths
        self.google = google
        self.sdks = sdks
        self.config_file = config_file
        """The file to read again (``tagrelay serve`` sets it); None: reloads fail."""
        self._lock: asyncio.Lock | None = None

    async def reload(self, trigger: str = "api") -> ReloadReport:
        """Read the file again and apply it; one reload at a time. ``trigger`` (``signal``,
        ``api``) is logged."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                report = await self._reload()
            except Exception as exc:
                log.exception("configuration reload failed")
                report = ReloadReport(
                    "failed",
                    str(self.config_file),
                    problems=[f"{type(exc).__name__}: {exc}"],
                )
        self.app[METRICS].config_reloads.labels(report.outcome).inc()
        self._log(report, trigger)
        return report

    async def _reload(self) -> ReloadReport:
        path = self.config_file
        if path is None:
            return ReloadReport(
                "failed",
                problems=["the relay was not started from a configuration file"],
            )
        source = str(path)
        try:
            new = await asyncio.to_thread(load_config, path)
        except ConfigError as exc:
            return ReloadReport("invalid", source, problems=format_config_error(exc).splitlines())
        old = self.config
        effective, needs_restart = self._keep_restart_only(old, new)
        if needs_restart:
            try:
                effective = Config.model_validate(effective.model_dump())
            except ValidationError as exc:
                problems = [
                    f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']} (with the "
                    "settings that need a restart kept as they are: "
                    + ", ".join(needs_restart)
                    + ")"
                    for e in exc.errors()
                ]
                return ReloadReport("invalid", source, problems=problems)
        report = ReloadReport("unchanged", source, needs_restart=needs_restart)
        if effective == old:
            return report
        report.changed = changed_settings(old, effective)
        report.keys = _id_changes(old.keys, effective.keys)
        report.forwarders = _id_changes(_enabled(old), _enabled(effective))
        effective = await self._apply(old, effective, report)
        self.config = effective
        report.outcome = "failed" if report.problems else "applied"
        return report

    @staticmethod
    def _keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
        """``new`` with the settings that need a restart as they are in ``old``, and the
        names of those that differ."""
        needs_restart: list[str] = []
        for name in RESTART_ONLY:
            if _get(old, name) != _get(new, name):
                needs_restart.append(name)
                new = _with(new, name, _get(old, name))
        for name in RESTART_TO_TOGGLE:
            before, after = _get(old, name), _get(new, name)
            if bool(before) != bool(after):
                needs_restart.append(name)
                new = _with(new, name, before)
        return new, needs_restart

    async def _apply(self, old: Config, new: Config, report: ReloadReport) -> Config:
        """Apply ``new`` where it differs from ``old``; returns the configuration in effect
        (``new``, less the forwarders that did not start)."""
        app = self.app

        def differs(*names: str) -> bool:
            return any(_get(old, name) != _get(new, name) for name in names)

        if differs("logging.level"):
            logging.getLogger().setLevel(new.logging.level.upper())
            await app[DELIVERY_LOOP].call(app[FLEET].refresh_process())  # its level too
        if _by_id(_enabled(old)) != _by_id(_enabled(new)):
            change = await app[DELIVERY_LOOP].call(app[FLEET].apply(_enabled(new)))
            # Here, on the relay's loop, where everything that reads the workers runs.
            workers = app[WORKERS]
            for fid in [fid for fid in workers if fid not in change.workers]:
                del workers[fid]
            workers.update(change.workers)
            if change.failed:
                report.problems += [
                    f"forwarders.{fid}: did not start: {error}"
                    for fid, error in change.failed.items()
                ]
                running = _by_id(change.configs)
                new = new.model_copy(
                    update={
                        "forwarders": [
                            running.get(f.id, f) if f.enabled else f
                            for f in new.forwarders
                            if not f.enabled or f.id in running
                        ]
                    }
                )
        service = app[INGEST]
        if differs("keys", *PIPELINE_SETTINGS):
            pipeline = service.pipeline
            if differs(*PIPELINE_SETTINGS):
                pipeline = await asyncio.to_thread(_pipeline, new)
            service.reconfigure(new, pipeline)
        if differs("paths", "script"):
            self.paths.set_routes(configured_routes(new, service))
        if differs("google", "limits"):
            self.google.reconfigure(new)
        if differs("sdks", "limits"):
            self.sdks.reconfigure(new)
        # Every secret of the new file (keys, tokens, forwarders' secrets) is scrubbed from
        # what the debug view shows.
        await app[CAPTURE].configure(
            sample_rate=new.debug.sample_rate,
            buffer_events=new.debug.buffer_events,
            scrub=functools.partial(scrub_secrets, secrets=new.secrets()),
        )
        return new

    def _log(self, report: ReloadReport, trigger: str) -> None:
        fields: dict[str, Any] = {
            "trigger": trigger,
            "outcome": report.outcome,
            "config_file": report.config_file,
        }
        if report.outcome == "invalid":
            for problem in report.problems:
                log.error("invalid configuration: %s", problem, extra=fields)
            log.error(
                "configuration not reloaded: the relay runs on as it was",
                extra={**fields, "problems": len(report.problems)},
            )
            return
        if report.needs_restart:
            log.warning(
                "these settings changed and take effect only after a restart: %s",
                ", ".join(report.needs_restart),
                extra={**fields, "needs_restart": ", ".join(report.needs_restart)},
            )
        for problem in report.problems:
            log.error("configuration reload: %s", problem, extra=fields)
        if report.outcome == "unchanged":
            log.info("configuration reloaded: nothing to apply", extra=fields)
            return
        for what, changes in (("keys", report.keys), ("forwarders", report.forwarders)):
            for kind, ids in changes.items():
                if ids:
                    fields[f"{what}_{kind}"] = ", ".join(ids)
        log.info(
            "configuration reloaded",
            extra={**fields, "changed": ", ".join(report.changed)},
        )


def _pipeline(config: Config) -> Pipeline:
    """A pipeline for ``config``, ready for requests (made off the event loop)."""
    pipeline = Pipeline(config)
    if pipeline.identity is not None:
        pipeline.identity.load_suffix_list()
    return pipeline


RELOADER = web.AppKey("reloader", Reloader)
"""The relay's ``Reloader`` (``create_app``)."""
