"""Pages of what a gallery holds, read-only, for the review UI and the API: events by filter
(keyset paging, newest first), one event, its kept crops and snapshot (served as stored, only
unsealed), the cameras seen, identities by name with their template counts, an identity's
templates and their photos. Changes live with their owners (`Gallery`, `EventStore`,
`ClusterStore`, `Corrections`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.gallery.codec import normalise_name
from app.gallery.db import (
    EventCropRow,
    EventEmbeddingRow,
    EventRow,
    EventSnapshotRow,
    IdentityRow,
    TemplateRow,
    as_utc,
    chunks,
)
from app.gallery.errors import GalleryError
from app.gallery.events import StoredEvent
from app.gallery.seal import CROP, SNAPSHOT
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



class Pages:
    """Read-only pages of an opened gallery (`Store`) for the review UI and the API."""

    def __init__(self, store: Store) -> None:
        self._store = store

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
        for chunk in chunks(ids):
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
            for chunk in chunks(event_ids):
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
            for chunk in chunks(identity_ids):
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
