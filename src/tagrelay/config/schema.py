"""The JSON Schema of the configuration file, generated from ``tagrelay.config.models``.

The generated file, ``schema.json`` next to this module, is committed and shipped in the
wheel so that editors (e.g. the YAML language server) can validate and complete a
configuration file. A test fails when it is out of date with the models. To regenerate::

    python -m tagrelay.config.schema --write

Without arguments the schema is printed; ``--check`` exits with 1 when the file is stale.

The schema describes the file after ``${VAR}`` interpolation: an editor validating the
raw file reports ``port: ${PORT}`` as a string where a number is expected.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tagrelay.config.models import Config

__all__ = ["SCHEMA_PATH", "config_json_schema", "render_schema"]

SCHEMA_PATH = Path(__file__).with_name("schema.json")
"""The committed, generated schema."""

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
REGENERATE_COMMAND = "python -m tagrelay.config.schema --write"


def _plain_secrets(node: Any) -> None:
    """Secrets as plain strings: in the file a write key is text like any other, so drop
    the ``format: password`` and ``writeOnly`` pydantic gives ``SecretStr``."""
    if isinstance(node, dict):
        if node.get("format") == "password" and node.get("type") == "string":
            del node["format"]
            node.pop("writeOnly", None)
        for value in node.values():
            _plain_secrets(value)
    elif isinstance(node, list):
        for value in node:
            _plain_secrets(value)


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the configuration file."""
    generated = Config.model_json_schema(mode="validation")
    _plain_secrets(generated)
    generated.pop("title", None)
    return {"$schema": JSON_SCHEMA_DIALECT, "title": "tagrelay configuration", **generated}


def render_schema() -> str:
    """The schema as written to ``schema.json``: stable formatting, trailing newline."""
    return json.dumps(config_json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tagrelay.config.schema",
        description="Print, write or check the JSON Schema of the tagrelay configuration.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write it to {SCHEMA_PATH}")
    action.add_argument("--check", action="store_true", help="exit 1 if schema.json is stale")
    args = parser.parse_args(argv)
    rendered = render_schema()
    if args.write:
        SCHEMA_PATH.write_text(rendered, encoding="utf-8")
        print(f"wrote {SCHEMA_PATH}")
    elif args.check:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else ""
        if current != rendered:
            print(f"{SCHEMA_PATH} is out of date; run: {REGENERATE_COMMAND}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
