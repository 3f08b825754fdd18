"""The gallery's side of erasing a person: its rows go, a tombstone stays until every trace
outside the database is gone too (`app.erasure` drives the whole erasure).

`begin` finds the identity by its id (or its current name), and in one transaction deletes
its templates, crops, the events that name it by any name only it has carried (old names
from renames and merges included, `identity_names`), their kept crops and embeddings, clears
those names as the `candidate` of other events, and writes the tombstone: the names, the
events' own ids and snapshot paths that the files outside still hold. `finish` deletes the
tombstone's erasing part done (`done_at`) once those are erased there. A tombstone left by a
failure (disk full, a broker away) is found again by the name, so a rerun finishes the
erasure. On a site of several boxes each box erases its own copies when it learns of the
tombstone (`for_box`, then `ack`); the tombstone is deleted once its erasing part is done and
every box of the site (the `boxes` table) has acknowledged it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.gallery.codec import normalise_name
from app.gallery.db import (
    IN_CHUNK,
    BoxRow,
    ErasureAckRow,
    ErasureRow,
    EventCropRow,
    EventRow,
    IdentityNameRow,
    IdentityRow,
    TemplateRow,
    as_utc,
    utcnow,
)
from app.gallery.errors import GalleryError, plural
from app.gallery.store import Store
from app.gallery.training import TrainedFaces

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tombstone:
    """An erasure whose database part is done; `names` are the names only this identity
    carried (lines naming them are its), `event_uids`/`snapshots` its events' ids and files."""

    id: int
    identity_id: int
    name: str
    names: tuple[str, ...]
    event_uids: frozenset[str]
    snapshots: tuple[str, ...]
    events_deleted: int
    created_at: datetime
    attempts: int
    last_error: str | None

    @classmethod
    def of(cls, row: ErasureRow) -> Tombstone:
        return cls(row.id, row.identity_id, row.name, tuple(json.loads(row.names)),
                   frozenset(json.loads(row.event_uids)), tuple(json.loads(row.snapshots)),
                   int(row.events_deleted or 0), as_utc(row.created_at), int(row.attempts or 1),
                   row.last_error)

    def as_json(self) -> dict:
        return {"identity": self.name, "identity_id": self.identity_id,
                "started": self.created_at.isoformat(), "attempts": self.attempts,
                "last_error": self.last_error}


class Erasures:
    """Tombstones of one opened gallery (`Store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def begin(self, *, name: str | None = None, identity_id: int | None = None) -> Tombstone:
        """Delete the identity's rows and write its tombstone (one transaction); an identity
        already gone whose erasure did not finish gives its tombstone back (a rerun).
        GalleryError 'no such identity' when neither exists."""
        if (name is None) == (identity_id is None):
            raise ValueError("give the identity's name or its id")
        store = self._store
        what = f"identity {identity_id}" if name is None else repr(normalise_name(name))

        def work(session: Session) -> Tombstone:
            if name is not None:
                row = session.scalar(select(IdentityRow)
                                     .where(IdentityRow.name == normalise_name(name)))
            else:
                row = session.get(IdentityRow, int(identity_id))
            if row is None:
                pending = self._pending_row(session, name, identity_id)
                if pending is None:
                    raise GalleryError(f"no such identity: {what}")
                pending.attempts = int(pending.attempts or 1) + 1
                return Tombstone.of(pending)
            return self._delete_rows(session, row)

        return store.db.write(f"remove {what}", work)

    @staticmethod
    def _pending_row(session: Session, name: str | None,
                     identity_id: int | None) -> ErasureRow | None:
        query = (select(ErasureRow).where(ErasureRow.done_at.is_(None))
                 .order_by(ErasureRow.id.desc()).limit(1))
        if name is not None:
            clean = normalise_name(name)
            query = query.where(ErasureRow.name == clean)
        else:
            query = query.where(ErasureRow.identity_id == int(identity_id))
        return session.scalar(query)

    def _delete_rows(self, session: Session, identity: IdentityRow) -> Tombstone:
        store = self._store
        names = self._own_names(session, identity)
        uids, snapshots, ids = set(), set(), []
        for i in range(0, len(names), IN_CHUNK):
            chunk = names[i:i + IN_CHUNK]
            for eid, uid, snap in session.execute(
                    select(EventRow.id, EventRow.uid, EventRow.snapshot)
                    .where(EventRow.identity.in_(chunk))).all():
                ids.append(eid)
                uids.update([uid] if uid else [])
                snapshots.update([snap] if snap else [])
            session.execute(update(EventRow).where(EventRow.candidate.in_(chunk))
                            .values(candidate=None, candidate_score=None))
        for i in range(0, len(ids), IN_CHUNK):
            chunk = ids[i:i + IN_CHUNK]
            session.execute(delete(EventCropRow).where(EventCropRow.event_id.in_(chunk)))
            session.execute(delete(EventRow).where(EventRow.id.in_(chunk)))
        templates = session.execute(
            delete(TemplateRow).where(TemplateRow.identity_id == identity.id)).rowcount
        tomb = ErasureRow(identity_id=identity.id, name=identity.name,
                          names=json.dumps(names, ensure_ascii=False),
                          event_uids=json.dumps(sorted(uids)),
                          snapshots=json.dumps(sorted(snapshots), ensure_ascii=False),
                          events_deleted=len(ids), attempts=1)
        session.add(tomb)
        session.execute(delete(IdentityNameRow).where(IdentityNameRow.identity_id == identity.id))
        # models fine-tuned on these faces keep what they learned: they need retraining
        TrainedFaces.mark_erased(session, identity.id)
        session.delete(identity)
        store.audit.record(session, "remove", identity.name,
                           f"{plural(templates, 'template')}, {plural(len(ids), 'event')} "
                           f"deleted")
        store.db.bump_version(session)
        session.flush()
        return Tombstone.of(tomb)

    @staticmethod
    def _own_names(session: Session, identity: IdentityRow) -> list[str]:
        """The names `identity` carried that no other identity (enrolled or being erased)
        carries or carried: events and lines with these names are its."""
        carried = set(session.scalars(select(IdentityNameRow.name)
                                      .where(IdentityNameRow.identity_id == identity.id)))
        carried.add(identity.name)
        shared = set(session.scalars(
            select(IdentityNameRow.name).where(IdentityNameRow.name.in_(sorted(carried)))
            .where(IdentityNameRow.identity_id != identity.id)))
        shared.update(session.scalars(select(IdentityRow.name)
                                      .where(IdentityRow.name.in_(sorted(carried)))
                                      .where(IdentityRow.id != identity.id)))
        if shared:
            log.warning("erasing %r: %s also carried by another identity; its events and "
                        "lines under %s are kept", identity.name,
                        plural(len(shared), "name"), ", ".join(map(repr, sorted(shared))))
        return sorted(carried - shared)

    def failed(self, tombstone: Tombstone, error: str) -> None:
        """Record why the erasure could not finish (shown by `gallery check`)."""
        def work(session: Session) -> None:
            row = session.get(ErasureRow, tombstone.id)
            if row is not None:
                row.last_error = error[:2000]

        self._store.db.write("record an unfinished erasure", work)

    def finish(self, tombstone: Tombstone) -> None:
        """Every trace this machine holds is erased: the tombstone is done, and goes once
        every box has erased its copies too (`ack`)."""
        def work(session: Session) -> None:
            row = session.get(ErasureRow, tombstone.id)
            if row is not None:
                row.done_at, row.last_error = utcnow(), None
                self._drop_if_acked(session, row)

        self._store.db.write(f"finish erasing {tombstone.name!r}", work)

    def for_box(self, box: str) -> list[Tombstone]:
        """The tombstones `box` has not acknowledged yet, oldest first."""
        acked = select(ErasureAckRow.erasure_id).where(ErasureAckRow.box == box)
        with self._store.db.read("list erasures for a box") as session:
            rows = session.scalars(select(ErasureRow).where(ErasureRow.id.not_in(acked))
                                   .order_by(ErasureRow.id)).all()
            return [Tombstone.of(r) for r in rows]

    def ack(self, tombstone: Tombstone, box: str) -> None:
        """`box` has erased its copies of the tombstone's person."""
        def work(session: Session) -> None:
            row = session.get(ErasureRow, tombstone.id)
            if row is None or session.get(ErasureAckRow, (tombstone.id, box)) is not None:
                return
            session.add(ErasureAckRow(erasure_id=tombstone.id, box=box, acked_at=utcnow()))
            session.flush()
            self._drop_if_acked(session, row)

        self._store.db.write(f"box {box} erased its copies of {tombstone.name!r}", work)

    @staticmethod
    def _waiting_boxes(session: Session, erasure_id: int) -> list[str]:
        acked = select(ErasureAckRow.box).where(ErasureAckRow.erasure_id == erasure_id)
        return list(session.scalars(select(BoxRow.box).where(BoxRow.box.not_in(acked))
                                    .order_by(BoxRow.box)))

    def _drop_if_acked(self, session: Session, row: ErasureRow) -> None:
        if row.done_at is not None and not self._waiting_boxes(session, row.id):
            session.execute(delete(ErasureAckRow).where(ErasureAckRow.erasure_id == row.id))
            session.delete(row)

    def waiting_for_boxes(self) -> list[tuple[Tombstone, list[str]]]:
        """Erasures done here whose boxes have not all erased their copies yet, with those
        boxes (`gallery check`, the fleet page): a box that never runs again keeps its
        tombstone until it is forgotten (`forget_box`)."""
        with self._store.db.read("list erasures waiting for boxes") as session:
            rows = session.scalars(select(ErasureRow).where(ErasureRow.done_at.is_not(None))
                                   .order_by(ErasureRow.id)).all()
            return [(Tombstone.of(r), self._waiting_boxes(session, r.id)) for r in rows]

    def forget_box(self, box: str) -> None:
        """A box is gone for good (its disks wiped): it leaves the fleet and no erasure waits
        for it any more."""
        def work(session: Session) -> None:
            if session.get(BoxRow, box) is None:
                raise GalleryError(f"no such box: {box!r}")
            session.execute(delete(BoxRow).where(BoxRow.box == box))
            session.flush()
            for row in session.scalars(select(ErasureRow)
                                       .where(ErasureRow.done_at.is_not(None))).all():
                self._drop_if_acked(session, row)

        self._store.db.write(f"forget box {box}", work)

    def names_in_use(self, names: tuple[str, ...]) -> set[str]:
        """Which of `names` an enrolled identity carries or carried (enrolled after the
        erasure began): lines with those names are no longer only the erased person's."""
        with self._store.db.read("read identity names") as session:
            used = set(session.scalars(select(IdentityNameRow.name)
                                       .where(IdentityNameRow.name.in_(names))))
            used.update(session.scalars(select(IdentityRow.name)
                                        .where(IdentityRow.name.in_(names))))
        return used

    def pending(self) -> list[Tombstone]:
        """Erasures whose erasing part has not finished, oldest first."""
        with self._store.db.read("list unfinished erasures") as session:
            rows = session.scalars(select(ErasureRow).where(ErasureRow.done_at.is_(None))
                                   .order_by(ErasureRow.id)).all()
            return [Tombstone.of(r) for r in rows]
