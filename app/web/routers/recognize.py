"""`POST /api/recognize` (every face of an image) and `POST /api/verify` (two images)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from app.web.context import WebContext
from app.web.deps import current_user, get_ctx, read_upload
from app.web.models import CandidateOut, FaceOut, RecognizeOut, VerifyOut

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api", tags=["recognition"], dependencies=[Depends(current_user)])


@router.post("/recognize", response_model=RecognizeOut,
             summary="Every face in an image: box, nearest names and scores")
async def recognize(image: UploadFile = File(...), top: int = Query(3, ge=1, le=20),
                    ctx: WebContext = Depends(get_ctx)) -> RecognizeOut:
    img = await read_upload(ctx, image, "image")
    faces = await run_in_threadpool(ctx.recognizer.recognize, img, top)
    return RecognizeOut(
        faces=[FaceOut(box=[round(v, 1) for v in f.box],
                       detector_score=round(f.detector_score, 4), identity=f.identity,
                       candidates=[CandidateOut(name=c.name, score=round(c.score, 4))
                                   for c in f.candidates]) for f in faces],
        threshold=ctx.threshold, model=ctx.embedder.model)


@router.post("/verify", response_model=VerifyOut,
             summary="Two images (largest face of each): same person or not, and the score")
async def verify(a: UploadFile = File(...), b: UploadFile = File(...),
                 ctx: WebContext = Depends(get_ctx)) -> VerifyOut:
    img_a, img_b = await read_upload(ctx, a, "image a"), await read_upload(ctx, b, "image b")
    v = await run_in_threadpool(ctx.recognizer.verify, img_a, img_b)
    return VerifyOut(same=v.same, score=round(v.score, 4), threshold=round(v.threshold, 4),
                     box_a=[round(x, 1) for x in v.box_a], box_b=[round(x, 1) for x in v.box_b])
