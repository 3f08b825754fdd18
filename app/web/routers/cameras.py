"""`/api/cameras`: the daemon's cameras (only when the daemon serves the app)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException

from app.web.auth import User
from app.web.context import WebContext
from app.web.deps import current_user, get_ctx
from app.web.models import CameraOut

router = APIRouter(prefix="/api/cameras", tags=["cameras"])


@router.get("", response_model=list[CameraOut], summary="Camera status (daemon only)")
def list_cameras(ctx: WebContext = Depends(get_ctx),
                 _user: User = Depends(current_user)) -> list[CameraOut]:
    if ctx.cameras is None:
        raise HTTPException(404, "no cameras: this server is `facemoe serve`, not the daemon")
    return [CameraOut(**c) for c in ctx.cameras()]
