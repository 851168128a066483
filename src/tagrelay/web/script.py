"""The first-party tracking script at ``paths.script``: built once at start-up, served from memory.

``build_script`` renders ``templates/p.js`` with the few settings the script needs (its global
name, the events path, the version, the cookieless and auto-page defaults) and, with
``script.jitsu_compat``, its Jitsu layer (Jitsu's browser API), minifies it with
``minify_js`` below, gzips it once and hashes it. The handler then only chooses a
representation (gzip or identity, by ``Accept-Encoding``) and answers revalidations with a
304. ``render_snippet`` renders the copy-paste ``<head>`` snippet that queues calls until the
script has loaded.

``minify_js`` is deliberately small and conservative: it removes comments and whitespace
between tokens and never rewrites a token. It knows strings, template literals (with nested
substitutions), regular expression literals and comments, and keeps a line break wherever
automatic semicolon insertion could depend on it. Its one guess: a ``/`` right after ``)``,
``]`` or ``}`` is read as a division, and right after ``++`` or ``--`` as a regex, so neither
``if (x) /re/.test(y)`` nor ``i++ / 2`` may appear in the script: such source may fail
loudly (an unterminated literal) or lose spaces inside the misread regex. The tests run
``node --check`` on the served script and compare a minified program's output with the
original's.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import Final

import jinja2
from aiohttp import hdrs, web

from tagrelay import __version__
from tagrelay.config.models import Config
from tagrelay.web.templates import templates_dir

__all__ = [
    "MinifyError",
    "ScriptAsset",
    "accepts_gzip",
    "add_script_route",
    "build_script",
    "etag_matches",
    "minify_js",
    "render_snippet",
    "script_handler",
    "script_settings",
    "strong_etag",
]

SCRIPT_TEMPLATE: Final = "p.js"
SNIPPET_TEMPLATE: Final = "snippet.html"
CONTENT_TYPE: Final = "text/javascript; charset=utf-8"


class MinifyError(ValueError):
    """The JavaScript given to ``minify_js`` is not something it can tokenize safely."""


@dataclass(frozen=True)
class ScriptAsset:
    """The tracking script as served: both representations and their strong ETags."""

    identity: bytes
    """The minified script, UTF-8."""
    gzipped: bytes
    """``identity`` gzipped (level 9, mtime 0: the same bytes on every start)."""
    etag: str
    """Strong ETag of the identity representation: a hash of the minified bytes, quoted."""
    gzip_etag: str
    """Strong ETag of the gzip representation (a strong validator differs per coding)."""


# ---------------------------------------------------------------------------------------
# The minifier


_LINE_TERMINATORS: Final = frozenset("\n\r\u2028\u2029")
_SPACES: Final = frozenset("\t\v\f \xa0\ufeff")
# After one of these a line break can be dropped: the expression or statement must go on,
# so automatic semicolon insertion cannot apply (and none ends a restricted production).
_CONTINUES_AFTER: Final = frozenset("{([,;:=*%&|^!~?<>")
# Before one of these a line break can be dropped: none can start a statement.
_CONTINUES_BEFORE: Final = frozenset(")]},;:=*%&|^?<>")
# Words after which an expression starts, so a "/" there opens a regex literal.
_EXPRESSION_KEYWORDS: Final = frozenset(
    {
        "return", "typeof", "instanceof", "in", "of", "new", "delete", "void", "throw",
        "case", "do", "else", "yield", "await",
    }
)  # fmt: skip


def _is_space(char: str) -> bool:
    return char in _SPACES or (char >= "\u1680" and unicodedata.category(char) == "Zs")


def _is_word(char: str) -> bool:
    """Part of an identifier, keyword or number (a space between two of these must stay)."""
    if char.isascii():
        return char.isalnum() or char in "_$\\"
    return not _is_space(char) and char not in _LINE_TERMINATORS


class _Tokenizer:
    """Splits JavaScript into tokens, recording for each whether whitespace preceded it
    (``""``, ``" "`` or ``"\\n"`` when the gap held a line break, comments included)."""

    def __init__(self, source: str) -> None:
        self.src = source
        self.pos = 0
        self.tokens: list[str] = []
        self.gaps: list[str] = []
        self.gap = ""
        # Does the last token end an operand? Then "/" divides; else it opens a regex.
        self.after_operand = False
        # One entry per open "{": True when it is a template literal's "${".
        self.braces: list[bool] = []

    def fail(self, what: str, at: int) -> MinifyError:
        line = self.src.count("\n", 0, at) + 1
        return MinifyError(f"{what} at line {line} of the script")

    def run(self) -> None:
        src, end = self.src, len(self.src)
        while self.pos < end:
            char = src[self.pos]
            if char in _LINE_TERMINATORS:
                self.gap = "\n"
                self.pos += 1
            elif _is_space(char):
                self.gap = self.gap or " "
                self.pos += 1
            elif src.startswith("//", self.pos):
                stop = self.pos
                while stop < end and src[stop] not in _LINE_TERMINATORS:
                    stop += 1
                self.gap = self.gap or " "  # the line break itself comes next
                self.pos = stop
            elif src.startswith("/*", self.pos):
                stop = src.find("*/", self.pos + 2)
                if stop < 0:
                    raise self.fail("unterminated comment", self.pos)
                body = src[self.pos + 2 : stop]
                if any(c in _LINE_TERMINATORS for c in body):
                    self.gap = "\n"  # a comment with a line break counts as one (ASI)
                else:
                    self.gap = self.gap or " "
                self.pos = stop + 2
            else:
                self.token(char)

    def emit(self, token: str, operand: bool) -> None:
        self.tokens.append(token)
        self.gaps.append(self.gap)
        self.gap = ""
        self.after_operand = operand

    def token(self, char: str) -> None:
        src, start = self.src, self.pos
        if char in "'\"":
            self.pos = self.quoted(start + 1, char)
            self.emit(src[start : self.pos], True)
        elif char == "`":
            self.template(start + 1)
        elif char == "}" and self.braces and self.braces[-1]:
            self.braces.pop()
            self.template(start + 1)
        elif char == "/" and not self.after_operand:
            self.pos = self.regex(start + 1)
            self.emit(src[start : self.pos], True)
        elif _is_word(char):
            stop = start + 1
            while stop < len(src) and _is_word(src[stop]):
                stop += 1
            self.pos = stop
            word = src[start:stop]
            self.emit(word, word not in _EXPRESSION_KEYWORDS)
        else:
            if char == "{":
                self.braces.append(False)
            elif char == "}" and self.braces:
                self.braces.pop()
            self.pos = start + 1
            self.emit(char, char in ")]}")

    def quoted(self, pos: int, quote: str) -> int:
        """The end (exclusive) of a string literal whose body starts at ``pos``."""
        src = self.src
        while pos < len(src):
            char = src[pos]
            if char == "\\":
                pos += 2
            elif char == quote:
                return pos + 1
            elif char in "\n\r":
                break
            else:
                pos += 1
        raise self.fail("unterminated string", pos)

    def template(self, pos: int) -> None:
        """A template literal's text from ``pos`` up to its end or its next ``${``."""
        src, start = self.src, self.pos
        while pos < len(src):
            char = src[pos]
            if char == "\\":
                pos += 2
            elif char == "`":
                self.pos = pos + 1
                self.emit(src[start : self.pos], True)
                return
            elif src.startswith("${", pos):
                self.pos = pos + 2
                self.braces.append(True)
                self.emit(src[start : self.pos], False)
                return
            else:
                pos += 1
        raise self.fail("unterminated template literal", start)

    def regex(self, pos: int) -> int:
        """The end (exclusive, flags included) of a regex literal whose body starts at ``pos``."""
        src = self.src
        in_class = False
        while pos < len(src):
            char = src[pos]
            if char in _LINE_TERMINATORS:
                break
            if char == "\\":
                pos += 2
                continue
            if char == "[":
                in_class = True
            elif char == "]":
                in_class = False
            elif char == "/" and not in_class:
                pos += 1
                while pos < len(src) and _is_word(src[pos]):
                    pos += 1
                return pos
            pos += 1
        raise self.fail("unterminated regular expression", pos)


def _separator(tokens: list[str], index: int, gap: str) -> str:
    """What replaces the whitespace (``gap``) before ``tokens[index]``: ``""``, ``" "``
    or ``"\\n"``."""
    if not gap:
        return ""
    before, token = tokens[index - 1], tokens[index]
    last, first = before[-1], token[0]
    space = (
        (_is_word(last) and _is_word(first))
        or (last in "+-" and first == last)  # a + +b, a - -b
        or (last == "/" and first in "/*")  # a / /re/: not a comment
        or (last == "<" and first == "!")  # not an HTML comment opener
        or (last == "-" and first == ">")  # nor its closer
        or (before[0].isdigit() and first == ".")  # 1 .toString()
    )
    if gap == "\n":
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        droppable = (
            last in _CONTINUES_AFTER
            or first in _CONTINUES_BEFORE
            or (first == "." and not following[:1].isdigit())  # not ".5"
        )
        if not droppable:
            return "\n"
    return " " if space else ""


def minify_js(source: str) -> str:
    """``source`` without comments and without whitespace that does not matter.

    Tokens are copied unchanged; a line break is kept wherever automatic semicolon
    insertion or a restricted production (``return``, ``x++``) could depend on it.
    Idempotent: minifying the output again changes nothing.
    """
    tokenizer = _Tokenizer(source)
    tokenizer.run()
    tokens, gaps = tokenizer.tokens, tokenizer.gaps
    parts: list[str] = []
    for index, token in enumerate(tokens):
        if index:
            parts.append(_separator(tokens, index, gaps[index]))
        parts.append(token)
    return "".join(parts)


# ---------------------------------------------------------------------------------------
# Building and serving


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=jinja2.StrictUndefined,
    )


def script_settings(config: Config, version: str) -> dict[str, object]:
    """The ``cfg`` object rendered into the script."""
    return {
        "g": config.script.global_name,
        "e": config.server.base_path + config.paths.events,
        "v": version,
        "c": config.script.cookieless,
        "a": config.script.auto_page,
    }


def strong_etag(data: bytes, suffix: str = "") -> str:
    """A strong ETag for ``data``: a hash of the content, quoted; ``suffix`` tells another
    representation of the same content apart (``-gz`` for its gzipped form)."""
    return '"' + hashlib.sha256(data).hexdigest()[:32] + suffix + '"'


def build_script(config: Config, version: str) -> ScriptAsset:
    """Render, minify, gzip and hash the tracking script (once, at start-up).

    The script posts its events to ``server.base_path + paths.events`` on its host. With
    ``script.jitsu_compat`` it also answers to Jitsu's browser API (the template's Jitsu
    layer).
    """
    template = _environment().get_template(SCRIPT_TEMPLATE)
    source = template.render(cfg=script_settings(config, version), jitsu=config.script.jitsu_compat)
    identity = minify_js(source).encode()
    gzipped = gzip.compress(identity, compresslevel=9, mtime=0)
    return ScriptAsset(
        identity=identity,
        gzipped=gzipped,
        etag=strong_etag(identity),
        gzip_etag=strong_etag(identity, "-gz"),
    )


def render_snippet(config: Config, script_url: str, write_key: str) -> str:
    """The HTML a site pastes into its ``<head>``: a stub of the API that queues calls,
    and the async script tag that loads ``script_url`` with ``write_key``."""
    template = _environment().get_template(SNIPPET_TEMPLATE)
    return template.render(
        global_name=config.script.global_name, script_url=script_url, write_key=write_key
    )


_QVALUE = re.compile(r"^(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)$")


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip (``q=0`` forbids; ``*`` counts
    when gzip is not named; a malformed q-value counts as 0). No header: identity."""
    if not accept_encoding:
        return False
    wildcard: bool | None = None
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                quality = float(value) if _QVALUE.match(value) else 0.0
        coding = coding.lower()
        if coding in ("gzip", "x-gzip"):
            return quality > 0
        if coding == "*" and wildcard is None:
            wildcard = quality > 0
    return bool(wildcard)


def etag_matches(if_none_match: str, etags: tuple[str, ...]) -> bool:
    """``If-None-Match`` uses the weak comparison (RFC 9110, 13.1.2)."""
    if if_none_match.strip() == "*":
        return True
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        tag = tag.removeprefix("W/")
        if tag in etags:
            return True
    return False


Handler = Callable[[web.Request], Awaitable[web.Response]]


def script_handler(asset: ScriptAsset, cache_max_age_secs: int) -> Handler:
    """A GET/HEAD handler serving ``asset``: gzip when the client accepts it, identity
    otherwise; 304 when ``If-None-Match`` names a current ETag."""
    common = {
        hdrs.CACHE_CONTROL: f"public, max-age={cache_max_age_secs}",
        hdrs.VARY: "Accept-Encoding",
        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: "*",
        "X-Content-Type-Options": "nosniff",
    }
    current = (asset.etag, asset.gzip_etag)

    async def serve_script(request: web.Request) -> web.Response:
        gzipped = accepts_gzip(request.headers.get(hdrs.ACCEPT_ENCODING))
        headers = {**common, hdrs.ETAG: asset.gzip_etag if gzipped else asset.etag}
        if_none_match = request.headers.get(hdrs.IF_NONE_MATCH)
        if if_none_match is not None and etag_matches(if_none_match, current):
            return web.Response(status=304, headers=headers)
        headers[hdrs.CONTENT_TYPE] = CONTENT_TYPE
        if gzipped:
            headers[hdrs.CONTENT_ENCODING] = "gzip"
        return web.Response(body=asset.gzipped if gzipped else asset.identity, headers=headers)

    return serve_script


def add_script_route(
    router: web.UrlDispatcher, config: Config, prefix: str, version: str = __version__
) -> ScriptAsset:
    """Build the script and serve it (GET and HEAD) at ``prefix + paths.script``.

    ``prefix`` is where the relay's routes are mounted, normally ``server.base_path``; the
    script itself posts to ``server.base_path + paths.events``. Returns the built asset.
    """
    asset = build_script(config, version)
    router.add_get(
        prefix + config.paths.script,
        script_handler(asset, config.script.cache_max_age_secs),
        allow_head=True,
    )
    return asset
