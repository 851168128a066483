"""The development write keys of ``config/tagrelay.yaml``, and where they may be used.

Those values (``dev-browser-key``, ``dev-server-key``) are published in the README, so a
relay that accepts them accepts events from anyone. ``TAGRELAY_DEV`` says what ``serve``
does when a configured key holds one of them:

* ``0``: refuse to start. The Docker image sets it, so that a container never runs with
  them by accident (a development config mounted, a key variable set to the example).
* ``1``: start, as asked (trying the image out).
* unset or empty: start with a warning (a checkout, the quick start).
"""

from __future__ import annotations

from collections.abc import Mapping

from tagrelay.config.models import Config

__all__ = ["DEVELOPMENT_KEYS", "DEV_ENV", "development_key_ids", "refusal"]

DEVELOPMENT_KEYS = frozenset({"dev-browser-key", "dev-server-key"})
"""The key values of ``config/tagrelay.yaml`` used when no key variable is set."""

DEV_ENV = "TAGRELAY_DEV"


def development_key_ids(config: Config) -> list[str]:
    """Ids of the configured keys whose value is a development key."""
    return [k.id for k in config.keys if k.key.get_secret_value() in DEVELOPMENT_KEYS]


def refusal(config: Config, env: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """``(why serve must not start, or None; ids of the development keys to warn about)``:
    nothing to warn about when ``TAGRELAY_DEV=1`` asked for them."""
    ids = development_key_ids(config)
    setting = env.get(DEV_ENV, "")
    if setting not in ("", "0", "1"):
        return f"{DEV_ENV} must be 0 (refuse development keys) or 1 (allow them)", ids
    if ids and setting == "0":
        return (
            f"write key(s) {', '.join(ids)} hold a development key, which anyone can read in "
            "the README; give each key its own value (TAGRELAY_BROWSER_KEY, "
            f"TAGRELAY_SERVER_KEY), or set {DEV_ENV}=1 to run with them anyway",
            ids,
        )
    return None, [] if setting == "1" else ids
