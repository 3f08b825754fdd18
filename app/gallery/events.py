"""The event store: one row per finished track, written by the daemon and `process` on their
hot path, each with up to N of its best aligned crops (so the person can be enrolled from
the track later: `facemoe enroll NAME --event ID`)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from app.gallery.codec import clean_name, decode_crop, encode_crop, normalise_name
from app.gallery.db import EventCropRow, EventRow, EventSnapshotRow, as_utc, chunks, utcnow
from app.gallery.errors import GalleryError, plural
from app.gallery.seal import CROP, SNAPSHOT
from app.gallery.store import Store
from app.records import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredEvent:
    """One stored event with its database id (`EventStore.stored`)."""

    id: int
    event: Event
    crops: int  # aligned crops kept with it (enrollable when > 0)
    created_at: datetime  # UTC

    def as_json(self) -> dict[str, Any]:
        # "id" stays the row id (`facemoe enroll --event ID`); the event's own id is "uid"
        return {**self.event.to_json(), "id": self.id, "uid": self.event.id,
                "crops": self.crops, "stored_at": self.created_at.isoformat()}

    @classmethod
    def of(cls, row: EventRow, crops: int) -> StoredEvent:
        """The stored event of an `events` row with `crops` kept crops."""
        return cls(row.id, _event_of(row), int(crops), as_utc(row.created_at))


def _event_of(r: EventRow) -> Event:
    # rows stored before events had ids get a stable one derived from the row
    uid = r.uid or str(uuid.uuid5(uuid.NAMESPACE_OID, f"facemoe-event-{r.id}-{r.created_at}"))
    return Event(camera=r.camera, track_id=r.track_id, identity=r.identity, score=r.score,
                 start=r.start, end=r.end, frames=r.frames,
                 best_bbox=(r.bbox_x, r.bbox_y, r.bbox_w, r.bbox_h), model=r.model,
                 id=uid, time=r.time, snapshot=r.snapshot, candidate=r.candidate,
                 candidate_score=r.candidate_score,
                 zones=tuple(json.loads(r.zones)) if r.zones else ())


def _row_values(ev: Event) -> dict[str, Any]:
    return {
        "camera": ev.camera,
        "track_id": int(ev.track_id),
        "identity": ev.identity,
        "score": float(ev.score),
        "start": float(ev.start),
        "end": float(ev.end),
        "frames": int(ev.frames),
        "bbox_x": float(ev.best_bbox[0]),
        "bbox_y": float(ev.best_bbox[1]),
        "bbox_w": float(ev.best_bbox[2]),
        "bbox_h": float(ev.best_bbox[3]),
        "model": ev.model,
        "uid": ev.id,
        "time": ev.time,
        "snapshot": None,  # the picture is stored with the event (`EventSnapshotRow`)
        "candidate": ev.candidate,
        "candidate_score": None if ev.candidate_score is None else float(ev.candidate_score),
        "zones": json.dumps(list(ev.zones), ensure_ascii=False) if ev.zones else None,
        "created_at": utcnow(),
    }


def _insert_once(session: Session, values: dict[str, Any]) -> int | None:
    """Insert an `events` row unless its uid is stored; its new row id, or None when it was.
    SQLite and PostgreSQL skip a duplicate in the INSERT itself (ON CONFLICT DO NOTHING on the
    unique index), so two writers racing with one event store it once."""
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        stmt = (dialect_insert(EventRow).values(**values)
                .on_conflict_do_nothing(index_elements=[EventRow.uid])
                .returning(EventRow.id))
        return session.execute(stmt).scalar()
    if session.scalar(select(EventRow.id).where(EventRow.uid == values["uid"])) is not None:
        return None
    return session.execute(insert(EventRow).values(**values).returning(EventRow.id)).scalar()


class EventStore:
    """The `events` and `event_crops` tables of an opened gallery (`Store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, events: list[Event], *, crops: int = 0) -> int:
        """Store events in one transaction, each with up to `crops` of its best aligned crops
        (`Event.crops`; sealed like template crops in an encrypted gallery) and its best-face
        picture (`Event.snapshot_image`, JPEG, sealed too). Idempotent: an
        event whose id (`Event.id`, the unique `events.uid`) is already stored is skipped, so
        a batch retried after a lost connection or replayed from an outbox is stored once.
        Returns how many were new."""
        if not events:
            return 0
        store = self._store
        jpegs = [[(float(q), encode_crop(c)) for q, c in ev.crops[:max(0, crops)]]
                 for ev in events]
        pictures = [None if ev.snapshot_image is None else encode_crop(ev.snapshot_image)
                    for ev in events]

        def work(session: Session) -> int:
            store.claim(session)
            new = 0
            for ev, kept, picture in zip(events, jpegs, pictures, strict=True):
                event_id = _insert_once(session, _row_values(ev))
                if event_id is None:
                    continue  # stored before
                new += 1
                if kept:
                    session.execute(insert(EventCropRow), [
                        {"event_id": event_id, "quality": q,
                         "crop": store.sealer.seal(jpeg, CROP)} for q, jpeg in kept])
                if picture is not None:
                    session.execute(insert(EventSnapshotRow).values(
                        event_id=event_id, jpeg=store.sealer.seal(picture, SNAPSHOT)))
            return new

        new = store.db.write(f"store {len(events)} event(s)", work)
        if new < len(events):
            log.info("gallery %s: %d of %d event(s) were already stored (skipped)",
                     store.location, len(events) - new, len(events))
        return new

    def stored(
        self,
        limit: int | None = None,
        *,
        camera: str | None = None,
        identity: str | None = None,
        unknown: bool = False,
    ) -> list[StoredEvent]:
        """Stored events with their ids and crop counts, oldest first; with `limit`, only the
        most recent `limit`; filtered by camera, by the identity named, or to unknown faces."""
        crops = (select(EventCropRow.event_id, func.count(EventCropRow.id).label("n"))
                 .group_by(EventCropRow.event_id).subquery())
        query = (select(EventRow, func.coalesce(crops.c.n, 0))
                 .outerjoin(crops, crops.c.event_id == EventRow.id)
                 .order_by(EventRow.id.desc()))
        if camera is not None:
            query = query.where(EventRow.camera == camera)
        if identity is not None:
            query = query.where(EventRow.identity == normalise_name(identity))
        if unknown:
            query = query.where(EventRow.identity.is_(None))
        if limit is not None:
            query = query.limit(limit)
        with self._store.db.read("read events") as session:
            rows = list(session.execute(query).all())
        rows.reverse()
        return [StoredEvent.of(r, n) for r, n in rows]

    def crops(self, event_id: int) -> tuple[StoredEvent, list[tuple[float, np.ndarray]]]:
        """An event and its kept aligned crops (quality, uint8[S, S, 3] BGR), best first."""
        with self._store.db.read("read event crops") as session:
            row = session.get(EventRow, int(event_id))
            if row is None:
                raise GalleryError(f"gallery {self._store.location} has no event {event_id}")
            crops = list(session.execute(
                select(EventCropRow.quality, EventCropRow.crop)
                .where(EventCropRow.event_id == row.id)
                .order_by(EventCropRow.quality.desc(), EventCropRow.id)).all())
            stored = StoredEvent.of(row, len(crops))
        what = f"event {event_id}"
        return stored, [(float(q), decode_crop(self._store.sealer.unseal(c, CROP), what))
                        for q, c in crops]

    def relabel(self, event_ids: Sequence[int], identity: str | None) -> int:
        """Name the events `identity` (None: unknown again); returns how many changed."""
        name = clean_name(identity) if identity is not None else None
        store = self._store

        def work(session: Session) -> int:
            n = 0
            for chunk in chunks(event_ids):
                n += session.execute(update(EventRow).where(EventRow.id.in_(chunk))
                                     .values(identity=name)).rowcount
            store.audit.record(session, "relabel", name,
                               f"{plural(n, 'event')} named {name!r}" if name
                               else f"{plural(n, 'event')} made unknown")
            return n

        return store.db.write("relabel events", work)

    def purge(self, older_than_days: float, *, compact: bool = True) -> int:
        """Delete events stored more than `older_than_days` days ago, then compact the file;
        returns how many."""
        days = float(older_than_days)
        if not np.isfinite(days) or days < 0:
            raise GalleryError(f"the retention period must be >= 0 days, got {older_than_days}")
        cutoff = utcnow() - timedelta(days=days)
        audit = self._store.audit

        def work(session: Session) -> int:
            old = select(EventRow.id).where(EventRow.created_at < cutoff)
            session.execute(delete(EventCropRow).where(EventCropRow.event_id.in_(old)))
            n = session.execute(delete(EventRow).where(EventRow.created_at < cutoff)).rowcount
            audit.record(session, "purge", None,
                         f"{plural(n, 'event')} older than {days:g} days deleted")
            return n

        n = self._store.db.write("purge events", work)
        log.info("purged %d event(s) older than %g days from %s", n, days, self._store.location)
        if compact and n:
            self._store.db.compact()
        return n

    @staticmethod
    def delete_named(session: Session, identity: str) -> int:
        """In a write transaction: delete the events (and their crops) that name `identity`;
        returns how many."""
        named = select(EventRow.id).where(EventRow.identity == identity)
        session.execute(delete(EventCropRow).where(EventCropRow.event_id.in_(named)))
        session.execute(update(EventRow).where(EventRow.candidate == identity)
                        .values(candidate=None, candidate_score=None))
        return session.execute(delete(EventRow).where(EventRow.identity == identity)).rowcount
