"""`/api/clusters`: unknown faces grouped by person; name, ignore or merge a group."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Query

from app.clusters import NamingReport
from app.gallery.audit import acting_as
from app.gallery.review import ClusterInfo
from app.web.auth import User
from app.web.context import WebContext
from app.web.deps import current_user, get_ctx, writer
from app.web.models import (
    ClusterOut,
    ClusterPage,
    Enrolled,
    MergeClusterRequest,
    NamedCluster,
    NameRequest,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/clusters", tags=["clusters"])
THUMBS = 6


def cluster_out(ctx: WebContext, c: ClusterInfo, best: list[int] | None = None) -> ClusterOut:
    best = ctx.review.best_events(c.id, THUMBS) if best is None else best
    return ClusterOut(id=c.id, state=c.state, members=c.members, created_at=c.created_at,
                      updated_at=c.updated_at, events=best,
                      crop_urls=[f"/api/events/{e}/crops/0" for e in best])


def list_clusters(ctx: WebContext, state: str, offset: int, limit: int) -> ClusterPage:
    """Cluster new unknown events first, then a page of clusters, largest first."""
    report = ctx.refresh_clusters()
    clusters, total = ctx.gallery.review.clusters(ctx.review.model, state=state, offset=offset,
                                                  limit=limit)
    best = ctx.gallery.review.best_cluster_events([c.id for c in clusters], THUMBS)
    return ClusterPage(clusters=[cluster_out(ctx, c, best[c.id]) for c in clusters],
                       total=total, pending=report.pending)


def naming_out(r: NamingReport) -> NamedCluster:
    return NamedCluster(cluster=r.cluster, events_named=r.events_named,
                        events_left=r.events_left, enrolled=Enrolled.of(r.enrollment))


@router.get("", response_model=ClusterPage, summary="Face clusters of unknown events")
def get_clusters(state: str = Query("open", pattern="^(open|ignored)$"),
                 offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500),
                 ctx: WebContext = Depends(get_ctx),
                 _user: User = Depends(current_user)) -> ClusterPage:
    return list_clusters(ctx, state, offset, limit)


@router.get("/{cluster_id}", response_model=ClusterOut, summary="One face cluster")
def get_cluster(cluster_id: int, ctx: WebContext = Depends(get_ctx),
                _user: User = Depends(current_user)) -> ClusterOut:
    return cluster_out(ctx, ctx.gallery.review.cluster(cluster_id))


@router.post("/{cluster_id}/name", response_model=NamedCluster,
             summary="This is NAME: enroll the cluster's best crops and name its events")
def name_cluster(cluster_id: int, body: NameRequest, ctx: WebContext = Depends(get_ctx),
                 user: User = Depends(writer)) -> NamedCluster:
    with acting_as(user.audit_name):
        return naming_out(ctx.review.name(cluster_id, body.name))


@router.post("/{cluster_id}/ignore", response_model=ClusterOut, summary="Hide a cluster")
def ignore_cluster(cluster_id: int, ctx: WebContext = Depends(get_ctx),
                   user: User = Depends(writer)) -> ClusterOut:
    with acting_as(user.audit_name):
        ctx.review.ignore(cluster_id)
    return cluster_out(ctx, ctx.gallery.review.cluster(cluster_id))


@router.post("/{cluster_id}/merge", response_model=ClusterOut,
             summary="Move another cluster's events into this one")
def merge_cluster(cluster_id: int, body: MergeClusterRequest,
                  ctx: WebContext = Depends(get_ctx), user: User = Depends(writer)) -> ClusterOut:
    with acting_as(user.audit_name):
        ctx.review.merge(cluster_id, body.other)
    return cluster_out(ctx, ctx.gallery.review.cluster(cluster_id))
