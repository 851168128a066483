"""The data map (``tagrelay privacy report``): where the relay keeps personal data, in what
fields, encrypted or not, for how long, and which forwarder receives which fields, hashed
or plain, under which consent. Built from a configuration (the running relay's, through
the admin socket's ``GET /privacy/report``, or the file's when no relay runs), and, for
the forwarders, from the tables they send by (``Forwarder.personal_data``: the conversions
layer's ``_user_data.RULES``, GA4's ``user_data`` fields, the warehouse's ``hash_pii``
keys), so that it changes when they do. ``render_text`` lays it out as tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tagrelay.config.models import Config
from tagrelay.forwarders import forwarder_class
from tagrelay.forwarders.warehouse import WarehouseConfig
from tagrelay.identity_store.config import CLICK_ID_DAYS

__all__ = ["build_report", "render_text"]

EVENT_FIELDS = (
    "userId, anonymousId, traits (email, phone, name, address, ...), properties, "
    "context.ip, context.userAgent, page URLs and referrers, click ids, browser ids"
)
"""The personal fields an event may carry, as the spool and the dead letters keep it."""


def _stores(config: Config, data_dir: Path) -> list[dict[str, Any]]:
    encrypted = bool(config.encryption.keys)
    at_rest = "AES-256-GCM (encryption.keys)" if encrypted else "no (encryption.keys is empty)"
    ip = "truncated" if config.privacy.truncate_ip else "as received"
    stores: list[dict[str, Any]] = [
        {
            "store": "spool",
            "where": str(data_dir / "spool.sqlite3"),
            "fields": f"{EVENT_FIELDS} (IP {ip})",
            "encrypted": at_rest,
            "kept": "until every forwarder has delivered or dead-lettered the event, "
            f"deleted within spool.prune_interval_secs ({config.spool.prune_interval_secs:g} s)",
        },
        {
            "store": "dead_letters",
            "where": str(data_dir / "spool.sqlite3") + " (table dead_letters)",
            "fields": f"{EVENT_FIELDS}; the destination's answer",
            "encrypted": at_rest,
            "kept": f"dead_letters.retention_days ({config.dead_letters.retention_days:g} days)",
        },
    ]
    identity = config.identity_store
    if identity.enabled:
        windows = {**CLICK_ID_DAYS, **identity.click_id_days}
        stores.append(
            {
                "store": "identity_store",
                "where": str(data_dir / "identity.db"),
                "fields": "anonymous ids, user ids, email, phone, first and last name, "
                "address, click ids, browser ids, when each was seen",
                "encrypted": "AES-256-GCM per person, ids as keyed hashes"
                if encrypted
                else at_rest,
                "kept": f"identity_store.ttl_days ({identity.ttl_days} days) since the person "
                "was last seen; click ids used within "
                + ", ".join(f"{name} {days} d" for name, days in sorted(windows.items())),
            }
        )
    for forwarder in config.forwarders:
        if not isinstance(forwarder, WarehouseConfig) or not forwarder.enabled:
            continue
        where = forwarder.describe(data_dir)
        hashed = "emails and phones as keyed hashes (hash_pii)" if forwarder.hash_pii else ""
        stores.append(
            {
                "store": f"warehouse ({forwarder.id})",
                "where": f"{where}, table {forwarder.table}",
                "fields": "every field of the event as a column (user_id, anonymous_id, "
                "context_ip, context_user_agent, traits_email, ...)",
                "encrypted": "no (analysts query it)" + (f"; {hashed}" if hashed else ""),
                "kept": f"retention_days ({forwarder.retention_days:g} days)"
                if forwarder.retention_days is not None
                else "until deleted (no retention_days)",
            }
        )
    return stores


def _forwarders(config: Config) -> list[dict[str, Any]]:
    out = []
    for forwarder in config.forwarders:
        if not forwarder.enabled:
            continue
        kind: str = forwarder.type
        fields = forwarder_class(kind).personal_data(forwarder)
        out.append(
            {
                "forwarder": forwarder.id,
                "type": kind,
                "requires_consent": list(forwarder.requires_consent),
                "enrich": bool(getattr(forwarder, "enrich", False)),
                "fields": fields,
            }
        )
    return out


def build_report(config: Config, data_dir: Path | None = None) -> dict[str, Any]:
    """The data map of ``config`` (see the module docstring), as JSON."""
    data_dir = data_dir or config.data_dir
    return {
        "encryption_at_rest": bool(config.encryption.keys),
        "ip_truncation": config.privacy.truncate_ip,
        "stores": _stores(config, data_dir),
        "forwarders": _forwarders(config),
    }


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    body = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return [line, rule, *body]


def render_text(report: dict[str, Any]) -> str:
    """The report as two tables: the stores, and what each forwarder receives."""
    lines = ["Where personal data is stored", ""]
    for store in report["stores"]:
        lines += [
            f"{store['store']}: {store['where']}",
            f"  fields     {store['fields']}",
            f"  encrypted  {store['encrypted']}",
            f"  kept       {store['kept']}",
            "",
        ]
    lines += ["What each forwarder receives", ""]
    rows: list[tuple[str, ...]] = []
    for forwarder in report["forwarders"]:
        consent = ", ".join(forwarder["requires_consent"]) or "none"
        first = True
        for name, how in forwarder["fields"].items():
            label = f"{forwarder['forwarder']} ({forwarder['type']})" if first else ""
            rows.append((label, consent if first else "", str(name), str(how)))
            first = False
    if rows:
        lines += _table(("forwarder", "requires consent", "field", "sent"), rows)
    else:
        lines.append("(no forwarder is enabled)")
    return "\n".join(lines)
