"""What the review UI reads and changes beyond enrollment: pages of events and identities,
stored JPEGs (served as they are stored, only unsealed), event embeddings cached per model,
face clusters of unknown events, relabelling events, deleting one template and merging two
identities. Every change writes an audit row in its transaction."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.gallery.codec import clean_name, normalise_name
from app.gallery.db import (
    IN_CHUNK,
    EventCropRow,
    EventEmbeddingRow,
    EventRow,
    EventSnapshotRow,
    FaceClusterRow,
    IdentityRow,
    TemplateRow,
    as_utc,
    move_names,
    stamp_bindings,
    utcnow,
)
from app.gallery.errors import GalleryError, plural
from app.gallery.events import StoredEvent
from app.gallery.seal import CROP, SNAPSHOT, VECTOR
from app.gallery.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventFilter:
    """Which events a page shows; times are when the event was stored (UTC)."""

    camera: str | None = None
    identity: str | None = None
    unknown: bool = False
    since: datetime | None = None
    until: datetime | None = None
    cluster: int | None = None


@dataclass(frozen=True)
class IdentityRowInfo:
    id: int
    name: str
    templates: int
    created_at: datetime


@dataclass(frozen=True)
class TemplateRef:
    """One template of an identity, by id (any model)."""

    id: int
    source: str
    quality: float
    model: str
    created_at: datetime
    has_crop: bool


@dataclass(frozen=True)
class ClusterInfo:
    id: int
    state: str
    members: int  # unknown events in it now
    model: str
    created_at: datetime
    updated_at: datetime


def _chunks(ids: Sequence[int]) -> list[list[int]]:
    ids = list(ids)
    return [ids[i:i + IN_CHUNK] for i in range(0, len(ids), IN_CHUNK)]


class Review:
    """Review queries and changes on an opened gallery (`Store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # --- events -------------------------------------------------------------------------------

    def _event_query(self, f: EventFilter):
        q = select(EventRow)
        if f.camera:
            q = q.where(EventRow.camera == f.camera)
        if f.identity:  # any case: the enrolled names that match it, or the name as given
            wanted = normalise_name(f.identity).strip()
            known = select(IdentityRow.name).where(func.lower(IdentityRow.name) == wanted.lower())
            q = q.where(or_(EventRow.identity == wanted, EventRow.identity.in_(known)))
        if f.unknown:
            q = q.where(EventRow.identity.is_(None))
        if f.since is not None:
            q = q.where(EventRow.created_at >= f.since)
        if f.until is not None:
            q = q.where(EventRow.created_at < f.until)
        if f.cluster is not None:
            q = q.join(EventEmbeddingRow, EventEmbeddingRow.event_id == EventRow.id).where(
                EventEmbeddingRow.cluster_id == f.cluster)
        return q

    def events(self, f: EventFilter, *, before: int | None = None, limit: int = 50,
               count: bool = True, after: int | None = None
               ) -> tuple[list[StoredEvent], int | None]:
        """Newest first: a page of up to `limit` events with ids below `before` (keyset
        pagination), or the `limit` oldest with ids above `after` (the newer page), and how
        many events match the filter (None without `count`)."""
        q = self._event_query(f)
        if before is not None:
            q = q.where(EventRow.id < before)
        if after is not None:
            q = q.where(EventRow.id > after).order_by(EventRow.id.asc()).limit(limit)
        else:
            q = q.order_by(EventRow.id.desc()).limit(limit)
        with self._store.db.read("read events") as session:
            rows = list(session.scalars(q).all())
            if after is not None:
                rows.reverse()
            crops = self._crop_counts(session, [r.id for r in rows])
            total = None
            if count:
                total = int(session.scalar(
                    select(func.count()).select_from(self._event_query(f).subquery())) or 0)
        return [StoredEvent.of(r, crops.get(r.id, 0))
                for r in rows], total

    @staticmethod
    def _crop_counts(session: Session, ids: list[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for chunk in _chunks(ids):
            out.update(session.execute(
                select(EventCropRow.event_id, func.count(EventCropRow.id))
                .where(EventCropRow.event_id.in_(chunk)).group_by(EventCropRow.event_id)).all())
        return out

    def event(self, event_id: int) -> StoredEvent:
        with self._store.db.read("read an event") as session:
            row = session.get(EventRow, int(event_id))
            if row is None:
                raise GalleryError(f"no event {event_id}")
            n = self._crop_counts(session, [row.id]).get(row.id, 0)
            return StoredEvent.of(row, n)

    def stored(self, event_ids: Sequence[int]) -> dict[int, StoredEvent]:
        """The events among `event_ids` that exist, by id."""
        out: dict[int, StoredEvent] = {}
        with self._store.db.read("read events") as session:
            for chunk in _chunks(event_ids):
                rows = session.scalars(select(EventRow).where(EventRow.id.in_(chunk))).all()
                crops = self._crop_counts(session, [r.id for r in rows])
                out.update((r.id, StoredEvent.of(r, crops.get(r.id, 0))) for r in rows)
        return out

    def cameras(self) -> list[str]:
        with self._store.db.read("list cameras") as session:
            return list(session.scalars(select(EventRow.camera).distinct()
                                        .order_by(EventRow.camera)).all())

    def event_crop_jpeg(self, event_id: int, index: int) -> bytes:
        """The `index`-th best kept crop of an event, as the stored JPEG."""
        if int(index) < 0:
            raise GalleryError(f"event {event_id} has no crop {index}")
        with self._store.db.read("read an event crop") as session:
            blob = session.scalar(
                select(EventCropRow.crop).where(EventCropRow.event_id == int(event_id))
                .order_by(EventCropRow.quality.desc(), EventCropRow.id)
                .offset(max(0, int(index))).limit(1))
        if blob is None:
            raise GalleryError(f"event {event_id} has no crop {index}")
        return self._store.sealer.unseal(blob, CROP)

    def event_snapshot_jpeg(self, event_id: int) -> bytes | None:
        """An event's best-face picture as JPEG: from the database, or (events stored before
        migration 0006) from the box-local file its row names where that file is readable
        here; None when it has none."""
        with self._store.db.read("read an event snapshot") as session:
            blob = session.scalar(select(EventSnapshotRow.jpeg)
                                  .where(EventSnapshotRow.event_id == int(event_id)))
            path = None if blob is not None else session.scalar(
                select(EventRow.snapshot).where(EventRow.id == int(event_id)))
        if blob is not None:
            return self._store.sealer.unseal(blob, SNAPSHOT)
        if path and path.endswith(".jpg"):  # only a JPEG file: the path is the row's word
            try:
                data = Path(path).read_bytes()
            except OSError:
                return None
            return data if data.startswith(b"\xff\xd8\xff") else None
        return None

    def relabel(self, event_ids: Sequence[int], identity: str | None) -> int:
        """Name the events `identity` (None: unknown again); returns how many changed."""
        name = clean_name(identity) if identity is not None else None
        store = self._store

        def work(session: Session) -> int:
            n = 0
            for chunk in _chunks(event_ids):
                n += session.execute(update(EventRow).where(EventRow.id.in_(chunk))
                                     .values(identity=name)).rowcount
            store.audit.record(session, "relabel", name,
                               f"{plural(n, 'event')} named {name!r}" if name
                               else f"{plural(n, 'event')} made unknown")
            return n

        return store.db.write("relabel events", work)

    # --- event embeddings and clusters --------------------------------------------------------

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
            for chunk in _chunks(event_ids):
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
            for chunk in _chunks(ids):
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
        for chunk in _chunks(events):
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
            for chunk in _chunks(list(out)):
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

    # --- identities and templates -------------------------------------------------------------

    def identities(self, *, search: str = "", offset: int = 0, limit: int = 50
                   ) -> tuple[list[IdentityRowInfo], int]:
        """A page of identities by name (with this model's template counts), and the total."""
        s = self._store
        where = IdentityRow.name.contains(search.strip()) if search.strip() else True
        q = (select(IdentityRow.id, IdentityRow.name, IdentityRow.created_at).where(where)
             .order_by(IdentityRow.name).offset(offset).limit(limit))
        with s.db.read("list identities") as session:
            rows = session.execute(q).all()
            ids = [r[0] for r in rows]
            counts = dict(session.execute(
                select(TemplateRow.identity_id, func.count(TemplateRow.id))
                .where(TemplateRow.identity_id.in_(ids))
                .where(TemplateRow.model_name == s.model_name)
                .where(TemplateRow.model_version == s.model_version)
                .group_by(TemplateRow.identity_id)).all()) if ids else {}
            total = int(session.scalar(select(func.count(IdentityRow.id)).where(where)) or 0)
        return [IdentityRowInfo(i, n, int(counts.get(i, 0)), as_utc(t))
                for i, n, t in rows], total

    def photo_templates(self, identity_ids: Sequence[int]) -> dict[int, int]:
        """The first template with a stored photo of each identity (for thumbnails)."""
        out: dict[int, int] = {}
        with self._store.db.read("find template photos") as session:
            for chunk in _chunks(identity_ids):
                out.update(session.execute(
                    select(TemplateRow.identity_id, func.min(TemplateRow.id))
                    .where(TemplateRow.identity_id.in_(chunk))
                    .where(TemplateRow.crop.is_not(None))
                    .group_by(TemplateRow.identity_id)).all())
        return out

    def identity(self, identity_id: int) -> IdentityRowInfo:
        """One identity by id, with this model's template count."""
        s = self._store
        with s.db.read("read an identity") as session:
            row = session.get(IdentityRow, int(identity_id))
            if row is None:
                raise GalleryError(f"no identity with id {identity_id}")
            n = session.scalar(select(func.count(TemplateRow.id))
                               .where(TemplateRow.identity_id == row.id)
                               .where(TemplateRow.model_name == s.model_name)
                               .where(TemplateRow.model_version == s.model_version))
            return IdentityRowInfo(row.id, row.name, int(n or 0), as_utc(row.created_at))

    def template_refs(self, name: str) -> list[TemplateRef]:
        """The templates of an identity (all models), oldest first, without vectors."""
        with self._store.db.read("list templates") as session:
            iid = session.scalar(select(IdentityRow.id)
                                 .where(IdentityRow.name == normalise_name(name)))
            if iid is None:
                raise GalleryError(f"no such identity: {normalise_name(name)!r}")
            rows = session.execute(
                select(TemplateRow.id, TemplateRow.source, TemplateRow.quality,
                       TemplateRow.model_name, TemplateRow.model_version,
                       TemplateRow.created_at, TemplateRow.crop.is_not(None))
                .where(TemplateRow.identity_id == iid).order_by(TemplateRow.id)).all()
        return [TemplateRef(i, s, float(q), f"{m}@{v}", as_utc(t), bool(c))
                for i, s, q, m, v, t, c in rows]

    def template_crop_jpeg(self, template_id: int) -> bytes:
        with self._store.db.read("read a template crop") as session:
            blob = session.scalar(select(TemplateRow.crop)
                                  .where(TemplateRow.id == int(template_id)))
        if blob is None:
            raise GalleryError(f"template {template_id} has no stored crop")
        return self._store.sealer.unseal(blob, CROP)

    def delete_template(self, template_id: int) -> str:
        """Delete one template; returns its identity's name (the identity stays, even empty)."""
        store = self._store

        def work(session: Session) -> str:
            row = session.get(TemplateRow, int(template_id))
            if row is None:
                raise GalleryError(f"no template {template_id}")
            name = row.identity.name
            store.audit.record(session, "delete_template", name,
                               f"template {row.id} ({row.source}) deleted")
            session.delete(row)
            store.db.bump_version(session)
            return name

        name = store.db.write(f"delete template {template_id}", work)
        store.db.compact()
        return name

    def merge_identities(self, source: str, target: str) -> int:
        """Move the templates and events of `source` to `target` and delete `source`;
        returns the templates moved."""
        store = self._store
        src_name, dst_name = normalise_name(source), normalise_name(target)
        if src_name == dst_name:
            raise GalleryError("cannot merge an identity with itself")

        def work(session: Session) -> int:
            ids = dict(session.execute(select(IdentityRow.name, IdentityRow.id)
                                       .where(IdentityRow.name.in_([src_name, dst_name]))).all())
            for n in (src_name, dst_name):
                if n not in ids:
                    raise GalleryError(f"no such identity: {n!r}")
            moved = session.execute(update(TemplateRow)
                                    .where(TemplateRow.identity_id == ids[src_name])
                                    .values(identity_id=ids[dst_name])).rowcount
            events = session.execute(update(EventRow).where(EventRow.identity == src_name)
                                     .values(identity=dst_name)).rowcount
            session.execute(delete(IdentityRow).where(IdentityRow.id == ids[src_name]))
            move_names(session, ids[src_name], ids[dst_name])  # an erasure of dst finds src's
            stamp_bindings(session, TemplateRow.identity_id == ids[dst_name])
            store.audit.record(session, "merge", dst_name,
                               f"{src_name!r} merged in: {plural(moved, 'template')}, "
                               f"{plural(events, 'event')} relabelled")
            store.db.bump_version(session)
            return moved

        return store.db.write(f"merge {src_name!r} into {dst_name!r}", work)
