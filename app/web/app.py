"""The ASGI application of the review UI and REST API (`create_app`), and `serve`, which
builds it from the app config the way the CLI builds its services."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from app import __version__
from app.config import AppConfig
from app.web.auth import Authenticator
from app.web.context import WebContext
from app.web.deps import NotAuthenticated, http_error, user_errors
from app.web.routers import cameras, clusters, events, identities, pages, recognize

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


class BodyLimit:
    """Refuses request bodies over `limit` bytes (413) and bodies of unknown length (411)
    before anything reads them; adds the security headers to every answer."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get(b"content-length")
            if length is None and headers.get(b"transfer-encoding"):
                await _plain(send, 411, "a Content-Length is required")
                return
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                await _plain(send, 413, f"request body over {self.limit // 2**20} MiB")
                return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + _HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _plain(send: Send, status: int, text: str) -> None:
    body = f'{{"detail": "{text}"}}'.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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
    for r in (events.router, clusters.router, identities.router, recognize.router,
              cameras.router, pages.router):
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.exception_handler(NotAuthenticated)
    async def _login(request: Request, _exc: NotAuthenticated) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "authentication required"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def _user_error(_request: Request, exc: Exception) -> Response:
        """A user's mistake in an API call (no such identity, a photo without a face ...):
        404 or 400 with its one-line message (the pages catch theirs and show them)."""
        answer = http_error(exc)
        return JSONResponse({"detail": answer.detail}, status_code=answer.status_code)

    for error in user_errors():
        app.add_exception_handler(error, _user_error)
    app.add_middleware(BodyLimit, limit=ctx.max_upload_bytes * 4 + 2**16)
    return app


def build_context(cfg: AppConfig, gallery_path: str | None = None, *, host: str | None = None,
                  cameras: Callable[[], list[dict[str, Any]]] | None = None) -> WebContext:
    """Load the models and open the gallery as the CLI does (key from the environment)."""
    from app.runtime import make_detector, make_embedder, open_gallery, threshold

    auth = Authenticator(cfg.web, host or cfg.web.host)  # refuse a bad set-up before loading
    embedder = make_embedder(cfg)
    gallery = open_gallery(gallery_path or cfg.gallery.path, embedder, create=True)
    return WebContext(cfg, gallery, make_detector(cfg), embedder, threshold(cfg, embedder),
                      auth, cameras)


def serve(cfg: AppConfig, gallery_path: str | None = None, host: str | None = None,
          port: int | None = None) -> int:
    """`facemoe serve`: run the app with uvicorn until interrupted."""
    import uvicorn

    host = host or cfg.web.host
    port = cfg.web.port if port is None else port
    ctx = build_context(cfg, gallery_path, host=host)
    if not ctx.auth.required:
        log.warning("no web users or tokens configured: anyone on this machine can use "
                    "http://%s:%d/", host, port)
    log.info("serving the review UI on http://%s:%d/ (API docs at /docs), gallery %s",
             host, port, ctx.gallery.location)
    stop = threading.Event()
    ctx.start_refresher(stop)
    try:
        uvicorn.run(create_app(ctx), host=host, port=port, log_level="warning",
                    access_log=False)
    finally:
        stop.set()
        ctx.gallery.close()
    return 0
