"""An opened gallery: its database, sealer, audit log and the embedding model it belongs to.

A gallery belongs to one embedding model: templates from another model live in a
different vector space, so opening a gallery with a different model is refused (open
with `adopt_model=True` to manage it, e.g. to re-embed it with a new model). The model
(and the encryption) is recorded in the `meta` table on the first write: every write of
templates or events calls `claim` in its transaction.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from sqlalchemy.orm import Session

from app.gallery.audit import AuditLog
from app.gallery.db import Database
from app.gallery.errors import GalleryError
from app.gallery.seal import Sealer, load_key

log = logging.getLogger(__name__)


_C = TypeVar("_C", bound="Closing")


class Closing:
    """Closed at the end of a `with` block (the store, and the gallery built on it)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _unreachable(exc: BaseException) -> bool:
    """Whether a gallery error comes from a database server that could not be reached (a
    connection that failed), not from what the database holds."""
    from sqlalchemy.exc import OperationalError

    while exc is not None:
        if isinstance(exc, OperationalError):
            return "connect" in str(exc).lower() or "server" in str(exc).lower()
        exc = exc.__cause__
    return False


class Store(Closing):
    """The parts every gallery module builds on: `db` (transactions), `sealer` (encryption
    at rest), `audit` (the audit log), the model (`model_name`, `model_version`) and the
    `store_crops` setting.

    `location` is a file path (SQLite) or a SQLAlchemy URL. With `create=False` the
    gallery must already exist. `key` (32 bytes) opens or creates an encrypted gallery;
    None reads it from the environment (`load_key`). `adopt_model=True` opens a gallery
    built with another model as that model. `defer_open=True` (the daemon) lets a gallery on
    a database server be made while the server is away: see `open`.
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
        self.model_name, self.model_version = model_name, model_version
        self.sealer = Sealer(load_key() if key is None else key)
        self.db = Database(location, create=create)
        self._create, self._adopt = create, adopt_model
        self.opened = False
        self.store_crops = True
        self.audit = AuditLog(self.db)
        try:
            self.open()
        except GalleryError as exc:
            if not (defer_open and not self.db.is_sqlite and _unreachable(exc)):
                self.db.discard()
                raise
            log.error("%s: the gallery is opened (and checked) when its database answers",
                      exc)
        except BaseException:
            self.db.discard()
            raise

    def open(self) -> None:
        """Check the database is this gallery (tables and migrations, model, encryption key),
        once. With `defer_open` a server that cannot be reached when the store is made is
        checked here later (`opened` says whether it has been); until then every use fails
        with a GalleryError, as it would during an outage."""
        if self.opened:
            return
        meta, has_templates = self.db.open_schema(self._create)
        self._check_model(meta, self._adopt)
        self.sealer.check_opens(meta, has_templates, self.location)
        self.store_crops = meta.get("store_crops", "1") == "1"
        self.opened = True

    @property
    def location(self) -> str:
        return self.db.location

    @property
    def model(self) -> str:
        """`name@version` of the model this gallery is opened with."""
        return f"{self.model_name}@{self.model_version}"

    def _check_model(self, meta: dict[str, str], adopt_model: bool) -> None:
        name, version = meta.get("model_name"), meta.get("model_version")
        if name is None or (name, version) == (self.model_name, self.model_version):
            return
        if not adopt_model:
            raise GalleryError(self._model_mismatch(name, version))
        log.info("gallery %s holds model %s@%s (not %s)", self.location, name, version,
                 self.model)
        self.model_name, self.model_version = name, version or ""

    def _model_mismatch(self, name: str, version: str | None) -> str:
        return (
            f"gallery {self.location} was built with model {name}@{version}; "
            f"this model is {self.model}: re-embed or use a matching model"
        )

    def claim(self, session: Session) -> None:
        """In a write transaction: record this gallery's model (and encryption) on its first
        write; refuse the write when another process changed them since this one opened it."""
        name = self.db.get_meta(session, "model_name")
        version = self.db.get_meta(session, "model_version")
        if name is None:
            self.db.set_meta(session, "model_name", self.model_name)
            self.db.set_meta(session, "model_version", self.model_version)
        elif (name, version) != (self.model_name, self.model_version):
            raise GalleryError(self._model_mismatch(name, version))
        self.sealer.claim(session, self.location)

    def close(self) -> None:
        """Release the database connections."""
        self.db.close()
