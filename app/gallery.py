"""Identity gallery and event store in SQLite (or any SQLAlchemy database).

A gallery belongs to one embedding model: templates from another model live in a
different vector space, so opening a gallery with a different model is refused. The
model is recorded in the `meta` table on the first write.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
from sqlalchemy import (
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

from app.records import Event

log = logging.getLogger(__name__)

_BUSY_TIMEOUT_MS = 10_000
_JPEG_QUALITY = 90


class GalleryError(Exception):
    """A user-facing gallery failure; str() is a single line."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Base(DeclarativeBase):
    pass


class _Identity(_Base):
    __tablename__ = "identities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    templates: Mapped[list[_Template]] = relationship(
        back_populates="identity", cascade="all, delete-orphan", passive_deletes=True
    )


class _Template(_Base):
    __tablename__ = "templates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity_id: Mapped[int] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), index=True
    )
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32[dim], little-endian
    dim: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(1024))  # file path, video#frame or track
    quality: Mapped[float] = mapped_column(Float)
    crop: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # JPEG 112x112
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    identity: Mapped[_Identity] = relationship(back_populates="templates")


class _EventRow(_Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    camera: Mapped[str] = mapped_column(String(256), index=True)
    track_id: Mapped[int] = mapped_column(Integer)
    identity: Mapped[str | None] = mapped_column(String(256), nullable=True, index=True)
    score: Mapped[float] = mapped_column(Float)
    start: Mapped[float] = mapped_column(Float)
    end: Mapped[float] = mapped_column(Float)
    frames: Mapped[int] = mapped_column(Integer)
    bbox_x: Mapped[float] = mapped_column(Float)
    bbox_y: Mapped[float] = mapped_column(Float)
    bbox_w: Mapped[float] = mapped_column(Float)
    bbox_h: Mapped[float] = mapped_column(Float)
    model: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)


class _Meta(_Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(1024))


@dataclass(frozen=True)
class IdentityInfo:
    """One enrolled identity as listed by `Gallery.identities()`."""

    name: str
    templates: int
    created_at: datetime  # UTC


def _one_line(exc: BaseException) -> str:
    """The first line of a (possibly DBAPI-wrapped) exception message."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _as_utc(value: datetime) -> datetime:
    """SQLite drops the timezone; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    """WAL (readers never block the writer), enforced foreign keys, busy timeout."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _encode_crop(crop: np.ndarray) -> bytes:
    """JPEG bytes of a uint8 HxWx3 BGR crop."""
    arr = np.asarray(crop)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise GalleryError(f"crop must be uint8[H, W, 3], got {arr.dtype}{list(arr.shape)}")
    ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise GalleryError("could not JPEG-encode a crop")
    return buf.tobytes()


class Gallery:
    """Enrolled identities (templates per model) and recognition events.

    `location` is a file path (SQLite) or a SQLAlchemy URL. With `create=False` the
    gallery must already exist.
    """

    def __init__(
        self,
        location: str | Path,
        model_name: str,
        model_version: str,
        *,
        create: bool = True,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        url, self.location = self._resolve(location, create)
        self._engine = self._make_engine(url)
        try:
            self._open(create)
        except BaseException:
            self._engine.dispose()
            raise
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        log.debug("opened gallery %s for model %s", self.location, self.model)

    @property
    def model(self) -> str:
        """`name@version` of the model this gallery is opened with."""
        return f"{self.model_name}@{self.model_version}"

    @staticmethod
    def _resolve(location: str | Path, create: bool) -> tuple[URL, str]:
        """SQLAlchemy URL and display name; checks/creates the SQLite file's folder."""
        text = str(location)
        if "://" in text:
            try:
                url = make_url(text)
            except ArgumentError as exc:
                raise GalleryError(f"invalid gallery URL {text!r}: {_one_line(exc)}") from exc
            display = url.render_as_string(hide_password=True)
            path = (
                Path(url.database)
                if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
                else None
            )
        else:
            path = Path(text).expanduser()
            url = URL.create("sqlite", database=str(path))
            display = str(path)
        if path is not None:
            if path.is_dir():
                raise GalleryError(f"gallery {display} is a directory, not a database file")
            if not path.exists():
                if not create:
                    raise GalleryError(f"no such gallery: {display}")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise GalleryError(f"cannot create gallery {display}: {exc.strerror}") from exc
        return url, display

    @staticmethod
    def _make_engine(url: URL) -> Engine:
        if url.get_backend_name() != "sqlite":
            return create_engine(url)
        kwargs: dict = {"connect_args": {"timeout": _BUSY_TIMEOUT_MS / 1000}}
        if url.database in (None, "", ":memory:"):
            # One shared connection, or every checkout would see a fresh empty database.
            kwargs = {
                "connect_args": {"check_same_thread": False},
                "poolclass": StaticPool,
            }
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def _open(self, create: bool) -> None:
        """Check the database is a gallery for this model; create the tables if allowed."""
        try:
            tables = set(inspect(self._engine).get_table_names())
            if "meta" not in tables:
                if not create:
                    raise GalleryError(f"no such gallery: {self.location}")
                if tables - set(_Base.metadata.tables):
                    raise GalleryError(f"{self.location} is a database but not a FaceMoE gallery")
            _Base.metadata.create_all(self._engine)
            with Session(self._engine) as session:
                meta = dict(session.execute(select(_Meta.key, _Meta.value)).all())
        except SQLAlchemyError as exc:
            raise GalleryError(f"cannot open gallery {self.location}: {_one_line(exc)}") from exc
        name, version = meta.get("model_name"), meta.get("model_version")
        if name is not None and (name, version) != (self.model_name, self.model_version):
            raise GalleryError(
                f"gallery {self.location} was built with model {name}@{version}; "
                f"this model is {self.model}: re-embed or use a matching model"
            )

    @contextmanager
    def _transaction(self, what: str) -> Iterator[Session]:
        """One session and transaction; commits on success, rolls back on any error."""
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise GalleryError(f"gallery {self.location}: {what} failed: {_one_line(exc)}") from exc

    def _claim_model(self, session: Session) -> None:
        """Record this gallery's model on its first write."""
        if session.get(_Meta, "model_name") is None:
            session.add_all(
                [
                    _Meta(key="model_name", value=self.model_name),
                    _Meta(key="model_version", value=self.model_version),
                ]
            )

    @staticmethod
    def _bump_version(session: Session) -> None:
        """Advance the change counter read by `version()`."""
        row = session.get(_Meta, "version")
        if row is None:
            session.add(_Meta(key="version", value="1"))
        else:
            row.value = str(int(row.value) + 1)

    @staticmethod
    def _clean_name(name: str) -> str:
        clean = name.strip()
        if not clean:
            raise GalleryError("identity name must not be empty")
        return clean

    def _find(self, session: Session, name: str) -> _Identity:
        identity = session.scalar(select(_Identity).where(_Identity.name == name.strip()))
        if identity is None:
            raise GalleryError(f"no such identity: {name.strip()!r}")
        return identity

    def enroll(
        self,
        name: str,
        vectors: np.ndarray,
        sources: list[str],
        qualities: list[float],
        crops: list[np.ndarray] | None = None,
    ) -> int:
        """Add templates (rows of `vectors` [M, D]) to identity `name`, creating it if new.

        Vectors are L2-normalised before storage. Everything is written in one
        transaction: on any error nothing is stored. Returns the number of templates added.
        """
        clean = self._clean_name(name)
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] == 0 or vecs.shape[1] == 0:
            raise GalleryError(f"enroll needs vectors of shape [M, D], got {list(vecs.shape)}")
        count, dim = vecs.shape
        lengths = {"sources": len(sources), "qualities": len(qualities)}
        if crops is not None:
            lengths["crops"] = len(crops)
        wrong = {k: n for k, n in lengths.items() if n != count}
        if wrong:
            raise GalleryError(f"enroll got {count} vectors but {wrong}")
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        if not np.all(np.isfinite(vecs)) or np.any(norms == 0):
            raise GalleryError("enroll vectors must be finite and non-zero")
        vecs = (vecs / norms).astype("<f4")
        try:
            quals = [float(q) for q in qualities]
        except (TypeError, ValueError) as exc:
            raise GalleryError(f"enroll qualities must be numbers: {exc}") from exc
        jpegs = [_encode_crop(c) for c in crops] if crops is not None else [None] * count

        with self._transaction(f"enroll {clean!r}") as session:
            stored_dim = session.scalar(
                select(_Template.dim)
                .where(_Template.model_name == self.model_name)
                .where(_Template.model_version == self.model_version)
                .limit(1)
            )
            if stored_dim is not None and stored_dim != dim:
                raise GalleryError(
                    f"cannot enroll {clean!r}: vectors have dim {dim}, "
                    f"gallery templates have dim {stored_dim}"
                )
            self._claim_model(session)
            identity = session.scalar(select(_Identity).where(_Identity.name == clean))
            if identity is None:
                identity = _Identity(name=clean)
                session.add(identity)
                session.flush()  # assigns identity.id
            session.add_all(
                _Template(
                    identity_id=identity.id,
                    vector=vec.tobytes(),
                    dim=dim,
                    model_name=self.model_name,
                    model_version=self.model_version,
                    source=str(source),
                    quality=quality,
                    crop=jpeg,
                )
                for vec, source, quality, jpeg in zip(vecs, sources, quals, jpegs, strict=True)
            )
            self._bump_version(session)
        log.info("enrolled %d template(s) for %r in %s", count, clean, self.location)
        return count

    def identities(self) -> list[IdentityInfo]:
        """All identities, by name, with their template counts for this model."""
        counts = (
            select(_Template.identity_id, func.count(_Template.id).label("n"))
            .where(_Template.model_name == self.model_name)
            .where(_Template.model_version == self.model_version)
            .group_by(_Template.identity_id)
            .subquery()
        )
        query = (
            select(_Identity.name, func.coalesce(counts.c.n, 0), _Identity.created_at)
            .outerjoin(counts, counts.c.identity_id == _Identity.id)
            .order_by(_Identity.name)
        )
        with self._transaction("list identities") as session:
            rows = session.execute(query).all()
        return [IdentityInfo(name, int(n), _as_utc(created)) for name, n, created in rows]

    def remove(self, name: str) -> None:
        """Delete an identity and its templates; its past events are kept."""
        with self._transaction(f"remove {name.strip()!r}") as session:
            session.delete(self._find(session, name))
            self._bump_version(session)
        log.info("removed %r from %s", name.strip(), self.location)

    def rename(self, old: str, new: str) -> None:
        """Rename an identity (past events keep the old name)."""
        clean = self._clean_name(new)
        with self._transaction(f"rename {old.strip()!r}") as session:
            identity = self._find(session, old)
            if identity.name == clean:
                return
            if session.scalar(select(_Identity.id).where(_Identity.name == clean)) is not None:
                raise GalleryError(f"identity {clean!r} already exists")
            identity.name = clean
            self._bump_version(session)
        log.info("renamed %r to %r in %s", old.strip(), clean, self.location)

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """Per-template identity names and their float32 [M, D] L2-normalised vectors.

        Only templates of this gallery's model are returned; an empty gallery gives
        ([], float32[0, 0]).
        """
        query = (
            select(_Identity.name, _Template.vector, _Template.dim)
            .join(_Template.identity)
            .where(_Template.model_name == self.model_name)
            .where(_Template.model_version == self.model_version)
            .order_by(_Template.id)
        )
        with self._transaction("read templates") as session:
            rows = session.execute(query).all()
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        names = [name for name, _, _ in rows]
        mat = np.stack([np.frombuffer(blob, dtype="<f4", count=dim) for _, blob, dim in rows])
        mat = mat.astype(np.float32)
        mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
        return names, mat

    def add_events(self, events: list[Event]) -> None:
        """Store events in one transaction."""
        if not events:
            return
        with self._transaction(f"store {len(events)} event(s)") as session:
            self._claim_model(session)
            session.add_all(
                [
                    _EventRow(
                        camera=ev.camera,
                        track_id=int(ev.track_id),
                        identity=ev.identity,
                        score=float(ev.score),
                        start=float(ev.start),
                        end=float(ev.end),
                        frames=int(ev.frames),
                        bbox_x=float(ev.best_bbox[0]),
                        bbox_y=float(ev.best_bbox[1]),
                        bbox_w=float(ev.best_bbox[2]),
                        bbox_h=float(ev.best_bbox[3]),
                        model=ev.model,
                    )
                    for ev in events
                ]
            )

    def events(self, limit: int | None = None) -> list[Event]:
        """Stored events, oldest first; with `limit`, only the most recent `limit`."""
        query = select(_EventRow).order_by(_EventRow.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._transaction("read events") as session:
            rows = list(session.scalars(query).all())
        rows.reverse()
        return [
            Event(
                camera=r.camera,
                track_id=r.track_id,
                identity=r.identity,
                score=r.score,
                start=r.start,
                end=r.end,
                frames=r.frames,
                best_bbox=(r.bbox_x, r.bbox_y, r.bbox_w, r.bbox_h),
                model=r.model,
            )
            for r in rows
        ]

    def version(self) -> int:
        """Change counter: differs after every enroll, remove or rename (0 when never written)."""
        with self._transaction("read version") as session:
            row = session.get(_Meta, "version")
            return int(row.value) if row is not None else 0

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
