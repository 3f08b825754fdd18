"""`/api/events`: stored events, newest first, with their kept crops and nearest names."""

from __future__ import annotations

import logging
from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from starlette.concurrency import run_in_threadpool

from app.gallery.paging import EventFilter
from app.web.auth import User
from app.web.context import WebContext
from app.web.deps import audited_writer, current_user, get_ctx
from app.web.models import (
    Enrolled,
    EventOut,
    EventPage,
    NameRequest,
    NotPersonOut,
    NotPersonRequest,
    RelabelRequest,
    ReprocessOut,
)
from app.web.services import CROP_CACHE, event_out, list_events, one_event
from app.web.timefmt import parse_time

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/events", tags=["events"], dependencies=[Depends(current_user)])
SINCE = ("stored at or after (ISO 8601; without an offset, in web.timezone, default the "
         "machine's zone)")
UNTIL = "stored before (ISO 8601, as `since`)"


def times(ctx: WebContext, since: str | None, until: str | None
          ) -> tuple[datetime | None, datetime | None]:
    """The `since` and `until` filter values as UTC (400 with one line when not times)."""
    try:
        return parse_time(since, "since", ctx.tz), parse_time(until, "until", ctx.tz)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


@router.get("", response_model=EventPage, summary="List events, newest first")
def get_events(
    camera: str | None = None,
    identity: str | None = None,
    unknown: bool = False,
    since: str | None = Query(None, description=SINCE),
    until: str | None = Query(None, description=UNTIL),
    cluster: int | None = Query(None, description="only the events of this face cluster"),
    before: int | None = Query(None, description="only events with a smaller id (next page)"),
    limit: int = Query(50, ge=1, le=500),
    ctx: WebContext = Depends(get_ctx),
) -> EventPage:
    f = EventFilter(camera, identity, unknown, *times(ctx, since, until), cluster)
    events, total, nearest = list_events(ctx, f, before, limit)
    nxt = events[-1].id if len(events) == limit else None
    return EventPage(events=[event_out(e, nearest.get(e.id)) for e in events], total=total,
                     next_before=nxt)


@router.get("/{event_id}", response_model=EventOut, summary="One event")
def get_event(event_id: int, ctx: WebContext = Depends(get_ctx)) -> EventOut:
    return one_event(ctx, event_id)


@router.get("/{event_id}/snapshot", summary="An event's best-face picture (JPEG)",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def get_event_snapshot(event_id: int, ctx: WebContext = Depends(get_ctx)) -> Response:
    data = ctx.gallery.pages.event_snapshot_jpeg(event_id)
    if data is None:
        raise HTTPException(404, f"event {event_id} has no snapshot")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": CROP_CACHE})


@router.get("/{event_id}/crops/{index}", summary="A kept crop of an event (JPEG), best first",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def get_event_crop(event_id: int, index: int, ctx: WebContext = Depends(get_ctx)) -> Response:
    data = ctx.gallery.pages.event_crop_jpeg(event_id, index)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": CROP_CACHE})


@router.post("/{event_id}/name", response_model=Enrolled,
             summary="This is NAME: enroll the event's kept crops and name the event")
def name_event(event_id: int, body: NameRequest, ctx: WebContext = Depends(get_ctx),
               _user: User = Depends(audited_writer)) -> Enrolled:
    r = ctx.review.name_event(event_id, body.name)
    return Enrolled.of(r)


@router.patch("/{event_id}", response_model=EventOut,
              summary="Relabel an event (an enrolled name, or null: unknown) without enrolling")
def relabel_event(event_id: int, body: RelabelRequest, ctx: WebContext = Depends(get_ctx),
                  _user: User = Depends(audited_writer)) -> EventOut:
    ctx.review.corrections.relabel(event_id, body.identity)
    return one_event(ctx, event_id)


@router.post("/{event_id}/not", response_model=NotPersonOut,
             summary="Not this person: unknown, never that name again, its templates deleted")
def not_person(event_id: int, body: NotPersonRequest, ctx: WebContext = Depends(get_ctx),
               _user: User = Depends(audited_writer)) -> NotPersonOut:
    name, removed = ctx.review.corrections.not_person(event_id, body.identity)
    return NotPersonOut(event=one_event(ctx, event_id), not_identity=name,
                        templates_deleted=removed)


@router.delete("/{event_id}", status_code=204, response_class=Response,
               summary="Delete an event with its crops")
def delete_event(event_id: int, ctx: WebContext = Depends(get_ctx),
                 _user: User = Depends(audited_writer)) -> Response:
    ctx.review.corrections.delete([event_id])
    return Response(status_code=204)


@router.post("/reprocess", response_model=ReprocessOut,
             summary="Re-run stored events (newest first) against the current gallery")
async def reprocess(
    camera: str | None = None,
    identity: str | None = None,
    since: str | None = Query(None, description=SINCE),
    until: str | None = Query(None, description=UNTIL),
    named: bool = Query(False, description="also named events (their names may change)"),
    before: int | None = Query(None, description="only events with a smaller id (continue)"),
    limit: int = Query(200, ge=1, le=2000),
    ctx: WebContext = Depends(get_ctx),
    _user: User = Depends(audited_writer),
) -> ReprocessOut:
    f = EventFilter(camera, identity, False, *times(ctx, since, until))

    def work():
        return ctx.review.reprocess(f, named=named, before=before, limit=limit)

    r = await run_in_threadpool(work)
    return ReprocessOut(checked=r.checked, changed=r.changed, without_crops=r.without_crops,
                        next_before=r.next_before)
