"""Every option documents itself: description and example, and a line in the reference."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from tagrelay.config.common import LazyUnion
from tagrelay.config.models import Config
from tagrelay.config.reference import iter_sections, render_reference
from tagrelay.forwarders import FORWARDERS


def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """Every model class an annotation mentions, through Annotated, lists, dicts, unions
    (a ``LazyUnion``'s members included)."""
    if isinstance(annotation, LazyUnion):
        for member in annotation.members():
            yield from models_in(member)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        for field in annotation.model_fields.values():
            yield from models_in(field.annotation)
    elif get_origin(annotation) in (Annotated, list, dict, tuple, Union, types.UnionType):
        for argument in get_args(annotation):
            yield from models_in(argument)


def all_models() -> list[type[BaseModel]]:
    found: dict[type[BaseModel], None] = {}
    for root in (Config, *(cls.config_model for cls in FORWARDERS.values())):
        found.update(dict.fromkeys(models_in(root)))
    return list(found)


def test_the_walk_reaches_every_forwarder_config() -> None:
    reached = set(models_in(Config))
    assert {cls.config_model for cls in FORWARDERS.values()} <= reached


def test_every_option_has_a_description_and_an_example() -> None:
    undocumented = [
        f"{model.__name__}.{name}"
        for model in all_models()
        for name, field in model.model_fields.items()
        if not (field.description or "").strip() or not field.examples
    ]
    assert undocumented == [], "options without a description or an example"


def test_every_model_has_a_docstring() -> None:
    assert [m.__name__ for m in all_models() if not (m.__doc__ or "").strip()] == []


def test_the_reference_lists_every_option_of_every_model() -> None:
    # A field shared by every forwarder type is listed once, so match on what a reader sees
    # (name, type, description) rather than on the field object.
    rows = {
        (option.name, repr(option.field.annotation), option.field.description)
        for section in iter_sections()
        for option in section.options
    }
    missing = [
        f"{model.__name__}.{name}"
        for model in all_models()
        for name, field in model.model_fields.items()
        if (field.alias or name, repr(field.annotation), field.description) not in rows
    ]
    assert missing == []


def test_the_reference_has_a_section_per_forwarder_type() -> None:
    text = render_reference()
    for forwarder_type in FORWARDERS:
        assert f"\n## `forwarders[]` with `type: {forwarder_type}`\n" in text
    port_row = (
        "| `server.port` | integer, >= 0, <= 65535 | `8080` | TCP port to listen on. | `8080` |"
    )
    assert port_row in text
    assert "| `keys[].key` | string (secret), length >= 1 | required |" in text
