"""The fleet table: each box's heartbeat, a camera name claimed by two live boxes, and
`facemoe fleet` flagging a box that went silent (exit code 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from app.gallery import Gallery
from app.gallery.db import BoxRow
from app.gallery.fleet import Fleet
from tests.gallery_helpers import MODEL

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
