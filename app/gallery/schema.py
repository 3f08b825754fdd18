"""The gallery schema's version (Alembic revisions in `app/gallery/migrations/versions`).

Every opened gallery is brought to `HEAD`: a new one is created at it (stamped `HEAD`), a
gallery of release 0.2 (no version yet) gets the tables it lacks and is stamped with the
baseline, then migrated; an older
revision is upgraded by Alembic's migrations. A gallery of a newer release (a revision this
one does not know) is refused. Alembic is imported only when there is something to migrate,
so opening an up-to-date gallery costs one SELECT.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Column, Engine, MetaData, String, Table, inspect, select

from app.gallery.errors import GalleryError, one_line

log = logging.getLogger(__name__)

BASELINE = "0001"  # release 0.2 tables plus the review UI's (what create_all can stamp)
HEAD = "0007"  # the newest revision in migrations/versions (tests/test_web_schema.py checks)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_version = Table("alembic_version", MetaData(), Column("version_num", String(32),
                                                       primary_key=True))


def revision(engine: Engine) -> str | None:
    """The schema revision stamped in the gallery, None when it has none."""
    if "alembic_version" not in inspect(engine).get_table_names():
        return None
    with engine.connect() as conn:
        return conn.scalar(select(_version.c.version_num))


def ensure_current(engine: Engine, location: str, *, new: bool = False) -> None:
    """Stamp or migrate the gallery to `HEAD` (its tables already exist: `create_all`);
    `new`: the gallery was just created, its tables made from the models (`HEAD`'s)."""
    current = revision(engine)
    if current == HEAD:
        return
    writer = engine.execution_options(gallery_write=True)
    if current is None:  # new (HEAD's tables), or release 0.2 (create_all made the baseline's)
        stamp = HEAD if new else BASELINE
        with writer.begin() as conn:
            _version.create(conn, checkfirst=True)
            if conn.scalar(select(_version.c.version_num)) is None:
                conn.execute(_version.insert().values(version_num=stamp))
        log.info("gallery %s: schema stamped at revision %s", location, stamp)
        current = stamp
        if current == HEAD:
            return
    upgrade(writer, location, current)


def _alembic_config():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def known_revisions() -> list[str]:
    from alembic.script import ScriptDirectory

    return [s.revision for s in ScriptDirectory.from_config(_alembic_config()).walk_revisions()]


def upgrade(engine: Engine, location: str, current: str) -> None:
    """Run the migrations from `current` to `HEAD`."""
    from alembic import command

    if current not in known_revisions():
        raise GalleryError(f"gallery {location} has schema revision {current}, written by a "
                           f"newer release of FaceMoE Edge (this one knows up to {HEAD}): "
                           f"upgrade facemoe")
    cfg = _alembic_config()
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except Exception as exc:
        raise GalleryError(f"gallery {location}: schema upgrade from {current} failed: "
                           f"{one_line(exc)}") from exc
    log.info("gallery %s: schema upgraded from %s to %s", location, current, HEAD)
