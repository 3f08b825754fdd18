"""The gallery schema is versioned with Alembic: new galleries are stamped at the head, galleries
of release 0.2 get the new tables and the baseline stamp, the migrations build exactly the
tables of `app.gallery.db`, a gallery of this release opens in a next release that adds a
migration, and a gallery of a newer release is refused in one line."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine

from app.gallery import Gallery, GalleryError
from app.gallery import schema as gallery_schema
from app.gallery.db import Base
from app.records import Event

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_gallery_key")]
NEW_TABLES = {"event_embeddings", "face_clusters"}


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as c:
        return {r[0] for r in c.execute("select name from sqlite_master where type='table'")}


def _revision(db: Path) -> str:
    with sqlite3.connect(db) as c:
        return c.execute("select version_num from alembic_version").fetchone()[0]


def test_head_is_the_newest_migration() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(gallery_schema._alembic_config())
    assert script.get_current_head() == gallery_schema.HEAD


def test_the_migrations_build_the_tables_of_the_code() -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine("sqlite://")
    cfg = gallery_schema._alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_a_new_gallery_is_stamped_at_the_head(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Its tables are made from the models (the head's): stamped there, no migration runs."""
    db = tmp_path / "g.db"
    migrated: list[str] = []
    monkeypatch.setattr(gallery_schema, "upgrade", lambda *a: migrated.append(a[2]))
    Gallery(db, "m", "1").close()
    assert migrated == [] and _revision(db) == gallery_schema.HEAD
    assert set(Base.metadata.tables) | {"alembic_version"} == _tables(db)


def test_a_gallery_of_release_0_2_opens_and_is_stamped(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with Gallery(db, "m", "1") as g:
        g.enroll("ada", np.eye(1, 8, dtype=np.float32), ["a.jpg"], [0.9])
        g.add_events([Event("door", 1, None, 0.1, 0.0, 1.0, 3, (1, 2, 3, 4), "m@1")])
    with sqlite3.connect(db) as c:  # as release 0.2 left it: no version, no review tables
        for t in (*NEW_TABLES, "alembic_version"):
            c.execute(f"drop table {t}")
    assert not _tables(db) & (NEW_TABLES | {"alembic_version"})
    with Gallery(db, "m", "1", create=False) as g:
        assert [i.name for i in g.identities()] == ["ada"] and len(g.stored_events()) == 1
    assert NEW_TABLES <= _tables(db) and _revision(db) == gallery_schema.HEAD


def test_a_gallery_of_this_release_opens_in_the_next(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The next release adds a migration (here a nullable column on events): this release's
    gallery is upgraded on open, its data intact."""
    db = tmp_path / "g.db"
    with Gallery(db, "m", "1") as g:
        g.add_events([Event("door", 1, None, 0.1, 0.0, 1.0, 3, (1, 2, 3, 4), "m@1")])
    migrations = tmp_path / "migrations"
    shutil.copytree(gallery_schema.MIGRATIONS, migrations,
                    ignore=shutil.ignore_patterns("__pycache__"))
    head = gallery_schema.HEAD
    nxt = f"{int(head) + 1:04d}"
    (migrations / "versions" / f"{nxt}_next.py").write_text(
        '"""next release: events.note"""\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"revision = '{nxt}'\ndown_revision = '{head}'\nbranch_labels = None\n"
        "depends_on = None\n\n\n"
        "def upgrade():\n"
        "    with op.batch_alter_table('events') as b:\n"
        "        b.add_column(sa.Column('note', sa.String(256), nullable=True))\n\n\n"
        "def downgrade():\n"
        "    with op.batch_alter_table('events') as b:\n"
        "        b.drop_column('note')\n")
    monkeypatch.setattr(gallery_schema, "MIGRATIONS", migrations)
    monkeypatch.setattr(gallery_schema, "HEAD", nxt)
    with Gallery(db, "m", "1", create=False) as g:
        assert len(g.stored_events()) == 1
    assert _revision(db) == nxt
    with sqlite3.connect(db) as c:
        assert "note" in [r[1] for r in c.execute("pragma table_info(events)")]


def test_a_gallery_of_a_newer_release_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    Gallery(db, "m", "1").close()
    with sqlite3.connect(db) as c:
        c.execute("update alembic_version set version_num = '0999'")
    with pytest.raises(GalleryError, match="written by a newer release") as err:
        Gallery(db, "m", "1", create=False)
    assert "\n" not in str(err.value)


def test_a_gallery_at_0005_gains_stored_snapshots_and_erasure_acks(tmp_path: Path) -> None:
    """Migration 0006 on a gallery as 0005 left it (no `event_snapshots`, no `erasure_acks`,
    no `erasures.done_at`): its old event keeps its box-local snapshot path, an unfinished
    erasure stays unfinished, and a new event's picture is stored in the database."""
    from dataclasses import replace

    db = tmp_path / "g.db"
    with Gallery(db, "m", "1") as g:
        g.enroll("ada", np.eye(1, 8, dtype=np.float32), ["a.jpg"], [0.9])
        g.enroll("bob", np.eye(1, 8, k=1, dtype=np.float32), ["b.jpg"], [0.9])
        g.add_events([Event("door", 1, None, 0.1, 0.0, 1.0, 3, (1, 2, 3, 4), "m@1")])
        g.erasures.begin(name="ada")  # its files part never finished
    with sqlite3.connect(db) as c:  # as 0005 left it
        c.execute("update events set snapshot='/var/lib/facemoe/snaps/door/1.jpg'")
        c.execute("drop table event_snapshots")
        c.execute("drop table erasure_acks")
        c.execute("alter table erasures drop column done_at")
        c.execute("update alembic_version set version_num='0005'")
    with Gallery(db, "m", "1", create=False) as g:
        assert _revision(db) == gallery_schema.HEAD
        assert [t.name for t in g.erasures.pending()] == ["ada"]
        old = g.stored_events()[0]
        assert old.event.snapshot == "/var/lib/facemoe/snaps/door/1.jpg"
        picture = np.full((20, 16, 3), 128, np.uint8)
        g.event_store.add([replace(Event("door", 2, None, 0.1, 0.0, 1.0, 3, (1, 2, 3, 4),
                                         "m@1"), snapshot_image=picture)])
        new = g.event_store.stored()[-1]
        assert new.event.snapshot is None and g.pages.event_snapshot_jpeg(new.id)
    assert {"event_snapshots", "erasure_acks"} <= _tables(db)
