"""A CompreFace-compatible subset of the REST API under /api/v1, so that CompreFace's SDKs and
tools built on it (Double Take) work unchanged against this server.

- Recognition: `POST /recognition/recognize`; faces: `POST|GET|DELETE /recognition/faces`
  (add by subject, list, delete a subject's faces), `DELETE /recognition/faces/{image_id}`,
  `GET .../{image_id}/img`, `POST .../{image_id}/verify`; subjects: `GET|POST
  /recognition/subjects`, `PUT|DELETE /recognition/subjects/{subject}`.
- Verification: `POST /verification/verify`; detection: `POST /detection/detect`.
- Images as multipart fields (`file`, `source_image`, `target_image`) or, with
  `Content-Type: application/json`, as base64 strings under the same names.
- Parameters as CompreFace documents them: `limit` (largest faces first, 0: all),
  `det_prob_threshold` (minimum detector score; it can only raise the detector's own
  threshold), `prediction_count` (subjects per face), `face_plugins` (`landmarks` and
  `calculator` are served; other plugins are ignored), `status` (adds `plugins_versions`).
- Keys: `x-api-key` against `web.api_keys` (sha256 hashes; `read_only` keys cannot change the
  gallery). Without the header the product's own credentials (bearer token, session) work;
  on loopback with no credentials configured at all, anyone on the machine may call it.
- `similarity` follows CompreFace's convention that 0.5 separates same from different: the
  cosine `c` is mapped linearly so that the server's match threshold `t` gives 0.5,
  `0.5 + (c - t) / (2 (1 - t))`, clamped to [0, 1].
- Errors answer `{"message": ..., "code": ...}`; no face found is HTTP 400 with code 28, as in
  CompreFace; other codes are the HTTP status.
- Image ids are the template ids of this gallery (strings of digits, not UUIDs).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse

from app.enroll import faces_from_array
from app.erasure import Outputs, erase
from app.faces import UPLOAD_MAX_PIXELS, decode_image, detect_faces
from app.gallery.audit import acting_as
from app.gallery.collection import FaceCollection
from app.records import Detection
from app.web.auth import User, hash_token
from app.web.context import WebContext
from app.web.deps import NotAuthenticated, current_user, get_ctx, user_errors, writer

log = logging.getLogger(__name__)
NO_FACE = "No face is found in the given image"
NO_FACE_CODE = 28  # CompreFace's code for it; clients test it to mean "nothing to recognise"
_ADD_LOCK = threading.Lock()  # one face added at a time, so its new template id is known


class CompreFaceError(Exception):
    """An answer in CompreFace's error shape."""

    def __init__(self, status: int, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code or status

    def response(self) -> JSONResponse:
        return JSONResponse({"message": self.message, "code": self.code},
                            status_code=self.status)


def _validation_message(exc: RequestValidationError) -> str:
    err = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
    return f"{where}: {err.get('msg', 'invalid value')}"


class _Route(APIRoute):
    """Answers every error of these endpoints in CompreFace's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        errors = user_errors()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except CompreFaceError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return CompreFaceError(400, _validation_message(exc)).response()
            except HTTPException as exc:
                return CompreFaceError(exc.status_code, str(exc.detail)).response()
            except NotAuthenticated:
                return CompreFaceError(401, "an x-api-key header is required").response()
            except errors as exc:
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                missing = text.startswith("no ") or " has no " in text
                return CompreFaceError(404 if missing else 400, text).response()

        return route


router = APIRouter(prefix="/api/v1", tags=["CompreFace-compatible"], route_class=_Route)


# --- who is calling ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    user: User
    read_only: bool


def caller(request: Request) -> Caller:
    """The `x-api-key`'s caller, else the product's own credentials (local access only when
    no API key is configured)."""
    ctx = get_ctx(request)
    keys = ctx.cfg.web.api_keys
    given = request.headers.get("x-api-key")
    if given is not None:
        got = hash_token(given.strip())
        for k in keys:
            if hmac.compare_digest(got, k.key_hash):
                return Caller(User(f"api key {k.name}", "apikey"), k.read_only)
        raise CompreFaceError(401, "the x-api-key is not a key of this server")
    user = current_user(request)
    if user.via == "local" and keys:
        raise CompreFaceError(401, "an x-api-key header is required")
    return Caller(user, False)


async def changer(request: Request) -> AsyncIterator[Caller]:
    """A caller that may change the gallery: not a read-only key; sessions with CSRF. As
    `audited_writer`: every change the request makes is audited as the caller's."""
    who = caller(request)
    if who.read_only:
        raise CompreFaceError(403, "this API key is read-only")
    if who.user.via != "apikey":
        await writer(request)
    with acting_as(who.user.audit_name):
        yield who


# --- inputs and outputs -----------------------------------------------------------------------


async def read_images(request: Request, ctx: WebContext, *names: str) -> list[np.ndarray]:
    """The named images of a multipart form, or base64 strings of a JSON body."""
    limit = ctx.max_upload_bytes
    found: list[tuple[str, bytes]] = []
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise CompreFaceError(400, "the body is not valid JSON") from None
        for name in names:
            value = body.get(name) if isinstance(body, dict) else None
            if not isinstance(value, str) or not value:
                raise CompreFaceError(400, f"{name} is required (a base64 string)")
            value = value.split(",", 1)[1] if value.startswith("data:") else value
            try:
                found.append((name, base64.b64decode(value, validate=True)))
            except (binascii.Error, ValueError):
                raise CompreFaceError(400, f"{name} is not valid base64") from None
    else:
        try:
            form = await request.form()
        except (AssertionError, ValueError) as exc:  # not a multipart or urlencoded body
            raise CompreFaceError(400, f"the body is not a form: {exc}") from None
        for name in names:
            upload = form.get(name)
            if not isinstance(upload, UploadFile):
                raise CompreFaceError(400, f"{name} is required (an image file)")
            found.append((f"{name} ({upload.filename or 'upload'})", await upload.read(limit + 1)))
    return [decode_image(data, what, max_bytes=limit, max_pixels=UPLOAD_MAX_PIXELS,
                         known_formats=True) for what, data in found]


@dataclass(frozen=True)
class Options:
    limit: int
    det_prob_threshold: float
    plugins: frozenset[str]
    status: bool


def options(
    limit: int = Query(0, ge=0, description="the largest faces first; 0: every face"),
    det_prob_threshold: float = Query(0.0, ge=0, le=1, description="minimum detector score"),
    face_plugins: str = Query("", description="landmarks, calculator (others are ignored)"),
    status: bool = Query(False, description="add plugins_versions"),
) -> Options:
    plugins = frozenset(p.strip() for p in face_plugins.split(",") if p.strip())
    return Options(limit, det_prob_threshold, plugins, status)


def similarity(cosine: float, threshold: float) -> float:
    """CompreFace's similarity: 0.5 at the match threshold, linear in the cosine."""
    return round(float(np.clip(0.5 + (cosine - threshold) / (2 * (1 - threshold)), 0, 1)), 5)


def face_json(det: Detection, vec: np.ndarray | None, opts: Options,
              shape: tuple[int, ...]) -> dict[str, Any]:
    x, y, w, h = (float(v) for v in det.bbox[:4])
    height, width = shape[:2]
    out: dict[str, Any] = {"box": {
        "probability": round(float(det.score), 5),
        "x_max": min(round(x + w), width), "y_max": min(round(y + h), height),
        "x_min": max(round(x), 0), "y_min": max(round(y), 0)}}
    if "landmarks" in opts.plugins:
        out["landmarks"] = [[round(float(px)), round(float(py))] for px, py in det.landmarks]
    if "calculator" in opts.plugins and vec is not None:
        out["embedding"] = [float(v) for v in vec]
    return out


def answer(ctx: WebContext, opts: Options, result: list) -> dict[str, Any]:
    out: dict[str, Any] = {"result": result}
    if opts.status:
        out["plugins_versions"] = {"detector": type(ctx.detector).__name__,
                                   "calculator": ctx.embedder.model}
    return out


def faces_of(ctx: WebContext, image: np.ndarray, opts: Options, *,
             limit: int | None = None) -> tuple[list[Detection], np.ndarray]:
    dets, vecs = ctx.recognizer.faces(image, min_score=opts.det_prob_threshold,
                                      limit=opts.limit if limit is None else limit)
    if not dets:
        raise CompreFaceError(400, NO_FACE, NO_FACE_CODE)
    return dets, vecs


def collection(ctx: WebContext) -> FaceCollection:
    return FaceCollection(ctx.gallery.store)


# --- recognition ------------------------------------------------------------------------------


@router.post("/recognition/recognize", summary="Every face of an image with its nearest subjects")
async def recognize(request: Request, opts: Options = Depends(options),
                    prediction_count: int = Query(1, ge=1, le=100),
                    ctx: WebContext = Depends(get_ctx),
                    _who: Caller = Depends(caller)) -> dict:
    (image,) = await read_images(request, ctx, "file")

    def work() -> list:
        dets, vecs = faces_of(ctx, image, opts)
        t = ctx.threshold
        return [{**face_json(d, v, opts, image.shape),
                 "subjects": [{"subject": c.name, "similarity": similarity(c.score, t)}
                              for c in cands]}
                for d, v, cands in zip(dets, vecs, ctx.recognizer.nearest(vecs, prediction_count),
                                       strict=True)]

    return answer(ctx, opts, await run_in_threadpool(work))


@router.post("/recognition/faces", status_code=201, summary="Add a face (the largest) to a subject")
async def add_face(request: Request, subject: str = Query(..., min_length=1, max_length=256),
                   det_prob_threshold: float = Query(0.0, ge=0, le=1),
                   ctx: WebContext = Depends(get_ctx), who: Caller = Depends(changer)) -> dict:
    from app.enroll import enroll

    (image,) = await read_images(request, ctx, "file")

    def work() -> dict:
        with ctx.recognizer.model_lock:
            ranked = sorted(detect_faces(ctx.detector, image),
                            key=lambda d: -float(d.bbox[2] * d.bbox[3]))
            index = next((i for i, d in enumerate(ranked) if d.score >= det_prob_threshold),
                         None)
            if index is None:
                raise CompreFaceError(400, NO_FACE, NO_FACE_CODE)
            faces = faces_from_array(image, "an API upload", ctx.detector, index)
        with _ADD_LOCK:
            enroll(subject, [], ctx.detector, ctx.embedder, ctx.gallery, faces=faces)
            face = collection(ctx).newest(subject)
        return {"image_id": str(face.id), "subject": face.subject}

    return await run_in_threadpool(work)


@router.get("/recognition/faces", summary="List faces (of a subject, or all), a page at a time")
def list_faces(page: int = Query(0, ge=0), size: int = Query(20, ge=1, le=1000),
               subject: str | None = Query(None, min_length=1),
               ctx: WebContext = Depends(get_ctx), _who: Caller = Depends(caller)) -> dict:
    faces, total = collection(ctx).faces(subject=subject, offset=page * size, limit=size)
    return {"faces": [{"image_id": str(f.id), "subject": f.subject} for f in faces],
            "page_number": page, "page_size": size, "total_pages": -(-total // size),
            "total_elements": total}


@router.delete("/recognition/faces", summary="Delete every face of a subject (it stays)")
def delete_faces(subject: str | None = Query(None, min_length=1),
                 ctx: WebContext = Depends(get_ctx), who: Caller = Depends(changer)) -> dict:
    if subject is None:
        raise CompreFaceError(400, "subject is required (this server does not delete every "
                                   "face of the gallery at once)")
    return {"deleted": collection(ctx).delete_faces(subject)}


def _face_id(image_id: str) -> int:
    if not image_id.isdigit():
        raise CompreFaceError(404, f"no face with id {image_id}")
    return int(image_id)


@router.delete("/recognition/faces/{image_id}", summary="Delete one face")
def delete_face(image_id: str, ctx: WebContext = Depends(get_ctx),
                who: Caller = Depends(changer)) -> dict:
    face, _ = collection(ctx).vector(_face_id(image_id))
    ctx.gallery.delete_template(face.id)
    return {"image_id": str(face.id), "subject": face.subject}


@router.get("/recognition/faces/{image_id}/img", response_class=Response,
            summary="The aligned photo of a face (JPEG)",
            responses={200: {"content": {"image/jpeg": {}}}})
def face_image(image_id: str, ctx: WebContext = Depends(get_ctx),
               _who: Caller = Depends(caller)) -> Response:
    data = ctx.gallery.pages.template_crop_jpeg(_face_id(image_id))
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private"})


@router.post("/recognition/faces/{image_id}/verify",
             summary="The faces of an image against one stored face")
async def verify_face(image_id: str, request: Request, opts: Options = Depends(options),
                      ctx: WebContext = Depends(get_ctx), _who: Caller = Depends(caller)) -> dict:
    _, stored = collection(ctx).vector(_face_id(image_id))
    (image,) = await read_images(request, ctx, "file")

    def work() -> list:
        dets, vecs = faces_of(ctx, image, opts)
        found = [{**face_json(d, v, opts, image.shape),
                  "similarity": similarity(float(v @ stored), ctx.threshold)}
                 for d, v in zip(dets, vecs, strict=True)]
        return sorted(found, key=lambda f: -f["similarity"])

    return answer(ctx, opts, await run_in_threadpool(work))


# --- subjects ---------------------------------------------------------------------------------


@router.get("/recognition/subjects", summary="Every subject's name")
def list_subjects(ctx: WebContext = Depends(get_ctx), _who: Caller = Depends(caller)) -> dict:
    return {"subjects": [i.name for i in ctx.gallery.identities()]}


def _subject_of(body: Any) -> str:
    name = body.get("subject") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise CompreFaceError(400, "subject is required (a JSON body {\"subject\": NAME})")
    return name


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise CompreFaceError(400, "the body is not valid JSON") from None


@router.post("/recognition/subjects", status_code=201, summary="Add a subject without a face")
async def add_subject(request: Request, ctx: WebContext = Depends(get_ctx),
                      who: Caller = Depends(changer)) -> dict:
    name = _subject_of(await _json(request))
    return {"subject": collection(ctx).add_subject(name)}


@router.put("/recognition/subjects/{subject}",
            summary="Rename a subject (into an existing one: its faces move there)")
async def rename_subject(subject: str, request: Request, ctx: WebContext = Depends(get_ctx),
                         who: Caller = Depends(changer)) -> dict:
    new = _subject_of(await _json(request))
    names = {i.name for i in ctx.gallery.identities()}
    if new.strip() in names and new.strip() != subject.strip():
        ctx.gallery.merge_identities(subject, new)
    else:
        ctx.gallery.rename(subject, new)
    return {"updated": True}


@router.delete("/recognition/subjects/{subject}",
               summary="Delete a subject with its faces and the events that name it (erasure)")
def delete_subject(subject: str, ctx: WebContext = Depends(get_ctx),
                   who: Caller = Depends(changer)) -> dict:
    r = erase(ctx.gallery, Outputs.of(ctx.cfg), name=subject)
    if r.unfinished:
        raise CompreFaceError(500, f"{r.removed} deleted, but not everything was erased "
                                   f"({r.errors[0] if r.errors else 'see the log'}): delete again")
    return {"subject": r.removed or subject.strip()}


# --- verification and detection ---------------------------------------------------------------


@router.post("/verification/verify",
             summary="The largest face of source_image against the faces of target_image")
async def verify(request: Request, opts: Options = Depends(options),
                 ctx: WebContext = Depends(get_ctx), _who: Caller = Depends(caller)) -> dict:
    source, target = await read_images(request, ctx, "source_image", "target_image")

    def work() -> list:
        s_dets, s_vecs = faces_of(ctx, source, opts, limit=1)
        t_dets, t_vecs = faces_of(ctx, target, opts)
        matches = [{**face_json(d, v, opts, target.shape),
                    "similarity": similarity(float(v @ s_vecs[0]), ctx.threshold)}
                   for d, v in zip(t_dets, t_vecs, strict=True)]
        return [{"source_image_face": face_json(s_dets[0], s_vecs[0], opts, source.shape),
                 "face_matches": sorted(matches, key=lambda f: -f["similarity"])}]

    return answer(ctx, opts, await run_in_threadpool(work))


@router.post("/detection/detect", summary="Every face of an image: box and detector score")
async def detect(request: Request, opts: Options = Depends(options),
                 ctx: WebContext = Depends(get_ctx), _who: Caller = Depends(caller)) -> dict:
    (image,) = await read_images(request, ctx, "file")

    def work() -> list:
        if "calculator" in opts.plugins:
            dets, vecs = faces_of(ctx, image, opts)
            return [face_json(d, v, opts, image.shape) for d, v in zip(dets, vecs, strict=True)]
        with ctx.recognizer.model_lock:
            dets = sorted(detect_faces(ctx.detector, image),
                          key=lambda d: -float(d.bbox[2] * d.bbox[3]))
        dets = [d for d in dets if d.score >= opts.det_prob_threshold][:opts.limit or None]
        if not dets:
            raise CompreFaceError(400, NO_FACE, NO_FACE_CODE)
        return [face_json(d, None, opts, image.shape) for d in dets]

    return answer(ctx, opts, await run_in_threadpool(work))
