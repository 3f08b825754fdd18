"""Identity gallery and event store in SQLite (or any SQLAlchemy database).

A gallery belongs to one embedding model: templates from another model live in a
different vector space, so opening a gallery with a different model is refused (open
with `adopt_model=True` to manage it, e.g. to re-embed it with a new model). The model
is recorded in the `meta` table on the first write.

Lifecycle and privacy:

- `export` writes identities, templates and crops to one zip file whose manifest holds a
  sha256 per entry and whose zip comment ends with the sha256 of the whole file;
  `import_file` verifies both, checks the model and writes everything in one transaction.
- `reembed` rebuilds every template from its stored aligned crop with a new embedder.
  Crops are stored unless the gallery's `store_crops` setting is off.
- `remove` deletes an identity, its templates, crops and events, then compacts the file
  (VACUUM); `purge_events` applies an event retention period. Deleted pages are zeroed
  (`secure_delete`). Every change writes an audit row in the same transaction.
- With a key (`load_key`: FACEMOE_GALLERY_KEY, FACEMOE_GALLERY_KEY_FILE or a key file)
  embeddings and crops are encrypted at rest with AES-256-GCM. Identity names, sources and
  events stay readable so that the gallery can be listed and searched.
- New SQLite files are created with mode 0600 (SQLite gives the -wal/-shm files the same
  mode). Writes take the write lock up front (BEGIN IMMEDIATE), wait up to the busy timeout
  and are retried when another writer still holds the database.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import json
import logging
import os
import stat
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol, TypeVar

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
    delete,
    event,
    func,
    insert,
    inspect,
    select,
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

from app.records import Event

log = logging.getLogger(__name__)

_BUSY_TIMEOUT_MS = 10_000
_PAGE_SIZE = 16384  # a 512-d template (2 KiB) per identity: ~2.6 KB on disk, not ~4.3 KB
_LOCK_RETRIES = 5  # attempts of a write that still finds the database locked after the timeout
_JPEG_QUALITY = 90
_CROP_SIZE = 112  # ArcFace crops kept by releases up to 0.2
_KEPT_SIZE = 192  # app.align.STORE
_IN_CHUNK = 500  # names per SQL IN (...) list
MAX_NAME_LENGTH = 256
KEY_ENV = "FACEMOE_GALLERY_KEY"
KEY_FILE_ENV = "FACEMOE_GALLERY_KEY_FILE"
EXPORT_FORMAT = "facemoe-gallery-export"
EXPORT_VERSION = 1
_TRAILER = b"facemoe-sha256:"  # zip comment: this prefix + hex sha256 of all bytes before the hex
_CIPHER = "aes-256-gcm"
_VEC, _CROP = b"vector", b"crop"  # AES-GCM associated data: what a blob is
ON_CONFLICT = ("fail", "skip", "merge")

T = TypeVar("T")


class GalleryError(Exception):
    """A user-facing gallery failure; str() is a single line."""


class EmbedderLike(Protocol):
    """What `reembed` and `import_file(embedder=...)` need (app.embed.Embedder has it)."""

    model_name: str
    model_version: str

    def embed_kept(self, crops: list[np.ndarray]) -> np.ndarray: ...


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Base(DeclarativeBase):
    pass


class _Identity(_Base):
    __tablename__ = "identities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH), unique=True)
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
    # float32[dim], little-endian; AES-GCM nonce + ciphertext in an encrypted gallery
    vector: Mapped[bytes] = mapped_column(LargeBinary)
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
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=_utcnow, index=True
    )


class _EventCrop(_Base):
    """An aligned crop of an event's track, kept so the person can be enrolled from it."""

    __tablename__ = "event_crops"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), index=True)
    quality: Mapped[float] = mapped_column(Float)
    crop: Mapped[bytes] = mapped_column(LargeBinary)  # JPEG 112x112 (sealed when encrypted)


class _Meta(_Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(1024))


class _AuditRow(_Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    action: Mapped[str] = mapped_column(String(32))
    identity: Mapped[str | None] = mapped_column(String(MAX_NAME_LENGTH), nullable=True)
    detail: Mapped[str] = mapped_column(String(2048))
    os_user: Mapped[str] = mapped_column(String(256))


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
    crop: np.ndarray | None  # uint8[112, 112, 3] BGR, None when not stored


@dataclass(frozen=True)
class StoredEvent:
    """One stored event with its database id (`Gallery.stored_events`)."""

    id: int
    event: Event
    crops: int  # aligned crops kept with it (enrollable when > 0)
    created_at: datetime  # UTC

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, **self.event.to_json(), "crops": self.crops,
                "stored_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class AuditEntry:
    """One audit row: who changed what, when."""

    time: datetime  # UTC
    action: str  # enroll, remove, rename, export, import, reembed, purge, settings
    identity: str | None
    detail: str
    user: str  # OS user that ran the change

    def as_json(self) -> dict[str, Any]:
        return {"time": self.time.isoformat(), "action": self.action,
                "identity": self.identity, "detail": self.detail, "user": self.user}


@dataclass(frozen=True)
class Enrollment:
    """Templates for one identity, as `Gallery.enroll` takes them (for `enroll_many`)."""

    name: str
    vectors: np.ndarray  # float32[M, D]
    sources: Sequence[str]
    qualities: Sequence[float]
    crops: Sequence[np.ndarray] | None = None  # uint8[H, W, 3] BGR each


@dataclass(frozen=True)
class ExportReport:
    path: str
    identities: int
    templates: int
    crops: int
    bytes: int
    sha256: str  # of the whole file (also in its zip comment)
    encrypted: bool

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ImportReport:
    path: str
    model: str  # the export's model
    identities_added: int
    identities_merged: int
    identities_skipped: int
    templates_added: int
    templates_duplicate: int  # merge: identical templates already present
    templates_reembedded: int
    templates_dropped: list[str] = field(default_factory=list)  # "name: source" without a crop
    crops_dropped: int = 0  # the gallery does not store crops

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ReembedReport:
    model_from: str
    model_to: str
    templates: int
    dropped: list[str]  # "name: source" of templates without a crop (removed)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _one_line(exc: BaseException) -> str:
    """The first line of a (possibly DBAPI-wrapped) exception message."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_busy(exc: BaseException) -> bool:
    text = _one_line(exc).lower()
    return "database is locked" in text or "database is busy" in text


def _as_utc(value: datetime) -> datetime:
    """SQLite drops the timezone; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    """WAL (readers never block the writer), enforced foreign keys, busy timeout, zeroed
    deleted pages, pages that hold several templates; transactions are begun by
    `_sqlite_begin`, not by the driver."""
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    try:
        cursor.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # only takes effect in a new file
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
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
    if size % page_size or size < expected:
        raise GalleryError(
            f"gallery {display} is corrupt: the file is truncated "
            f"({size} of {max(expected, size + 1)} bytes); {hint}"
        )


def _encode_crop(crop: np.ndarray) -> bytes:
    """JPEG bytes of a uint8 HxWx3 BGR crop."""
    arr = np.asarray(crop)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise GalleryError(f"crop must be uint8[H, W, 3], got {arr.dtype}{list(arr.shape)}")
    ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise GalleryError("could not JPEG-encode a crop")
    return buf.tobytes()


def _decode_crop(jpeg: bytes, what: str) -> np.ndarray:
    """uint8[S, S, 3] BGR from stored JPEG bytes: 192 (app.align.STORE) or 112 (ArcFace crops
    kept by releases up to 0.2)."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise GalleryError(f"{what}: the stored crop is not a readable JPEG")
    if img.shape[:2] not in ((_CROP_SIZE, _CROP_SIZE), (_KEPT_SIZE, _KEPT_SIZE)):
        raise GalleryError(f"{what}: the stored crop is {img.shape[1]}x{img.shape[0]}, "
                           f"not {_KEPT_SIZE}x{_KEPT_SIZE} or {_CROP_SIZE}x{_CROP_SIZE}")
    return img


def _normalise_name(name: str) -> str:
    """The canonical form of an identity name: NFC, surrounding white space removed."""
    return unicodedata.normalize("NFC", str(name)).strip()


def _clean_name(name: str) -> str:
    clean = _normalise_name(name)
    if not clean:
        raise GalleryError("identity name must not be empty")
    if len(clean) > MAX_NAME_LENGTH:
        raise GalleryError(
            f"identity name is too long ({len(clean)} characters; at most {MAX_NAME_LENGTH})"
        )
    if any(unicodedata.category(c) == "Cc" for c in clean):
        raise GalleryError(f"identity name {clean!r} contains control characters")
    return clean


def _check_vectors(vecs: np.ndarray, what: str) -> np.ndarray:
    """L2-normalised little-endian float32 rows, or a GalleryError."""
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    if not np.all(np.isfinite(vecs)) or np.any(norms == 0):
        raise GalleryError(f"{what} vectors must be finite and non-zero")
    return (vecs / norms).astype("<f4")


def _unit_bytes(vector: bytes) -> bytes:
    """An imported vector as stored: unchanged when already unit length (so that merging an
    export twice finds its templates identical), else normalised."""
    vec = np.frombuffer(vector, "<f4")
    norm = float(np.linalg.norm(vec))
    if not np.all(np.isfinite(vec)) or norm == 0:
        raise GalleryError("imported vectors must be finite and non-zero")
    return vector if abs(norm - 1.0) < 1e-5 else (vec / norm).astype("<f4").tobytes()


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def _names_preview(names: Iterable[str], limit: int = 3) -> str:
    items = sorted(set(names))
    shown = ", ".join(repr(n) for n in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- encryption at rest ----------------------------------------------------------------------

def load_key(key_file: str | Path | None = None) -> bytes | None:
    """The gallery key: from `key_file`, else $FACEMOE_GALLERY_KEY (base64 of 32 bytes),
    else the file named by $FACEMOE_GALLERY_KEY_FILE; None when none is given.

    A key file holds the base64 text (e.g. from `openssl rand -base64 32`) or 32 raw bytes.
    """
    if key_file is None and os.environ.get(KEY_ENV):
        return _parse_key(os.environ[KEY_ENV].encode(), KEY_ENV, raw_ok=False)
    if key_file is None:
        key_file = os.environ.get(KEY_FILE_ENV) or None
        if key_file is None:
            return None
    path = Path(key_file).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GalleryError(f"cannot read the gallery key file {path}: {exc.strerror}") from exc
    return _parse_key(data, f"key file {path}", raw_ok=True)


def _parse_key(data: bytes, source: str, *, raw_ok: bool) -> bytes:
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) == 32:
        return key
    if raw_ok and len(data) == 32:
        return data
    raise GalleryError(f"the gallery key in {source} must be the base64 of 32 random bytes "
                       f"(make one with: openssl rand -base64 32)")


class _Cipher:
    """AES-256-GCM over blobs: 12-byte random nonce + ciphertext + tag."""

    _CHECK = b"facemoe-gallery-key-check"

    def __init__(self, key: bytes) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as exc:  # pragma: no cover - cryptography is a dependency
            raise GalleryError("gallery encryption needs the 'cryptography' package") from exc
        self._aead = AESGCM(key)

    def seal(self, data: bytes, purpose: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, purpose)

    def unseal(self, blob: bytes, purpose: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(blob[:12], blob[12:], purpose)
        except (InvalidTag, ValueError) as exc:
            raise GalleryError(
                f"an encrypted {purpose.decode()} does not decrypt: the data is corrupt "
                f"or the key is wrong"
            ) from exc

    def check_value(self) -> str:
        return base64.b64encode(self.seal(self._CHECK, b"key-check")).decode()

    def verifies(self, check: str) -> bool:
        try:
            return self.unseal(base64.b64decode(check), b"key-check") == self._CHECK
        except (GalleryError, binascii.Error, ValueError):
            return False


# --- export file -----------------------------------------------------------------------------

def _file_sha256(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        left = length
        while left > 0:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def verify_export(path: str | Path) -> str:
    """Check an export's whole-file checksum (its zip comment); returns the sha256."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GalleryError(f"no such export file: {path}")
    size = path.stat().st_size
    tail = len(_TRAILER) + 64
    with path.open("rb") as fh:
        if size >= tail:
            fh.seek(size - tail)
        trailer = fh.read(tail)
    if size < tail or not trailer.startswith(_TRAILER):
        raise GalleryError(f"{path} is not a FaceMoE gallery export (no checksum) or is truncated")
    expected = trailer[len(_TRAILER):].decode("ascii", "replace")
    actual = _file_sha256(path, size - 64)
    if actual != expected:
        raise GalleryError(f"export {path} is corrupt or was modified: sha256 checksum mismatch")
    return actual


class _Prepared(NamedTuple):
    """A validated `Enrollment`."""

    name: str
    vectors: np.ndarray  # little-endian float32[M, D], unit rows
    sources: list[str]
    qualities: list[float]
    jpegs: list[bytes | None]


@dataclass
class _Incoming:
    """One template read from an export, decrypted."""

    vector: bytes | None  # plaintext float32 bytes; None until re-embedded
    jpeg: bytes | None
    source: str
    quality: float
    created_at: datetime


class Gallery:
    """Enrolled identities (templates per model), recognition events and an audit log.

    `location` is a file path (SQLite) or a SQLAlchemy URL. With `create=False` the
    gallery must already exist. `key` (32 bytes) opens or creates an encrypted gallery;
    None reads it from the environment (`load_key`). `adopt_model=True` opens a gallery
    built with another model as that model (to export, purge or re-embed it).
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
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        url, self.location, self._path = self._resolve(location)
        key = load_key() if key is None else key
        created = self._prepare_file(create)
        self._cipher = _Cipher(key) if key is not None else None
        self._engine = self._make_engine(url)
        try:
            self._open(create, adopt_model)
        except BaseException:
            self._engine.dispose()
            if created and self._path is not None:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self._path}{suffix}").unlink(missing_ok=True)
            raise
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(
            self._engine.execution_options(gallery_write=True), expire_on_commit=False
        )
        self._user = _os_user()
        log.debug("opened gallery %s for model %s", self.location, self.model)

    @property
    def model(self) -> str:
        """`name@version` of the model this gallery is opened with."""
        return f"{self.model_name}@{self.model_version}"

    @property
    def encrypted(self) -> bool:
        return self._cipher is not None

    # --- opening ------------------------------------------------------------------------------

    @staticmethod
    def _resolve(location: str | Path) -> tuple[URL, str, Path | None]:
        """SQLAlchemy URL, display name and the SQLite file (None for other databases)."""
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
        return url, display, path

    def _prepare_file(self, create: bool) -> bool:
        """Check an existing SQLite file, or create it with mode 0600; True when created."""
        path, display = self._path, self.location
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
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return False
        except OSError as exc:
            raise GalleryError(f"cannot create gallery {display}: {exc.strerror}") from exc
        return True

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
        event.listen(engine, "begin", _sqlite_begin)
        return engine

    def _open(self, create: bool, adopt_model: bool) -> None:
        """Check the database is a gallery for this model; create the tables if allowed."""
        for attempt in range(1, _LOCK_RETRIES + 1):
            try:
                meta, has_templates = self._read_schema(create)
                break
            except OperationalError as exc:  # another process is creating the same tables
                racing = _is_busy(exc) or "already exists" in _one_line(exc)
                if not racing or attempt == _LOCK_RETRIES:
                    raise GalleryError(
                        f"cannot open gallery {self.location}: {self._describe(exc)}"
                    ) from exc
                time.sleep(0.05 * attempt)
            except SQLAlchemyError as exc:
                raise GalleryError(
                    f"cannot open gallery {self.location}: {self._describe(exc)}"
                ) from exc
        name, version = meta.get("model_name"), meta.get("model_version")
        if name is not None and (name, version) != (self.model_name, self.model_version):
            if adopt_model:
                log.info("gallery %s holds model %s@%s (not %s)", self.location, name, version,
                         self.model)
                self.model_name, self.model_version = name, version or ""
            else:
                raise GalleryError(self._model_mismatch(name, version))
        self.store_crops = meta.get("store_crops", "1") == "1"
        if meta.get("encryption") is not None:
            if self._cipher is None:
                raise GalleryError(self._missing_key())
            if not self._cipher.verifies(meta.get("key_check", "")):
                raise GalleryError(self._wrong_key())
        elif self._cipher is not None and has_templates:
            raise GalleryError(self._not_encrypted())

    def _read_schema(self, create: bool) -> tuple[dict[str, str], bool]:
        tables = set(inspect(self._engine).get_table_names())
        if "meta" not in tables:
            if not create:
                raise GalleryError(f"no such gallery: {self.location}")
            if tables - set(_Base.metadata.tables):
                raise GalleryError(f"{self.location} is a database but not a FaceMoE gallery")
        if set(_Base.metadata.tables) - tables:
            _Base.metadata.create_all(self._engine)
        with Session(self._engine) as session:
            meta = dict(session.execute(select(_Meta.key, _Meta.value)).all())
            has_templates = session.scalar(select(_Template.id).limit(1)) is not None
        return meta, has_templates

    def _model_mismatch(self, name: str, version: str | None) -> str:
        return (
            f"gallery {self.location} was built with model {name}@{version}; "
            f"this model is {self.model}: re-embed or use a matching model"
        )

    def _missing_key(self) -> str:
        return (f"gallery {self.location} is encrypted: give its key in {KEY_ENV} "
                f"(base64 of 32 bytes), {KEY_FILE_ENV} or --key-file")

    def _wrong_key(self) -> str:
        return f"gallery {self.location}: wrong encryption key (it does not open this gallery)"

    def _not_encrypted(self) -> str:
        return (f"gallery {self.location} is not encrypted but a key was given: unset the key, "
                f"or export it and import the export into a new gallery with the key set")

    # --- transactions -------------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        text = _one_line(exc)
        if "malformed" in text:
            return f"{text} (the file is corrupt; restore it from a backup or an export)"
        return text

    @contextmanager
    def _transaction(self, what: str) -> Iterator[Session]:
        """A read transaction; errors become one-line GalleryErrors."""
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise GalleryError(
                f"gallery {self.location}: {what} failed: {self._describe(exc)}"
            ) from exc

    def _write(self, what: str, work: Callable[[Session], T]) -> T:
        """Run `work` in one write transaction: commit on success, roll back on any error;
        retried (from the start) while another writer holds the database past the timeout."""
        for attempt in range(1, _LOCK_RETRIES + 1):
            try:
                with self._write_sessions.begin() as session:
                    return work(session)
            except OperationalError as exc:
                if _is_busy(exc) and attempt < _LOCK_RETRIES:
                    log.warning("gallery %s is locked by another writer; retrying %s (%d/%d)",
                                self.location, what, attempt, _LOCK_RETRIES - 1)
                    time.sleep(0.1 * attempt)
                    continue
                raise GalleryError(
                    f"gallery {self.location}: {what} failed: {self._describe(exc)}"
                ) from exc
            except SQLAlchemyError as exc:
                raise GalleryError(
                    f"gallery {self.location}: {what} failed: {self._describe(exc)}"
                ) from exc
        raise AssertionError("unreachable")

    def _claim(self, session: Session) -> None:
        """Record this gallery's model (and encryption) on its first write; refuse a write
        when another process changed them since this object opened the gallery."""
        name, version = session.get(_Meta, "model_name"), session.get(_Meta, "model_version")
        if name is None:
            session.add_all(
                [
                    _Meta(key="model_name", value=self.model_name),
                    _Meta(key="model_version", value=self.model_version),
                ]
            )
        elif (name.value, version.value if version else None) != (
            self.model_name, self.model_version
        ):
            raise GalleryError(self._model_mismatch(name.value, version.value if version else None))
        encryption = session.get(_Meta, "encryption")
        if self._cipher is None:
            if encryption is not None:
                raise GalleryError(self._missing_key())
        elif encryption is None:
            if (session.scalar(select(_Template.id).limit(1)) is not None
                    or session.scalar(select(_EventCrop.id).limit(1)) is not None):
                raise GalleryError(self._not_encrypted())
            session.add_all(
                [
                    _Meta(key="encryption", value=_CIPHER),
                    _Meta(key="key_check", value=self._cipher.check_value()),
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

    def _audit(self, session: Session, action: str, identity: str | None, detail: str) -> None:
        self._audit_many(session, [(action, identity, detail)])

    def _audit_many(self, session: Session, rows: list[tuple[str, str | None, str]]) -> None:
        if not rows:
            return
        now = _utcnow()
        session.execute(insert(_AuditRow), [
            {"time": now, "action": action, "identity": identity, "detail": detail[:2048],
             "os_user": self._user} for action, identity, detail in rows])

    def _seal(self, data: bytes, purpose: bytes) -> bytes:
        return self._cipher.seal(data, purpose) if self._cipher is not None else data

    def _unseal(self, blob: bytes, purpose: bytes) -> bytes:
        return self._cipher.unseal(blob, purpose) if self._cipher is not None else blob

    @staticmethod
    def _clean_name(name: str) -> str:
        return _clean_name(name)

    def _find(self, session: Session, name: str) -> _Identity:
        identity = session.scalar(select(_Identity).where(_Identity.name == _normalise_name(name)))
        if identity is None:
            raise GalleryError(f"no such identity: {_normalise_name(name)!r}")
        return identity

    def _ids_by_name(self, session: Session, names: Iterable[str]) -> dict[str, int]:
        wanted, found = sorted(set(names)), {}
        for i in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[i:i + _IN_CHUNK]
            found.update(session.execute(
                select(_Identity.name, _Identity.id).where(_Identity.name.in_(chunk))).all())
        return found

    def _stored_dim(self, session: Session) -> int | None:
        return session.scalar(
            select(_Template.dim)
            .where(_Template.model_name == self.model_name)
            .where(_Template.model_version == self.model_version)
            .limit(1)
        )

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
        prepared = [self._prepare(e) for e in enrollments]
        if not prepared:
            return 0
        dims = {p.vectors.shape[1] for p in prepared}
        if len(dims) > 1:
            raise GalleryError(f"enroll got vectors of different dims {sorted(dims)}")
        (dim,) = dims
        keep_crops = self.store_crops

        def work(session: Session) -> int:
            self._claim(session)
            stored_dim = self._stored_dim(session)
            if stored_dim is not None and stored_dim != dim:
                raise GalleryError(
                    f"cannot enroll {prepared[0].name!r}: vectors have dim {dim}, "
                    f"gallery templates have dim {stored_dim}"
                )
            ids = self._new_identities(session, {p.name: None for p in prepared})
            now = _utcnow()
            rows = [
                {
                    "identity_id": ids[name],
                    "vector": self._seal(vec.tobytes(), _VEC),
                    "dim": dim,
                    "model_name": self.model_name,
                    "model_version": self.model_version,
                    "source": source,
                    "quality": quality,
                    "crop": self._seal(jpeg, _CROP) if jpeg is not None and keep_crops else None,
                    "created_at": now,
                }
                for name, vecs, sources, quals, jpegs in prepared
                for vec, source, quality, jpeg in zip(vecs, sources, quals, jpegs, strict=True)
            ]
            session.execute(insert(_Template), rows)
            self._audit_many(session, [
                ("enroll", name, f"{_plural(len(vecs), 'template')}, "
                 f"{_plural(sum(j is not None for j in jpegs) if keep_crops else 0, 'crop')}, "
                 f"model {self.model}")
                for name, vecs, _, _, jpegs in prepared])
            self._bump_version(session)
            return len(rows)

        names = _names_preview(p.name for p in prepared)
        count = self._write(f"enroll {names}", work)
        log.info("enrolled %d template(s) for %s in %s", count, names, self.location)
        return count

    def _new_identities(
        self, session: Session, names: dict[str, datetime | None]
    ) -> dict[str, int]:
        """Ids of `names`, inserting the missing ones (with their created_at, or now)."""
        ids = self._ids_by_name(session, names)
        missing = [n for n in names if n not in ids]
        if missing:
            now = _utcnow()
            result = session.execute(
                insert(_Identity).returning(_Identity.name, _Identity.id,
                                            sort_by_parameter_order=True),
                [{"name": n, "created_at": names[n] or now} for n in missing],
            )
            ids.update((name, iid) for name, iid in result)
        return ids

    @staticmethod
    def _prepare(e: Enrollment) -> _Prepared:
        """Validate one enrollment; vectors normalised, crops JPEG-encoded."""
        clean = _clean_name(e.name)
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
        vecs = _check_vectors(vecs, "enroll")
        try:
            quals = [float(q) for q in e.qualities]
        except (TypeError, ValueError) as exc:
            raise GalleryError(f"enroll qualities must be numbers: {exc}") from exc
        jpegs = [_encode_crop(c) for c in e.crops] if e.crops is not None else [None] * count
        return _Prepared(clean, vecs, [str(s) for s in e.sources], quals, jpegs)

    # --- reading ------------------------------------------------------------------------------

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

    def templates(self, name: str) -> list[TemplateInfo]:
        """The stored templates of one identity (all models), oldest first, decrypted."""
        with self._transaction(f"read templates of {_normalise_name(name)!r}") as session:
            identity = self._find(session, name)
            rows = session.execute(
                select(_Template).where(_Template.identity_id == identity.id).order_by(_Template.id)
            ).scalars().all()
        out = []
        for t in rows:
            vec = np.frombuffer(self._unseal(t.vector, _VEC), dtype="<f4").astype(np.float32)
            crop = (_decode_crop(self._unseal(t.crop, _CROP), f"{identity.name!r}")
                    if t.crop is not None else None)
            out.append(TemplateInfo(t.source, t.quality, f"{t.model_name}@{t.model_version}",
                                    _as_utc(t.created_at), vec, crop))
        return out

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
        dims = {dim for _, _, dim in rows}
        blob = b"".join(self._unseal(vec, _VEC) for _, vec, _ in rows)
        if len(dims) != 1 or len(blob) != 4 * len(rows) * next(iter(dims)):
            raise GalleryError(f"gallery {self.location} is corrupt: template vectors have "
                               f"inconsistent sizes; restore it from a backup or an export")
        raw = np.frombuffer(blob, dtype="<f4").reshape(len(rows), -1)
        norms = np.sqrt(np.einsum("ij,ij->i", raw, raw, dtype=np.float32))[:, None]
        return names, (raw / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)

    def add_events(self, events: list[Event], *, crops: int = 0) -> None:
        """Store events in one transaction, each with up to `crops` of its best aligned crops
        (`Event.crops`; sealed like template crops in an encrypted gallery)."""
        if not events:
            return
        jpegs = [[(float(q), _encode_crop(c)) for q, c in ev.crops[:max(0, crops)]]
                 for ev in events]

        def work(session: Session) -> None:
            self._claim(session)
            rows = [
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
            session.add_all(rows)
            if any(jpegs):
                session.flush()  # assigns the event ids
                session.execute(insert(_EventCrop), [
                    {"event_id": row.id, "quality": q, "crop": self._seal(jpeg, _CROP)}
                    for row, kept in zip(rows, jpegs, strict=True) for q, jpeg in kept])

        self._write(f"store {len(events)} event(s)", work)

    def stored_events(
        self,
        limit: int | None = None,
        *,
        camera: str | None = None,
        identity: str | None = None,
        unknown: bool = False,
    ) -> list[StoredEvent]:
        """Stored events with their ids and crop counts, oldest first; with `limit`, only the
        most recent `limit`; filtered by camera, by the identity named, or to unknown faces."""
        crops = (select(_EventCrop.event_id, func.count(_EventCrop.id).label("n"))
                 .group_by(_EventCrop.event_id).subquery())
        query = (select(_EventRow, func.coalesce(crops.c.n, 0))
                 .outerjoin(crops, crops.c.event_id == _EventRow.id)
                 .order_by(_EventRow.id.desc()))
        if camera is not None:
            query = query.where(_EventRow.camera == camera)
        if identity is not None:
            query = query.where(_EventRow.identity == _normalise_name(identity))
        if unknown:
            query = query.where(_EventRow.identity.is_(None))
        if limit is not None:
            query = query.limit(limit)
        with self._transaction("read events") as session:
            rows = list(session.execute(query).all())
        rows.reverse()
        return [StoredEvent(r.id, self._event_of(r), int(n), _as_utc(r.created_at))
                for r, n in rows]

    def event_crops(self, event_id: int) -> tuple[StoredEvent, list[tuple[float, np.ndarray]]]:
        """An event and its kept aligned crops (quality, uint8[112, 112, 3] BGR), best first."""
        with self._transaction("read event crops") as session:
            row = session.get(_EventRow, int(event_id))
            if row is None:
                raise GalleryError(f"gallery {self.location} has no event {event_id}")
            crops = list(session.execute(
                select(_EventCrop.quality, _EventCrop.crop)
                .where(_EventCrop.event_id == row.id)
                .order_by(_EventCrop.quality.desc(), _EventCrop.id)).all())
            stored = StoredEvent(row.id, self._event_of(row), len(crops), _as_utc(row.created_at))
        what = f"event {event_id}"
        return stored, [(float(q), _decode_crop(self._unseal(c, _CROP), what)) for q, c in crops]

    @staticmethod
    def _event_of(r: _EventRow) -> Event:
        return Event(camera=r.camera, track_id=r.track_id, identity=r.identity, score=r.score,
                     start=r.start, end=r.end, frames=r.frames,
                     best_bbox=(r.bbox_x, r.bbox_y, r.bbox_w, r.bbox_h), model=r.model)

    def events(self, limit: int | None = None) -> list[Event]:
        """Stored events, oldest first; with `limit`, only the most recent `limit`."""
        return [stored.event for stored in self.stored_events(limit)]

    def audit(self, limit: int | None = None) -> list[AuditEntry]:
        """Audit rows, oldest first; with `limit`, only the most recent `limit`."""
        query = select(_AuditRow).order_by(_AuditRow.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._transaction("read the audit log") as session:
            rows = list(session.scalars(query).all())
        rows.reverse()
        return [AuditEntry(_as_utc(r.time), r.action, r.identity, r.detail, r.os_user)
                for r in rows]

    def version(self) -> int:
        """Change counter: differs after every enroll, remove or rename (0 when never written)."""
        with self._transaction("read version") as session:
            row = session.get(_Meta, "version")
            return int(row.value) if row is not None else 0

    def info(self) -> dict[str, Any]:
        """Model, settings and sizes."""
        counts = {
            "identities": select(func.count(_Identity.id)),
            "templates": select(func.count(_Template.id)),
            "templates_with_crops": select(func.count(_Template.id))
            .where(_Template.crop.is_not(None)),
            "events": select(func.count(_EventRow.id)),
            "event_crops": select(func.count(_EventCrop.id)),
            "audit_rows": select(func.count(_AuditRow.id)),
        }
        with self._transaction("read gallery info") as session:
            info = {"gallery": self.location, "model": self.model, "encrypted": self.encrypted,
                    "store_crops": self.store_crops}
            info.update({k: int(session.scalar(q) or 0) for k, q in counts.items()})
        info["version"] = self.version()
        if self._path is not None:  # the database file and its write-ahead log
            info["bytes"] = sum(p.stat().st_size for p in (self._path, Path(f"{self._path}-wal"))
                                if p.exists())
        return info

    # --- changes ------------------------------------------------------------------------------

    def remove(self, name: str, *, compact: bool = True) -> int:
        """Delete an identity with its templates, crops and the events that name it, then
        compact the file so nothing of it is left behind. Returns the events deleted."""

        def work(session: Session) -> tuple[str, int]:
            identity = self._find(session, name)
            templates = session.execute(
                delete(_Template).where(_Template.identity_id == identity.id)).rowcount
            named = select(_EventRow.id).where(_EventRow.identity == identity.name)
            session.execute(delete(_EventCrop).where(_EventCrop.event_id.in_(named)))
            events = session.execute(
                delete(_EventRow).where(_EventRow.identity == identity.name)).rowcount
            session.delete(identity)
            self._audit(session, "remove", identity.name,
                        f"{_plural(templates, 'template')}, {_plural(events, 'event')} deleted")
            self._bump_version(session)
            return identity.name, events

        clean, events = self._write(f"remove {_normalise_name(name)!r}", work)
        log.info("removed %r (and %d event(s)) from %s", clean, events, self.location)
        if compact:
            self.compact()
        return events

    def rename(self, old: str, new: str) -> None:
        """Rename an identity (past events keep the old name)."""
        clean = _clean_name(new)

        def work(session: Session) -> None:
            identity = self._find(session, old)
            if identity.name == clean:
                return
            if session.scalar(select(_Identity.id).where(_Identity.name == clean)) is not None:
                raise GalleryError(f"identity {clean!r} already exists")
            self._audit(session, "rename", identity.name, f"renamed to {clean!r}")
            identity.name = clean
            self._bump_version(session)

        self._write(f"rename {_normalise_name(old)!r}", work)
        log.info("renamed %r to %r in %s", _normalise_name(old), clean, self.location)

    def purge_events(self, older_than_days: float, *, compact: bool = True) -> int:
        """Delete events stored more than `older_than_days` days ago; returns how many."""
        days = float(older_than_days)
        if not np.isfinite(days) or days < 0:
            raise GalleryError(f"the retention period must be >= 0 days, got {older_than_days}")
        cutoff = _utcnow() - timedelta(days=days)

        def work(session: Session) -> int:
            old = select(_EventRow.id).where(_EventRow.created_at < cutoff)
            session.execute(delete(_EventCrop).where(_EventCrop.event_id.in_(old)))
            n = session.execute(delete(_EventRow).where(_EventRow.created_at < cutoff)).rowcount
            self._audit(session, "purge", None,
                        f"{_plural(n, 'event')} older than {days:g} days deleted")
            return n

        n = self._write("purge events", work)
        log.info("purged %d event(s) older than %g days from %s", n, days, self.location)
        if compact and n:
            self.compact()
        return n

    def set_store_crops(self, on: bool, *, delete_existing: bool = False) -> int:
        """Store aligned crops of new templates (needed by `reembed`) or not; with
        `delete_existing`, also delete the crops already stored. Returns crops deleted."""

        def work(session: Session) -> int:
            row = session.get(_Meta, "store_crops")
            if row is None:
                session.add(_Meta(key="store_crops", value="1" if on else "0"))
            else:
                row.value = "1" if on else "0"
            deleted = 0
            if delete_existing:
                deleted = session.execute(
                    update(_Template).where(_Template.crop.is_not(None)).values(crop=None)
                ).rowcount
            self._audit(session, "settings", None,
                        f"store_crops={'on' if on else 'off'}, {_plural(deleted, 'crop')} deleted")
            return deleted

        deleted = self._write("change settings", work)
        self.store_crops = on
        if deleted:
            self.compact()
        return deleted

    def compact(self) -> bool:
        """VACUUM the SQLite file and empty its WAL, so deleted data leaves the disk file;
        False when it could not run now (another connection is busy: it runs next time)."""
        if self._engine.url.get_backend_name() != "sqlite":
            return False
        raw = self._engine.raw_connection()
        try:
            raw.driver_connection.execute("VACUUM")
            raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return True
        except Exception as exc:  # sqlite3.OperationalError: busy; the deletion has committed
            log.warning("gallery %s: could not compact now (%s); deleted pages are zeroed",
                        self.location, _one_line(exc))
            return False
        finally:
            raw.close()

    def integrity_check(self) -> str:
        """SQLite's full integrity check: 'ok' or the first problem found. Other databases
        check their own storage; there, 'ok' when every template vector decodes with one size
        (the server answered and `matrix()` reads), else the problem."""
        if self._engine.url.get_backend_name() != "sqlite":
            try:
                self.matrix()
            except GalleryError as exc:
                return str(exc)
            return "ok"
        with self._transaction("check integrity") as session:
            result = session.connection().exec_driver_sql("PRAGMA integrity_check").all()
        return "; ".join(str(r[0]) for r in result[:5])

    # --- model upgrades -----------------------------------------------------------------------

    def reembed(self, embedder: EmbedderLike, *, drop_missing: bool = False,
                batch_size: int = 64) -> ReembedReport:
        """Rebuild every template from its stored aligned crop with `embedder`; the gallery
        then belongs to the embedder's model. Templates without a crop are refused (nothing
        changes) unless `drop_missing`, which deletes them. One transaction."""
        start_version = self.version()
        with self._transaction("read crops") as session:
            rows = session.execute(
                select(_Template.id, _Identity.name, _Template.source, _Template.crop)
                .join(_Template.identity).order_by(_Template.id)
            ).all()
        have = [(tid, name, crop) for tid, name, _, crop in rows if crop is not None]
        missing = [(tid, f"{name}: {source}") for tid, name, source, crop in rows if crop is None]
        if missing and not drop_missing:
            owners = {m.split(": ", 1)[0] for _, m in missing}
            raise GalleryError(
                f"no stored crop for {_plural(len(missing), 'template')} of "
                f"{_plural(len(owners), 'identity')} ({_names_preview(owners)}): "
                f"re-enroll them, or re-embed with "
                f"--drop-missing to delete those templates"
            )
        vectors = self._embed_crops(
            embedder, [(self._unseal(crop, _CROP), f"{name!r}") for _, name, crop in have],
            batch_size)
        old, new = self.model, f"{embedder.model_name}@{embedder.model_version}"
        dim = vectors.shape[1] if len(vectors) else 0

        def work(session: Session) -> None:
            row = session.get(_Meta, "version")
            if (int(row.value) if row is not None else 0) != start_version:
                raise GalleryError(
                    f"gallery {self.location} changed while re-embedding; run it again")
            if have:
                session.execute(update(_Template), [
                    {"id": tid, "vector": self._seal(vec.tobytes(), _VEC), "dim": dim,
                     "model_name": embedder.model_name, "model_version": embedder.model_version}
                    for (tid, _, _), vec in zip(have, vectors, strict=True)
                ])
            for i in range(0, len(missing), _IN_CHUNK):
                ids = [tid for tid, _ in missing[i:i + _IN_CHUNK]]
                session.execute(delete(_Template).where(_Template.id.in_(ids)))
            for key, value in (("model_name", embedder.model_name),
                               ("model_version", embedder.model_version)):
                meta = session.get(_Meta, key)
                if meta is None:
                    session.add(_Meta(key=key, value=value))
                else:
                    meta.value = value
            self._audit(session, "reembed", None,
                        f"{old} -> {new}: {_plural(len(have), 'template')} re-embedded, "
                        f"{len(missing)} without a crop deleted")
            self._bump_version(session)

        self._write("re-embed", work)
        self.model_name, self.model_version = embedder.model_name, embedder.model_version
        log.info("re-embedded %d template(s) of %s with %s (was %s)", len(have), self.location,
                 new, old)
        if missing:
            self.compact()
        return ReembedReport(old, new, len(have), [m for _, m in missing])

    @staticmethod
    def _embed_crops(embedder: EmbedderLike, jpegs: list[tuple[bytes, str]],
                     batch_size: int) -> np.ndarray:
        """L2-normalised little-endian float32[N, D] embeddings of JPEG crops."""
        out = []
        for i in range(0, len(jpegs), batch_size):
            batch = [_decode_crop(jpeg, what) for jpeg, what in jpegs[i:i + batch_size]]
            vecs = np.asarray(embedder.embed_kept(batch), dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape[0] != len(batch):
                raise GalleryError(f"the embedder returned shape {list(vecs.shape)} "
                                   f"for {len(batch)} crops")
            out.append(_check_vectors(vecs, "re-embedded"))
        return np.concatenate(out) if out else np.zeros((0, 0), "<f4")

    # --- export / import ----------------------------------------------------------------------

    def export(self, path: str | Path) -> ExportReport:
        """Write every identity with its templates and crops (of this gallery's model) to one
        zip file (mode 0600): manifest.json (model, identities, per-entry sha256) and one
        entry per vector and crop; the zip comment carries the whole file's sha256. Stored
        blobs are copied as they are, so an encrypted gallery gives an encrypted export."""
        dest = Path(path).expanduser()
        if dest.is_dir():
            raise GalleryError(f"cannot export to {dest}: it is a directory")
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w+b") as fh:
                counts = self._write_export(fh)
                size = fh.seek(0, os.SEEK_END)
                fh.flush()
                digest = _file_sha256(tmp, size - 64)
                fh.seek(size - 64)
                fh.write(digest.encode("ascii"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            raise GalleryError(f"cannot write export {dest}: {exc.strerror or exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        report = ExportReport(str(dest), counts[0], counts[1], counts[2], size, digest,
                              self.encrypted)
        self._write("audit export", lambda s: self._audit(
            s, "export", None,
            f"{dest}: {_plural(report.identities, 'identity')}, "
            f"{_plural(report.templates, 'template')}, sha256 {digest[:16]}"))
        log.info("exported %s to %s", self.location, dest)
        return report

    def _write_export(self, fh: Any) -> tuple[int, int, int]:
        entries: dict[str, str] = {}
        people: dict[int, dict[str, Any]] = {}
        n_templates = n_crops = 0
        dim = None

        def put(zf: zipfile.ZipFile, name: str, data: bytes) -> str:
            zf.writestr(name, data)
            entries[name] = hashlib.sha256(data).hexdigest()
            return name

        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf, \
                self._transaction("read for export") as session:
            for iid, name, created in session.execute(
                    select(_Identity.id, _Identity.name, _Identity.created_at)
                    .order_by(_Identity.name)):
                people[iid] = {"name": name, "created_at": _as_utc(created).isoformat(),
                               "templates": []}
            rows = session.execute(
                select(_Template.identity_id, _Template.vector, _Template.dim, _Template.source,
                       _Template.quality, _Template.crop, _Template.created_at)
                .where(_Template.model_name == self.model_name)
                .where(_Template.model_version == self.model_version)
                .order_by(_Template.id)
                .execution_options(yield_per=500)
            )
            for iid, vector, tdim, source, quality, crop, created in rows:
                dim = tdim
                stem = f"templates/{n_templates:07d}"
                people[iid]["templates"].append({
                    "vector": put(zf, stem + ".f32", vector),
                    "crop": put(zf, stem + ".jpg", crop) if crop is not None else None,
                    "source": source, "quality": quality,
                    "created_at": _as_utc(created).isoformat(),
                })
                n_templates += 1
                n_crops += crop is not None
            meta = dict(session.execute(select(_Meta.key, _Meta.value)).all())
            manifest = {
                "format": EXPORT_FORMAT,
                "format_version": EXPORT_VERSION,
                "created_at": _utcnow().isoformat(),
                "model": {"name": self.model_name, "version": self.model_version},
                "dim": dim,
                "encryption": ({"algorithm": _CIPHER, "key_check": meta["key_check"]}
                               if self._cipher is not None and "key_check" in meta else None),
                "counts": {"identities": len(people), "templates": n_templates, "crops": n_crops},
                "identities": list(people.values()),
                "entries": entries,
            }
            zf.writestr("manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1),
                        compress_type=zipfile.ZIP_DEFLATED)
            zf.comment = _TRAILER + b"0" * 64
        return len(people), n_templates, n_crops

    def import_file(
        self,
        path: str | Path,
        *,
        on_conflict: str = "fail",
        embedder: EmbedderLike | None = None,
        drop_missing: bool = False,
    ) -> ImportReport:
        """Add the identities of an export (see `export`) in one transaction.

        Checksums (whole file and every entry) and the model are verified first. An export
        of another model is refused unless an `embedder` of this gallery's model is given:
        its crops are then re-embedded (templates without a crop are refused unless
        `drop_missing`). Names already in the gallery: `on_conflict` "fail" refuses the
        import, "skip" keeps the gallery's identity, "merge" adds the new templates to it
        (identical templates are not added twice).
        """
        if on_conflict not in ON_CONFLICT:
            raise GalleryError(f"on_conflict must be one of {', '.join(ON_CONFLICT)}")
        src = Path(path).expanduser()
        digest = verify_export(src)
        manifest, people = self._read_export(src)
        m = manifest["model"]
        export_model = f"{m['name']}@{m['version']}"
        reembed = (m["name"], m["version"]) != (self.model_name, self.model_version)
        dropped: list[str] = []
        if reembed:
            if embedder is None:
                raise GalleryError(
                    f"export {src} holds templates of model {export_model}; this gallery uses "
                    f"{self.model}: import with --reembed to re-embed its crops")
            if f"{embedder.model_name}@{embedder.model_version}" != self.model:
                raise GalleryError(f"the embedder's model {embedder.model_name}@"
                                   f"{embedder.model_version} is not this gallery's {self.model}")
            dropped = [f"{n}: {t.source}" for n, _, ts in people for t in ts if t.jpeg is None]
            if dropped and not drop_missing:
                raise GalleryError(
                    f"no crop to re-embed for {_plural(len(dropped), 'template')} in {src} "
                    f"({_names_preview(d.split(': ', 1)[0] for d in dropped)}): "
                    f"import with --drop-missing to leave them out")
            people = [(n, c, kept) for n, c, ts in people  # leave out who has nothing left
                      if (kept := [t for t in ts if t.jpeg is not None]) or not ts]
            todo = [t for _, _, ts in people for t in ts]
            vecs = self._embed_crops(embedder, [(t.jpeg, t.source) for t in todo], 64)
            for t, v in zip(todo, vecs, strict=True):
                t.vector = v.tobytes()
        dims = {len(t.vector) // 4 for _, _, ts in people for t in ts}
        if len(dims) > 1:
            raise GalleryError(f"export {src} holds vectors of different sizes")
        keep_crops = self.store_crops

        def work(session: Session) -> ImportReport:
            self._claim(session)
            stored_dim = self._stored_dim(session)
            if dims and stored_dim is not None and stored_dim not in dims:
                raise GalleryError(f"export {src} has {next(iter(dims))}-d templates; this gallery "
                                   f"has {stored_dim}-d templates")
            existing = self._ids_by_name(session, [n for n, _, _ in people])
            if existing and on_conflict == "fail":
                raise GalleryError(
                    f"{_plural(len(existing), 'identity')} of {src} already in the gallery "
                    f"({_names_preview(existing)}): import with --on-conflict skip or merge")
            incoming = [p for p in people if not (on_conflict == "skip" and p[0] in existing)]
            ids = self._new_identities(session, {n: c for n, c, _ in incoming})
            seen = self._existing_vectors(session, [ids[n] for n, _, _ in incoming
                                                    if n in existing])
            rows, duplicates, crops_dropped = [], 0, 0
            for name, _, templates in incoming:
                for t in templates:
                    if t.vector in seen.get(ids[name], ()):
                        duplicates += 1
                        continue
                    seen.setdefault(ids[name], set()).add(t.vector)
                    crops_dropped += t.jpeg is not None and not keep_crops
                    rows.append({
                        "identity_id": ids[name], "vector": self._seal(t.vector, _VEC),
                        "dim": len(t.vector) // 4, "model_name": self.model_name,
                        "model_version": self.model_version, "source": t.source,
                        "quality": t.quality, "created_at": t.created_at,
                        "crop": self._seal(t.jpeg, _CROP) if t.jpeg and keep_crops else None,
                    })
            if rows:
                session.execute(insert(_Template), rows)
            added = sum(n not in existing for n, _, _ in incoming)
            report = ImportReport(
                str(src), export_model, added, sum(n in existing for n, _, _ in incoming),
                len(people) - len(incoming), len(rows), duplicates,
                len(rows) if reembed else 0, dropped, crops_dropped)
            self._audit_many(session, [
                ("import", name, f"{'merged' if name in existing else 'added'} from {src}")
                for name, _, _ in incoming])
            self._audit(session, "import", None,
                        f"{src} (model {export_model}, sha256 {digest[:16]}): "
                        f"{added} added, {report.identities_merged} merged, "
                        f"{report.identities_skipped} skipped, "
                        f"{_plural(len(rows), 'template')}")
            self._bump_version(session)
            return report

        report = self._write(f"import {src}", work)
        log.info("imported %s into %s: %d identities added, %d merged, %d skipped, "
                 "%d templates", src, self.location, report.identities_added,
                 report.identities_merged, report.identities_skipped, report.templates_added)
        return report

    def _existing_vectors(self, session: Session, identity_ids: list[int]) -> dict[int, set[bytes]]:
        out: dict[int, set[bytes]] = {}
        for i in range(0, len(identity_ids), _IN_CHUNK):
            for iid, blob in session.execute(
                    select(_Template.identity_id, _Template.vector)
                    .where(_Template.identity_id.in_(identity_ids[i:i + _IN_CHUNK]))
                    .where(_Template.model_name == self.model_name)
                    .where(_Template.model_version == self.model_version)):
                out.setdefault(iid, set()).add(self._unseal(blob, _VEC))
        return out

    def _read_export(self, src: Path) -> tuple[dict, list[tuple[str, datetime, list[_Incoming]]]]:
        """Manifest and (name, created_at, templates) per identity, checked and decrypted."""
        bad = f"export {src} is not a valid FaceMoE gallery export"
        try:
            with zipfile.ZipFile(src) as zf:
                manifest = json.loads(zf.read("manifest.json"))
                if manifest.get("format") != EXPORT_FORMAT:
                    raise GalleryError(f"{bad}: unknown format {manifest.get('format')!r}")
                if manifest.get("format_version") != EXPORT_VERSION:
                    raise GalleryError(f"{bad}: format version {manifest.get('format_version')} "
                                       f"(this version reads {EXPORT_VERSION})")
                cipher = self._export_cipher(src, manifest.get("encryption"))
                entries = manifest["entries"]

                def entry(name: str, purpose: bytes) -> bytes:
                    data = zf.read(name)
                    if hashlib.sha256(data).hexdigest() != entries[name]:
                        raise GalleryError(f"export {src}: entry {name} fails its sha256 checksum "
                                           f"(the file was modified)")
                    return cipher.unseal(data, purpose) if cipher is not None else data

                dim = manifest.get("dim")
                people = []
                for person in manifest["identities"]:
                    name = _clean_name(person["name"])
                    templates = []
                    for t in person["templates"]:
                        vector = entry(t["vector"], _VEC)
                        if dim is None or len(vector) != 4 * int(dim):
                            raise GalleryError(f"{bad}: {t['vector']} is not a {dim}-d vector")
                        templates.append(_Incoming(
                            _unit_bytes(vector),
                            entry(t["crop"], _CROP) if t.get("crop") else None,
                            str(t["source"]), float(t["quality"]),
                            _as_utc(datetime.fromisoformat(t["created_at"]))))
                    people.append((name, _as_utc(datetime.fromisoformat(person["created_at"])),
                                   templates))
        except (KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile,
                json.JSONDecodeError) as exc:
            raise GalleryError(f"{bad}: {_one_line(exc)}") from exc
        except OSError as exc:
            raise GalleryError(f"cannot read export {src}: {exc.strerror or exc}") from exc
        merged: dict[str, tuple[datetime, list[_Incoming]]] = {}
        for name, created, templates in people:  # names equal after normalisation
            if name in merged:
                merged[name][1].extend(templates)
            else:
                merged[name] = (created, templates)
        return manifest, [(n, c, ts) for n, (c, ts) in merged.items()]

    def _export_cipher(self, src: Path, encryption: dict | None) -> _Cipher | None:
        if encryption is None:
            return None
        if self._cipher is None:
            raise GalleryError(f"export {src} is encrypted: give its key in {KEY_ENV}, "
                               f"{KEY_FILE_ENV} or --key-file")
        if not self._cipher.verifies(encryption.get("key_check", "")):
            raise GalleryError(f"export {src} was encrypted with another key")
        return self._cipher

    # --- lifetime -----------------------------------------------------------------------------

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
