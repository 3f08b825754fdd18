"""Persistence of face clusters: unknown events' embeddings cached per model, the clusters
of those embeddings (centroid, members, open or ignored), assigning events to clusters, merging
and forgetting clusters. The clustering itself (which event joins which) is `app.clusters`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.gallery.db import (
    EventCropRow,
    EventEmbeddingRow,
    EventRow,
    FaceClusterRow,
    as_utc,
    chunks,
    utcnow,
)
from app.gallery.errors import GalleryError
from app.gallery.seal import VECTOR
from app.gallery.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    id: int
    state: str
    members: int  # unknown events in it now
    model: str
    created_at: datetime
    updated_at: datetime


class ClusterStore:
    """Event embeddings (cached per model) and face clusters of an opened gallery (`Store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def events_without_embedding(self, model: str, *, limit: int) -> list[int]:
        """Unknown events with kept crops and no cached embedding of `model`, newest first."""
        have = (select(EventEmbeddingRow.event_id)
                .where(EventEmbeddingRow.event_id == EventRow.id)
                .where(EventEmbeddingRow.model == model))
        crops = select(EventCropRow.id).where(EventCropRow.event_id == EventRow.id)
        q = (select(EventRow.id).where(EventRow.identity.is_(None))
             .where(crops.exists()).where(~have.exists())
             .order_by(EventRow.id.desc()).limit(limit))
        with self._store.db.read("find events to embed") as session:
            return list(session.scalars(q).all())

    def embeddings(self, event_ids: Sequence[int], model: str
                   ) -> dict[int, tuple[np.ndarray, int | None]]:
        """Cached (embedding, cluster id) of the events that have one of `model`."""
        out: dict[int, tuple[np.ndarray, int | None]] = {}
        unseal = self._store.sealer.unseal
        with self._store.db.read("read event embeddings") as session:
            for chunk in chunks(event_ids):
                for eid, vec, cid in session.execute(
                        select(EventEmbeddingRow.event_id, EventEmbeddingRow.vector,
                               EventEmbeddingRow.cluster_id)
                        .where(EventEmbeddingRow.event_id.in_(chunk))
                        .where(EventEmbeddingRow.model == model)).all():
                    out[eid] = (np.frombuffer(unseal(vec, VECTOR), "<f4").astype(np.float32), cid)
        return out

    def save_embeddings(self, vectors: dict[int, np.ndarray], model: str) -> None:
        """Cache event embeddings (replacing another model's)."""
        if not vectors:
            return
        seal = self._store.sealer.seal

        def work(session: Session) -> None:
            self._store.claim(session)
            ids = list(vectors)
            for chunk in chunks(ids):
                session.execute(delete(EventEmbeddingRow)
                                .where(EventEmbeddingRow.event_id.in_(chunk)))
            session.add_all([EventEmbeddingRow(
                event_id=eid, model=model,
                vector=seal(np.asarray(v, "<f4").tobytes(), VECTOR)) for eid, v in vectors.items()])

        self._store.db.write("cache event embeddings", work)

    def unclustered(self, model: str, *, limit: int) -> dict[int, np.ndarray]:
        """Embedded unknown events that belong to no cluster yet, oldest first."""
        q = (select(EventEmbeddingRow.event_id, EventEmbeddingRow.vector)
             .join(EventRow, EventRow.id == EventEmbeddingRow.event_id)
             .where(EventRow.identity.is_(None)).where(EventEmbeddingRow.model == model)
             .where(EventEmbeddingRow.cluster_id.is_(None))
             .order_by(EventEmbeddingRow.event_id).limit(limit))
        unseal = self._store.sealer.unseal
        with self._store.db.read("read unclustered events") as session:
            return {eid: np.frombuffer(unseal(v, VECTOR), "<f4").astype(np.float32)
                    for eid, v in session.execute(q).all()}

    def cluster_centroids(self, model: str) -> tuple[list[int], np.ndarray, list[int]]:
        """Ids, unit centroids float32[K, D] and member counts of the clusters of `model`
        (open and ignored: new faces of an ignored cluster stay ignored)."""
        unseal = self._store.sealer.unseal
        with self._store.db.read("read clusters") as session:
            rows = session.execute(select(FaceClusterRow.id, FaceClusterRow.centroid,
                                          FaceClusterRow.members)
                                   .where(FaceClusterRow.model == model)
                                   .order_by(FaceClusterRow.id)).all()
        if not rows:
            return [], np.zeros((0, 0), np.float32), []
        mat = np.stack([np.frombuffer(unseal(c, VECTOR), "<f4") for _, c, _ in rows])
        return [r[0] for r in rows], mat.astype(np.float32), [int(r[2]) for r in rows]

    def assign_clusters(self, model: str, joins: dict[int, list[int]],
                        new: list[list[int]], centroids: dict[int, np.ndarray],
                        new_centroids: list[np.ndarray]) -> list[int]:
        """In one transaction: add events to existing clusters (`joins`: cluster -> events,
        with their updated `centroids`) and make the `new` clusters; returns the new ids."""
        seal = self._store.sealer.seal

        def vec(v: np.ndarray) -> bytes:
            return seal(np.asarray(v, "<f4").tobytes(), VECTOR)

        def work(session: Session) -> list[int]:
            now = utcnow()
            for cid, events in joins.items():
                row = session.get(FaceClusterRow, cid)
                if row is None:
                    continue
                row.centroid, row.members, row.updated_at = vec(centroids[cid]), \
                    row.members + len(events), now
                self._set_cluster(session, events, cid)
            made = []
            for events, centroid in zip(new, new_centroids, strict=True):
                row = FaceClusterRow(model=model, state="open", centroid=vec(centroid),
                                     members=len(events), created_at=now, updated_at=now)
                session.add(row)
                session.flush()
                self._set_cluster(session, events, row.id)
                made.append(row.id)
            return made

        return self._store.db.write("update face clusters", work)

    @staticmethod
    def _set_cluster(session: Session, events: Sequence[int], cid: int | None) -> None:
        for chunk in chunks(events):
            session.execute(update(EventEmbeddingRow).where(EventEmbeddingRow.event_id.in_(chunk))
                            .values(cluster_id=cid))

    def clusters(self, model: str, *, state: str = "open", offset: int = 0,
                 limit: int = 50) -> tuple[list[ClusterInfo], int]:
        """Clusters of `model` in `state` that still have unknown events (counted now: events
        named, purged or erased since leave their cluster), largest first, and how many."""
        live = (select(EventEmbeddingRow.cluster_id.label("cid"),
                       func.count(EventEmbeddingRow.event_id).label("n"))
                .join(EventRow, EventRow.id == EventEmbeddingRow.event_id)
                .where(EventRow.identity.is_(None))
                .where(EventEmbeddingRow.cluster_id.is_not(None))
                .group_by(EventEmbeddingRow.cluster_id).subquery())
        q = (select(FaceClusterRow, live.c.n).join(live, live.c.cid == FaceClusterRow.id)
             .where(FaceClusterRow.model == model).where(FaceClusterRow.state == state))
        with self._store.db.read("list clusters") as session:
            rows = session.execute(q.order_by(live.c.n.desc(), FaceClusterRow.id.desc())
                                   .offset(offset).limit(limit)).all()
            total = int(session.scalar(select(func.count()).select_from(q.subquery())) or 0)
        return [self._cluster_info(r, n) for r, n in rows], total

    @staticmethod
    def _cluster_info(r: FaceClusterRow, members: int) -> ClusterInfo:
        return ClusterInfo(r.id, r.state, int(members), r.model, as_utc(r.created_at),
                           as_utc(r.updated_at))

    def cluster(self, cluster_id: int) -> ClusterInfo:
        """One cluster, with the number of its events that are still unknown."""
        with self._store.db.read("read a cluster") as session:
            row = session.get(FaceClusterRow, int(cluster_id))
            if row is None:
                raise GalleryError(f"no face cluster {cluster_id}")
            n = session.scalar(select(func.count(EventEmbeddingRow.event_id))
                               .join(EventRow, EventRow.id == EventEmbeddingRow.event_id)
                               .where(EventEmbeddingRow.cluster_id == row.id)
                               .where(EventRow.identity.is_(None)))
            return self._cluster_info(row, int(n or 0))

    def best_cluster_events(self, cluster_ids: Sequence[int], per_cluster: int
                            ) -> dict[int, list[int]]:
        """Each cluster's unknown events with the best kept crops, best first (one query)."""
        out: dict[int, list[tuple[float, int]]] = {int(c): [] for c in cluster_ids}
        with self._store.db.read("read cluster events") as session:
            for chunk in chunks(list(out)):
                rows = session.execute(
                    select(EventEmbeddingRow.cluster_id, EventEmbeddingRow.event_id,
                           func.max(EventCropRow.quality))
                    .join(EventRow, EventRow.id == EventEmbeddingRow.event_id)
                    .join(EventCropRow, EventCropRow.event_id == EventEmbeddingRow.event_id)
                    .where(EventEmbeddingRow.cluster_id.in_(chunk))
                    .where(EventRow.identity.is_(None))
                    .group_by(EventEmbeddingRow.cluster_id, EventEmbeddingRow.event_id)).all()
                for cid, eid, q in rows:
                    out[cid].append((-float(q), int(eid)))
        return {c: [e for _, e in sorted(v)[:per_cluster]] for c, v in out.items()}

    def cluster_events(self, cluster_id: int) -> list[int]:
        """The unknown events of a cluster, newest first."""
        q = (select(EventEmbeddingRow.event_id)
             .join(EventRow, EventRow.id == EventEmbeddingRow.event_id)
             .where(EventEmbeddingRow.cluster_id == int(cluster_id))
             .where(EventRow.identity.is_(None)).order_by(EventEmbeddingRow.event_id.desc()))
        with self._store.db.read("read cluster events") as session:
            return list(session.scalars(q).all())

    def set_cluster_state(self, cluster_id: int, state: str) -> None:
        store = self._store

        def work(session: Session) -> None:
            row = session.get(FaceClusterRow, int(cluster_id))
            if row is None:
                raise GalleryError(f"no face cluster {cluster_id}")
            row.state, row.updated_at = state, utcnow()
            store.audit.record(session, "cluster", None, f"cluster {cluster_id} {state}")

        store.db.write(f"mark cluster {cluster_id} {state}", work)

    def merge_clusters(self, into: int, other: int, centroid: np.ndarray) -> None:
        """Move the events of cluster `other` into `into` (with its new centroid); delete
        `other`."""
        if int(into) == int(other):
            raise GalleryError("cannot merge a cluster with itself")
        store = self._store

        def work(session: Session) -> None:
            a, b = session.get(FaceClusterRow, int(into)), session.get(FaceClusterRow, int(other))
            if a is None or b is None:
                raise GalleryError(f"no face cluster {other if a else into}")
            session.execute(update(EventEmbeddingRow)
                            .where(EventEmbeddingRow.cluster_id == b.id)
                            .values(cluster_id=a.id))
            a.members += b.members
            a.centroid = store.sealer.seal(np.asarray(centroid, "<f4").tobytes(), VECTOR)
            a.updated_at = utcnow()
            session.delete(b)
            store.audit.record(session, "cluster", None, f"cluster {b.id} merged into {a.id}")

        store.db.write("merge clusters", work)

    def delete_cluster(self, cluster_id: int) -> None:
        """Forget a cluster (its events stay; they are no longer grouped)."""

        def work(session: Session) -> None:
            row = session.get(FaceClusterRow, int(cluster_id))
            if row is not None:
                session.delete(row)

        self._store.db.write("delete a cluster", work)
