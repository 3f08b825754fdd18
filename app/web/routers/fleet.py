"""The fleet: `/api/boxes` (every box of the site from its heartbeats in the database) and
`/api/cameras` (every camera of those boxes; the daemon serving the app reports its own
cameras live). A box not heard of for three heartbeats (at least 60 s) is silent, and so are
its cameras; a camera name that two live boxes claim is flagged on both."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from app.gallery.fleet import Fleet, site_view
from app.web.auth import User
from app.web.context import WebContext
from app.web.deps import current_user, get_ctx
from app.web.models import BoxOut, CameraOut

router = APIRouter(prefix="/api", tags=["fleet"])


def silent_after_s(ctx: WebContext) -> float:
    """As the daemons judge each other's liveness (`Daemon.beat`)."""
    return max(60.0, 3 * ctx.cfg.daemon.heartbeat_s)


def fleet_view(ctx: WebContext) -> dict[str, Any]:
    """Boxes, their cameras and the camera-name clashes (`app.gallery.fleet.site_view`)."""
    return site_view(Fleet(ctx.gallery.store).boxes(), silent_after_s(ctx))


def camera_rows(ctx: WebContext) -> list[dict[str, Any]]:
    """The cameras: the daemon's own, live, when it serves the app; else every box's."""
    if ctx.cameras is not None:
        box = ctx.cfg.daemon.box
        clash = {c["name"]: c["clash"] for b in fleet_view(ctx)["boxes"] if b["box"] == box
                 for c in b["cameras"]}
        return [{**c, "box": box, "silent": False, "clash": clash.get(c["name"], [])}
                for c in ctx.cameras()]
    return [c for b in fleet_view(ctx)["boxes"] for c in b["cameras"]]


@router.get("/boxes", response_model=list[BoxOut],
            summary="The boxes (daemons) of the site and their cameras, from their heartbeats")
def list_boxes(ctx: WebContext = Depends(get_ctx),
               _user: User = Depends(current_user)) -> list[BoxOut]:
    return [BoxOut(**b) for b in fleet_view(ctx)["boxes"]]


@router.get("/cameras", response_model=list[CameraOut], summary="Camera status, every box's")
def list_cameras(ctx: WebContext = Depends(get_ctx),
                 _user: User = Depends(current_user)) -> list[CameraOut]:
    return [CameraOut(**c) for c in camera_rows(ctx)]
