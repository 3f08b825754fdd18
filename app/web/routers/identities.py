"""`/api/identities`: the gallery: list, enroll from photos, rename, merge, delete
(`app.erasure`, as the CLI), add templates. One template is `/api/templates`
(`app.web.routers.templates`)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from app.erasure import Outputs, erase
from app.web.auth import User
from app.web.context import WebContext
from app.web.deps import audited_writer, current_user, get_ctx
from app.web.models import (
    Enrolled,
    IdentityDetail,
    IdentityOut,
    IdentityPage,
    MergeIdentityRequest,
    Removed,
    RenameRequest,
)
from app.web.services import enroll_uploads, identity_detail, identity_out

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/identities", tags=["identities"],
                   dependencies=[Depends(current_user)])


@router.get("", response_model=IdentityPage, summary="List identities by name")
def list_identities(search: str = "", offset: int = Query(0, ge=0),
                    limit: int = Query(50, ge=1, le=500),
                    ctx: WebContext = Depends(get_ctx)) -> IdentityPage:
    rows, total = ctx.gallery.pages.identities(search=search, offset=offset, limit=limit)
    return IdentityPage(identities=[identity_out(i) for i in rows], total=total)


@router.post("", response_model=Enrolled, status_code=201,
             summary="Enroll a person (new or existing) from photos (largest face of each)")
async def create_identity(name: str = Form(...), photos: list[UploadFile] = File(...),
                          ctx: WebContext = Depends(get_ctx),
                          _user: User = Depends(audited_writer)) -> Enrolled:
    return Enrolled.of(await enroll_uploads(ctx, name, photos))


@router.get("/{identity_id}", response_model=IdentityDetail,
            summary="One identity with its templates")
def get_identity(identity_id: int, ctx: WebContext = Depends(get_ctx)) -> IdentityDetail:
    return identity_detail(ctx, identity_id)


@router.patch("/{identity_id}", response_model=IdentityOut, summary="Rename")
def rename_identity(identity_id: int, body: RenameRequest, ctx: WebContext = Depends(get_ctx),
                    _user: User = Depends(audited_writer)) -> IdentityOut:
    old = ctx.gallery.pages.identity(identity_id).name
    ctx.gallery.rename(old, body.name)
    return identity_out(ctx.gallery.pages.identity(identity_id))


@router.delete("/{identity_id}", response_model=Removed,
               summary="Delete an identity with its templates, crops and events (erasure)")
def delete_identity(identity_id: int, ctx: WebContext = Depends(get_ctx),
                    _user: User = Depends(audited_writer)) -> Removed:
    r = erase(ctx.gallery, Outputs.of(ctx.cfg), identity_id=identity_id)
    return Removed(removed=r.removed, events_deleted=r.events_deleted,
                   jsonl_lines_removed=r.jsonl_lines_removed,
                   snapshots_deleted=len(r.snapshots_deleted), unfinished=r.unfinished,
                   errors=r.errors)


@router.post("/{identity_id}/merge", response_model=IdentityOut,
             summary="Merge this identity into another (templates and events move)")
def merge_identity(identity_id: int, body: MergeIdentityRequest,
                   ctx: WebContext = Depends(get_ctx), _user: User = Depends(audited_writer)
                   ) -> IdentityOut:
    pages = ctx.gallery.pages
    src, dst = pages.identity(identity_id).name, pages.identity(body.into).name
    ctx.gallery.merge_identities(src, dst)
    return identity_out(pages.identity(body.into))


@router.post("/{identity_id}/templates", response_model=Enrolled,
             summary="Add templates from photos")
async def add_templates(identity_id: int, photos: list[UploadFile] = File(...),
                        ctx: WebContext = Depends(get_ctx),
                        _user: User = Depends(audited_writer)) -> Enrolled:
    name = ctx.gallery.pages.identity(identity_id).name
    return Enrolled.of(await enroll_uploads(ctx, name, photos))
