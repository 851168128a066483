"""Loading the configuration file: YAML text -> ``${VAR}`` interpolation -> ``Config``.

This is the first thing ``tagrelay serve`` and ``tagrelay check`` do, and the only place
where a configuration file is read. Every problem is collected and raised together as one
``ConfigError``, each with its key path (``forwarders[1].batch.max_events``) and its line.

The rules, as a user sees them:

* YAML is read with PyYAML's safe loader; anchors, aliases and ``<<`` merge keys work.
  A key given twice in the same mapping is an error (PyYAML would keep the last silently).
* ``${VAR}`` in a string value is replaced by the environment variable ``VAR``;
  ``${VAR:-default}`` uses ``default`` when ``VAR`` is unset or empty (as in a shell);
  ``$$`` is a literal ``$``; a ``$`` followed by anything else is kept as is. Defaults are
  literal text (no nested placeholders). ``VAR`` unset with no default is an error at the
  value's line, never a silent empty string. Mapping keys are not interpolated.
* Types after interpolation: a substituted value is always a string, and the option's type
  converts it. ``port: ${PORT:-8080}`` validates as the integer 8080 and
  ``enabled: ${ON:-false}`` as ``False``, while ``key: ${KEY}`` with ``KEY=123456`` stays
  the string ``"123456"``. Typing by the schema rather than by YAML's rules keeps a secret
  that happens to look like a number, or like ``yes``/``no``, the string it is.
* Relative paths such as ``data_dir: data`` are kept as written, so they are relative to
  the working directory of the process, not to the configuration file (as with most CLI
  tools; a systemd unit or container sets ``WorkingDirectory``).
* Error messages say what was expected and what arrived, but never repeat the value of a
  secret (write keys, webhook headers, anything named like a token or password), nor the
  value of an unknown key, nor what an environment variable holds.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretBytes, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from tagrelay.config.common import LazyUnion, unwrap_annotated
from tagrelay.config.models import Config
from tagrelay.errors import ConfigError, ConfigProblem

__all__ = ["format_config_error", "load_config", "parse_config"]

Loc = tuple[Any, ...]
"""A location in the loaded data: mapping keys and sequence indexes, from the root."""

_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def load_config(path: Path | str) -> Config:
    """Read, interpolate and validate the configuration file at ``path``.

    Raises ``ConfigError`` listing every problem (a missing or unreadable file included);
    nothing else escapes for a bad file.
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise _file_error(source, "file not found; pass the path of a YAML file") from None
    except IsADirectoryError:
        raise _file_error(source, "is a directory; pass the path of a YAML file") from None
    except PermissionError:
        raise _file_error(source, "permission denied while reading the file") from None
    except OSError as exc:
        raise _file_error(source, f"cannot read the file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problem = ConfigProblem("", line, "the file is not valid UTF-8 text")
        raise ConfigError(source, [problem]) from None
    return parse_config(text, source)


def parse_config(text: str, source: str, env: Mapping[str, str] | None = None) -> Config:
    """Parse YAML ``text`` into a validated ``Config``.

    ``source`` names the text in errors (usually the file path). ``${VAR}`` placeholders
    are filled from ``env``, or from ``os.environ`` when ``env`` is None. Raises
    ``ConfigError`` with every problem found.
    """
    root = _compose(text, source)
    tree = _Tree(env=os.environ if env is None else env)
    data = tree.build(root, ())
    if not isinstance(data, dict):
        kind = "nothing" if data is None else _kind(data)
        message = f"expected a mapping of options at the top level (e.g. 'keys:'), got {kind}"
        raise ConfigError(source, [*tree.problems, ConfigProblem("", tree.line_of(()), message)])
    tree.check_unique_ids(data)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = tree.problems + _validation_problems(exc, tree)
        raise ConfigError(source, _sorted(problems)) from None
    if tree.problems:
        raise ConfigError(source, _sorted(tree.problems))
    return config


def format_config_error(err: ConfigError) -> str:
    """One line per problem, compiler style: ``file:line: key.path: message``.

    The line number is left out when unknown and the key path when the problem concerns
    the whole file.
    """
    rendered = []
    for problem in err.problems:
        where = err.source if problem.line is None else f"{err.source}:{problem.line}"
        if problem.path:
            rendered.append(f"{where}: {problem.path}: {problem.message}")
        else:
            rendered.append(f"{where}: {problem.message}")
    return "\n".join(rendered)


# --- YAML -------------------------------------------------------------------------------


def _file_error(source: str, message: str) -> ConfigError:
    return ConfigError(source, [ConfigProblem("", None, message)])


def _compose(text: str, source: str) -> Node:
    """The YAML node tree (nodes keep their line), or a ConfigError for a syntax error."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = _line(exc.problem_mark or exc.context_mark)
        message = f"invalid YAML: {exc.problem or exc.context}"
        context_line = _line(exc.context_mark)
        if exc.context == "expected a single document in the stream":
            message = "invalid YAML: a second document starts here; the configuration is one"
        elif exc.problem and exc.context:
            started = f" started at line {context_line}" if context_line != line else ""
            message += f" ({exc.context}{started})"
        raise ConfigError(source, [ConfigProblem("", line, message)]) from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        message = f"invalid YAML: character {exc.character!r} is not allowed"
        raise ConfigError(source, [ConfigProblem("", line, message)]) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error has a mark or a position
        raise ConfigError(source, [ConfigProblem("", None, f"invalid YAML: {exc}")]) from None
    if root is None:
        message = "the file is empty; it needs at least a 'keys:' list of write keys"
        raise ConfigError(source, [ConfigProblem("", None, message)])
    return root


def _line(mark: yaml.Mark | None) -> int | None:
    return None if mark is None else mark.line + 1


@dataclass
class _Tree:
    """Builds plain Python data from the YAML nodes, remembering the line of every key
    and sequence item, and interpolating string values on the way."""

    env: Mapping[str, str]
    lines: dict[Loc, int] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)
    unresolved: set[Loc] = field(default_factory=set)
    """Locations whose value is known to be wrong because of a problem reported here (a
    placeholder left unfilled, an unsupported tag): validation need not say it again."""
    problem_locs: set[Loc] = field(default_factory=set)
    _constructor: SafeConstructor = field(default_factory=SafeConstructor)
    _active: set[int] = field(default_factory=set)

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of its nearest ancestor present in the file."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return None

    def problem(self, loc: Loc, message: str, line: int | None = None) -> None:
        line = self.line_of(loc) if line is None else line
        self.problem_locs.add(loc)
        self.problems.append(ConfigProblem(_format_loc(loc), line, message))

    def build(self, node: Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if id(node) in self._active:
            self.problem(loc, "an alias refers to a node that contains it (recursive alias)")
            return None
        if not isinstance(node, ScalarNode) and node.tag not in (_MAP_TAG, _SEQ_TAG):
            self.problem(loc, f"unsupported YAML tag {node.tag!r}; use plain mappings and lists")
            self.unresolved.add(loc)
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, loc)
            if isinstance(node, SequenceNode):
                return [self.build(item, (*loc, index)) for index, item in enumerate(node.value)]
            assert isinstance(node, ScalarNode)
            return self._scalar(node, loc)
        finally:
            self._active.discard(id(node))

    def _scalar(self, node: ScalarNode, loc: Loc) -> Any:
        if node.tag == _STR_TAG:
            value, errors = _interpolate(node.value, self.env)
            for error in errors:
                self.problem(loc, error)
            if errors:
                self.unresolved.add(loc)
            return value
        try:
            return self._constructor.construct_object(node)
        except ConstructorError as exc:
            self.problem(loc, f"unsupported YAML value: {exc.problem}")
            self.unresolved.add(loc)
            return None

    def _mapping(self, node: MappingNode, loc: Loc) -> dict[Any, Any]:
        own_keys = {id(key) for key, _ in node.value if key.tag != _MERGE_TAG}
        try:
            # Resolves ``<<`` merge keys in place: merged pairs first, then the node's own.
            self._constructor.flatten_mapping(node)
        except ConstructorError as exc:
            self.problem(loc, f"invalid merge key: {exc.problem}", _line(exc.problem_mark))
            node.value = [(key, value) for key, value in node.value if key.tag != _MERGE_TAG]
        result: dict[Any, Any] = {}
        own_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                message = "mapping keys must be plain values, not lists or mappings"
                self.problem(loc, message, key_line)
                continue
            key = self._scalar_key(key_node, loc)
            if key is None:
                continue
            if id(key_node) in own_keys:
                if key in own_lines:
                    message = f"key {key!r} is given twice (first at line {own_lines[key]})"
                    self.problem((*loc, key), message, key_line)
                own_lines[key] = key_line
            self.lines[(*loc, key)] = key_line
            result[key] = self.build(value_node, (*loc, key))
        return result

    def _scalar_key(self, node: ScalarNode, loc: Loc) -> str | None:
        """The key as a string, or None (reported) when YAML reads it as something else:
        every key in the configuration is a name, and ``on:`` or ``1:`` are not strings."""
        line = node.start_mark.line + 1
        if node.tag == _STR_TAG:
            return str(node.value)
        try:
            key = self._constructor.construct_object(node)
        except ConstructorError as exc:
            self.problem(loc, f"unsupported YAML key: {exc.problem}", line)
            return None
        message = f"keys must be strings, got {_kind(key)}; quote it: '{node.value}'"
        self.problem(loc, message, line)
        return None

    def check_unique_ids(self, data: dict[Any, Any]) -> None:
        """Duplicate ids and write key values, reported at the second occurrence.

        ``Config`` checks the same, but only once every item of the list is valid and
        without a line; here it is checked on the raw data so that it comes out with the
        other problems. Values that kept a placeholder are not compared.
        """
        for list_name, item_key, message in _UNIQUE:
            items = data.get(list_name)
            if not isinstance(items, list):
                continue
            first_seen: dict[str, int] = {}
            for index, item in enumerate(items):
                if not isinstance(item, dict):
                    continue
                value = item.get(item_key)
                loc = (list_name, index, item_key)
                if not isinstance(value, str) or loc in self.unresolved:
                    continue
                if value in first_seen:
                    first = (list_name, first_seen[value], item_key)
                    self.problem(loc, message(value, _format_loc(first), self.line_of(first)))
                else:
                    first_seen[value] = index


def _id_message(value: str, first: str, line: int | None) -> str:
    return f"id {value!r} is already used by {first} (line {line}); ids must be unique"


def _key_message(value: str, first: str, line: int | None) -> str:
    del value  # a secret: never in a message
    return f"same key value as {first} (line {line}); every write key needs its own value"


_UNIQUE: tuple[tuple[str, str, Callable[[str, str, int | None], str]], ...] = (
    ("keys", "id", _id_message),
    ("keys", "key", _key_message),
    ("forwarders", "id", _id_message),
)
_UNIQUE_LISTS = frozenset(list_name for list_name, _, _ in _UNIQUE)


# --- ${VAR} interpolation -----------------------------------------------------------------

_TOKEN = re.compile(r"\$\$|\$\{(?P<body>[^}]*)\}|\$\{")
_PLACEHOLDER_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


def _interpolate(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace ``${VAR}``, ``${VAR:-default}`` and ``$$`` in ``text``.

    Returns the new text and the problems found. A placeholder that cannot be filled is
    left as written, so that the problem is reported once, here, and not again by
    validation. Messages name the variable, never a value.
    """
    errors: list[str] = []

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        if found == "$$":
            return "$"
        body = match.group("body")
        if body is None:
            errors.append(
                "unterminated placeholder: '${' needs a closing '}' ('$$' is a literal '$')"
            )
            return found
        placeholder = _PLACEHOLDER_BODY.fullmatch(body)
        if placeholder is None:
            errors.append(
                "invalid placeholder: expected ${NAME} or ${NAME:-default}, NAME made of "
                "letters, digits and '_' ('$$' is a literal '$')"
            )
            return found
        name, default = placeholder.group("name", "default")
        if default is not None and "${" in default:
            errors.append(
                f"the default of ${{{name}:-...}} contains a placeholder; nesting is not supported"
            )
            return found
        value = env.get(name)
        if default is not None and not value:
            return default
        if value is None:
            errors.append(
                f"environment variable {name} is not set; set it, or give a default "
                f"with ${{{name}:-default}}"
            )
            return found
        return value

    return _TOKEN.sub(replace, text), errors


# --- validation errors ----------------------------------------------------------------------

_SECRET_NAME = re.compile(
    r"(^|_)(key|token|secret|password|passwd|credentials?|authorization)(_|$)"
)
_SECRET_FIELDS = frozenset({"headers"})
"""Field names whose whole content may hold credentials (e.g. an Authorization header)."""

_NO_INPUT_ECHO = frozenset(
    {
        "missing",
        "extra_forbidden",
        "value_error",
        "assertion_error",
        "union_tag_invalid",
        "union_tag_not_found",
        "too_short",
        "too_long",
        "string_too_short",
        "string_too_long",
    }
)

_EXPECTATIONS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "path_type": "a filesystem path",
    "ip_v4_network": "an IPv4 network in CIDR notation (e.g. 10.0.0.0/8)",
    "ip_v6_network": "an IPv6 network in CIDR notation (e.g. fd00::/8)",
}


@dataclass
class _Where:
    """Where a pydantic error location points in the user's file, found by walking the
    model types along it (pydantic inserts union member tags into locations)."""

    loc: Loc
    """The location in the data, union tags removed."""
    path: str
    model: type[BaseModel] | None
    """The model that holds the last key of ``loc``."""
    annotation: Any
    """The type expected at ``loc``, when known."""
    discriminator: str | None
    secret: bool
    via_union: bool
    """The error is one of several alternatives of a plain (not discriminated) union."""


def _walk(error_loc: tuple[int | str, ...]) -> _Where:
    annotation: Any = Config
    discriminator: str | None = None
    model: type[BaseModel] | None = None
    loc: list[Any] = []
    secret = via_union = False
    items = list(error_loc)
    while items:
        annotation, discriminator = unwrap_annotated(annotation, discriminator)
        secret = secret or annotation in (SecretStr, SecretBytes)
        item = items.pop(0)
        origin = get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            loc.append(item)
            field_info = _field(annotation, item) if isinstance(item, str) else None
            annotation = field_info.annotation if field_info else None
            discriminator = _discriminator_of(field_info) if field_info else None
            secret = secret or (isinstance(item, str) and _is_secret_name(item))
        elif origin in (list, tuple, set, frozenset):
            loc.append(item)
            annotation, discriminator = get_args(annotation)[0], None
        elif origin is dict:
            loc.append(item)
            annotation, discriminator = get_args(annotation)[1], None
        elif isinstance(annotation, LazyUnion):
            # ``item`` is the tag, inserted as a discriminated union does: not in the file.
            known = isinstance(item, str) and item in annotation.tags
            annotation = annotation.model(str(item)) if known else None
            discriminator = None
        elif origin in (Union, types.UnionType):
            # ``item`` is the tag pydantic inserted for the union member: not in the file.
            members = get_args(annotation)
            if discriminator is None:
                via_union = True
                by_name = (m for m in members if getattr(m, "__name__", None) == item)
                annotation = next(by_name, None)
            else:
                annotation = next((m for m in members if item in _tags(m, discriminator)), None)
            discriminator = None
        else:
            loc.append(item)
            annotation = None
    annotation, discriminator = unwrap_annotated(annotation, discriminator)
    secret = secret or annotation in (SecretStr, SecretBytes)
    return _Where(
        tuple(loc), _format_loc(tuple(loc)), model, annotation, discriminator, secret, via_union
    )


def _discriminator_of(field_info: FieldInfo) -> str | None:
    return field_info.discriminator if isinstance(field_info.discriminator, str) else None


def _tags(member: Any, discriminator: str) -> tuple[Any, ...]:
    if not (isinstance(member, type) and issubclass(member, BaseModel)):
        return ()
    tag_field = member.model_fields.get(discriminator)
    if tag_field is None or get_origin(tag_field.annotation) is not Literal:
        return ()
    return get_args(tag_field.annotation)


def _is_secret_name(name: str) -> bool:
    return name in _SECRET_FIELDS or _SECRET_NAME.search(name.lower()) is not None


def _validation_problems(exc: ValidationError, tree: _Tree) -> list[ConfigProblem]:
    """Pydantic's errors as problems at the user's paths and lines.

    Errors that only restate a problem the tree already reported are left out; as each of
    those needs a tree problem, a failed validation never ends up with no problem at all.
    """
    problems: list[ConfigProblem] = []
    alternatives: dict[Loc, list[tuple[str, str]]] = {}
    for error in exc.errors(include_url=False):
        where = _walk(error["loc"])
        if _already_reported(error, where, tree):
            continue
        if error["type"] in ("union_tag_invalid", "union_tag_not_found") and where.discriminator:
            tag_loc = (*where.loc, where.discriminator)
            message = _tag_message(error, where)
            problems.append(ConfigProblem(_format_loc(tag_loc), tree.line_of(tag_loc), message))
            continue
        expected, got = _describe(error, where)
        if where.via_union:
            alternatives.setdefault(where.loc, []).append((expected, got))
            continue
        message = f"{expected}, got {got}" if got else expected
        problems.append(ConfigProblem(where.path, tree.line_of(where.loc), message))
    for loc, options in alternatives.items():
        expectations = list(dict.fromkeys(_strip_expected(expected) for expected, _ in options))
        got = options[0][1]
        message = "expected " + " or ".join(expectations) + (f", got {got}" if got else "")
        problems.append(ConfigProblem(_format_loc(loc), tree.line_of(loc), message))
    return problems


def _already_reported(error: ErrorDetails, where: _Where, tree: _Tree) -> bool:
    if any(where.loc[:end] in tree.unresolved for end in range(len(where.loc) + 1)):
        return True  # the value kept a placeholder (or a bad tag) that was reported as such
    # ``Config``'s uniqueness checks work on whole lists, once all items are valid;
    # ``check_unique_ids`` reported the same with the exact item. Any problem the tree found
    # in the list (a duplicate, or a placeholder left unfilled) may be what set them off.
    return (
        error["type"] == "value_error"
        and len(where.loc) == 1
        and where.loc[0] in _UNIQUE_LISTS
        and any(loc[:1] == where.loc for loc in tree.problem_locs)
    )


def _describe(error: ErrorDetails, where: _Where) -> tuple[str, str]:
    """What was expected, and what arrived ("" when the input is not to be shown)."""
    kind = error["type"]
    ctx = error.get("ctx", {})
    value = error["input"]
    if kind == "missing":
        return "required option is missing", ""
    if kind == "extra_forbidden":
        return _unknown_key_message(where), ""
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, "), ""
    if kind in ("too_short", "string_too_short"):
        unit = "character" if isinstance(value, str | SecretStr) else "item"
        minimum = ctx.get("min_length")
        expected = f"expected at least {minimum} {unit}{'s' if minimum != 1 else ''}"
        return expected, "" if unit == "character" else str(ctx.get("actual_length"))
    if kind in ("too_long", "string_too_long"):
        unit = "character" if isinstance(value, str | SecretStr) else "item"
        return f"expected at most {ctx.get('max_length')} {unit}s", ""
    if kind == "literal_error":
        expected = f"expected {ctx['expected']}"
    elif kind in _EXPECTATIONS:
        expected = f"expected {_EXPECTATIONS[kind]}"
    elif kind == "string_pattern_mismatch":
        expected = f"expected a string matching the pattern {ctx['pattern']}"
    else:
        expected = _expectation_from_message(str(error["msg"]))
    if kind in _NO_INPUT_ECHO:
        return expected, ""
    got = _show(value, secret=where.secret)
    if kind == "string_type" and isinstance(value, int | float | bool):
        got += " (YAML reads it as one; put it in quotes)"
    return expected, got


def _expectation_from_message(message: str) -> str:
    rest = message.removeprefix("Input should be ")
    if rest == message:
        return message[:1].lower() + message[1:]
    if rest.startswith(("greater", "less")):
        return "expected a value " + rest
    return "expected " + rest


def _strip_expected(expected: str) -> str:
    return expected.removeprefix("expected ")


def _unknown_key_message(where: _Where) -> str:
    key = where.loc[-1] if where.loc else ""
    if where.model is None:
        return f"unknown key {key!r}"
    valid = [field.alias or name for name, field in where.model.model_fields.items()]
    message = f"unknown key {key!r}; valid keys here: {', '.join(valid)}"
    close = difflib.get_close_matches(str(key), valid, n=1)
    return f"{message} (did you mean {close[0]!r}?)" if close else message


def _tag_message(error: ErrorDetails, where: _Where) -> str:
    if isinstance(where.annotation, LazyUnion):
        valid = sorted(where.annotation.tags)
    else:
        members = get_args(where.annotation) if where.annotation is not None else ()
        discriminator = where.discriminator or ""
        valid = sorted(str(tag) for member in members for tag in _tags(member, discriminator))
    choices = ", ".join(valid)
    if error["type"] == "union_tag_not_found":
        if isinstance(error["input"], dict):
            return f"required option is missing; set it to one of: {choices}"
        return f"expected a mapping with a {where.discriminator!r} key, got {_kind(error['input'])}"
    tag = error.get("ctx", {}).get("tag", "")
    return f"unknown {where.discriminator} {tag!r}; expected one of: {choices}"


def _show(value: Any, *, secret: bool) -> str:
    """How an input is shown in a message: its value for a plain value that is not a
    secret, otherwise only its kind."""
    if secret or not isinstance(value, str | int | float | bool):
        return _kind(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


# --- key paths ------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _format_loc(loc: Loc) -> str:
    """``('forwarders', 1, 'batch', 'max_events')`` -> ``forwarders[1].batch.max_events``.

    Ints are list indexes (every mapping key is a string: ``_Tree`` reports the others);
    keys that are not simple names are quoted (``headers["X-Api.Key"]``).
    """
    path = ""
    for item in loc:
        if isinstance(item, int) and not isinstance(item, bool):
            path += f"[{item}]"
        elif isinstance(item, str) and _PLAIN_KEY.fullmatch(item):
            path += f".{item}" if path else item
        else:
            path += "[" + _quote(str(item)) + "]"
    return path


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sorted(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """In file order; problems without a line last."""
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


def _field(model: type[BaseModel], key: str) -> Any:
    """The field written as ``key`` in the file: by its name, or by its alias."""
    fields = model.model_fields
    return fields.get(key) or next((f for f in fields.values() if f.alias == key), None)
