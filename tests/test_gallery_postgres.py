"""Gallery on PostgreSQL: the core operations against a real server.

Runs when FACEMOE_TEST_POSTGRES_URL names an empty scratch database, e.g.
postgresql+psycopg://facemoe@127.0.0.1:54329/facemoe_test (`.ci/run` starts one through
`.ci/postgres.sh`); its gallery tables are dropped after every test. Skips otherwise.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.gallery import Gallery, GalleryError
from app.gallery.db import Base
from app.match import Matcher
from tests.gallery_helpers import MODEL, crops, event, unit

pytestmark = pytest.mark.unit


@pytest.fixture
def pg_url() -> str:
    url = os.environ.get("FACEMOE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("FACEMOE_TEST_POSTGRES_URL is not set (a scratch PostgreSQL database URL, "
                    "e.g. from .ci/postgres.sh)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e .[dev])")
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as exc:
        pytest.skip(f"cannot connect to FACEMOE_TEST_POSTGRES_URL: {str(exc).splitlines()[0]}")
    Base.metadata.drop_all(engine)
    yield url
    Base.metadata.drop_all(engine)
    engine.dispose()


def test_enroll_matrix_rename_remove(pg_url: str) -> None:
    rng = np.random.default_rng(1)
    a, b = unit(rng, 2), unit(rng, 1)
    with Gallery(pg_url, *MODEL) as g:
        assert g.matrix()[0] == [] and g.version() == 0
        g.enroll("alice", a, ["a1.jpg", "a2.jpg"], [0.7, 0.8], crops(rng, 2))
        g.enroll("bob", b, ["b.jpg"], [0.9])
        names, mat = g.matrix()
        assert names == ["alice", "alice", "bob"]
        np.testing.assert_allclose(mat, np.concatenate([a, b]), atol=1e-6)
        assert [i.name for i in g.identities()] == ["alice", "bob"]
        assert [t.source for t in g.templates("alice")] == ["a1.jpg", "a2.jpg"]
        assert Matcher.from_gallery(g, 0.5).match(a[1]).identity == "alice"

        v = g.version()
        g.rename("alice", "carol")
        assert g.version() > v and [i.name for i in g.identities()] == ["bob", "carol"]
        with pytest.raises(GalleryError, match="already exists"):
            g.rename("bob", "carol")

        kept = tuple((0.9 - 0.1 * i, c) for i, c in enumerate(crops(rng, 3)))
        g.add_events([replace(event(1, "carol"), crops=kept), event(2, None),
                      replace(event(3, "bob"), crops=kept[:1])], crops=2)
        evs = g.events()
        assert len(evs) == 3 and {e.identity for e in evs} == {"carol", None, "bob"}
        stored = g.stored_events()
        assert [e.crops for e in stored] == [2, 0, 1]
        assert [e.event.track_id for e in g.stored_events(unknown=True)] == [2]
        assert [q for q, _ in g.event_crops(stored[0].id)[1]] == pytest.approx([0.9, 0.8])
        assert g.remove("carol") == 1  # its one event goes with it; compact is a no-op here
        assert [i.name for i in g.identities()] == ["bob"]
        assert len(g.events()) == 2 and g.info()["event_crops"] == 1
        assert g.compact() is False  # VACUUM is SQLite-only: skipped
        assert g.integrity_check() == "ok"
        assert "bytes" not in g.info() and g.info()["identities"] == 1
        actions = [e.action for e in g.audit()]
        assert {"enroll", "rename", "remove"} <= set(actions)
    with Gallery(pg_url, *MODEL, create=False) as g:  # reopen: the data persisted
        assert g.matrix()[0] == ["bob"]


def test_model_mismatch_refused(pg_url: str) -> None:
    rng = np.random.default_rng(2)
    with Gallery(pg_url, *MODEL) as g:
        g.enroll("alice", unit(rng, 1), ["a.jpg"], [0.5])
    with pytest.raises(GalleryError, match="model"):
        Gallery(pg_url, "other-model", "9")
    with Gallery(pg_url, "other-model", "9", adopt_model=True) as g:
        assert g.model == "facemoe-edge@0.1.0"


def test_export_import_round_trip(pg_url: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    with Gallery(pg_url, *MODEL) as g:
        g.enroll("alice", unit(rng, 2), ["a1.jpg", "a2.jpg"], [0.7, 0.8], crops(rng, 2))
        g.enroll("bob", unit(rng, 1), ["b.jpg"], [0.9], crops(rng, 1))
        report = g.export(tmp_path / "g.zip")
        before = g.matrix()
        expected = {n: g.templates(n) for n in ("alice", "bob")}
    assert (report.identities, report.templates) == (2, 3)
    # PostgreSQL -> SQLite -> PostgreSQL (after emptying the PostgreSQL gallery)
    with Gallery(tmp_path / "copy.db", *MODEL) as local:
        r = local.import_file(report.path)
        assert (r.identities_added, r.templates_added) == (2, 3)
        back = local.export(tmp_path / "back.zip")
    with Gallery(pg_url, *MODEL) as g:
        g.remove("alice")
        g.remove("bob")
        assert g.matrix()[0] == []
        r = g.import_file(back.path)
        assert (r.identities_added, r.templates_added) == (2, 3)
        names, mat = g.matrix()
        assert names == before[0]
        np.testing.assert_array_equal(mat, before[1])
        for name, templates in expected.items():
            got = g.templates(name)
            assert [(t.source, t.quality) for t in got] == \
                   [(t.source, t.quality) for t in templates]
            assert all(np.array_equal(x.crop, y.crop) for x, y in zip(got, templates, strict=True))
        with pytest.raises(GalleryError, match="already in the gallery"):
            g.import_file(back.path)
        r = g.import_file(back.path, on_conflict="merge")
        assert (r.templates_added, r.templates_duplicate) == (0, 3)


def test_an_older_gallery_gains_the_event_columns(pg_url: str) -> None:
    """A gallery made before events had ids and wall-clock times opens: the nullable columns
    are added by migration 0002, old rows read back, new rows keep every field."""
    import sqlalchemy

    from app.gallery.db import EVENT_COLUMNS_ADDED

    with Gallery(pg_url, *MODEL) as g:
        g.add_events([event(1)])
    engine = sqlalchemy.create_engine(pg_url)
    with engine.begin() as conn:
        for col in EVENT_COLUMNS_ADDED:
            conn.exec_driver_sql(f'ALTER TABLE events DROP COLUMN "{col}"')
        conn.exec_driver_sql("DROP TABLE alembic_version")  # release 0.2 had no version
    engine.dispose()
    new = replace(event(2), time="2026-12-01T12:00:00.000+00:00", candidate="alice",
                  candidate_score=0.61, zones=("porch",), snapshot="/s/2.jpg")
    with Gallery(pg_url, *MODEL) as g:
        old = g.events()[0]
        assert old.track_id == 1 and old.time is None and old.id
        g.add_events([new])
        assert g.events()[1] == replace(new, snapshot=None)  # the picture, not a path, is kept


def test_events_are_stored_once_per_id(pg_url: str) -> None:
    """A batch written again (a retry after a lost connection, an outbox replay) and an event
    twice in one batch are stored once (ON CONFLICT DO NOTHING on the unique events.uid)."""
    rng = np.random.default_rng(5)
    with Gallery(pg_url, *MODEL) as g:
        batch = [replace(event(i), crops=((0.9, crops(rng, 1)[0]),)) for i in range(3)]
        assert g.event_store.add(batch, crops=1) == 3
        assert g.event_store.add(batch + [event(7)] * 2, crops=1) == 1
        assert len(g.events()) == 4 and g.info()["event_crops"] == 3


@pytest.mark.slow
def test_cli_gallery_takes_a_database_url(pg_url: str, tmp_path: Path, data_dir: Path) -> None:
    """`--gallery URL` opens that database in every command (it once made a SQLite file named
    like the URL and said "no such gallery" in `gallery list`)."""
    import json
    import subprocess

    from tests.conftest import facemoe

    root = Path(__file__).resolve().parent.parent

    def cli(*args: str) -> subprocess.CompletedProcess:
        return facemoe(*args, cwd=tmp_path, env={"PYTHONPATH": str(root)})

    r = cli("enroll", "Ada", str(data_dir / "videos" / "obama.jpg"), "--gallery", pg_url)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("gallery", "list", "--gallery", pg_url, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [i["name"] for i in json.loads(r.stdout)["identities"]] == ["Ada"]
    assert list(tmp_path.iterdir()) == []  # no file named like the URL
    r = cli("gallery", "list", "--gallery", "nosuchdb://x/y")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot open gallery nosuchdb://x/y" in r.stderr


def test_an_event_the_database_refuses_is_set_aside_not_blocking_the_outbox(
        pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL refuses an event on its own (a camera name longer than the column): with the
    database up, the outbox replays the others and sets that one aside in `.rejected`."""
    import json

    from app.outbox import Outbox
    from app.sinks import GallerySink

    with Gallery(pg_url, *MODEL) as g:
        sink = GallerySink(g.event_store, outbox=Outbox(tmp_path / "o.jsonl"))
        bad = replace(event(1), camera="c" * 300)
        sink.write([event(2), bad, event(3)])  # the batch is refused: all wait
        assert sink.pending() == 3 and "too long" in sink.error
        sink.write([event(4)])  # behind them; the replay stores them one by one
        assert sink.pending() == 0 and sink.retry()
        assert sorted(e.track_id for e in g.events()) == [2, 3, 4]
        rejected = [json.loads(x) for x in (tmp_path / "o.jsonl.rejected").read_text()
                    .splitlines()]
        assert [r["event"]["id"] for r in rejected] == [bad.id] and "too long" in \
            rejected[0]["reason"]
        sink.close()


def test_a_change_reaches_the_gallery_watch_at_once(pg_url: str) -> None:
    """On PostgreSQL a change is NOTIFYed: the daemon's gallery watch rebuilds its matcher at
    once, not at its next poll (60 s here)."""
    import threading
    import time

    from app.runtime import GalleryWatch

    rng = np.random.default_rng(6)
    with Gallery(pg_url, *MODEL) as box, Gallery(pg_url, *MODEL) as writer:
        watch, stop = GalleryWatch(box, 0.5, poll_s=60.0), threading.Event()
        thread = threading.Thread(target=watch.run, args=(stop,), daemon=True)
        thread.start()
        try:
            time.sleep(1.0)  # listening
            t = time.monotonic()
            writer.enroll("alice", unit(rng, 1), ["a.jpg"], [0.7])
            while not watch.matcher.names and time.monotonic() - t < 10:
                time.sleep(0.05)
            took = time.monotonic() - t
            assert watch.matcher.names == ["alice"] and took < 3, took
        finally:
            stop.set()
            watch.reload.set()
            thread.join(5)
