"""``tagrelay forget`` and ``tagrelay export``: an erasure or access request for one person,
across every store (``privacy.requests``); and ``tagrelay privacy report``, the data map
(``privacy.report``).

``forget --user-id U | --anonymous-id A | --email E`` deletes the person those ids lead to
from the identity store, the warehouse (their rows and those of their linked anonymous
ids), the events still in the spool and the dead letters, and prints how many rows each
store deleted; with ``--suppress`` their future events are dropped at ingest
(``pipeline.suppression``). ``export`` prints, as JSON, everything each store holds about
them.

While ``tagrelay serve`` runs on the same data directory, the request goes through its admin
socket (``POST /privacy/forget``, ``/privacy/export``: ``web.admin_identity``), which writes
the audit line; when no relay answers, the files are opened here (the spool holding its
lock, with the configuration's ``encryption.keys``), and the audit line goes to stderr.
Exit status: 0 done (also when nothing was found), 1 a store could not be opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from tagrelay.app import admin_socket_path, identity_settings
from tagrelay.cli.logs import setup_logging
from tagrelay.cli.relay_admin import Failed, NoRelay, ask, open_spool, spool_for_writing
from tagrelay.config.models import Config
from tagrelay.crypto import CryptoError
from tagrelay.errors import EncryptionKeyError, IdentityStoreError, WarehouseError
from tagrelay.forwarders.warehouse import WarehouseConfig, database_path
from tagrelay.identity_store import FILE_NAME as IDENTITY_FILE
from tagrelay.identity_store import IdentityStore
from tagrelay.model.subject import Subject
from tagrelay.pipeline.suppression import Suppression, privacy_salt, salted_ref
from tagrelay.privacy.report import build_report, render_text
from tagrelay.privacy.requests import Stores, audit_fields, count_of, export, forget
from tagrelay.spool import erasure
from tagrelay.spool.backend import spool_path
from tagrelay.spool.encryption import PayloadCipher, check_keys, stored_key_ids
from tagrelay.warehouse import Warehouse

audit = logging.getLogger("tagrelay.audit")


class OfflineSpool:
    """The spool file when no relay runs: erased holding its lock, read read-only."""

    def __init__(self, path: Path, cipher: PayloadCipher) -> None:
        self.path = path
        self.cipher = cipher

    def _erase(self, subject: Subject) -> dict[str, int]:
        with spool_for_writing(self.path) as conn:
            check_keys(stored_key_ids(conn), self.cipher, str(self.path))
            return erasure.erase_offline(conn, self.cipher, subject)

    async def erase(self, subject: Subject) -> dict[str, int]:
        return await asyncio.to_thread(self._erase, subject)

    def _export(self, subject: Subject) -> dict[str, Any]:
        with contextlib.closing(open_spool(self.path)) as conn:
            return erasure.export(conn, self.cipher, subject)

    async def export_subject(self, subject: Subject) -> dict[str, Any]:
        return await asyncio.to_thread(self._export, subject)


def _warehouses(config: Config, data_dir: Path, *, writable: bool) -> Iterator[Warehouse]:
    for forwarder in config.forwarders:
        if not isinstance(forwarder, WarehouseConfig) or not forwarder.enabled:
            continue
        if forwarder.dialect == "duckdb" and not database_path(forwarder, data_dir).exists():
            continue
        salt = forwarder.hash_pii_salt
        yield Warehouse.open(
            forwarder.dialect,
            forwarder.target(data_dir),
            table=forwarder.table,
            max_columns=forwarder.max_columns,
            read_only=not writable,
            settings=forwarder.engine_settings(read_only=not writable),
            hash_pii_salt=salt.get_secret_value().encode()
            if forwarder.hash_pii and salt is not None
            else None,
        )


async def _here(config: Config, data_dir: Path, action: str, args: dict[str, Any]) -> Any:
    ids: dict[str, str] = {k: v for k, v in args.items() if k != "suppress"}
    stores = Stores()
    identity: IdentityStore | None = None
    warehouses: list[Warehouse] = []
    settings = identity_settings(config)
    try:
        if settings is not None and (data_dir / IDENTITY_FILE).exists():
            identity = stores.identity = await settings.open(data_dir, writer=True)
        warehouses = list(_warehouses(config, data_dir, writable=action == "forget"))
        stores.warehouses = warehouses
        if spool_path(data_dir).exists():
            stores.spool = OfflineSpool(
                spool_path(data_dir), PayloadCipher(config.encryption.keyring())
            )
        who = {"uid": os.getuid(), "user": getpass.getuser()}
        ref = salted_ref(privacy_salt(data_dir), ids)
        if action == "forget":
            subject, counts = await forget(ids, stores)
            if args.get("suppress"):
                counts["suppression"] = {"added": Suppression.load(data_dir).add(subject)}
            audit.info("erasure request", extra=audit_fields(ids, ref, who, counts))
            return counts
        found = await export(ids, stores)
        sizes = {store: count_of(store, result) for store, result in found.items()}
        audit.info("access request", extra=audit_fields(ids, ref, who, sizes))
        return found
    finally:
        for warehouse in warehouses:
            warehouse.close()
        if identity is not None:
            await identity.close()


def run_privacy(
    config: Config, data_dir: Path | None, action: str, ids: dict[str, str], suppress: bool = False
) -> int:
    """``tagrelay forget`` (``action`` forget) or ``export``; prints the result as JSON."""
    data_dir = data_dir or config.data_dir
    if config.spool.type != "sqlite":
        # as the running relay answers: not done in part while events wait in the stream
        print(
            "error: not_supported: erasure and access do not reach the jetstream spool yet; "
            "its events leave the stream after spool.max_age_secs",
            file=sys.stderr,
        )
        return 1
    body: dict[str, Any] = {**ids, "suppress": True} if suppress else dict(ids)
    try:
        answer = asyncio.run(
            ask(
                admin_socket_path(data_dir),
                "POST",
                f"/privacy/{action}",
                body=body,
                timeout_secs=300,
            )
        )
    except NoRelay:
        setup_logging(config.logging.level, config.logging.format)
        try:
            answer = {"stores": asyncio.run(_here(config, data_dir, action, body))}
        except (
            Failed,
            IdentityStoreError,
            WarehouseError,
            EncryptionKeyError,
            CryptoError,
        ) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if "error" in answer:
        print(f"error: {answer.get('error')}: {answer.get('message')}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
    return 0


def run_report(config: Config, data_dir: Path | None, fmt: str) -> int:
    """``tagrelay privacy report``: the running relay's data map, or the file's."""
    data_dir = data_dir or config.data_dir
    try:
        report = asyncio.run(ask(admin_socket_path(data_dir), "GET", "/privacy/report"))
        via = "the running relay's configuration"
    except NoRelay:
        report, via = build_report(config, data_dir), "the configuration file (no relay runs)"
    if "error" in report:
        print(f"error: {report.get('error')}: {report.get('message')}", file=sys.stderr)
        return 1
    if fmt == "json":
        print(orjson.dumps({**report, "from": via}, option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"tagrelay privacy report, from {via}\n\n{render_text(report)}")
    return 0
