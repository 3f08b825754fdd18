"""`/api/clusters`: unknown faces grouped by person; name, ignore or merge a group."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Query

from app.web.auth import User
from app.web.context import WebContext
from app.web.deps import audited_writer, current_user, get_ctx
from app.web.models import (
    ClusterOut,
    ClusterPage,
    MergeClusterRequest,
    NamedCluster,
    NameRequest,
)
from app.web.services import cluster_out, list_clusters, naming_out

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/clusters", tags=["clusters"],
                   dependencies=[Depends(current_user)])


@router.get("", response_model=ClusterPage, summary="Face clusters of unknown events")
def get_clusters(state: str = Query("open", pattern="^(open|ignored)$"),
                 offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500),
                 ctx: WebContext = Depends(get_ctx)) -> ClusterPage:
    return list_clusters(ctx, state, offset, limit)


@router.get("/{cluster_id}", response_model=ClusterOut, summary="One face cluster")
def get_cluster(cluster_id: int, ctx: WebContext = Depends(get_ctx)) -> ClusterOut:
    return cluster_out(ctx, ctx.gallery.clusters.cluster(cluster_id))


@router.post("/{cluster_id}/name", response_model=NamedCluster,
             summary="This is NAME: enroll the cluster's best crops and name its events")
def name_cluster(cluster_id: int, body: NameRequest, ctx: WebContext = Depends(get_ctx),
                 _user: User = Depends(audited_writer)) -> NamedCluster:
    return naming_out(ctx.review.name(cluster_id, body.name))


@router.post("/{cluster_id}/ignore", response_model=ClusterOut, summary="Hide a cluster")
def ignore_cluster(cluster_id: int, ctx: WebContext = Depends(get_ctx),
                   _user: User = Depends(audited_writer)) -> ClusterOut:
    ctx.review.ignore(cluster_id)
    return cluster_out(ctx, ctx.gallery.clusters.cluster(cluster_id))


@router.post("/{cluster_id}/merge", response_model=ClusterOut,
             summary="Move another cluster's events into this one")
def merge_cluster(cluster_id: int, body: MergeClusterRequest,
                  ctx: WebContext = Depends(get_ctx),
                  _user: User = Depends(audited_writer)) -> ClusterOut:
    ctx.review.merge(cluster_id, body.other)
    return cluster_out(ctx, ctx.gallery.clusters.cluster(cluster_id))
