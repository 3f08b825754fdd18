"""Corrections of stored events: delete, relabel, "not this person" and the results of re-running
events against the current gallery. Every change writes an audit row in its transaction.

"Not this person" (and any relabel away from a name) is remembered per event as the identity
ids it is not, so that re-running the event never gives it that name again and enrolling a
group leaves it out; the templates enrolled from the event's crops into that identity are
deleted. The ids are kept in the meta table (`not_person:` + a digest of the event's own id,
which is never reused, unlike row ids -> comma-separated identity ids) until a schema revision
gives them a table of their own; deleting the event deletes them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.gallery.codec import clean_name, normalise_name
from app.gallery.db import (
    IN_CHUNK,
    EventCropRow,
    EventEmbeddingRow,
    EventRow,
    IdentityRow,
    MetaRow,
    TemplateRow,
)
from app.gallery.errors import GalleryError, plural
from app.gallery.store import Store

log = logging.getLogger(__name__)
_KEY = "not_person:"


@dataclass(frozen=True)
class Relabel:
    """A new label for an event: identity (None: unknown), its score and nearest name."""

    identity: str | None
    score: float
    candidate: str | None
    candidate_score: float | None


def _key(uid: str | None, event_id: int) -> str:
    """The meta key of an event's corrections: a digest of its uid, within the key column's 64
    characters whatever the uid's length (rows of release 0.2 have none: their row id)."""
    if not uid:
        return f"{_KEY}row-{int(event_id)}"
    return _KEY + hashlib.sha256(uid.encode()).hexdigest()[:40]


def _event(session: Session, event_id: int) -> EventRow:
    row = session.get(EventRow, int(event_id))
    if row is None:
        raise GalleryError(f"no event {event_id}")
    return row


class Corrections:
    """Event corrections on an opened gallery (`Store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # --- what an event is not -----------------------------------------------------------------

    @staticmethod
    def _not_ids(session: Session, key: str) -> set[int]:
        row = session.get(MetaRow, key)
        return {int(v) for v in row.value.split(",") if v} if row is not None else set()

    def _remember_not(self, session: Session, event: EventRow, identity: str) -> int:
        """Record that the event is not `identity` and delete the templates enrolled from
        its crops into it; returns the templates deleted."""
        iid = session.scalar(select(IdentityRow.id).where(IdentityRow.name == identity))
        if iid is None:
            return 0
        key = _key(event.uid, event.id)
        ids = self._not_ids(session, key) | {int(iid)}
        self._store.db.set_meta(session, key, ",".join(map(str, sorted(ids))))
        event_id = event.id
        removed = session.execute(
            delete(TemplateRow).where(TemplateRow.identity_id == iid)
            .where(TemplateRow.source.like(f"event {int(event_id)}: %"))).rowcount
        if removed:
            self._store.db.bump_version(session)
        return int(removed)

    def rejected(self, event_ids: Sequence[int]) -> dict[int, set[str]]:
        """The names each of these events has been marked as not being."""
        wanted_ids = sorted({int(e) for e in event_ids})
        if not wanted_ids:
            return {}
        with self._store.db.read("read corrections") as session:
            keys = {}
            for i in range(0, len(wanted_ids), IN_CHUNK):
                keys.update((_key(uid, eid), eid) for eid, uid in session.execute(
                    select(EventRow.id, EventRow.uid)
                    .where(EventRow.id.in_(wanted_ids[i:i + IN_CHUNK]))).all())
            rows = session.execute(select(MetaRow.key, MetaRow.value)
                                   .where(MetaRow.key.in_(list(keys)))).all()
            ids = {k: {int(v) for v in value.split(",") if v} for k, value in rows}
            wanted = set().union(*ids.values()) if ids else set()
            names = dict(session.execute(select(IdentityRow.id, IdentityRow.name)
                                         .where(IdentityRow.id.in_(wanted))).all())
        return {keys[k]: {names[i] for i in v if i in names} for k, v in ids.items()}

    # --- changes ------------------------------------------------------------------------------

    def relabel(self, event_id: int, identity: str | None) -> tuple[str | None, int]:
        """Name the event `identity` (an existing identity; None: unknown), remembering that it
        is not its former name. Returns (former name, templates deleted from it)."""
        name = clean_name(identity) if identity is not None else None
        store = self._store

        def work(session: Session) -> tuple[str | None, int]:
            row = _event(session, event_id)
            old = row.identity
            if name is not None and not session.scalar(
                    select(IdentityRow.id).where(IdentityRow.name == name)):
                raise GalleryError(f"no such identity: {name!r} (enroll it first)")
            if old == name:
                return old, 0
            removed = self._remember_not(session, row, old) if old else 0
            row.identity = name
            store.audit.record(session, "relabel", name or old,
                               f"event {row.id} relabelled from {old or 'unknown'!s} to "
                               f"{name or 'unknown'}"
                               + (f"; {plural(removed, 'template')} from it deleted from {old!r}"
                                  if removed else ""))
            return old, removed

        return store.db.write(f"relabel event {event_id}", work)

    def not_person(self, event_id: int, identity: str | None = None) -> tuple[str, int]:
        """"Not this person": the event becomes unknown and is never again named `identity`
        (default: its current name); the templates enrolled from it into that identity are
        deleted. Returns (the name, templates deleted)."""
        store = self._store

        def work(session: Session) -> tuple[str, int]:
            row = _event(session, event_id)
            name = normalise_name(identity) if identity is not None else row.identity
            if not name:
                raise GalleryError(f"event {event_id} is unknown: say which person it is not")
            if not session.scalar(select(IdentityRow.id).where(IdentityRow.name == name)):
                raise GalleryError(f"no such identity: {name!r}")
            removed = self._remember_not(session, row, name)
            if row.identity == name:
                row.identity = None
            store.audit.record(session, "not_person", name,
                               f"event {row.id} is not {name!r}; "
                               f"{plural(removed, 'template')} from it deleted")
            return name, removed

        return store.db.write(f"mark event {event_id}", work)

    def delete(self, event_ids: Sequence[int]) -> int:
        """Delete events with their crops, embeddings and corrections; returns how many."""
        ids = sorted({int(e) for e in event_ids})
        store = self._store

        def work(session: Session) -> int:
            found = dict(session.execute(select(EventRow.id, EventRow.uid)
                                         .where(EventRow.id.in_(ids))).all())
            missing = sorted(set(ids) - set(found))
            if missing:
                raise GalleryError(f"no event {missing[0]}")
            session.execute(delete(EventCropRow).where(EventCropRow.event_id.in_(ids)))
            session.execute(delete(EventEmbeddingRow).where(EventEmbeddingRow.event_id.in_(ids)))
            session.execute(delete(MetaRow).where(
                MetaRow.key.in_([_key(uid, e) for e, uid in found.items()])))
            n = session.execute(delete(EventRow).where(EventRow.id.in_(ids))).rowcount
            store.audit.record(session, "delete_events", None,
                               f"{plural(n, 'event')} deleted: "
                               + ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else ""))
            return int(n)

        n = store.db.write("delete events", work)
        store.db.compact()
        return n

    def apply(self, labels: dict[int, Relabel]) -> int:
        """Store the results of re-running events against the gallery (identity, score and
        nearest name of each); returns how many events changed their name."""
        if not labels:
            return 0
        store = self._store

        def work(session: Session) -> int:
            renamed = 0
            for eid, new in labels.items():
                row = session.get(EventRow, eid)
                if row is None:
                    continue
                renamed += row.identity != new.identity
                row.identity, row.score = new.identity, float(new.score)
                row.candidate, row.candidate_score = new.candidate, new.candidate_score
            store.audit.record(session, "reprocess", None,
                               f"{plural(len(labels), 'event')} re-run against the gallery, "
                               f"{plural(renamed, 'name')} changed")
            return renamed

        return store.db.write("store re-run events", work)
