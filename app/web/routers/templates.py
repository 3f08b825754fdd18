"""`/api/templates`: one enrolled template: its aligned face photo, and deleting it (its
identity stays, even empty)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from app.web.auth import User
from app.web.context import WebContext
from app.web.deps import audited_writer, current_user, get_ctx
from app.web.services import CROP_CACHE

router = APIRouter(prefix="/api/templates", tags=["identities"],
                   dependencies=[Depends(current_user)])


@router.delete("/{template_id}", status_code=204, response_class=Response,
               summary="Delete one template")
def delete_template(template_id: int, ctx: WebContext = Depends(get_ctx),
                    _user: User = Depends(audited_writer)) -> Response:
    ctx.gallery.delete_template(template_id)
    return Response(status_code=204)


@router.get("/{template_id}/crop", response_class=Response,
            summary="The aligned face photo of a template (JPEG)",
            responses={200: {"content": {"image/jpeg": {}}}})
def template_crop(template_id: int, ctx: WebContext = Depends(get_ctx)) -> Response:
    data = ctx.gallery.pages.template_crop_jpeg(template_id)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": CROP_CACHE})
