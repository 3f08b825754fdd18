"""The daemon's outbox file: private, in order, durable across a restart (a line cut short by a
crash is dropped), crops sealed like the gallery's; and events are stored once per event id
(a replayed batch never duplicates), also through the migration that adds the unique index."""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.gallery import Gallery
from app.gallery.seal import Sealer
from app.outbox import Outbox, OutboxError
from app.process import event_id
from app.sinks import GallerySink
from tests.gallery_helpers import MODEL, event

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_gallery_key")]


def _crop(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (192, 192, 3), dtype=np.uint8)


def test_outbox_keeps_events_in_order_privately_and_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.jsonl"
    box = Outbox(path, crops=2)
    assert not path.exists() and len(box) == 0 and box.oldest() is None  # made on first use
    events = [replace(event(i, "ada" if i % 2 else None), crops=((0.9, _crop(i)),))
              for i in range(5)]
    box.append(events[:3])
    box.append(events[3:])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    n, back = box.peek(3)
    assert n == 3 and [e.id for e in back] == [e.id for e in events[:3]]
    assert back[0] == events[0] and back[0].crops[0][1].shape == (192, 192, 3)
    box.consume(2)
    box.close()
    with path.open("ab") as fh:  # a crash in the middle of an append
        fh.write(b'{"event": {"camera": "c", "tr')
    again = Outbox(path, crops=2)
    assert len(again) == 5  # nothing was stored: all five are replayed (consume is in memory)
    assert [e.id for e in again.peek(10)[1]] == [e.id for e in events]
    assert path.read_bytes().endswith(b"\n")  # the partial line is gone
    again.consume(5)
    assert path.stat().st_size == 0 and len(again) == 0
    again.close()


def test_outbox_crops_are_sealed_with_the_gallerys_key(tmp_path: Path) -> None:
    key = bytes(range(32))
    box = Outbox(tmp_path / "o.jsonl", Sealer(key), crops=1)
    ev = replace(event(1, "ada"), crops=((0.8, _crop(1)),))
    box.append([ev])
    assert b"\xff\xd8" not in (tmp_path / "o.jsonl").read_bytes()  # no JPEG in the clear
    assert Outbox(tmp_path / "o.jsonl", Sealer(key), crops=1).peek(1)[1][0].crops[0][0] == 0.8


def test_outbox_refuses_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("")
    (tmp_path / "o.jsonl").symlink_to(victim)
    with pytest.raises(OutboxError, match="cannot open the outbox"):
        Outbox(tmp_path / "o.jsonl")


def test_events_are_stored_once_per_id(tmp_path: Path) -> None:
    with Gallery(tmp_path / "g.db", *MODEL) as g:
        first = [replace(event(i, "ada"), crops=((0.9, _crop(i)),)) for i in range(3)]
        assert g.event_store.add(first, crops=1) == 3
        assert g.event_store.add(first + [event(9, None)], crops=1) == 1  # a replay: one new
        assert g.event_store.add([event(10, None)] * 2) == 1  # twice in one batch
        assert len(g.stored_events()) == 5 and g.info()["event_crops"] == 3


def test_gallery_sink_replays_its_outbox_in_order(tmp_path: Path) -> None:
    """The gallery's events table is taken away (as a database that refuses writes): events go
    to the outbox, later ones queue behind them, and once it is back all are stored once, in
    the order they came."""
    db = tmp_path / "g.db"
    with Gallery(db, *MODEL) as g:
        sink = GallerySink(g.event_store, outbox=Outbox(tmp_path / "o.jsonl"))
        sink.write([event(1, None)])
        with sqlite3.connect(db) as c:
            c.execute("alter table events rename to events_away")
        sink.write([event(2, None)])
        assert sink.pending() == 1 and "no such table" in sink.error
        assert not sink.retry()
        with sqlite3.connect(db) as c:
            c.execute("alter table events_away rename to events")
        sink.write([event(3, None)])  # behind the waiting one, then all are replayed
        assert sink.pending() == 0 and sink.oldest() is None
        assert [e.event.track_id for e in g.stored_events()] == [1, 2, 3]
        sink.close()


def test_the_migration_keeps_one_row_per_event_id(tmp_path: Path) -> None:
    """A gallery of revision 0002 holding two copies of one event (same uid) opens at the head:
    the later copy and its crop are removed and the uid becomes unique."""
    db = tmp_path / "g.db"
    with Gallery(db, *MODEL) as g:
        g.add_events([replace(event(1, "ada"), crops=((0.9, _crop(1)),))], crops=1)
    with sqlite3.connect(db) as c:
        c.execute("drop index ux_events_uid")
        c.execute("insert into events (camera, track_id, identity, score, start, \"end\", frames,"
                  " bbox_x, bbox_y, bbox_w, bbox_h, model, created_at, uid) select camera, "
                  "track_id, identity, score, start, \"end\", frames, bbox_x, bbox_y, bbox_w, "
                  "bbox_h, model, created_at, uid from events")
        c.execute("insert into event_crops (event_id, quality, crop) select 2, quality, crop "
                  "from event_crops")
        c.execute("update alembic_version set version_num = '0002'")
        assert c.execute("select count(*) from events").fetchone()[0] == 2
    with Gallery(db, *MODEL, create=False) as g:
        stored = g.stored_events()
        assert [(s.id, s.crops) for s in stored] == [(1, 1)]
    with sqlite3.connect(db) as c:
        assert c.execute("select count(*) from event_crops").fetchone()[0] == 1
        with pytest.raises(sqlite3.IntegrityError):
            c.execute("insert into events (camera, track_id, score, start, \"end\", frames, "
                      "bbox_x, bbox_y, bbox_w, bbox_h, model, created_at, uid) select camera, "
                      "track_id, score, start, \"end\", frames, bbox_x, bbox_y, bbox_w, bbox_h, "
                      "model, created_at, uid from events")


def test_process_event_ids_come_from_the_file_and_the_track(tmp_path: Path) -> None:
    from app.process import video_fingerprint

    video = tmp_path / "v.mp4"
    video.write_bytes(os.urandom(3 << 20))
    fp = video_fingerprint(str(video))
    assert fp == video_fingerprint(str(video))
    assert event_id(fp, "cam", 1) == event_id(fp, "cam", 1)
    assert len({event_id(fp, "cam", 1), event_id(fp, "cam", 2), event_id(fp, "door", 1)}) == 3
    last = video.read_bytes()[-1]
    with video.open("r+b") as fh:  # other content (its last byte changed): other ids
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last ^ 0xFF]))
    assert video_fingerprint(str(video)) != fp


def test_an_erasure_drops_the_persons_waiting_events_in_order(tmp_path: Path) -> None:
    """`Outbox.erase`: the person's events (by name or event id) go, their name is cleared as
    another event's candidate, the rest keep their order, crops and snapshot, privately, and
    the outbox reopened from disk agrees."""
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path, crops=1)
    picture = _crop(9)[:40, :30].copy()
    events = [replace(event(1, "ada")), replace(event(2, None), candidate="ada",
                                                candidate_score=0.3),
              replace(event(3, "bob"), crops=((0.8, _crop(3)),), snapshot_image=picture),
              replace(event(4, None)), replace(event(5, "bob"))]
    box.append(events)
    assert box.erase({"ada"}, {events[3].id}) == {events[0].id, events[3].id}
    assert box.erase({"ada"}, set()) == set()  # nothing left to do
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for b in (box, Outbox(path, crops=1)):
        n, back = b.peek(10)
        assert n == 3 and [e.track_id for e in back] == [2, 3, 5]
        assert back[0].candidate is None and back[0].candidate_score is None
        assert len(back[1].crops) == 1 and back[1].snapshot_image.shape == picture.shape
    box.consume(3)
    assert len(box) == 0 and path.stat().st_size == 0
