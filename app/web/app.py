"""The ASGI application of the review UI and REST API (`create_app`), and `serve`, which
builds it from the app config the way the CLI builds its services."""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import socket
import sys
import threading
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.config import AppConfig
from app.web import openapi
from app.web.auth import COOKIE, AuthConfigError, Authenticator, hash_token
from app.web.context import WebContext
from app.web.deps import NotAuthenticated, http_error, user_errors
from app.web.guard import HostGuard, json_answer
from app.web.routers import (
    clusters,
    compreface,
    events,
    fleet,
    identities,
    pages,
    recognize,
    templates,
)

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
     b"frame-ancestors 'none'; form-action 'self'"),
]


LOGIN_BODY_LIMIT = 2**16  # what a request without credentials may send (the login form)


class BodyLimit:
    """Guards request bodies before anything reads them: over `limit` bytes -> 413 with the
    size, of unknown length -> 411, a body from a client without credentials (when some are
    required) -> 401, or over `LOGIN_BODY_LIMIT` on /login -> 413; a body that stops arriving
    for `timeout_s` -> 408. Adds the security headers to every answer."""

    def __init__(self, app: ASGIApp, limit: int, auth: Authenticator,
                 timeout_s: float = 30.0, api_key_hashes: tuple[str, ...] = ()) -> None:
        self.app, self.limit, self.auth, self.timeout_s = app, limit, auth, timeout_s
        self.api_key_hashes = api_key_hashes  # the x-api-keys of /api/v1 (web.api_keys)

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        length = headers.get(b"content-length")
        if length is None:
            return (411, "a Content-Length is required") if headers.get(b"transfer-encoding") \
                else None
        if not length.isdigit():
            return 400, "bad Content-Length"
        size = int(length)
        login = scope["path"] == "/login"
        limit = LOGIN_BODY_LIMIT if login else self.limit
        if size > limit:
            return 413, (f"request body of {size / 2**20:.1f} MiB is over the limit of "
                         f"{limit / 2**20:.1f} MiB")
        if self.auth.required and not login and size and not self._credentials(headers):
            return 401, "authentication required"
        return None

    def _credentials(self, headers: dict[bytes, bytes]) -> bool:
        """A valid bearer token, session cookie or x-api-key (checked again by the route)."""
        key = headers.get(b"x-api-key")
        if key is not None:
            got = hash_token(key.decode("latin-1").strip())
            return any(hmac.compare_digest(got, h) for h in self.api_key_hashes)
        bearer = headers.get(b"authorization", b"").decode("latin-1")
        if bearer.lower().startswith("bearer "):
            return self.auth.check_token(bearer[7:].strip())
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:
            return False
        morsel = cookies.get(COOKIE)
        return morsel is not None and self.auth.read_session(morsel.value) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                extra = [(b"www-authenticate", b"Bearer")] if refusal[0] == 401 else []
                await json_answer(send, *refusal, [*extra, *_HEADERS])
                return
        state = {"started": False, "answered": False, "body_done": scope["method"] in
                 ("GET", "HEAD", "OPTIONS")}

        async def timed_receive() -> Message:
            if state["body_done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                if not state["started"]:
                    state["answered"] = True
                    await json_answer(send, 408, f"the request body stopped arriving for "
                                                 f"{self.timeout_s:g} s", list(_HEADERS))
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def send_with_headers(message: Message) -> None:
            if state["answered"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
                message["headers"] = list(message.get("headers", [])) + _HEADERS
            await send(message)

        try:
            await self.app(scope, timed_receive, send_with_headers)
        except ClientDisconnect:
            if not state["answered"]:
                raise


def create_app(ctx: WebContext) -> FastAPI:
    """The review UI (HTML pages) and the REST API (`/api/...`, OpenAPI at /docs) over the
    services of `ctx`."""
    # /docs is rendered here from the OpenAPI schema: FastAPI's Swagger UI and ReDoc pages load
    # their scripts from a CDN, which an edge box may not reach (and the CSP forbids)
    app = FastAPI(title="FaceMoE Edge", version=__version__, docs_url=None, redoc_url=None,
                  description="Review events and unknown faces, manage the gallery, recognise "
                              "and verify faces. Pages use a session cookie (with CSRF "
                              "tokens); the API takes `Authorization: Bearer TOKEN`.")
    app.state.ctx = ctx
    openapi.install(app)
    for r in (events.router, clusters.router, identities.router, templates.router,
              recognize.router,
              compreface.router, fleet.router, pages.router):
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.exception_handler(NotAuthenticated)
    async def _login(request: Request, _exc: NotAuthenticated) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "authentication required"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(pages.PageRefused)
    async def _page_refused(_request: Request, exc: pages.PageRefused) -> Response:
        return exc.response  # a page's form refused: back where it came from, with the error

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404 and not request.url.path.startswith("/api/"):
            response = pages.page(request, "404.html", None, path=request.url.path)
            response.status_code = 404
            return response
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def _user_error(_request: Request, exc: Exception) -> Response:
        """A user's mistake in an API call (no such identity, a photo without a face ...):
        404 or 400 with its one-line message (the pages catch theirs and show them)."""
        answer = http_error(exc)
        return JSONResponse({"detail": answer.detail}, status_code=answer.status_code)

    for error in user_errors():
        app.add_exception_handler(error, _user_error)
    web = ctx.cfg.web
    app.add_middleware(BodyLimit, limit=ctx.max_upload_bytes * 4 + 2**16, auth=ctx.auth,
                       timeout_s=web.body_timeout_s,
                       api_key_hashes=tuple(k.key_hash for k in web.api_keys))
    # outermost: a request for another host name is refused before anything else runs
    app.add_middleware(HostGuard, allowed=web.allowed_hosts, bind_host=ctx.auth.host,
                       check_origin=not ctx.auth.required)
    return app


def build_context(cfg: AppConfig, gallery_path: str | None = None, *, host: str | None = None,
                  cameras: Callable[[], list[dict[str, Any]]] | None = None) -> WebContext:
    """Load the models and open the gallery as the CLI does (key from the environment)."""
    from app.runtime import make_detector, make_embedder, open_gallery, open_set, threshold

    auth = Authenticator(cfg.web, host or cfg.web.host)  # refuse a bad set-up before loading
    embedder = make_embedder(cfg)
    gallery = open_gallery(gallery_path or cfg.gallery.path, embedder, create=True)
    return WebContext(cfg, gallery, make_detector(cfg), embedder, threshold(cfg, embedder),
                      auth, cameras, open_set(cfg, embedder))


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; AuthConfigError (one line) when it cannot be had,
    e.g. the port is in use, before any model is loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AuthConfigError(f"cannot serve on {host}:{port}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise AuthConfigError(f"cannot serve on {host}:{port}: {why}") from exc
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: FastAPI, **kwargs: Any):
    """uvicorn's settings for the app: X-Forwarded-For is left to the app, which trusts it
    only from `web.trusted_proxies` (uvicorn would take it from any loopback peer)."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, proxy_headers=False,
                          **kwargs)


def serve(cfg: AppConfig, gallery_path: str | None = None, host: str | None = None,
          port: int | None = None) -> int:
    """`facemoe serve`: run the app with uvicorn until interrupted."""
    import uvicorn

    host = host or cfg.web.host
    port = cfg.web.port if port is None else port
    Authenticator(cfg.web, host)  # a bad set-up is refused before the port is taken
    sock = listen(host, port)
    try:
        ctx = build_context(cfg, gallery_path, host=host)
    except BaseException:
        sock.close()
        raise
    if not ctx.auth.required:
        log.warning("no web users or tokens configured: anyone on this machine can use "
                    "http://%s:%d/", host, port)
    print(f"facemoe: serving the review UI on http://{host}:{port}/ (API docs at /docs), "
          f"gallery {ctx.gallery.location}", file=sys.stderr, flush=True)
    stop = threading.Event()
    ctx.start_refresher(stop)
    try:
        uvicorn.Server(uvicorn_config(create_app(ctx))).run(sockets=[sock])
    finally:
        stop.set()
        ctx.gallery.close()
        sock.close()
    return 0
