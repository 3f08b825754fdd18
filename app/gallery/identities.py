"""The identity store: enrolled identities and their templates (per model), and `Gallery`,
the one handle on an opened gallery that the CLI, the pipeline and the tests use. Every write
of identities and templates is here: enroll, rename, merge two, delete one template, remove.

`remove` deletes an identity, its templates, crops and events, then compacts the file
(VACUUM). Every change writes an audit row in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from app.gallery.audit import AuditEntry
from app.gallery.clusters import ClusterStore
from app.gallery.codec import (
    binding_checksum,
    clean_name,
    decode_crop,
    encode_crop,
    normalise_name,
    unit_vectors,
    vector_checksum,
    vector_problem,
)
from app.gallery.db import (
    AuditRow,
    EventCropRow,
    EventRow,
    IdentityRow,
    TemplateRow,
    add_identities,
    as_utc,
    move_names,
    record_names,
    refuse_lookalikes,
    stamp_bindings,
    template_dim,
    utcnow,
)
from app.gallery.erasures import Erasures
from app.gallery.errors import GalleryError, names_preview, plural
from app.gallery.events import EventStore, StoredEvent
from app.gallery.paging import Pages
from app.gallery.reembed import EmbedderLike, ReembedReport, reembed
from app.gallery.seal import CROP, VECTOR
from app.gallery.store import Closing, Store
from app.gallery.training import TrainedFaces
from app.gallery.transfer import ExportReport, ImportReport, export, import_file
from app.records import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdentityInfo:
    """One enrolled identity as listed by `Gallery.identities()`."""

    name: str
    templates: int
    created_at: datetime  # UTC


@dataclass(frozen=True)
class TemplateInfo:
    """One stored template of an identity (`Gallery.templates(name)`)."""

    source: str
    quality: float
    model: str  # name@version
    created_at: datetime  # UTC
    vector: np.ndarray  # float32[D]
    crop: np.ndarray | None  # uint8[S, S, 3] BGR (app.align.STORE), None when not stored


@dataclass(frozen=True)
class Enrollment:
    """Templates for one identity, as `Gallery.enroll` takes them (for `enroll_many`)."""

    name: str
    vectors: np.ndarray  # float32[M, D]
    sources: Sequence[str]
    qualities: Sequence[float]
    crops: Sequence[np.ndarray] | None = None  # uint8[H, W, 3] BGR each


@dataclass(frozen=True)
class CorruptTemplate:
    """A stored template that cannot be used, by identity and template id."""

    identity: str
    template_id: int
    problem: str

    def __str__(self) -> str:
        return f"{self.identity!r} template {self.template_id}: {self.problem}"

    def as_json(self) -> dict[str, Any]:
        return {"identity": self.identity, "template_id": self.template_id,
                "problem": self.problem}


class _Prepared(NamedTuple):
    """A validated `Enrollment`."""

    name: str
    vectors: np.ndarray  # little-endian float32[M, D], unit rows
    sources: list[str]
    qualities: list[float]
    jpegs: list[bytes | None]


def _prepare(e: Enrollment) -> _Prepared:
    """Validate one enrollment; vectors normalised, crops JPEG-encoded."""
    clean = clean_name(e.name)
    vecs = np.asarray(e.vectors, dtype=np.float32)
    if vecs.ndim != 2 or vecs.shape[0] == 0 or vecs.shape[1] == 0:
        raise GalleryError(f"enroll needs vectors of shape [M, D], got {list(vecs.shape)}")
    count = vecs.shape[0]
    lengths = {"sources": len(e.sources), "qualities": len(e.qualities)}
    if e.crops is not None:
        lengths["crops"] = len(e.crops)
    wrong = {k: n for k, n in lengths.items() if n != count}
    if wrong:
        raise GalleryError(f"enroll got {count} vectors but {wrong}")
    vecs = unit_vectors(vecs, "enroll")
    try:
        quals = [float(q) for q in e.qualities]
    except (TypeError, ValueError) as exc:
        raise GalleryError(f"enroll qualities must be numbers: {exc}") from exc
    jpegs = [encode_crop(c) for c in e.crops] if e.crops is not None else [None] * count
    # a file name that is not UTF-8 (its bytes as surrogates) is stored with them escaped
    sources = [str(s).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
               for s in e.sources]
    return _Prepared(clean, vecs, sources, quals, jpegs)


_MOVED = "belongs to another identity (moved outside FaceMoE: binding checksum mismatch)"


def _bound(identity_id: int, checksum: str | None, binding: str | None) -> bool:
    """Whether a template is where it was put (True for rows from before bindings)."""
    return binding is None or checksum is None or \
        binding_checksum(identity_id, checksum) == binding


def _find(session: Session, name: str) -> IdentityRow:
    identity = session.scalar(select(IdentityRow).where(IdentityRow.name == normalise_name(name)))
    if identity is None:
        raise GalleryError(f"no such identity: {normalise_name(name)!r}")
    return identity


class Gallery(Closing):
    """Enrolled identities (templates per model); through it, the gallery's event store
    (`event_store`), audit log, export/import and re-embedding.

    Opens the gallery as `Store` does: `location` is a file path (SQLite) or a SQLAlchemy
    URL; with `create=False` it must already exist; `key` (32 bytes) opens or creates an
    encrypted gallery, None reads it from the environment (`load_key`); `adopt_model=True`
    opens a gallery built with another model as that model (to export, purge or re-embed it).
    """

    def __init__(
        self,
        location: str | Path,
        model_name: str,
        model_version: str,
        *,
        create: bool = True,
        key: bytes | None = None,
        adopt_model: bool = False,
        defer_open: bool = False,
    ) -> None:
        self.store = Store(location, model_name, model_version, create=create, key=key,
                           adopt_model=adopt_model, defer_open=defer_open)
        self.event_store = EventStore(self.store)
        self.pages = Pages(self.store)  # read-only pages of events and identities
        self.clusters = ClusterStore(self.store)  # event embeddings and face clusters
        self.erasures = Erasures(self.store)  # tombstones of erasures (app.erasure)
        self.trained = TrainedFaces(self.store)  # models fine-tuned on its faces
        self.corrupt_templates: list[CorruptTemplate] = []  # left out by the last `matrix()`
        log.debug("opened gallery %s for model %s", self.location, self.model)

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def model_name(self) -> str:
        return self.store.model_name

    @property
    def model_version(self) -> str:
        return self.store.model_version

    @property
    def model(self) -> str:
        """`name@version` of the model this gallery is opened with."""
        return self.store.model

    @property
    def encrypted(self) -> bool:
        return self.store.sealer.encrypted

    @property
    def store_crops(self) -> bool:
        return self.store.store_crops

    # --- enrollment ---------------------------------------------------------------------------

    def enroll(
        self,
        name: str,
        vectors: np.ndarray,
        sources: list[str],
        qualities: list[float],
        crops: list[np.ndarray] | None = None,
    ) -> int:
        """Add templates (rows of `vectors` [M, D]) to identity `name`, creating it if new.

        Vectors are L2-normalised before storage; crops are kept as JPEG unless the
        gallery's `store_crops` is off. Everything is written in one transaction: on any
        error nothing is stored. Returns the number of templates added.
        """
        return self.enroll_many([Enrollment(name, vectors, sources, qualities, crops)])

    def enroll_many(self, enrollments: Sequence[Enrollment]) -> int:
        """`enroll` for many identities in one transaction; returns the templates added."""
        prepared = [_prepare(e) for e in enrollments]
        if not prepared:
            return 0
        dims = {p.vectors.shape[1] for p in prepared}
        if len(dims) > 1:
            raise GalleryError(f"enroll got vectors of different dims {sorted(dims)}")
        (dim,) = dims
        store, seal, keep_crops = self.store, self.store.sealer.seal, self.store.store_crops

        def work(session: Session) -> int:
            store.claim(session)
            stored_dim = template_dim(session, store.model_name, store.model_version)
            if stored_dim is not None and stored_dim != dim:
                raise GalleryError(
                    f"cannot enroll {prepared[0].name!r}: vectors have dim {dim}, "
                    f"gallery templates have dim {stored_dim}"
                )
            ids = add_identities(session, {p.name: None for p in prepared})
            now = utcnow()
            rows = [
                {
                    "identity_id": ids[name],
                    "vector": (blob := seal(vec.tobytes(), VECTOR)),
                    "checksum": (checksum := vector_checksum(blob)),
                    "binding": binding_checksum(ids[name], checksum),
                    "dim": dim,
                    "model_name": store.model_name,
                    "model_version": store.model_version,
                    "source": source,
                    "quality": quality,
                    "crop": (crop := seal(jpeg, CROP) if jpeg is not None and keep_crops
                             else None),
                    "crop_checksum": vector_checksum(crop) if crop is not None else None,
                    "created_at": now,
                }
                for name, vecs, sources, quals, jpegs in prepared
                for vec, source, quality, jpeg in zip(vecs, sources, quals, jpegs, strict=True)
            ]
            session.execute(insert(TemplateRow), rows)
            store.audit.record_many(session, [
                ("enroll", name, f"{plural(len(vecs), 'template')}, "
                 f"{plural(sum(j is not None for j in jpegs) if keep_crops else 0, 'crop')}, "
                 f"model {store.model}")
                for name, vecs, _, _, jpegs in prepared])
            store.db.bump_version(session)
            return len(rows)

        names = names_preview(p.name for p in prepared)
        count = store.db.write(f"enroll {names}", work)
        log.info("enrolled %d template(s) for %s in %s", count, names, self.location)
        return count

    # --- reading ------------------------------------------------------------------------------

    def identities(self) -> list[IdentityInfo]:
        """All identities, by name, with their template counts for this model."""
        counts = (
            select(TemplateRow.identity_id, func.count(TemplateRow.id).label("n"))
            .where(TemplateRow.model_name == self.model_name)
            .where(TemplateRow.model_version == self.model_version)
            .group_by(TemplateRow.identity_id)
            .subquery()
        )
        query = (
            select(IdentityRow.name, func.coalesce(counts.c.n, 0), IdentityRow.created_at)
            .outerjoin(counts, counts.c.identity_id == IdentityRow.id)
            .order_by(IdentityRow.name)
        )
        with self.store.db.read("list identities") as session:
            rows = session.execute(query).all()
        return [IdentityInfo(name, int(n), as_utc(created)) for name, n, created in rows]

    def templates(self, name: str) -> list[TemplateInfo]:
        """The stored templates of one identity (all models), oldest first, decrypted."""
        with self.store.db.read(f"read templates of {normalise_name(name)!r}") as session:
            identity = _find(session, name)
            rows = session.execute(
                select(TemplateRow).where(TemplateRow.identity_id == identity.id)
                .order_by(TemplateRow.id)
            ).scalars().all()
        unseal = self.store.sealer.unseal
        out = []
        for t in rows:
            vec = np.frombuffer(unseal(t.vector, VECTOR), dtype="<f4").astype(np.float32)
            crop = (decode_crop(unseal(t.crop, CROP), f"{identity.name!r}")
                    if t.crop is not None else None)
            out.append(TemplateInfo(t.source, t.quality, f"{t.model_name}@{t.model_version}",
                                    as_utc(t.created_at), vec, crop))
        return out

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """Per-template identity names and their float32 [M, D] L2-normalised vectors.

        Only templates of this gallery's model are returned; an empty gallery gives
        ([], float32[0, 0]).
        """
        query = (
            select(TemplateRow.id, IdentityRow.name, TemplateRow.vector, TemplateRow.dim,
                   TemplateRow.checksum, TemplateRow.identity_id, TemplateRow.binding)
            .join(TemplateRow.identity)
            .where(TemplateRow.model_name == self.model_name)
            .where(TemplateRow.model_version == self.model_version)
            .order_by(TemplateRow.id)
        )
        with self.store.db.read("read templates") as session:
            rows = session.execute(query).all()
        dims = [row[3] for row in rows]
        dim = max(set(dims), key=dims.count) if dims else 0  # the gallery's; others are corrupt
        names, vectors, corrupt = [], [], []
        for tid, name, stored, row_dim, checksum, iid, binding in rows:
            vector, problem = self._verified_vector(stored, row_dim, checksum, dim)
            if problem is None and not _bound(iid, checksum, binding):
                vector, problem = b"", _MOVED
            if problem is None:
                names.append(name)
                vectors.append(vector)
            else:
                corrupt.append(CorruptTemplate(name, tid, problem))
        if corrupt and corrupt != self.corrupt_templates:
            log.error("gallery %s: left out %s (restore from a backup or an export, or "
                      "re-enroll): %s", self.location, plural(len(corrupt), "corrupt template"),
                      "; ".join(str(c) for c in corrupt[:10]))
        self.corrupt_templates = corrupt
        if not vectors:
            return [], np.zeros((0, 0), dtype=np.float32)
        raw = np.frombuffer(b"".join(vectors), dtype="<f4").reshape(len(vectors), -1)
        norms = np.sqrt(np.einsum("ij,ij->i", raw, raw, dtype=np.float32))[:, None]
        return names, (raw / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)

    def _verified_vector(self, stored: bytes, row_dim: int, checksum: str | None,
                         dim: int) -> tuple[bytes, str | None]:
        """(unsealed vector, None) or (b"", why the stored template is unusable)."""
        if checksum is not None and vector_checksum(stored) != checksum:
            return b"", "checksum mismatch"
        try:
            vector = self.store.sealer.unseal(stored, VECTOR)
        except GalleryError:
            return b"", "does not decrypt (authentication failed)"
        if row_dim != dim:
            return b"", f"dim {row_dim}, the gallery's templates have {dim}"
        problem = vector_problem(vector, row_dim)
        return (vector, None) if problem is None else (b"", problem)

    def verify(self) -> list[CorruptTemplate]:
        """Every template (of any model) and stored crop checked: checksum, decryption,
        dimension, finite unit vector, decodable crop of a kept size. Returns the problems."""
        query = (select(TemplateRow.id, IdentityRow.name, TemplateRow.vector, TemplateRow.dim,
                        TemplateRow.checksum, TemplateRow.crop, TemplateRow.model_name,
                        TemplateRow.model_version, TemplateRow.identity_id,
                        TemplateRow.binding, TemplateRow.crop_checksum)
                 .join(TemplateRow.identity).order_by(TemplateRow.id))
        problems: list[CorruptTemplate] = []
        dims: dict[tuple[str, str], list[int]] = {}
        with self.store.db.read("verify templates") as session:
            rows = session.execute(query).all()
        for row in rows:
            dims.setdefault((row.model_name, row.model_version), []).append(row.dim)
        for row in rows:
            model_dims = dims[(row.model_name, row.model_version)]
            dim = max(set(model_dims), key=model_dims.count)
            _, problem = self._verified_vector(row.vector, row.dim, row.checksum, dim)
            if problem is None and not _bound(row.identity_id, row.checksum, row.binding):
                problem = _MOVED
            if problem is not None:
                problems.append(CorruptTemplate(row.name, row.id, problem))
            if row.crop is not None and row.crop_checksum is not None \
                    and vector_checksum(row.crop) != row.crop_checksum:
                problems.append(CorruptTemplate(row.name, row.id, "crop checksum mismatch"))
            elif row.crop is not None:
                try:
                    decode_crop(self.store.sealer.unseal(row.crop, CROP), "crop")
                except GalleryError as exc:
                    problems.append(CorruptTemplate(row.name, row.id, str(exc)))
        return problems

    def version(self) -> int:
        """Change counter: differs after every enroll, remove or rename (0 when never written)."""
        return self.store.db.version()

    def info(self) -> dict[str, Any]:
        """Model, settings and sizes."""
        counts = {
            "identities": select(func.count(IdentityRow.id)),
            "templates": select(func.count(TemplateRow.id)),
            "templates_with_crops": select(func.count(TemplateRow.id))
            .where(TemplateRow.crop.is_not(None)),
            "events": select(func.count(EventRow.id)),
            "event_crops": select(func.count(EventCropRow.id)),
            "audit_rows": select(func.count(AuditRow.id)),
        }
        with self.store.db.read("read gallery info") as session:
            info = {"gallery": self.location, "model": self.model, "encrypted": self.encrypted,
                    "store_crops": self.store_crops}
            info.update({k: int(session.scalar(q) or 0) for k, q in counts.items()})
        info["version"] = self.version()
        size = self.store.db.file_bytes()
        if size is not None:  # the database file and its write-ahead log
            info["bytes"] = size
        return info

    # --- changes ------------------------------------------------------------------------------

    def remove(self, name: str, *, compact: bool = True) -> int:
        """Erase a person from the gallery alone: the identity, its templates, crops and the
        events that name it by any name it carried (`Erasures.begin`), then compact the file.
        Returns the events deleted. The product's doors (CLI, web, API) call
        `app.erasure.erase`, which also erases the JSONL lines, snapshots and MQTT state the
        product wrote outside the gallery, and finishes on a rerun after a failure."""
        tomb = self.erasures.begin(name=name)
        self.erasures.finish(tomb)
        log.info("removed %r (and %d event(s)) from %s", tomb.name, tomb.events_deleted,
                 self.location)
        if compact:
            self.compact()
        return tomb.events_deleted

    def rename(self, old: str, new: str) -> None:
        """Rename an identity (past events keep the old name)."""
        clean = clean_name(new)
        store = self.store

        def work(session: Session) -> None:
            identity = _find(session, old)
            if identity.name == clean:
                return
            if session.scalar(select(IdentityRow.id).where(IdentityRow.name == clean)) is not None:
                raise GalleryError(f"identity {clean!r} already exists")
            refuse_lookalikes(session, [clean], except_id=identity.id)
            store.audit.record(session, "rename", identity.name, f"renamed to {clean!r}")
            identity.name = clean
            record_names(session, {identity.id: clean})
            store.db.bump_version(session)

        store.db.write(f"rename {normalise_name(old)!r}", work)
        log.info("renamed %r to %r in %s", normalise_name(old), clean, self.location)

    def delete_template(self, template_id: int) -> str:
        """Delete one template; returns its identity's name (the identity stays, even empty)."""
        store = self.store

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
        store = self.store
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

    def set_store_crops(self, on: bool, *, delete_existing: bool = False) -> int:
        """Store aligned crops of new templates (needed by `reembed`) or not; with
        `delete_existing`, also delete the crops already stored. Returns crops deleted."""
        store = self.store

        def work(session: Session) -> int:
            store.db.set_meta(session, "store_crops", "1" if on else "0")
            deleted = 0
            if delete_existing:
                deleted = session.execute(
                    update(TemplateRow).where(TemplateRow.crop.is_not(None))
                    .values(crop=None, crop_checksum=None)
                ).rowcount
            store.audit.record(session, "settings", None,
                               f"store_crops={'on' if on else 'off'}, "
                               f"{plural(deleted, 'crop')} deleted")
            return deleted

        deleted = store.db.write("change settings", work)
        store.store_crops = on
        if deleted:
            self.compact()
        return deleted

    def compact(self) -> bool:
        """VACUUM the SQLite file and empty its WAL, so deleted data leaves the disk file;
        False when it could not run now (another connection is busy: it runs next time)."""
        return self.store.db.compact()

    def integrity_check(self) -> str:
        """SQLite's full integrity check: 'ok' or the first problem found. Other databases
        check their own storage; there, 'ok' when every template vector decodes with one size
        (the server answered and `matrix()` reads), else the problem."""
        if self.store.db.is_sqlite:
            return self.store.db.sqlite_integrity()
        try:
            self.matrix()
        except GalleryError as exc:
            return str(exc)
        return "ok"

    # --- the rest of the gallery: events, audit, export/import, model upgrades ----------------

    def add_events(self, events: list[Event], *, crops: int = 0) -> None:
        """`EventStore.add`."""
        self.event_store.add(events, crops=crops)

    def stored_events(self, limit: int | None = None, *, camera: str | None = None,
                      identity: str | None = None, unknown: bool = False) -> list[StoredEvent]:
        """`EventStore.stored`."""
        return self.event_store.stored(limit, camera=camera, identity=identity, unknown=unknown)

    def event_crops(self, event_id: int) -> tuple[StoredEvent, list[tuple[float, np.ndarray]]]:
        """`EventStore.crops`."""
        return self.event_store.crops(event_id)

    def events(self, limit: int | None = None) -> list[Event]:
        """Stored events, oldest first; with `limit`, only the most recent `limit`."""
        return [stored.event for stored in self.event_store.stored(limit)]

    def purge_events(self, older_than_days: float, *, compact: bool = True) -> int:
        """`EventStore.purge`."""
        return self.event_store.purge(older_than_days, compact=compact)

    def audit(self, limit: int | None = None) -> list[AuditEntry]:
        """`AuditLog.entries`."""
        return self.store.audit.entries(limit)

    def export(self, path: str | Path) -> ExportReport:
        """`transfer.export`."""
        return export(self.store, path)

    def import_file(self, path: str | Path, *, on_conflict: str = "fail",
                    embedder: EmbedderLike | None = None,
                    drop_missing: bool = False) -> ImportReport:
        """`transfer.import_file`."""
        return import_file(self.store, path, on_conflict=on_conflict, embedder=embedder,
                           drop_missing=drop_missing)

    def reembed(self, embedder: EmbedderLike, *, drop_missing: bool = False,
                batch_size: int = 64) -> ReembedReport:
        """`reembed.reembed`."""
        return reembed(self.store, embedder, drop_missing=drop_missing, batch_size=batch_size)

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the database connections."""
        self.store.close()
