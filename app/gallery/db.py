"""The gallery's tables and its database: engine, read and write transactions, locking.

`Database` is the only place that talks to SQLAlchemy's engine. Every change runs as
`db.write(what, work)`: one transaction that takes the write lock up front (BEGIN
IMMEDIATE in SQLite), commits when `work(session)` returns, rolls back on any error and
is retried from the start while another writer still holds the database past the busy
timeout. Reads run in `with db.read(what) as session:`. Database errors come out as
one-line `GalleryError`s.

New SQLite files are created with mode 0600 (SQLite gives the -wal/-shm files the same
mode); deleted pages are zeroed (`secure_delete`) and `compact()` VACUUMs the file.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

from app.fsutil import make_dirs
from app.gallery.codec import MAX_NAME_LENGTH, binding_checksum, lookalike_key
from app.gallery.errors import GalleryError, one_line

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
CHANGES_CHANNEL = "facemoe_gallery"  # PostgreSQL NOTIFY channel of `bump_version`
# a database server (PostgreSQL): a connection attempt gives up after CONNECT_TIMEOUT_S; TCP
# keepalives find a dead peer (server host gone, cable pulled) in about KEEPALIVE_IDLE_S +
# KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S instead of the kernel's two hours; every pooled
# connection is checked (pre-ping) before use, so a server restart costs one failed check,
# not a failed transaction
CONNECT_TIMEOUT_S = 5
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
POOL_RECYCLE_S = 1800  # connections older than this are replaced (idle-killing firewalls)
LOCK_RETRIES = 5  # attempts of a write that still finds the database locked after the timeout
IN_CHUNK = 500  # values per SQL IN (...) list


def chunks(ids) -> list[list]:
    """`ids` in lists of at most `IN_CHUNK` (one SQL IN (...) list each)."""
    ids = list(ids)
    return [ids[i:i + IN_CHUNK] for i in range(0, len(ids), IN_CHUNK)]
_PAGE_SIZE = 16384  # a 512-d template (2 KiB) per identity: ~2.6 KB on disk, not ~4.3 KB

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """SQLite drops the timezone; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


# --- tables ----------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class IdentityRow(Base):
    __tablename__ = "identities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    templates: Mapped[list[TemplateRow]] = relationship(
        back_populates="identity", cascade="all, delete-orphan", passive_deletes=True
    )


class TemplateRow(Base):
    __tablename__ = "templates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity_id: Mapped[int] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), index=True
    )
    # float32[dim], little-endian; AES-GCM nonce + ciphertext in an encrypted gallery
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    dim: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(1024))  # file path, video#frame or track
    quality: Mapped[float] = mapped_column(Float)
    crop: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # JPEG, kept geometry
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    identity: Mapped[IdentityRow] = relationship(back_populates="templates")
    # sha256 hex of `vector` as stored (`codec.vector_checksum`): a flipped bit is found by
    # `gallery check` and the template is left out at load; NULL in rows of older releases
    checksum: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # sha256 hex of `crop` as stored, and `codec.binding_checksum` (identity id + checksum):
    # a corrupted crop and a template moved to another identity are found (migration 0003)
    crop_checksum: Mapped[str | None] = mapped_column(String(64), nullable=True)
    binding: Mapped[str | None] = mapped_column(String(64), nullable=True)


class EventRow(Base):
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
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    # Added after the first release: nullable, and added to older galleries when they are
    # opened (migration 0002). `uid` is the event's own id (`Event.id`, a UUID string), unique
    # (migration 0004): a write retried or replayed from the outbox is stored once.
    uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    __table_args__ = (Index("ux_events_uid", "uid", unique=True),)
    time: Mapped[str | None] = mapped_column(String(40), nullable=True)  # ISO 8601, wall clock
    # a box-local file path, as events stored before migration 0006 have it; the picture of a
    # newer event is in the database (`EventSnapshotRow`), so a UI on any machine shows it
    snapshot: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    candidate: Mapped[str | None] = mapped_column(String(256), nullable=True)
    candidate_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    zones: Mapped[str | None] = mapped_column(String(1024), nullable=True)  # JSON list of names


class IdentityNameRow(Base):
    """Every name an identity has carried (enroll, rename, merge), so an erasure finds the
    traces that still name it by an old name. No foreign key: the rows outlive the identity
    until its erasure has finished."""

    __tablename__ = "identity_names"

    identity_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH), primary_key=True, index=True)


class ErasureRow(Base):
    """A tombstone: an identity whose database rows are gone but whose traces outside the
    database (JSONL lines, snapshots, retained MQTT topics) may not be erased yet. Written in
    the transaction that deletes the rows; deleted when the erasure has finished."""

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity_id: Mapped[int] = mapped_column(Integer, index=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))  # its name when erased
    names: Mapped[str] = mapped_column(Text)  # JSON list: names only it carried
    event_uids: Mapped[str] = mapped_column(Text)  # JSON list of its events' own ids
    snapshots: Mapped[str] = mapped_column(Text)  # JSON list of its events' snapshot paths
    events_deleted: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    last_error: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    # when the erasing machine's part (its files, MQTT) finished (migration 0006); the row stays
    # until every box of the site has erased its own copies too (`ErasureAckRow`)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ErasureAckRow(Base):
    """A box has erased its local copies (JSONL lines, spooled snapshots, outbox entries) of a
    tombstone's person (migration 0006)."""

    __tablename__ = "erasure_acks"

    erasure_id: Mapped[int] = mapped_column(
        ForeignKey("erasures.id", ondelete="CASCADE"), primary_key=True)
    box: Mapped[str] = mapped_column(String(64), primary_key=True)
    acked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EventSnapshotRow(Base):
    """An event's best-face picture (JPEG of the frame region, sealed when the gallery is
    encrypted), stored with the event so that the review UI on any machine can show it
    (migration 0006)."""

    __tablename__ = "event_snapshots"

    event_id: Mapped[int] = mapped_column(
        ForeignKey("events.id", ondelete="CASCADE"), primary_key=True)
    jpeg: Mapped[bytes] = mapped_column(LargeBinary)


# Columns of `events` and `templates` that galleries of release 0.2 lack, as release 0.3 added
# them (migration 0002 adds the missing ones on open; its one source, frozen as they were).
RELEASE_0_3_EVENT_COLUMNS = (
    Column("uid", String(64), nullable=True),
    Column("time", String(40), nullable=True),
    Column("snapshot", String(1024), nullable=True),
    Column("candidate", String(256), nullable=True),
    Column("candidate_score", Float(), nullable=True),
    Column("zones", String(1024), nullable=True),
)
RELEASE_0_3_TEMPLATE_COLUMNS = (Column("checksum", String(64), nullable=True),)
EVENT_COLUMNS_ADDED = tuple(c.name for c in RELEASE_0_3_EVENT_COLUMNS)
TEMPLATE_COLUMNS_ADDED = tuple(c.name for c in RELEASE_0_3_TEMPLATE_COLUMNS)


class EventCropRow(Base):
    """An aligned crop of an event's track, kept so the person can be enrolled from it."""

    __tablename__ = "event_crops"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), index=True)
    quality: Mapped[float] = mapped_column(Float)
    crop: Mapped[bytes] = mapped_column(LargeBinary)  # JPEG, kept geometry (sealed when encrypted)


class EventEmbeddingRow(Base):
    """An event's embedding (quality-weighted mean of its kept crops' embeddings) with the
    model that made it, cached for the review UI: nearest names and face clusters."""

    __tablename__ = "event_embeddings"

    event_id: Mapped[int] = mapped_column(
        ForeignKey("events.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(256))  # name@version
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32[D] (sealed when encrypted)
    cluster_id: Mapped[int | None] = mapped_column(
        ForeignKey("face_clusters.id", ondelete="SET NULL"), nullable=True, index=True
    )


class FaceClusterRow(Base):
    """A group of unknown events of one face, with a stable id (the review UI's state)."""

    __tablename__ = "face_clusters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(256))  # name@version of the member embeddings
    state: Mapped[str] = mapped_column(String(16), default="open")  # open | ignored
    centroid: Mapped[bytes] = mapped_column(LargeBinary)  # float32[D] unit (sealed)
    members: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MetaRow(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(1024))


class BoxRow(Base):
    """A daemon's heartbeat, one row per box of the site (`app.gallery.fleet`): when it started
    and was last heard of, its state and its cameras' counters (JSON, no faces or names)."""

    __tablename__ = "boxes"

    box: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(16))  # ok | degraded | stopped
    detail: Mapped[str] = mapped_column(Text)  # JSON: {"cameras": [...], "reasons": [...]}


class TrainedFaceRow(Base):
    """A model fine-tuned on this gallery's faces, one row per identity whose faces it learned
    (`app.gallery.training`): an erasure marks the person's rows `erased_at`, so the models
    that still carry what they learned from that person are known (`gallery check`). No
    foreign key: the record outlives the identity. Holds ids, never names or faces."""

    __tablename__ = "trained_faces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(256), index=True)  # name@version
    model_sha256: Mapped[str] = mapped_column(String(64))  # the artifact's weights
    model_dir: Mapped[str] = mapped_column(String(1024))  # where it was written
    identity_id: Mapped[int] = mapped_column(Integer, index=True)
    tracks: Mapped[int] = mapped_column(Integer, default=0)  # training tracks (and photos)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditRow(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    action: Mapped[str] = mapped_column(String(32))
    identity: Mapped[str | None] = mapped_column(String(MAX_NAME_LENGTH), nullable=True)
    detail: Mapped[str] = mapped_column(String(2048))
    os_user: Mapped[str] = mapped_column(String(256))


# --- queries shared by the identity store and import -----------------------------------------


def identity_ids(session: Session, names: Iterable[str]) -> dict[str, int]:
    """Ids of the identities among `names` that exist."""
    wanted, found = sorted(set(names)), {}
    for i in range(0, len(wanted), IN_CHUNK):
        chunk = wanted[i:i + IN_CHUNK]
        found.update(session.execute(
            select(IdentityRow.name, IdentityRow.id).where(IdentityRow.name.in_(chunk))).all())
    return found


def add_identities(session: Session, names: dict[str, datetime | None]) -> dict[str, int]:
    """Ids of `names`, inserting the missing ones (with their created_at, or now)."""
    ids = identity_ids(session, names)
    missing = [n for n in names if n not in ids]
    if missing:
        refuse_lookalikes(session, missing)
        now = utcnow()
        result = session.execute(
            insert(IdentityRow).returning(IdentityRow.name, IdentityRow.id,
                                          sort_by_parameter_order=True),
            [{"name": n, "created_at": names[n] or now} for n in missing],
        )
        ids.update((name, iid) for name, iid in result)
        record_names(session, {ids[n]: n for n in missing})
    return ids


def record_names(session: Session, names: dict[int, str]) -> None:
    """Remember that identity id carried name (`IdentityNameRow`), once each."""
    for iid, name in names.items():
        if session.get(IdentityNameRow, (iid, name)) is None:
            session.add(IdentityNameRow(identity_id=iid, name=name))


def move_names(session: Session, source: int, target: int) -> None:
    """The names identity `source` carried now belong to `target` too (a merge)."""
    names = session.scalars(select(IdentityNameRow.name)
                            .where(IdentityNameRow.identity_id == source)).all()
    for n in names:
        if session.get(IdentityNameRow, (target, n)) is None:
            session.add(IdentityNameRow(identity_id=target, name=n))
    session.execute(delete(IdentityNameRow).where(IdentityNameRow.identity_id == source))


def refuse_lookalikes(session: Session, names: list[str], *, except_id: int | None = None
                      ) -> None:
    """GalleryError when a new name reads the same as an enrolled one (a case variant, the
    same letters in fullwidth ...) or as another of `names`."""
    seen: dict[str, str] = {}
    for iid, existing in session.execute(select(IdentityRow.id, IdentityRow.name)).all():
        if iid != except_id:
            seen.setdefault(lookalike_key(existing), existing)
    for name in names:
        other = seen.setdefault(lookalike_key(name), name)
        if other != name:
            raise GalleryError(f"identity name {name!r} looks like the existing {other!r}: "
                               f"use that one, or a name that reads differently")


def stamp_bindings(session: Session, *where) -> int:
    """Recompute `templates.binding` of the rows matching `where` (after a change of their
    identity or vector); returns how many."""
    rows = session.execute(select(TemplateRow.id, TemplateRow.identity_id, TemplateRow.checksum)
                           .where(TemplateRow.checksum.is_not(None), *where)).all()
    if rows:
        session.execute(update(TemplateRow), [
            {"id": tid, "binding": binding_checksum(iid, checksum)}
            for tid, iid, checksum in rows])
    return len(rows)


def template_dim(session: Session, model_name: str, model_version: str) -> int | None:
    """The dimension of the stored templates of a model (None when it has none)."""
    return session.scalar(
        select(TemplateRow.dim)
        .where(TemplateRow.model_name == model_name)
        .where(TemplateRow.model_version == model_version)
        .limit(1)
    )


# --- SQLite set-up ---------------------------------------------------------------------------


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    """WAL (readers never block the writer), enforced foreign keys, busy timeout, zeroed
    deleted pages, pages that hold several templates; transactions are begun by
    `_sqlite_begin`, not by the driver."""
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    try:
        cursor.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # only takes effect in a new file
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    """Writers take the write lock at BEGIN: a deferred transaction that read first cannot
    wait for the lock (SQLite answers 'database is locked' at once to avoid a deadlock)."""
    write = conn.get_execution_options().get("gallery_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _check_sqlite_file(path: Path, display: str) -> None:
    """Refuse a truncated SQLite file (SQLite itself notices only when it reads a lost page)."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb") as fh:
        header = fh.read(100)
    if not header.startswith(b"SQLite format 3\x00"):
        return  # SQLite reports "file is not a database"
    hint = "restore it from a backup or an export"
    if size < 100:
        raise GalleryError(f"gallery {display} is corrupt: truncated to {size} bytes; {hint}")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise GalleryError(f"gallery {display} is corrupt: bad page size {page_size}; {hint}")
    pages = int.from_bytes(header[28:32], "big")
    header_valid = header[24:28] == header[92:96]
    expected = pages * page_size if pages and header_valid else size
    wal = path.with_name(path.name + "-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        # a checkpoint that could not grow the file (disk full): the pages are still in the
        # write-ahead log, which SQLite reads; not a truncation
        return
    if size % page_size or size < expected:
        raise GalleryError(
            f"gallery {display} is corrupt: the file is truncated "
            f"({size} of {max(expected, size + 1)} bytes); {hint}"
        )


def _is_busy(exc: BaseException) -> bool:
    text = one_line(exc).lower()
    return "database is locked" in text or "database is busy" in text


# --- the database ----------------------------------------------------------------------------


class Database:
    """A gallery database: a file path (SQLite) or a SQLAlchemy URL.

    With `create=False` the database must already exist. `location` is the display name
    (a URL without its password); `path` the SQLite file, None for other databases.
    """

    def __init__(self, location: str | Path, *, create: bool = True) -> None:
        url, self.location, self.path = self._resolve(location)
        self._created = self._prepare_file(create)
        self._engine = self._make_engine(url)
        self._reads = sessionmaker(self._engine, expire_on_commit=False)
        self._writes = sessionmaker(
            self._engine.execution_options(gallery_write=True), expire_on_commit=False
        )

    @property
    def is_sqlite(self) -> bool:
        return self._engine.url.get_backend_name() == "sqlite"

    # --- opening ------------------------------------------------------------------------------

    @staticmethod
    def _resolve(location: str | Path) -> tuple[URL, str, Path | None]:
        """SQLAlchemy URL, display name and the SQLite file (None for other databases)."""
        text = str(location)
        if "://" in text:
            try:
                url = make_url(text)
            except ArgumentError as exc:
                raise GalleryError(f"invalid gallery URL {text!r}: {one_line(exc)}") from exc
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
        return url, display, path

    def _prepare_file(self, create: bool) -> bool:
        """Check an existing SQLite file, or create it with mode 0600; True when created."""
        path, display = self.path, self.location
        if path is None:
            return False
        if path.is_dir():
            raise GalleryError(f"gallery {display} is a directory, not a database file")
        if path.exists():
            try:
                _check_sqlite_file(path, display)
                mode = stat.S_IMODE(path.stat().st_mode)
            except OSError as exc:
                raise GalleryError(f"cannot read gallery {display}: {exc.strerror}") from exc
            if mode & 0o077:
                log.warning("gallery %s is readable by other users (mode %o); chmod 600 it",
                            display, mode)
            return False
        if not create:
            raise GalleryError(f"no such gallery: {display}")
        try:
            make_dirs(path.parent)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return False
        except OSError as exc:
            raise GalleryError(f"cannot create gallery {display}: {exc.strerror}") from exc
        return True

    @staticmethod
    def _make_engine(url: URL) -> Engine:
        if url.get_backend_name() != "sqlite":
            kwargs = {"pool_pre_ping": True, "pool_recycle": POOL_RECYCLE_S}
            if url.get_backend_name() == "postgresql" and url.get_driver_name() in (
                    "psycopg", "psycopg2"):  # libpq's connection parameters
                kwargs["connect_args"] = {
                    "connect_timeout": CONNECT_TIMEOUT_S, "keepalives": 1,
                    "keepalives_idle": KEEPALIVE_IDLE_S,
                    "keepalives_interval": KEEPALIVE_INTERVAL_S,
                    "keepalives_count": KEEPALIVE_COUNT,
                    "tcp_user_timeout": (KEEPALIVE_IDLE_S + KEEPALIVE_COUNT
                                         * KEEPALIVE_INTERVAL_S) * 1000,
                }
            try:
                return create_engine(url, **kwargs)
            except (ArgumentError, ImportError) as exc:  # e.g. an unknown dialect or driver
                raise GalleryError(f"cannot open gallery {url.render_as_string()}: "
                                   f"{one_line(exc)}") from exc
        kwargs: dict = {"connect_args": {"timeout": BUSY_TIMEOUT_MS / 1000}}
        if url.database in (None, "", ":memory:"):
            # One shared connection, or every checkout would see a fresh empty database.
            kwargs = {
                "connect_args": {"check_same_thread": False},
                "poolclass": StaticPool,
            }
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine

    def open_schema(self, create: bool) -> tuple[dict[str, str], bool]:
        """Check the database is a gallery, creating its tables if allowed; returns the meta
        table and whether any template is stored."""
        for attempt in range(1, LOCK_RETRIES + 1):
            try:
                return self._read_schema(create)
            except OperationalError as exc:  # another process is creating the same tables
                racing = _is_busy(exc) or "already exists" in one_line(exc)
                if not racing or attempt == LOCK_RETRIES:
                    raise GalleryError(
                        f"cannot open gallery {self.location}: {self._describe(exc)}"
                    ) from exc
                time.sleep(0.05 * attempt)
            except SQLAlchemyError as exc:
                raise GalleryError(
                    f"cannot open gallery {self.location}: {self._describe(exc)}"
                ) from exc
        raise AssertionError("unreachable")

    def _read_schema(self, create: bool) -> tuple[dict[str, str], bool]:
        tables = set(inspect(self._engine).get_table_names())
        if "meta" not in tables:
            if not create:
                raise GalleryError(f"no such gallery: {self.location}")
            if tables - set(Base.metadata.tables) - {"alembic_version"}:
                raise GalleryError(f"{self.location} is a database but not a FaceMoE gallery")
        if set(Base.metadata.tables) - tables:
            Base.metadata.create_all(self._engine)
        from app.gallery.schema import ensure_current

        # versioned (Alembic migrations); a new gallery's tables, made from the models, are HEAD's
        ensure_current(self._engine, self.location, new="meta" not in tables)
        with Session(self._engine) as session:
            meta = dict(session.execute(select(MetaRow.key, MetaRow.value)).all())
            has_templates = session.scalar(select(TemplateRow.id).limit(1)) is not None
        return meta, has_templates

    # --- transactions -------------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        text = one_line(exc)
        if "malformed" in text:
            return f"{text} (the file is corrupt; restore it from a backup or an export)"
        return text

    @contextmanager
    def read(self, what: str) -> Iterator[Session]:
        """A read transaction; errors become one-line GalleryErrors naming `what`."""
        try:
            with self._reads.begin() as session:
                yield session
        except OverflowError as exc:  # an id past SQLite's 64-bit integers: nothing has it
            raise GalleryError(f"no such item: an id is out of range ({what})") from exc
        except SQLAlchemyError as exc:
            raise GalleryError(
                f"gallery {self.location}: {what} failed: {self._describe(exc)}"
            ) from exc

    def write(self, what: str, work: Callable[[Session], T]) -> T:
        """Run `work` in one write transaction: commit on success, roll back on any error;
        retried (from the start) while another writer holds the database past the timeout."""
        for attempt in range(1, LOCK_RETRIES + 1):
            try:
                with self._writes.begin() as session:
                    return work(session)
            except OperationalError as exc:
                if _is_busy(exc) and attempt < LOCK_RETRIES:
                    log.warning("gallery %s is locked by another writer; retrying %s (%d/%d)",
                                self.location, what, attempt, LOCK_RETRIES - 1)
                    time.sleep(0.1 * attempt)
                    continue
                raise GalleryError(
                    f"gallery {self.location}: {what} failed: {self._describe(exc)}"
                ) from exc
            except OverflowError as exc:
                raise GalleryError(f"no such item: an id is out of range ({what})") from exc
            except SQLAlchemyError as exc:
                raise GalleryError(
                    f"gallery {self.location}: {what} failed: {self._describe(exc)}"
                ) from exc
        raise AssertionError("unreachable")

    # --- the meta table -----------------------------------------------------------------------

    @staticmethod
    def get_meta(session: Session, key: str) -> str | None:
        row = session.get(MetaRow, key)
        return row.value if row is not None else None

    @staticmethod
    def set_meta(session: Session, key: str, value: str) -> None:
        row = session.get(MetaRow, key)
        if row is None:
            session.add(MetaRow(key=key, value=value))
        else:
            row.value = value

    @staticmethod
    def bump_version(session: Session) -> None:
        """Advance the change counter read by `version()` (in the change's transaction); on
        PostgreSQL also NOTIFY `CHANGES_CHANNEL` (sent at commit) for `listen`ers."""
        value = Database.get_meta(session, "version")
        Database.set_meta(session, "version", str(int(value) + 1 if value else 1))
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text(f"NOTIFY {CHANGES_CHANNEL}"))

    def listen(self):  # noqa: ANN201  (a psycopg.Connection, or None)
        """A connection of its own (not from the pool) that LISTENs for gallery changes, on
        PostgreSQL through psycopg 3; None for other databases (they keep the poll). Wait on
        it with `conn.notifies(timeout=..., stop_after=1)`; close it when done."""
        url = self._engine.url
        if url.get_backend_name() != "postgresql" or url.get_driver_name() != "psycopg":
            return None
        import psycopg

        try:
            conn = psycopg.connect(
                url.set(drivername="postgresql").render_as_string(hide_password=False),
                autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, keepalives=1,
                keepalives_idle=KEEPALIVE_IDLE_S, keepalives_interval=KEEPALIVE_INTERVAL_S,
                keepalives_count=KEEPALIVE_COUNT)
            conn.execute(f"LISTEN {CHANGES_CHANNEL}")
        except psycopg.Error as exc:
            raise GalleryError(f"gallery {self.location}: listen for changes failed: "
                               f"{one_line(exc)}") from exc
        return conn

    def version(self) -> int:
        """Change counter: differs after every enroll, remove or rename (0 when never written)."""
        with self.read("read version") as session:
            value = self.get_meta(session, "version")
            return int(value) if value is not None else 0

    # --- the file -----------------------------------------------------------------------------

    def compact(self) -> bool:
        """VACUUM the SQLite file and empty its WAL, so deleted data leaves the disk file;
        False when it could not run now (another connection is busy: it runs next time)."""
        if not self.is_sqlite:
            return False
        raw = self._engine.raw_connection()
        try:
            raw.driver_connection.execute("VACUUM")
            raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return True
        except Exception as exc:  # sqlite3.OperationalError: busy; the deletion has committed
            log.warning("gallery %s: could not compact now (%s); deleted pages are zeroed",
                        self.location, one_line(exc))
            return False
        finally:
            raw.close()

    def sqlite_integrity(self) -> str:
        """SQLite's full integrity check: 'ok' or the first problems found (SQLite only)."""
        with self.read("check integrity") as session:
            result = session.connection().exec_driver_sql("PRAGMA integrity_check").all()
        return "; ".join(str(r[0]) for r in result[:5])

    def file_bytes(self) -> int | None:
        """Size of the SQLite file and its write-ahead log; None for other databases."""
        if self.path is None:
            return None
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    def discard(self) -> None:
        """Close after a failed open; a SQLite file this object created is deleted."""
        self.close()
        if self._created and self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
