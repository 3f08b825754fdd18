"""FastAPI dependencies: the context, the authenticated user, write checks (`writer`) and the
audited writer (`audited_writer`), upload reading, and the mapping of service errors onto HTTP
answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from app.faces import UPLOAD_MAX_PIXELS, FaceError, decode_image
from app.gallery import GalleryError
from app.gallery.audit import acting_as
from app.web.auth import COOKIE, CSRF_FIELD, CSRF_HEADER, User
from app.web.context import WebContext

log = logging.getLogger(__name__)


class NotAuthenticated(Exception):
    """No valid session or token: pages redirect to the login, the API answers 401."""


def get_ctx(request: Request) -> WebContext:
    return request.app.state.ctx


def current_user(request: Request) -> User:
    ctx = get_ctx(request)
    auth = ctx.auth
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        if auth.check_token(header[7:].strip()):
            return User("token", "token")
        raise HTTPException(401, "invalid bearer token")
    user = auth.read_session(request.cookies.get(COOKIE))
    if user is not None:
        return user
    if not auth.required:
        return User(auth.local_user, "local")
    raise NotAuthenticated()


def same_site(request: Request) -> bool:
    """False when a browser says the request comes from another site."""
    if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return False
    origin = request.headers.get("origin")
    if origin and origin != "null":
        return urlsplit(origin).netloc == request.headers.get("host", "")
    return origin != "null"


async def writer(request: Request) -> User:
    """The user of a mutating request: sessions must carry their CSRF token."""
    user = current_user(request)
    if user.via == "session":
        token = request.headers.get(CSRF_HEADER)
        if token is None and "form" in request.headers.get("content-type", ""):
            token = (await request.form()).get(CSRF_FIELD)
        if not get_ctx(request).auth.csrf_ok(user, token if isinstance(token, str) else None):
            raise HTTPException(403, "missing or wrong CSRF token (reload the page)")
    elif user.via == "local" and not same_site(request):
        raise HTTPException(403, "cross-site request refused")
    return user


async def audited_writer(request: Request) -> AsyncIterator[User]:
    """The audited writer, for every route that changes something (pages and API): `writer`'s
    user, and every change the request makes is audited as theirs (`acting_as` holds until
    the response: the handler, and the threads it runs work in, see it)."""
    user = await writer(request)
    with acting_as(user.audit_name):
        yield user


_DECODES = asyncio.Semaphore(2)  # images decoded at once (each up to 40 MP: ~120 MB)


async def read_upload(ctx: WebContext, upload: UploadFile, what: str):
    """Decode an uploaded image within the size and pixel limits, off the event loop (413
    with its size when too large, FaceError for what is not an acceptable image)."""
    limit, label = ctx.max_upload_bytes, f"{what} ({upload.filename or 'upload'})"
    data = await upload.read(limit + 1)
    if len(data) > limit:
        size = max(upload.size or 0, len(data))
        raise HTTPException(413, f"{label} is {_mib(size)}; at most {_mib(limit)} is accepted")
    async with _DECODES:
        return await run_in_threadpool(decode_image, data, label, max_bytes=limit,
                                       max_pixels=UPLOAD_MAX_PIXELS, known_formats=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def http_error(exc: Exception) -> HTTPException:
    """A service error as an HTTP answer: 404 for what does not exist, else 400."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    missing = isinstance(exc, GalleryError) and (text.startswith("no ") or " has no " in text)
    return HTTPException(404 if missing else 400, text)


USER_ERRORS: tuple[type[Exception], ...] = (GalleryError, FaceError)


def user_errors() -> tuple[type[Exception], ...]:
    from app.enroll import EnrollError

    return (*USER_ERRORS, EnrollError)
