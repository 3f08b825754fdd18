"""The fleet: `/api/boxes` (every box of the site from its heartbeats in the database) and
`/api/cameras` (every camera of those boxes; the daemon serving the app reports its own
cameras live). A box not heard of for three heartbeats (at least 60 s) is silent, and so are
its cameras; a camera name that two live boxes claim is flagged on both."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.web.context import WebContext
from app.web.deps import current_user, get_ctx
from app.web.models import BoxOut, CameraOut
from app.web.services import camera_rows, fleet_view

router = APIRouter(prefix="/api", tags=["fleet"], dependencies=[Depends(current_user)])


@router.get("/boxes", response_model=list[BoxOut],
            summary="The boxes (daemons) of the site and their cameras, from their heartbeats")
def list_boxes(ctx: WebContext = Depends(get_ctx)) -> list[BoxOut]:
    return [BoxOut(**b) for b in fleet_view(ctx)["boxes"]]


@router.get("/cameras", response_model=list[CameraOut], summary="Camera status, every box's")
def list_cameras(ctx: WebContext = Depends(get_ctx)) -> list[CameraOut]:
    return [CameraOut(**c) for c in camera_rows(ctx)]
