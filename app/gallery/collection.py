"""The gallery as a face collection (what the CompreFace-compatible API calls subjects and
their faces): templates of this gallery's model by id, a page of them, one template's vector,
the templates of one subject deleted, and a subject created without a face. Every change
writes an audit row in its transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.gallery.codec import clean_name, normalise_name
from app.gallery.db import IdentityRow, TemplateRow, add_identities
from app.gallery.errors import GalleryError, plural
from app.gallery.seal import VECTOR
from app.gallery.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceRef:
    """One template of this gallery's model: its id and its identity's name."""

    id: int
    subject: str


class FaceCollection:
    """Templates of the gallery's model, addressed by id (`Store` of an opened gallery)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def _mine(self, query):
        s = self._store
        return (query.where(TemplateRow.model_name == s.model_name)
                .where(TemplateRow.model_version == s.model_version))

    def _identity_id(self, session: Session, name: str) -> int:
        iid = session.scalar(select(IdentityRow.id)
                             .where(IdentityRow.name == normalise_name(name)))
        if iid is None:
            raise GalleryError(f"no such identity: {normalise_name(name)!r}")
        return iid

    def faces(self, *, subject: str | None = None, offset: int = 0, limit: int = 20
              ) -> tuple[list[FaceRef], int]:
        """A page of templates (oldest first), of one subject or all, and their total."""
        q = self._mine(select(TemplateRow.id, IdentityRow.name).join(TemplateRow.identity))
        n = self._mine(select(func.count(TemplateRow.id)))
        with self._store.db.read("list faces") as session:
            if subject is not None:
                iid = self._identity_id(session, subject)
                q, n = (q.where(TemplateRow.identity_id == iid),
                        n.where(TemplateRow.identity_id == iid))
            rows = session.execute(q.order_by(TemplateRow.id).offset(offset).limit(limit)).all()
            total = int(session.scalar(n) or 0)
        return [FaceRef(int(i), name) for i, name in rows], total

    def newest(self, subject: str) -> FaceRef:
        """The subject's most recent template of this model."""
        with self._store.db.read("find the newest face") as session:
            iid = self._identity_id(session, subject)
            row = session.execute(
                self._mine(select(TemplateRow.id, IdentityRow.name).join(TemplateRow.identity))
                .where(TemplateRow.identity_id == iid)
                .order_by(TemplateRow.id.desc()).limit(1)).first()
        if row is None:
            raise GalleryError(f"{normalise_name(subject)!r} has no face")
        return FaceRef(int(row[0]), row[1])

    def vector(self, face_id: int) -> tuple[FaceRef, np.ndarray]:
        """One template of this model with its unit vector float32[D]."""
        with self._store.db.read("read a face") as session:
            row = session.execute(
                self._mine(select(TemplateRow.vector, IdentityRow.name)
                           .join(TemplateRow.identity))
                .where(TemplateRow.id == int(face_id))).first()
        if row is None:
            raise GalleryError(f"no face with id {face_id}")
        vec = np.frombuffer(self._store.sealer.unseal(row[0], VECTOR), dtype="<f4")
        vec = vec.astype(np.float32) / max(float(np.linalg.norm(vec)), 1e-12)
        return FaceRef(int(face_id), row[1]), vec

    def add_subject(self, name: str) -> str:
        """Create an identity without templates (GalleryError when it exists)."""
        clean = clean_name(name)
        store = self._store

        def work(session: Session) -> None:
            if session.scalar(select(IdentityRow.id).where(IdentityRow.name == clean)):
                raise GalleryError(f"identity {clean!r} already exists")
            add_identities(session, {clean: None})
            store.audit.record(session, "add_identity", clean, "created without a face")
            store.db.bump_version(session)

        store.db.write(f"add {clean!r}", work)
        return clean

    def delete_faces(self, subject: str) -> int:
        """Delete every template of `subject` (all models); the identity and its events stay.
        Returns the templates deleted."""
        store = self._store

        def work(session: Session) -> int:
            iid = self._identity_id(session, subject)
            n = session.execute(delete(TemplateRow).where(TemplateRow.identity_id == iid)
                                ).rowcount
            store.audit.record(session, "delete_templates", normalise_name(subject),
                               f"{plural(n, 'template')} deleted")
            store.db.bump_version(session)
            return int(n)

        n = store.db.write(f"delete the faces of {normalise_name(subject)!r}", work)
        if n:
            store.db.compact()
        return n
