"""`/api/identities` and `/api/templates`: the gallery: list, enroll from photos, rename,
merge, delete (`app.erasure`, as the CLI), templates and their photos."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.enroll import EnrollReport, enroll, faces_from_array
from app.erasure import Outputs, erase
from app.gallery.audit import acting_as
from app.gallery.review import IdentityRowInfo
from app.web.auth import User
from app.web.context import WebContext
from app.web.deps import current_user, get_ctx, read_upload, writer
from app.web.models import (
    Enrolled,
    IdentityDetail,
    IdentityOut,
    IdentityPage,
    MergeIdentityRequest,
    Removed,
    RenameRequest,
    TemplateOut,
)
from app.web.routers.events import CROP_CACHE

log = logging.getLogger(__name__)
router = APIRouter(tags=["identities"])
MAX_PHOTOS = 20


def identity_out(i: IdentityRowInfo) -> IdentityOut:
    return IdentityOut(id=i.id, name=i.name, templates=i.templates, created_at=i.created_at)


def identity_detail(ctx: WebContext, identity_id: int) -> IdentityDetail:
    i = ctx.gallery.review.identity(identity_id)
    refs = ctx.gallery.review.template_refs(i.name)
    return IdentityDetail(
        **identity_out(i).model_dump(),
        template_list=[TemplateOut(id=t.id, source=t.source, quality=t.quality, model=t.model,
                                   created_at=t.created_at,
                                   crop_url=f"/api/templates/{t.id}/crop" if t.has_crop else None)
                       for t in refs])


async def enroll_uploads(ctx: WebContext, user: User, name: str,
                         photos: list[UploadFile]) -> EnrollReport:
    """Decode the photos within the limits and enroll their faces as the CLI does."""
    from app.enroll import EnrollError

    if not photos or len(photos) > MAX_PHOTOS:
        raise EnrollError(f"give 1 to {MAX_PHOTOS} photos")
    images = [(p.filename or f"photo {k}", await read_upload(ctx, p, "photo"))
              for k, p in enumerate(photos)]

    def work() -> EnrollReport:
        with ctx.recognizer.model_lock:
            faces = [f for fname, img in images
                     for f in faces_from_array(img, f"upload {fname}", ctx.detector, 0)]
        with acting_as(user.audit_name):
            return enroll(name, [], ctx.detector, ctx.embedder, ctx.gallery, faces=faces)

    return await run_in_threadpool(work)


@router.get("/api/identities", response_model=IdentityPage, summary="List identities by name")
def list_identities(search: str = "", offset: int = Query(0, ge=0),
                    limit: int = Query(50, ge=1, le=500), ctx: WebContext = Depends(get_ctx),
                    _user: User = Depends(current_user)) -> IdentityPage:
    rows, total = ctx.gallery.review.identities(search=search, offset=offset, limit=limit)
    return IdentityPage(identities=[identity_out(i) for i in rows], total=total)


@router.post("/api/identities", response_model=Enrolled, status_code=201,
             summary="Enroll a person (new or existing) from photos (largest face of each)")
async def create_identity(name: str = Form(...), photos: list[UploadFile] = File(...),
                          ctx: WebContext = Depends(get_ctx),
                          user: User = Depends(writer)) -> Enrolled:
    return Enrolled.of(await enroll_uploads(ctx, user, name, photos))


@router.get("/api/identities/{identity_id}", response_model=IdentityDetail,
            summary="One identity with its templates")
def get_identity(identity_id: int, ctx: WebContext = Depends(get_ctx),
                 _user: User = Depends(current_user)) -> IdentityDetail:
    return identity_detail(ctx, identity_id)


@router.patch("/api/identities/{identity_id}", response_model=IdentityOut, summary="Rename")
def rename_identity(identity_id: int, body: RenameRequest, ctx: WebContext = Depends(get_ctx),
                    user: User = Depends(writer)) -> IdentityOut:
    old = ctx.gallery.review.identity(identity_id).name
    with acting_as(user.audit_name):
        ctx.gallery.rename(old, body.name)
    return identity_out(ctx.gallery.review.identity(identity_id))


@router.delete("/api/identities/{identity_id}", response_model=Removed,
               summary="Delete an identity with its templates, crops and events (erasure)")
def delete_identity(identity_id: int, ctx: WebContext = Depends(get_ctx),
                    user: User = Depends(writer)) -> Removed:
    with acting_as(user.audit_name):
        r = erase(ctx.gallery, Outputs.of(ctx.cfg), identity_id=identity_id)
    return Removed(removed=r.removed, events_deleted=r.events_deleted,
                   jsonl_lines_removed=r.jsonl_lines_removed,
                   snapshots_deleted=len(r.snapshots_deleted), unfinished=r.unfinished,
                   errors=r.errors)


@router.post("/api/identities/{identity_id}/merge", response_model=IdentityOut,
             summary="Merge this identity into another (templates and events move)")
def merge_identity(identity_id: int, body: MergeIdentityRequest,
                   ctx: WebContext = Depends(get_ctx), user: User = Depends(writer)
                   ) -> IdentityOut:
    review = ctx.gallery.review
    src, dst = review.identity(identity_id).name, review.identity(body.into).name
    with acting_as(user.audit_name):
        review.merge_identities(src, dst)
    return identity_out(review.identity(body.into))


@router.post("/api/identities/{identity_id}/templates", response_model=Enrolled,
             summary="Add templates from photos")
async def add_templates(identity_id: int, photos: list[UploadFile] = File(...),
                        ctx: WebContext = Depends(get_ctx),
                        user: User = Depends(writer)) -> Enrolled:
    name = ctx.gallery.review.identity(identity_id).name
    return Enrolled.of(await enroll_uploads(ctx, user, name, photos))


@router.delete("/api/templates/{template_id}", status_code=204, response_class=Response,
               summary="Delete one template")
def delete_template(template_id: int, ctx: WebContext = Depends(get_ctx),
                    user: User = Depends(writer)) -> Response:
    with acting_as(user.audit_name):
        ctx.gallery.review.delete_template(template_id)
    return Response(status_code=204)


@router.get("/api/templates/{template_id}/crop", response_class=Response,
            summary="The aligned face photo of a template (JPEG)",
            responses={200: {"content": {"image/jpeg": {}}}})
def template_crop(template_id: int, ctx: WebContext = Depends(get_ctx),
                  _user: User = Depends(current_user)) -> Response:
    data = ctx.gallery.review.template_crop_jpeg(template_id)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": CROP_CACHE})
