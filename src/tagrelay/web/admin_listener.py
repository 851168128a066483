"""The admin listener: a TCP listener apart from the public one (``admin.listen``, by default
127.0.0.1:9100) for what visitors must not reach.

It serves the admin socket's routes (``tagrelay.web.admin.build_admin_app``: ``POST /sql``,
and whatever the admin API grows), ``/metrics`` (on the public listener only with
``metrics.public``), ``/healthz`` and ``/readyz`` (on both listeners), a login form at
``/login``, and ``/`` listing what is there.

Access. With ``admin.token`` set, every route but ``/healthz``, ``/readyz`` and ``/login``
needs either the header ``Authorization: Bearer <token>`` (Prometheus, scripts) or the
session cookie the login form sets once the token is typed into it (a browser). The token is
compared in constant time, never logged and never stored in the cookie: the cookie holds its
expiry and a random nonce, signed with a key derived from the token (HMAC-SHA256), so
changing the token ends every session; ``/logout`` ends one. The cookie is ``HttpOnly``,
``SameSite=Strict``, and a request authenticated by it that changes something must come from
the admin listener's own pages (its ``Origin``, when sent, is the listener's).

Without a token the listener binds only a loopback address (the configuration refuses any
other), and answers only requests whose ``Host`` names the loopback (``127.0.0.1``,
``[::1]``, ``localhost``): a web page cannot reach it through a DNS name it points at
127.0.0.1 (DNS rebinding).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Middleware
from yarl import URL

from tagrelay.appkeys import CONFIG
from tagrelay.config.models import AdminConfig, is_loopback
from tagrelay.errors import ListenError
from tagrelay.logthrottle import LogThrottle
from tagrelay.web.admin import build_admin_app
from tagrelay.web.health import add_health_routes, add_metrics_route
from tagrelay.web.ingest import json_response
from tagrelay.web.templates import templates_dir

__all__ = [
    "ADMIN_LISTENER",
    "SESSION_COOKIE",
    "SESSION_MAX_AGE_SECS",
    "AdminListener",
    "admin_listener_ctx",
    "build_admin_listener_app",
]

log = logging.getLogger(__name__)

SESSION_COOKIE = "tagrelay_admin"
SESSION_MAX_AGE_SECS = 12 * 3600
"""How long a login lasts."""
SHUTDOWN_TIMEOUT_SECS = 1.0
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login"})
"""Paths answered without the token."""
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class AdminListener:
    """The relay application's admin listener: where it listens once bound (``port`` is
    the one chosen, for port 0), None before."""

    host: str
    port: int | None = None

    @property
    def url(self) -> str:
        """``http://host:port``; only once bound."""
        if self.port is None:
            raise RuntimeError("the admin listener is not listening")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


ADMIN_LISTENER = web.AppKey("admin_listener", AdminListener)
"""On the relay application when it runs an admin listener (``create_app``)."""


class Sessions:
    """Login sessions as signed cookies: ``<expires>.<nonce>.<mac>``, the MAC an HMAC-SHA256
    with a key derived from the token. Nothing but the revoked nonces (``/logout``) is kept."""

    def __init__(self, token: str, clock: Callable[[], float] = time.time) -> None:
        self._key = hashlib.sha256(b"tagrelay admin session\0" + token.encode()).digest()
        self._clock = clock
        self._revoked: dict[str, float] = {}  # nonce -> its cookie's expiry

    def _mac(self, expires: int, nonce: str) -> str:
        mac = hmac.new(self._key, f"{expires}.{nonce}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def issue(self) -> str:
        expires = int(self._clock()) + SESSION_MAX_AGE_SECS
        nonce = secrets.token_urlsafe(18)
        return f"{expires}.{nonce}.{self._mac(expires, nonce)}"

    def _parse(self, cookie: str) -> tuple[int, str] | None:
        expires_text, _, rest = cookie.partition(".")
        nonce, _, mac = rest.partition(".")
        if not expires_text.isdigit() or not nonce or not mac:
            return None
        expires = int(expires_text)
        if not hmac.compare_digest(mac.encode(), self._mac(expires, nonce).encode()):
            return None
        return expires, nonce

    def valid(self, cookie: str) -> bool:
        parsed = self._parse(cookie)
        if parsed is None:
            return False
        expires, nonce = parsed
        return expires > self._clock() and nonce not in self._revoked

    def revoke(self, cookie: str) -> None:
        parsed = self._parse(cookie)
        if parsed is None:
            return
        now = self._clock()
        for nonce, expires in list(self._revoked.items()):
            if expires <= now:
                del self._revoked[nonce]
        self._revoked[parsed[1]] = parsed[0]


class TokenCheck:
    """Whether a request carries the admin token (Bearer) or a valid session cookie."""

    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()
        self.sessions = Sessions(token)

    def matches(self, given: str) -> bool:
        """``given`` is the token. Both sides are hashed first, so the comparison takes the
        same time whatever the length of what was sent."""
        return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self._digest)

    def bearer(self, request: web.Request) -> bool | None:
        """None when the request sends no Bearer token; else whether it is the token."""
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.matches(credentials.strip())

    def session(self, request: web.Request) -> bool:
        cookie = request.cookies.get(SESSION_COOKIE)
        return cookie is not None and self.sessions.valid(cookie)


TOKEN_CHECK = web.RequestKey("admin_token_check", TokenCheck)
"""On a request to the admin listener when it has a token."""


def _loopback_host(request: web.Request) -> bool:
    host = request.url.host  # the Host header's name, without port or brackets
    return host is not None and is_loopback(host)


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not sent by a browser's cross-origin request
    try:
        url = URL(origin)
    except ValueError:
        return False
    return (url.host, url.port) == (request.url.host, request.url.port)


def _wants_html(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path of this listener only (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _unauthorized(request: web.Request) -> web.StreamResponse:
    if _wants_html(request):
        raise web.HTTPSeeOther(str(URL("/login").with_query(next=request.path_qs)))
    return json_response(
        401,
        {
            "error": "unauthorized",
            "message": "this admin listener needs its token: send 'Authorization: Bearer "
            "<admin.token>', or log in at /login",
        },
        {"WWW-Authenticate": 'Bearer realm="tagrelay admin"'},
    )


def _access(config: AdminConfig) -> Middleware:
    """The middleware that lets a request in, or answers 401 (403 for a foreign Host or
    Origin); see the module docstring."""
    token = config.token.get_secret_value()
    check = TokenCheck(token) if token else None
    refusals = LogThrottle(log)

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        if check is None:
            if not _loopback_host(request):
                return json_response(
                    403,
                    {
                        "error": "host_not_allowed",
                        "message": "without admin.token the admin listener answers only "
                        "requests to 127.0.0.1, [::1] or localhost; set admin.token to reach "
                        "it by another name",
                    },
                )
            return await handler(request)
        request[TOKEN_CHECK] = check
        if request.path in OPEN_PATHS:
            return await handler(request)
        bearer = check.bearer(request)
        if bearer is True:
            return await handler(request)
        if bearer is None and check.session(request):
            if request.method in UNSAFE_METHODS and not _same_origin(request):
                return json_response(
                    403,
                    {
                        "error": "origin_not_allowed",
                        "message": "a change through the admin session must come from the "
                        "admin listener's own pages",
                    },
                )
            return await handler(request)
        if bearer is False or SESSION_COOKIE in request.cookies:
            refusals.log(
                logging.WARNING,
                "refused",
                "admin request refused: wrong token or expired session",
                {"peer": request.remote, "path": request.path},
            )
        return _unauthorized(request)

    return access


def build_admin_listener_app(main_app: web.Application, config: AdminConfig) -> web.Application:
    """The admin listener's application: the admin socket's routes, the health and metrics
    routes, the login form, behind the access middleware."""
    app = build_admin_app(main_app)
    app.middlewares.append(_access(config))
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=jinja2.select_autoescape(["html"]),
    )
    add_health_routes(app.router, main_app, "")
    add_metrics_route(app.router, main_app, "")
    failed_logins = LogThrottle(log)

    async def index(request: web.Request) -> web.Response:
        links = sorted(
            {
                route.resource.canonical
                for route in request.app.router.routes()
                if route.method == "GET"
                and route.resource is not None
                and route.resource.canonical not in ("/", "/login")
                and "{" not in route.resource.canonical  # a pattern is not a page
            }
        )
        return aiohttp_jinja2.render_template(
            "admin_index.html",
            request,
            {"links": links, "logged_in": TOKEN_CHECK in request},
        )

    def login_page(request: web.Request, target: str, *, status: int, wrong: bool) -> web.Response:
        response = aiohttp_jinja2.render_template(
            "admin_login.html", request, {"next": target, "wrong": wrong}, status=status
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    async def login_form(request: web.Request) -> web.StreamResponse:
        target = _safe_next(request.query.get("next"))
        check = request.get(TOKEN_CHECK)
        if check is None or check.session(request):
            raise web.HTTPSeeOther(target)  # no token to ask for, or logged in already
        return login_page(request, target, status=200, wrong=False)

    async def login(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        target = _safe_next(str(form.get("next", "/")))
        check = request.get(TOKEN_CHECK)
        if check is None:
            raise web.HTTPSeeOther(target)
        given = form.get("token")
        if not isinstance(given, str) or not check.matches(given):
            failed_logins.log(
                logging.WARNING, "login", "admin login refused", {"peer": request.remote}
            )
            return login_page(request, target, status=401, wrong=True)
        response = web.HTTPSeeOther(target)
        response.set_cookie(
            SESSION_COOKIE,
            check.sessions.issue(),
            max_age=SESSION_MAX_AGE_SECS,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        raise response

    async def logout(request: web.Request) -> web.StreamResponse:
        check = request.get(TOKEN_CHECK)
        cookie = request.cookies.get(SESSION_COOKIE)
        if check is not None and cookie is not None:
            check.sessions.revoke(cookie)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    app.router.add_get("/", index)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    return app


def admin_listener_ctx(
    listener: AdminListener,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The relay application's start-up context for its admin listener (``admin`` in its
    configuration): bound once the spool and the forwarders are up, closed first. Fills in
    ``listener.port``."""

    async def ctx(main_app: web.Application) -> AsyncIterator[None]:
        config = main_app[CONFIG].admin
        runner = web.AppRunner(
            build_admin_listener_app(main_app, config),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_SECS,
        )
        await runner.setup()
        site = web.TCPSite(runner, listener.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenError(
                f"the admin listener could not listen on {config.listen}: "
                f"{exc.strerror or exc} (change admin.listen, or set admin.enabled: false)"
            ) from exc
        listener.port = _bound_port(site, config.port)
        log.info(
            "admin listening",
            extra={"url": listener.url, "token": "required" if config.has_token else "none"},
        )
        try:
            yield
        finally:
            listener.port = None
            await runner.cleanup()

    return ctx


def _bound_port(site: web.TCPSite, configured: int) -> int:
    server: Any = site._server  # aiohttp keeps the asyncio server there, unexposed
    sockets = list(getattr(server, "sockets", None) or ())
    return int(sockets[0].getsockname()[1]) if sockets else configured
