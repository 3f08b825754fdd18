"""Enrollment from a track: events keep their best aligned crops in the gallery, operators
list them (`facemoe gallery events`) and enroll from them (`facemoe enroll NAME --event ID`);
the crops are purged, deleted and encrypted with the events."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from app.aggregate import KEEP_CROPS, TrackAggregator
from app.enroll import EnrollError, enroll
from app.gallery import Gallery, GalleryError
from app.records import AlignedFace, Event, Quality
from tests.conftest import facemoe

REPO = Path(__file__).resolve().parent.parent


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_gallery_key")]  # plain galleries here


@pytest.fixture(scope="module")
def embedder(default_model_dir: Path):
    """The shipped model: it tells the real CelebA identities apart (the tiny one cannot)."""
    from app.embed import Embedder

    return Embedder.from_config(str(default_model_dir), "onnxruntime")


def track_event(track_id: int, crops: list[np.ndarray], identity: str | None = None,
                camera: str = "door") -> Event:
    """An event whose track kept `crops` (best first, qualities 0.9, 0.8, ...)."""
    return Event(camera, track_id, identity, 0.2, 1.0, 3.0, 40, (5.0, 6.0, 50.0, 60.0), "m",
                 crops=tuple((0.9 - 0.1 * i, c) for i, c in enumerate(crops)))


def person(real_faces: dict, k: int, n: int) -> list[np.ndarray]:
    return list(real_faces["crops"][np.flatnonzero(real_faces["labels"] == k)[:n]])


def test_aggregator_keeps_the_best_crops_of_a_track() -> None:
    agg = TrackAggregator("cam")
    rng = np.random.default_rng(0)
    qualities = rng.permutation(np.linspace(0.05, 0.95, 12))
    for i, q in enumerate(qualities):
        crop = np.full((112, 112, 3), i, np.uint8)
        agg.observe(AlignedFace(7, i, i / 10, np.array([0, 0, 40, 40], np.float32), crop,
                                Quality(float(q), 20.0, 100.0, 1.0, 0.9)))
    summary = agg.finish(7)
    assert len(summary.crops) == KEEP_CROPS
    kept = [q for q, _ in summary.crops]
    assert kept == sorted(qualities, reverse=True)[:KEEP_CROPS]
    assert [int(c[0, 0, 0]) for _, c in summary.crops] == [
        int(np.flatnonzero(qualities == q)[0]) for q in kept]
    assert summary.best_quality == kept[0]  # one best-face rule for both


def test_events_keep_crops_and_enroll_from_them(tmp_path: Path, embedder, real_faces: dict,
                                               yunet_path: Path) -> None:
    from app.yunet import FaceDetector

    db = tmp_path / "g.db"
    alice, bob = person(real_faces, 0, 5), person(real_faces, 1, 5)
    with Gallery(db, embedder.model_name, embedder.model_version) as g:
        g.add_events([track_event(1, alice), track_event(2, bob, camera="desk"),
                      track_event(3, [], identity="carol")], crops=3)
        listed = g.stored_events()
        assert [(e.event.track_id, e.crops) for e in listed] == [(1, 3), (2, 3), (3, 0)]
        assert [e.event.track_id for e in g.stored_events(camera="desk")] == [2]
        assert [e.event.track_id for e in g.stored_events(unknown=True)] == [1, 2]
        assert [e.event.track_id for e in g.stored_events(identity=" carol ")] == [3]
        assert [e.event.track_id for e in g.stored_events(limit=1)] == [3]
        stored, crops = g.event_crops(listed[0].id)
        assert stored.event.camera == "door" and [q for q, _ in crops] == pytest.approx(
            [0.9, 0.8, 0.7])
        assert crops[0][0] > crops[1][0] and crops[0][1].shape == (112, 112, 3)
        assert np.abs(crops[0][1].astype(int) - alice[0]).mean() < 4  # JPEG of the best crop

        detector = FaceDetector(str(yunet_path))
        report = enroll("Alice", [], detector, embedder, g, events=[listed[0].id])
        assert len(report.faces) == 3 and not report.rejected
        assert all(f.source.startswith(f"event {listed[0].id}: camera door track 1")
                   for f in report.faces)
        # the event's templates are the embeddings of its crops, and it is Alice
        names, mat = g.matrix()
        probe = embedder.embed_kept([alice[4]])[0]
        assert names[int(np.argmax(mat @ probe))] == "Alice"
        with pytest.raises(EnrollError, match="event 3 has no kept face crops"):
            enroll("Carol", [], detector, embedder, g, events=[3])
        with pytest.raises(EnrollError, match="has no event 99"):
            enroll("Nobody", [], detector, embedder, g, events=[99])
        with pytest.raises(EnrollError, match="nothing to enroll from"):
            enroll("Nobody", [], detector, embedder, g)
        # a track whose best crop is someone else (a tracker swap): rejected as an outlier
        # (the default margin is conservative: clear cases only, like this one at cos -0.07)
        g.add_events([track_event(4, alice[:1] + person(real_faces, 2, 5))], crops=5)
        mixed = g.stored_events()[-1].id
        report = enroll("Carol", [], detector, embedder, g, events=[mixed])
        assert len(report.faces) == 4
        assert [r.source for r in report.rejected] == [f"event {mixed}: camera door track 4 "
                                                       f"at 1.00 s crop 0"]


def test_event_crops_follow_purge_remove_and_encryption(tmp_path: Path, embedder,
                                                        real_faces: dict) -> None:
    db = tmp_path / "g.db"
    model = (embedder.model_name, embedder.model_version)
    with Gallery(db, *model) as g:
        g.add_events([track_event(i, person(real_faces, i, 3), identity="dave" if i == 2 else None)
                      for i in range(4)], crops=3)
        g.enroll("dave", embedder.embed_kept(person(real_faces, 2, 1)), ["x"], [0.5])
        assert g.info()["event_crops"] == 12
        g.remove("dave")  # deletes the event that named dave, with its crops
        assert g.info()["event_crops"] == 9
    with sqlite3.connect(db) as con:
        con.execute("UPDATE events SET created_at = '2020-01-01 00:00:00.000000' WHERE id <= 2")
    with Gallery(db, *model) as g:
        assert g.purge_events(30) == 2
        assert g.info()["event_crops"] == 3 and g.info()["events"] == 1
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM event_crops").fetchone()[0] == 3

    key = os.urandom(32)
    enc = tmp_path / "enc.db"
    with Gallery(enc, *model, key=key) as g:
        g.add_events([track_event(1, person(real_faces, 0, 2))], crops=3)
        _, crops = g.event_crops(1)
        assert len(crops) == 2
    with sqlite3.connect(enc) as con:
        blobs = [r[0] for r in con.execute("SELECT crop FROM event_crops")]
    assert blobs and not any(b"\xff\xd8\xff" in b for b in blobs)  # no JPEG in the clear
    with pytest.raises(GalleryError, match="encrypted"):
        Gallery(enc, *model)
    # a gallery that already holds clear-text event crops cannot silently become encrypted
    with Gallery(tmp_path / "clear.db", *model) as g:
        g.add_events([track_event(1, person(real_faces, 0, 1))], crops=1)
    with Gallery(tmp_path / "clear.db", *model, key=key) as g, pytest.raises(
            GalleryError, match="not encrypted"):
        g.add_events([track_event(2, [])])
    assert base64.b64encode(key)  # the key itself is never stored


@pytest.mark.slow
def test_cli_lists_events_and_enrolls_from_one(tmp_path: Path, tiny_model_dir: Path,
                                               real_faces: dict) -> None:
    db = tmp_path / "g.db"
    from app.embed import Embedder

    emb = Embedder.from_config(str(tiny_model_dir), "onnxruntime")
    with Gallery(db, emb.model_name, emb.model_version) as g:
        g.add_events([track_event(5, person(real_faces, 3, 4), camera="gate")], crops=3)
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"model:\n  dir: {tiny_model_dir}\n  backend: onnxruntime\n")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return facemoe(*args, "--config", cfg, "--gallery", db)

    listed = cli("gallery", "events", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = json.loads(listed.stdout)["events"]
    assert [(r["camera"], r["track_id"], r["crops"]) for r in rows] == [("gate", 5, 3)]
    table = cli("gallery", "events", "--unknown")
    assert "gate" in table.stdout and "(unknown)" in table.stdout
    done = cli("enroll", "Erin", "--event", str(rows[0]["id"]), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["templates"] == 3
    bad = cli("enroll", "Frank", "--event", "42")
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.startswith("facemoe: error:")]
    assert errors == [f"facemoe: error: gallery {db} has no event 42"], bad.stderr
