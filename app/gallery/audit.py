"""The audit log: who changed what, when. Every change writes its rows in its own transaction,
so a rolled-back change leaves no audit row."""

from __future__ import annotations

import getpass
import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.gallery.db import AuditRow, Database, as_utc, utcnow


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


_ACTOR: ContextVar[str | None] = ContextVar("facemoe_audit_actor", default=None)


@contextmanager
def acting_as(user: str) -> Iterator[None]:
    """Audit rows written inside this block name `user` (e.g. `alice (web)`), not the OS
    user: a server acting for an authenticated user."""
    token = _ACTOR.set(user)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def _os_user() -> str:
    """The real user of this process, from its uid (not $LOGNAME/$USER, which anyone sets)."""
    if not hasattr(os, "getuid"):
        return getpass.getuser()
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class AuditLog:
    """The `audit` table of a gallery; rows name the OS user of this process."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.user = _os_user()

    def record(self, session: Session, action: str, identity: str | None, detail: str) -> None:
        """Add one row in the change's write transaction."""
        self.record_many(session, [(action, identity, detail)])

    def record_many(self, session: Session, rows: list[tuple[str, str | None, str]]) -> None:
        """Add (action, identity, detail) rows in the change's write transaction."""
        if not rows:
            return
        now = utcnow()
        session.execute(insert(AuditRow), [
            {"time": now, "action": action, "identity": identity, "detail": detail[:2048],
             "os_user": _ACTOR.get() or self.user} for action, identity, detail in rows])

    def entries(self, limit: int | None = None) -> list[AuditEntry]:
        """Audit rows, oldest first; with `limit`, only the most recent `limit`."""
        query = select(AuditRow).order_by(AuditRow.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._db.read("read the audit log") as session:
            rows = list(session.scalars(query).all())
        rows.reverse()
        return [AuditEntry(as_utc(r.time), r.action, r.identity, r.detail, r.os_user)
                for r in rows]
