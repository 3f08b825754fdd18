"""Event sinks: JSONL lines with exactly the keys of docs/events.md; gallery events table; snapshot
JPEGs (private, atomic, purged after their retention)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.gallery import Gallery
from app.gallery.db import EVENT_COLUMNS_ADDED
from app.records import Event
from app.sinks import GallerySink, JsonlSink, SinkError, SnapshotSink
from tests.gallery_helpers import EVENT_KEYS

pytestmark = pytest.mark.unit


def event(track_id: int, identity: str | None) -> Event:
    return Event(
        camera="door",
        track_id=track_id,
        identity=identity,
        score=0.4321987654,
        start=12.0,
        end=13.5,
        frames=38,
        best_bbox=(1.234, 5.0, 64.0, 72.5),
        model="facemoe-edge@0.1.0",
        time="2026-12-01T12:00:03.250000+01:00",
        snapshot="/snaps/door/x.jpg",
        candidate="Zoë",
        candidate_score=0.4321987654,
        zones=("porch",),
    )


def test_jsonl_lines_have_exactly_the_design_keys(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    sink.write([event(1, "Zoë"), event(2, None)])
    lines = path.read_text(encoding="utf-8").splitlines()  # flushed before close
    sink.close()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == EVENT_KEYS and set(second) == EVENT_KEYS
    assert first.pop("id") != second.pop("id")
    assert first == {
        "camera": "door",
        "track_id": 1,
        "identity": "Zoë",
        "score": 0.432199,
        "start": 12.0,
        "end": 13.5,
        "frames": 38,
        "best_bbox": [1.23, 5.0, 64.0, 72.5],
        "model": "facemoe-edge@0.1.0",
        "type": "end",
        "time": "2026-12-01T12:00:03.250000+01:00",
        "snapshot": "/snaps/door/x.jpg",
        "candidate": "Zoë",
        "candidate_score": 0.432199,
        "zones": ["porch"],
    }
    assert second["identity"] is None


def test_jsonl_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    for track_id in (1, 2):
        sink = JsonlSink(path)
        sink.write([event(track_id, None)])
        sink.close()
    assert [json.loads(x)["track_id"] for x in path.read_text().splitlines()] == [1, 2]


def test_jsonl_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "events.jsonl"
    with pytest.raises(SinkError) as err:
        JsonlSink(missing)
    assert str(err.value) == f"cannot open events file {missing}: No such file or directory"
    sink = JsonlSink(tmp_path / "e.jsonl")
    sink.close()
    sink.close()
    with pytest.raises(SinkError, match="is closed"):
        sink.write([event(1, None)])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_jsonl_disk_full() -> None:
    sink = JsonlSink("/dev/full")
    with pytest.raises(SinkError) as err:
        sink.write([event(1, None)])
    assert str(err.value) == "cannot write events file /dev/full: No space left on device"


def test_gallery_sink(tmp_path: Path) -> None:
    events = [event(1, "alice"), event(2, None), event(3, "bob")]
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as gallery:
        sink = GallerySink(gallery.event_store)
        sink.write(events[:2])
        sink.write(events[2:])
        sink.close()
        # the box-local snapshot path is not stored (the picture is: see below)
        assert gallery.events() == [replace(e, snapshot=None) for e in events]
        with pytest.raises(SinkError, match="closed"):
            sink.write(events)
        assert len(gallery.events()) == 3  # borrowed gallery still usable after close


def test_gallery_sink_error_is_sink_error(tmp_path: Path) -> None:
    bad = Event("door", 1, None, 0.1, 0.0, 1.0, 3, (0.0, 0.0, 1.0, 1.0), None)  # type: ignore[arg-type]
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as gallery:
        with pytest.raises(SinkError) as err:
            GallerySink(gallery.event_store).write([event(1, None), bad])
        assert "\n" not in str(err.value)
        assert gallery.events() == []


def test_gallery_keeps_the_extended_event_fields(tmp_path: Path) -> None:
    events = [event(1, "alice"), replace(event(2, None), candidate=None, candidate_score=None,
                                         zones=(), snapshot=None, time=None)]
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as gallery:
        GallerySink(gallery.event_store).write(events)
        stored = gallery.event_store.stored()
    assert [s.event for s in stored] == [replace(e, snapshot=None) for e in events]  # no path
    assert [s.as_json()["uid"] for s in stored] == [e.id for e in events]
    assert stored[0].as_json()["id"] == 1  # the row id, for `facemoe enroll --event ID`


def test_a_gallery_made_before_the_event_extensions_opens_and_gains_the_columns(
    tmp_path: Path,
) -> None:
    """A gallery whose events table has only the first release's columns: it opens, the new
    nullable columns are added, old rows read back with a stable id, new rows keep theirs."""
    path = tmp_path / "old.db"
    with Gallery(path, "facemoe-edge", "0.1.0") as gallery:
        GallerySink(gallery.event_store).write([event(1, "alice")])
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX ux_events_uid")  # release 0.2 had no unique event id
        for col in EVENT_COLUMNS_ADDED:
            db.execute(f"ALTER TABLE events DROP COLUMN {col}")
        db.execute("DROP TABLE alembic_version")  # release 0.2 had no schema version
    with sqlite3.connect(path) as db:
        columns = {r[1] for r in db.execute("pragma table_info(events)")}
    assert not set(EVENT_COLUMNS_ADDED) & columns
    for _ in range(2):
        with Gallery(path, "facemoe-edge", "0.1.0") as gallery:
            old = gallery.event_store.stored()[0].event
            assert old.identity == "alice" and old.time is None and old.zones == ()
            ids = {s.event.id for s in gallery.event_store.stored()[:1]}
        assert ids == {old.id}  # derived from the row: the same on every read
    with Gallery(path, "facemoe-edge", "0.1.0") as gallery:
        new = event(2, None)
        GallerySink(gallery.event_store).write([new])
        assert gallery.event_store.stored()[-1].event == replace(new, snapshot=None)
    with sqlite3.connect(path) as db:
        assert set(EVENT_COLUMNS_ADDED) <= {r[1] for r in db.execute("pragma table_info(events)")}
        assert "ux_events_uid" in {r[1] for r in db.execute("pragma index_list(events)")}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def face_photo(data_dir: Path) -> np.ndarray:
    return cv2.imread(str(data_dir / "videos" / "obama_small.jpg"))


def test_snapshot_sink_writes_private_jpegs_and_the_end_replaces_the_alert(
        tmp_path: Path, face_photo: np.ndarray) -> None:
    snaps = tmp_path / "snaps"
    sink = SnapshotSink(snaps, retention_days=7)
    alert = replace(event(1, None), type="recognized", snapshot=None)
    path = sink.path(alert)
    assert path == str(snaps / "door" / f"{alert.id}.jpg")
    alert = replace(alert, snapshot=path, snapshot_image=face_photo[:40, :30])
    sink.write([alert])
    assert cv2.imread(path).shape == (40, 30, 3)
    assert _mode(snaps) == _mode(snaps / "door") == 0o700 and _mode(Path(path)) == 0o600
    end = replace(alert, type="end", snapshot_image=face_photo)  # the track's best face
    no_picture = replace(event(2, None), snapshot=None)
    sink.write([end, no_picture])
    sink.close()
    written = cv2.imread(path)
    assert written.shape == face_photo.shape
    assert np.abs(written.astype(int) - face_photo).mean() < 8  # JPEG quality 90
    assert [p for p in snaps.rglob("*") if p.is_file()] == [Path(path)]  # no temporaries left
    record = end.to_json()
    assert record["snapshot"] == path and "snapshot_image" not in record


def test_a_failed_snapshot_is_one_error_and_spares_the_others(
        tmp_path: Path, face_photo: np.ndarray) -> None:
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    (snaps / "door").write_bytes(b"")  # a file where the camera's folder should be
    sink = SnapshotSink(snaps, retention_days=7)
    door = replace(event(1, None), snapshot_image=face_photo)
    hall = replace(event(2, None), camera="hall", snapshot_image=face_photo)
    door, hall = (replace(ev, snapshot=sink.path(ev)) for ev in (door, hall))
    with pytest.raises(SinkError) as err:
        sink.write([door, hall])
    assert err.value.lost == 1 and str(err.value).startswith(f"{door.id}: ")
    assert "\n" not in str(err.value)
    assert Path(hall.snapshot).is_file() and not Path(door.snapshot).exists()


def test_snapshots_older_than_the_retention_are_purged(tmp_path: Path,
                                                       face_photo: np.ndarray) -> None:
    snaps = tmp_path / "snaps"
    sink = SnapshotSink(snaps, retention_days=2)
    assert sink.purge() == 0  # no folder yet
    old, new = (replace(event(i, None), snapshot_image=face_photo) for i in (1, 2))
    old, new = (replace(ev, snapshot=sink.path(ev)) for ev in (old, new))
    sink.write([old, new])
    three_days_ago = time.time() - 3 * 86400
    os.utime(old.snapshot, (three_days_ago, three_days_ago))
    assert sink.purge() == 1
    assert not Path(old.snapshot).exists() and Path(new.snapshot).is_file()
    assert sink.purge(now=time.time() + 3 * 86400) == 1 and not Path(new.snapshot).exists()


def test_jsonl_refuses_a_planted_symlink_and_keeps_the_file_private(tmp_path: Path) -> None:
    """A symlink planted at the events file's name is not followed (before: the events went
    to its target); a file someone left readable by others becomes 0600 (before: 0644)."""
    target = tmp_path / "victim.txt"
    target.write_text("")
    link = tmp_path / "events.jsonl"
    link.symlink_to(target)
    with pytest.raises(SinkError) as err:
        JsonlSink(link)
    assert str(err.value) == f"cannot open events file {link}: it is a symbolic link"
    assert target.read_text() == ""
    loose = tmp_path / "loose.jsonl"
    loose.write_text("")
    loose.chmod(0o644)
    sink = JsonlSink(loose)
    sink.write([event(1, "ada")])
    sink.close()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600


def test_snapshots_are_stored_in_the_database_and_old_rows_paths_still_read(
        tmp_path: Path, face_photo: np.ndarray) -> None:
    """A UI on another machine shows an event's picture: it is stored with the event (JPEG,
    sealed when the gallery is encrypted), not as a box-local path; an event stored before
    (its row names a file) still shows where that file is readable, and only a JPEG file."""
    for key in (None, os.urandom(32)):
        path = tmp_path / f"g{key is not None}.db"
        with Gallery(path, "facemoe-edge", "0.1.0", key=key) as gallery:
            ev = replace(event(1, None), snapshot_image=face_photo)
            GallerySink(gallery.event_store).write([ev, event(2, None)])
            rows = {e.event.track_id: e.id for e in gallery.event_store.stored()}
            jpeg = gallery.pages.event_snapshot_jpeg(rows[1])
            shown = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert shown.shape == face_photo.shape
            assert np.abs(shown.astype(int) - face_photo).mean() < 8
            assert gallery.pages.event_snapshot_jpeg(rows[2]) is None
            blob = sqlite3.connect(path).execute("select jpeg from event_snapshots").fetchone()[0]
            assert (blob == jpeg) == (key is None)  # sealed in an encrypted gallery
    old = tmp_path / "old.jpg"
    old.write_bytes(jpeg)
    not_a_picture = tmp_path / "secret.jpg"
    not_a_picture.write_text("not a JPEG")
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as gallery:
        GallerySink(gallery.event_store).write([event(3, None), event(4, None)])
    db = sqlite3.connect(tmp_path / "g.db")
    with db:  # rows as a release before 0006 stored them: the path on the box
        db.execute("update events set snapshot=? where track_id=3", (str(old),))
        db.execute("update events set snapshot=? where track_id=4", (str(not_a_picture),))
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as gallery:
        rows = {e.event.track_id: e.id for e in gallery.event_store.stored()}
        assert gallery.pages.event_snapshot_jpeg(rows[3]) == jpeg
        assert gallery.pages.event_snapshot_jpeg(rows[4]) is None


def test_jsonl_never_keeps_a_partial_line(tmp_path: Path) -> None:
    """A write that hits the file size limit (as a full disk would) is undone to the last
    complete line; the file is private."""
    import json
    import resource

    from app.sinks import JsonlSink, SinkError
    from tests.gallery_helpers import event

    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    sink.write([event(1)])
    size = path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + size // 2, hard))
    try:
        with pytest.raises(SinkError, match="cannot write events file"):
            sink.write([event(2), event(3)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    sink.write([event(4)])
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["track_id"] for line in lines] == [1, 4]
    assert path.read_text().endswith("\n")
    assert os.stat(path).st_mode & 0o777 == 0o600
