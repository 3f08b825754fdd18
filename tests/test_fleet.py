"""The fleet table: each box's heartbeat, a camera name claimed by two live boxes, and
`facemoe fleet` flagging a box that went silent (exit code 1); an erasure reaching every box
of a site on a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from app.gallery import Gallery
from app.gallery.db import BoxRow
from app.gallery.fleet import Fleet
from tests.gallery_helpers import MODEL, event

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_gallery_key")]
REPO_ROOT = Path(__file__).resolve().parent.parent


def _cam(name: str) -> dict:
    return {"name": name, "state": "running", "fps": 12.5, "frames": 100, "dropped": 0,
            "reconnects": 0, "events": 3, "last_event": None}


def test_heartbeats_and_camera_name_clashes(tmp_path: Path) -> None:
    start = datetime.now(timezone.utc)
    with Gallery(tmp_path / "g.db", *MODEL) as g:
        fleet = Fleet(g.store)
        assert fleet.beat("box-a", start, "ok", [_cam("door")], []) == {}
        assert fleet.beat("box-b", start, "ok", [_cam("yard")], []) == {}
        assert fleet.beat("box-b", start, "degraded", [_cam("yard"), _cam("door")],
                          ["sink mqtt: ..."]) == {"door": "box-a"}
        fleet.beat("box-a", start, "stopped", [_cam("door")], [])
        assert fleet.beat("box-b", start, "ok", [_cam("yard"), _cam("door")], []) == {}
        boxes = fleet.boxes()
        assert [(b.box, b.state) for b in boxes] == [("box-a", "stopped"), ("box-b", "ok")]
        assert [c["name"] for c in boxes[1].cameras] == ["yard", "door"]
        assert boxes[1].age_s() < 5


def test_fleet_command_flags_a_silent_box(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    start = datetime.now(timezone.utc)
    with Gallery(db, *MODEL) as g:
        Fleet(g.store).beat("box-a", start, "ok", [_cam("door")], [])
        Fleet(g.store).beat("box-b", start, "ok", [_cam("yard")], [])

        def quiet(session):  # box-b last heard of 5 minutes ago
            session.get(BoxRow, "box-b").seen_at = start - timedelta(minutes=5)

        g.store.db.write("age box-b", quiet)
    done = subprocess.run([sys.executable, "-m", "app.cli", "fleet", "--gallery", str(db),
                           "--json"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert done.returncode == 1, done.stderr  # a silent box
    boxes = {b["box"]: b for b in json.loads(done.stdout)["boxes"]}
    assert not boxes["box-a"]["silent"] and boxes["box-b"]["silent"]
    assert boxes["box-b"]["last_seen_s"] >= 299 and boxes["box-a"]["cameras"][0]["fps"] == 12.5


@pytest.fixture
def pg():
    from tests.services import Postgres

    server = Postgres()
    yield server
    server.close()


class _Box:
    """A box's erasure side as its daemon wires it: its own gallery connection, JSONL file
    (appended to all along by a writer thread, as the daemon's sink does), spooled snapshots,
    outbox, and a gallery watch whose change hook runs `erase_on_box`."""

    def __init__(self, name: str, root: Path, url: str, rng: np.random.Generator) -> None:
        from app.erasure import Outputs, erase_on_box
        from app.outbox import Outbox
        from app.runtime import GalleryWatch
        from app.sinks import RotatingJsonlSink

        self.name, self.root, self.rng = name, root, rng
        root.mkdir()
        self.gallery = Gallery(url, *MODEL)
        Fleet(self.gallery.store).beat(name, datetime.now(timezone.utc), "ok", [_cam(name)], [])
        self.jsonl, self.snaps = root / "events.jsonl", root / "snaps"
        self.sink = RotatingJsonlSink(self.jsonl, 10**7, 2)
        self.outbox = Outbox(root / "outbox.jsonl", self.gallery.store.sealer)
        outputs = Outputs((str(self.jsonl),), str(self.snaps))
        self.watch = GalleryWatch(self.gallery, 0.5, poll_s=30.0, on_change=lambda: erase_on_box(
            self.gallery, name, outputs, self.outbox))
        self.stopping = threading.Event()
        self.appended: list[str] = []  # ids of Bob's events the writer thread appended
        self.threads = [threading.Thread(target=self.watch.run, args=(self.stopping,)),
                        threading.Thread(target=self._append_all_along)]
        self.track = {"box-a": 1000, "box-b": 2000}[name]

    def event(self, identity: str, *, snapshot: bool = True):
        from dataclasses import replace

        self.track += 1
        ev = replace(event(self.track, identity), camera=self.name)
        if snapshot:
            path = self.snaps / self.name / f"{ev.id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\xff\xd8\xff spooled")
            ev = replace(ev, snapshot=str(path),
                         snapshot_image=self.rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
        return ev

    def _append_all_along(self) -> None:
        while not self.stopping.is_set():
            ev = self.event("Bob", snapshot=False)
            self.sink.write([ev])
            self.appended.append(ev.id)
            time.sleep(0.002)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        self.watch.reload.set()
        for t in self.threads:
            t.join(30)
        self.sink.close()
        self.outbox.close()
        self.gallery.close()

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.jsonl.read_text().splitlines()]


def test_an_erasure_reaches_every_box_on_postgresql(tmp_path: Path, pg) -> None:
    """One erasure (the erasure service on another machine) reaches two running boxes on a
    real PostgreSQL: each learns of the tombstone (NOTIFY: their poll is 30 s) and removes its
    JSONL lines, spooled snapshots and outbox entries of the person, while its writer keeps
    appending other events to that same file (none of them lost); the tombstone stays until
    every box of the fleet has acknowledged it (a box that does not run holds it, until it is
    forgotten), and the outbox replayed afterwards stores none of the person's events."""
    from app.erasure import Outputs, erase
    from app.sinks import GallerySink
    from tests.gallery_helpers import crops, unit

    rng = np.random.default_rng(0)
    central = Gallery(pg.url, *MODEL)
    for name in ("Ada", "Bob"):
        central.enroll(name, unit(rng, 2), ["a.jpg", "b.jpg"], [0.9, 0.8], crops(rng, 2))
    Fleet(central.store).beat("box-c", datetime.now(timezone.utc), "stopped", [_cam("box-c")],
                              [])  # a box that is not running now
    boxes = [_Box(n, tmp_path / n, pg.url, rng) for n in ("box-a", "box-b")]
    ada: dict[str, dict[str, list]] = {}
    try:
        for b in boxes:
            stored = [b.event("Ada"), b.event("Bob"), b.event("Ada")]
            waiting = [b.event("Ada"), b.event("Bob")]  # the database was away: in the outbox
            b.gallery.event_store.add(stored)
            b.sink.write(stored + waiting)
            b.outbox.append(waiting)
            ada[b.name] = {"ids": [e.id for e in stored + waiting if e.identity == "Ada"],
                           "snaps": [e.snapshot for e in stored + waiting
                                     if e.identity == "Ada"],
                           "bob": [e.snapshot for e in stored + waiting if e.identity == "Bob"]}
        for b in boxes:
            b.start()
        time.sleep(1.0)  # the watches listen; the writers append
        assert pg.sql("select count(*) from event_snapshots")[0][0] == 6  # pictures in the db
        report = erase(central, Outputs(), name="Ada")
        assert report.events_deleted == 4 and not report.unfinished
        t = time.monotonic()
        deadline = t + 15
        while time.monotonic() < deadline and pg.sql(
                "select count(*) from erasure_acks")[0][0] < 2:
            time.sleep(0.1)
        reached_s = time.monotonic() - t
        assert reached_s < 10, "the erasure did not reach both boxes"
        time.sleep(0.5)  # the writers go on appending to the rewritten files
    finally:
        for b in boxes:
            b.stop()
    assert pg.sql("select count(*) from event_snapshots")[0][0] == 2  # Bob's
    for b in boxes:
        lines = b.lines()
        assert not [x for x in lines if x["identity"] == "Ada" or x["id"] in ada[b.name]["ids"]]
        ids = {x["id"] for x in lines}
        assert set(b.appended) <= ids, "a line appended while the file was rewritten was lost"
        assert len(b.appended) > 50
        assert not any(Path(p).exists() for p in ada[b.name]["snaps"])
        assert all(Path(p).exists() for p in ada[b.name]["bob"])
        with Gallery(pg.url, *MODEL) as g:
            from app.outbox import Outbox

            outbox = Outbox(b.root / "outbox.jsonl", g.store.sealer)
            assert len(outbox) == 1
            sink = GallerySink(g.event_store, outbox=outbox)
            assert sink.retry()  # what waited is stored: Bob's event only
            sink.close()
    assert not pg.sql("select count(*) from events where identity = 'Ada'")[0][0]
    # box-c has not erased its copies: the tombstone waits for it (gallery check says so)
    waiting = central.erasures.waiting_for_boxes()
    assert [(t.name, boxes_) for t, boxes_ in waiting] == [("Ada", ["box-c"])]
    central.erasures.forget_box("box-c")
    assert pg.sql("select count(*) from erasures")[0][0] == 0
    assert pg.sql("select count(*) from erasure_acks")[0][0] == 0
    central.close()
    print(f"an erasure reached both boxes in {reached_s:.2f} s")
