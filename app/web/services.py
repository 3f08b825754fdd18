"""What the pages and the API routers both show: an event, a page of events, a cluster, an
identity with its templates, the fleet's boxes and cameras, and enrollment from uploaded
photos. Each turns the services of `WebContext` into the web's models; the routers (JSON) and
the pages (HTML) only translate HTTP around them, so neither imports the other."""

from __future__ import annotations

from typing import Any

from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from app.clusters import NamingReport
from app.enroll import EnrollError, EnrollReport, enroll, faces_from_array
from app.gallery import StoredEvent
from app.gallery.clusters import ClusterInfo
from app.gallery.fleet import Fleet, site_view
from app.gallery.paging import EventFilter, IdentityRowInfo
from app.recognize import Candidate
from app.web.context import WebContext
from app.web.deps import read_upload
from app.web.models import (
    ClusterOut,
    ClusterPage,
    Enrolled,
    EventOut,
    IdentityDetail,
    IdentityOut,
    NamedCluster,
    Nearest,
    TemplateOut,
)

CROP_CACHE = "private, max-age=86400"
SCORE_DIGITS = 4  # cosines to 1e-4: more digits are noise of the float32 maths
THUMBS = 6  # a cluster's best crops shown
MAX_PHOTOS = 20  # photos in one enrollment upload


# --- events -----------------------------------------------------------------------------------


def event_out(e: StoredEvent, nearest: Candidate | None = None, *,
              snapshot: bool = False) -> EventOut:
    ev = e.event
    return EventOut(
        id=e.id, camera=ev.camera, track_id=ev.track_id, identity=ev.identity,
        score=round(ev.score, SCORE_DIGITS),
        start=ev.start, end=ev.end, frames=ev.frames, best_bbox=list(ev.best_bbox),
        model=ev.model, crops=e.crops, stored_at=e.created_at,
        nearest=(Nearest(name=nearest.name, score=round(nearest.score, SCORE_DIGITS))
                 if nearest else None),
        crop_urls=[f"/api/events/{e.id}/crops/{i}" for i in range(e.crops)],
        snapshot_url=f"/api/events/{e.id}/snapshot" if snapshot else None,
    )


def list_events(ctx: WebContext, f: EventFilter, before: int | None, limit: int,
                after: int | None = None,
                ) -> tuple[list[StoredEvent], int | None, dict[int, Candidate]]:
    """A page of events and the nearest identity of its unknown ones."""
    events, total = ctx.gallery.pages.events(f, before=before, limit=limit, after=after)
    return events, total, ctx.review.nearest(events)


def one_event(ctx: WebContext, event_id: int) -> EventOut:
    """An event with its nearest name and whether it kept a snapshot."""
    e = ctx.gallery.pages.event(event_id)
    return event_out(e, ctx.review.nearest([e]).get(e.id),
                     snapshot=ctx.gallery.pages.event_snapshot_jpeg(e.id) is not None)


# --- clusters ---------------------------------------------------------------------------------


def cluster_out(ctx: WebContext, c: ClusterInfo, best: list[int] | None = None) -> ClusterOut:
    best = ctx.review.best_events(c.id, THUMBS) if best is None else best
    return ClusterOut(id=c.id, state=c.state, members=c.members, created_at=c.created_at,
                      updated_at=c.updated_at, events=best,
                      crop_urls=[f"/api/events/{e}/crops/0" for e in best])


def list_clusters(ctx: WebContext, state: str, offset: int, limit: int) -> ClusterPage:
    """Cluster new unknown events first, then a page of clusters, largest first."""
    report = ctx.refresh_clusters()
    clusters, total = ctx.gallery.clusters.clusters(ctx.review.model, state=state, offset=offset,
                                                  limit=limit)
    best = ctx.gallery.clusters.best_cluster_events([c.id for c in clusters], THUMBS)
    return ClusterPage(clusters=[cluster_out(ctx, c, best[c.id]) for c in clusters],
                       total=total, pending=report.pending)


def naming_out(r: NamingReport) -> NamedCluster:
    return NamedCluster(cluster=r.cluster, events_named=r.events_named,
                        events_left=r.events_left, enrolled=Enrolled.of(r.enrollment))


# --- identities -------------------------------------------------------------------------------


def identity_out(i: IdentityRowInfo) -> IdentityOut:
    return IdentityOut(id=i.id, name=i.name, templates=i.templates, created_at=i.created_at)


def identity_detail(ctx: WebContext, identity_id: int) -> IdentityDetail:
    i = ctx.gallery.pages.identity(identity_id)
    refs = ctx.gallery.pages.template_refs(i.name)
    return IdentityDetail(
        **identity_out(i).model_dump(),
        template_list=[TemplateOut(id=t.id, source=t.source, quality=t.quality, model=t.model,
                                   created_at=t.created_at,
                                   crop_url=f"/api/templates/{t.id}/crop" if t.has_crop else None)
                       for t in refs])


async def enroll_uploads(ctx: WebContext, name: str, photos: list[UploadFile]) -> EnrollReport:
    """Decode the photos within the limits and enroll their faces as the CLI does (audited as
    the request's user: `audited_writer`)."""
    if not photos or len(photos) > MAX_PHOTOS:
        raise EnrollError(f"give 1 to {MAX_PHOTOS} photos")
    images = [(p.filename or f"photo {k}", await read_upload(ctx, p, "photo"))
              for k, p in enumerate(photos)]

    def work() -> EnrollReport:
        with ctx.recognizer.model_lock:
            faces = [f for fname, img in images
                     for f in faces_from_array(img, f"upload {fname}", ctx.detector, 0)]
        return enroll(name, [], ctx.detector, ctx.embedder, ctx.gallery, faces=faces)

    return await run_in_threadpool(work)


# --- fleet ------------------------------------------------------------------------------------


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
