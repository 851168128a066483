"""The Markdown reference of every configuration option, generated from the models.

    python -m tagrelay.config.reference --write

writes it to ``docs/config.md`` (run from the repository's root), which the README links;
without arguments it is printed, and ``--check`` exits with 1 when the file is stale (a test
in tests/test_readme.py keeps the committed copy current).

One section per mapping in the file, one table row per option: its path, type, default,
description and an example, all taken from ``tagrelay.config.models`` and the forwarder
configs in ``tagrelay.forwarders.FORWARDERS``. Options every forwarder type shares are
listed once, then each type's own.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from tagrelay.config.common import LazyUnion, unwrap_annotated
from tagrelay.config.models import Config

__all__ = [
    "DOC_PATH",
    "REGENERATE_COMMAND",
    "Option",
    "Section",
    "github_anchor",
    "iter_sections",
    "render_reference",
]

DOC_PATH = Path("docs/config.md")
"""The committed, generated reference, relative to the repository's root."""

REGENERATE_COMMAND = "python -m tagrelay.config.reference --write"


@dataclass(frozen=True)
class Option:
    """One option: ``path`` as written in the file, e.g. ``forwarders[].batch.max_events``."""

    path: str
    name: str
    field: FieldInfo


@dataclass(frozen=True)
class Section:
    """The options of one mapping of the file."""

    title: str
    description: str
    options: tuple[Option, ...]


def iter_sections(model: type[BaseModel] = Config) -> Iterator[Section]:
    """Every section, depth first in the models' field order, ``model`` first."""
    yield from _sections(model, prefix="", title="Top level", names=None)


def _sections(
    model: type[BaseModel], prefix: str, title: str, names: list[str] | None
) -> Iterator[Section]:
    names = list(model.model_fields) if names is None else names
    # a field named otherwise in Python (``db_schema``) is written under its alias
    options = tuple(
        Option(_join(prefix, key), key, field)
        for name in names
        for field in (model.model_fields[name],)
        for key in (field.alias or name,)
    )
    yield Section(title, _docstring(model), options)
    for option in options:
        yield from _nested(option.path, option.field.annotation)


def _nested(path: str, annotation: Any) -> Iterator[Section]:
    annotation, discriminator = unwrap_annotated(annotation)
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        yield from _nested(f"{path}[]", get_args(annotation)[0])
    elif origin is dict:
        yield from _nested(f"{path}.<name>", get_args(annotation)[1])
    elif isinstance(annotation, LazyUnion):
        yield from _discriminated(path, list(annotation.members()), annotation.discriminator)
    elif origin in (Union, types.UnionType):
        members = [m for m in get_args(annotation) if _is_model(m)]
        if discriminator and members:
            yield from _discriminated(path, members, discriminator)
        else:
            for member in members:
                yield from _sections(member, path, f"`{path}` ({member.__name__})", None)
    elif _is_model(annotation):
        yield from _sections(annotation, path, f"`{path}`", None)


def _discriminated(path: str, members: list[type[BaseModel]], key: str) -> Iterator[Section]:
    """Shared options once (those every member declares alike), then each member's own."""
    first = members[0].model_fields
    shared = [
        name
        for name in first
        if all(_same_field(first[name], m.model_fields.get(name)) for m in members[1:])
    ]
    shared_options = tuple(Option(_join(path, n), n, first[n]) for n in shared)
    # The base's first sentence: the rest of its docstring speaks to developers.
    summary = _docstring(_common_base(members)).split(". ")[0].rstrip(".") + "."
    yield Section(f"`{path}` (every {key})", summary, shared_options)
    for option in shared_options:
        yield from _nested(option.path, option.field.annotation)
    for member in members:
        tag = ", ".join(str(t) for t in get_args(member.model_fields[key].annotation))
        own = [name for name in member.model_fields if name not in shared]
        yield from _sections(member, path, f"`{path}` with `{key}: {tag}`", own)


def _common_base(members: list[type[BaseModel]]) -> type[BaseModel]:
    """The most specific model class every member derives from."""
    others = [set(member.__mro__) for member in members[1:]]
    return next(
        base
        for base in members[0].__mro__
        if _is_model(base) and all(base in mro for mro in others)
    )


def _same_field(a: FieldInfo, b: FieldInfo | None) -> bool:
    return b is not None and (a.annotation, a.description) == (b.annotation, b.description)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _docstring(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


# --- rendering --------------------------------------------------------------------------


def render_reference() -> str:
    """The whole reference as the Markdown document ``docs/config.md``: a title, a table
    of contents of the file's top-level mappings and forwarder types, then one section
    (heading level 2) per mapping."""
    sections = list(iter_sections())
    anchors = _anchors([section.title for section in sections])
    out = [
        "# Configuration reference",
        "",
        f"Generated from the configuration models by `{REGENERATE_COMMAND}`;",
        "do not edit by hand. `config/tagrelay.yaml` is the commented example to start from,",
        "and the [README](../README.md#configuration) says how the file is read. Values are",
        "shown as JSON, which YAML accepts as is. A value given as `${VAR}` is converted to",
        "the option's type: `port: ${PORT:-8080}` works.",
        "",
    ]
    out += [
        f"- [{section.title}](#{anchor})"
        for section, anchor in zip(sections, anchors, strict=True)
        if _top_level(section.title)
    ]
    for section in sections:
        out += ["", f"## {section.title}", ""]
        if section.description:
            out += [section.description, ""]
        out += ["| Option | Type | Default | Description | Example |", "|---|---|---|---|---|"]
        for option in section.options:
            cells = (
                f"`{option.path}`",
                _with_constraints(_type_name(option.field.annotation), option.field),
                _default(option.field),
                option.field.description or "",
                _example(option.field),
            )
            out.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(out) + "\n"


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading (before de-duplication): lower case,
    punctuation but ``-`` and ``_`` removed, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(headings: list[str]) -> list[str]:
    """Each heading's fragment, a repeated one suffixed ``-1``, ``-2``... as GitHub does."""
    seen: dict[str, int] = {}
    out = []
    for heading in headings:
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        out.append(f"{anchor}-{count}" if count else anchor)
    return out


def _top_level(title: str) -> bool:
    """A section of a top-level mapping or of a forwarder type, not of a mapping in those."""
    path = title.split("`")[1] if "`" in title else title
    return "." not in path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type_name(annotation: Any) -> str:
    annotation, discriminator = unwrap_annotated(annotation)
    origin = get_origin(annotation)
    if annotation in (SecretStr, SecretBytes):
        return "string (secret)"
    if annotation in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[annotation]
    if origin is Literal:
        return " or ".join(json.dumps(value) for value in get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        return f"list of {_type_name(get_args(annotation)[0])}"
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping of {_type_name(key)} to {_type_name(value)}"
    if isinstance(annotation, LazyUnion):
        return f"mapping, by `{annotation.discriminator}`"
    if origin in (Union, types.UnionType):
        if discriminator:
            return f"mapping, by `{discriminator}`"
        return " or ".join(_type_name(member) for member in get_args(annotation))
    if _is_model(annotation):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _with_constraints(type_name: str, field: FieldInfo) -> str:
    """``integer, >= 1, <= 10000``: bounds, lengths and patterns of ``Field(...)``."""
    constraints = []
    for meta in field.metadata:
        for attribute, template in _CONSTRAINTS:
            value = getattr(meta, attribute, None)
            if value is not None:
                constraints.append(template.format(value))
    return ", ".join([type_name, *constraints])


_CONSTRAINTS = (
    ("gt", "> {}"),
    ("ge", ">= {}"),
    ("lt", "< {}"),
    ("le", "<= {}"),
    ("min_length", "length >= {}"),
    ("max_length", "length <= {}"),
    ("pattern", "matching `{}`"),
)

_SIMPLE_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    ipaddress.IPv4Network: "IPv4 network",
    ipaddress.IPv6Network: "IPv6 network",
    type(None): "null",
}


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if _is_model(unwrap_annotated(field.annotation)[0]):
        return "see below"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:  # pragma: no cover - is_required() above
        return "required"
    else:
        value = field.default
    return _json(value)


def _example(field: FieldInfo) -> str:
    return _json(field.examples[0]) if field.examples else ""


def _json(value: Any) -> str:
    return "`" + json.dumps(to_jsonable_python(value), ensure_ascii=False) + "`"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tagrelay.config.reference",
        description="Print, write or check the configuration reference (docs/config.md).",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write it to {DOC_PATH}")
    action.add_argument("--check", action="store_true", help=f"exit 1 if {DOC_PATH} is stale")
    args = parser.parse_args(argv)
    rendered = render_reference()
    if args.write:
        DOC_PATH.parent.mkdir(exist_ok=True)
        DOC_PATH.write_text(rendered, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
    elif args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != rendered:
            print(f"{DOC_PATH} is out of date; run: {REGENERATE_COMMAND}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
