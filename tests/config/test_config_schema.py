"""The committed JSON Schema matches the models."""

from __future__ import annotations

import json
from typing import Any

from tagrelay.config import schema
from tagrelay.forwarders import FORWARDERS


def test_the_committed_schema_is_up_to_date() -> None:
    committed = schema.SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == schema.render_schema(), (
        f"{schema.SCHEMA_PATH} is out of date with the models; regenerate it with:\n"
        f"    {schema.REGENERATE_COMMAND}"
    )


def test_check_mode_agrees() -> None:
    assert schema.main(["--check"]) == 0


def test_the_schema_names_its_dialect_and_title_and_rejects_unknown_keys() -> None:
    generated = schema.config_json_schema()
    assert generated["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert generated["title"] == "tagrelay configuration"
    assert generated["additionalProperties"] is False
    assert generated["required"] == ["keys"]
    json.dumps(generated)  # plain JSON, nothing pydantic-specific left


def test_secrets_are_plain_strings() -> None:
    key = schema.config_json_schema()["$defs"]["WriteKeyConfig"]["properties"]["key"]
    assert {k: v for k, v in key.items() if k not in ("description", "examples", "title")} == {
        "type": "string",
        "minLength": 1,
    }


def test_every_forwarder_type_is_a_choice() -> None:
    generated: dict[str, Any] = schema.config_json_schema()
    items = generated["properties"]["forwarders"]["items"]
    assert items["discriminator"]["propertyName"] == "type"
    assert sorted(items["discriminator"]["mapping"]) == sorted(FORWARDERS)
    assert len(items["oneOf"]) == len(FORWARDERS)
