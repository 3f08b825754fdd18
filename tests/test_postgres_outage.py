"""A site of two boxes on one PostgreSQL gallery and one MQTT broker survives both: two daemons
(subprocesses, box-a and box-b, each on a looped file camera) keep processing video through a
`pg_ctl restart -m fast`, a broker restart and a stopped database; the events a box could not
store wait in its outbox and are stored once the server is back, /healthz says "degraded"
(naming the gallery and its sink) while it is away, and video goes on within 10 s of each
recovery; a person enrolled meanwhile, then renamed, reaches both boxes; both boxes
and their cameras show in `facemoe fleet` and on `facemoe serve`'s fleet page and API
(heartbeats in the database); erasing the person reaches both boxes (each acknowledges the
tombstone); every event produced (each box's JSONL file) is stored exactly once and published.
The servers are ones this test starts and restarts itself (tests/services.py); it skips with a
reason where they cannot be started."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from app.config import AppConfig
from tests.services import Mosquitto, Postgres, free_port
from tests.test_daemon import _health, _wait

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parent.parent
VIDEO = "short_hamilton_clip.mp4"


@pytest.fixture
def pg():
    server = Postgres()
    yield server
    server.close()


class Box:
    """A daemon subprocess (`facemoe run`) of one box with one looped file camera."""

    def __init__(self, name: str, folder: Path, cfg: dict) -> None:
        folder.mkdir(exist_ok=True)  # a box started again keeps its files
        self.name, self.port = name, free_port()
        self.jsonl, self.outbox = folder / "events.jsonl", folder / "outbox.jsonl"
        self.log = folder / "daemon.log"
        daemon = {"box": name, "metrics_port": self.port, "stats_interval_s": 5,
                  "jsonl": {"path": str(self.jsonl)}, "sqlite_commit_s": 0.5,
                  "gallery_poll_s": 0.5, "outbox": str(self.outbox), "heartbeat_s": 1,
                  # two daemons on a loaded 2-core machine drop frames: not what is tested here
                  "health": {"max_sink_age_s": 3, "max_drop_rate": 1.0},
                  "shutdown_timeout_s": 10}
        cfg = {**cfg, "daemon": {**cfg["daemon"], **daemon}}
        AppConfig.model_validate(cfg)
        self.config = folder / "daemon.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "run", "--config", str(self.config)],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def health(self) -> dict:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return _health(self.port) or {}

    def frames(self) -> int:
        cams = self.health().get("cameras", {})
        return sum(c["frames"] for c in cams.values())

    def produced(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines()]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Serve:
    """`facemoe serve` (a subprocess) on the boxes' database, as a UI on another machine."""

    def __init__(self, log: Path, config: Path) -> None:
        self.port, self.log = free_port(), log
        with log.open("a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--config", str(config), "--port",
                 str(self.port)], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def get(self, path: str) -> str:
        import urllib.error
        import urllib.request

        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return ""

    def json(self, path: str):  # noqa: ANN201
        text = self.get(path)
        return json.loads(text) if text else None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _cli(*args: object) -> str:
    done = subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _fleet(box: Box) -> dict[str, dict]:
    done = subprocess.run([sys.executable, "-m", "app.cli", "fleet", "--config", str(box.config),
                           "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    return {b["box"]: b for b in json.loads(done.stdout)["boxes"]}


def test_a_site_of_two_boxes_survives_database_and_broker_restarts(
        tmp_path, data_dir, tiny_model_dir, yunet_path, pg, no_gallery_key):
    mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt not installed")
    broker = Mosquitto(tmp_path / "broker", persistent=True)
    published: list[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="site-watcher",
                      clean_session=False)  # its queue is kept by the broker across restarts
    sub.on_connect = lambda c, *a: c.subscribe("facemoe/events", 1)
    sub.on_message = lambda c, u, m: published.append(json.loads(m.payload))
    sub.reconnect_delay_set(0.2, 1)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    base = {
        "model": {"dir": str(tiny_model_dir), "threads": 1, "batch_size": 8},
        "detector": {"model": str(yunet_path)},
        "tracker": {"max_missed": 3},
        "gallery": {"path": pg.url},
        "daemon": {"mqtt": {"host": "127.0.0.1", "port": broker.port, "reconnect_max_s": 1}},
    }
    uri = str(data_dir / "videos" / VIDEO)
    boxes = []

    def stored() -> int:
        return pg.sql("select count(*) from events")[0][0]

    try:
        for name in ("box-a", "box-b"):
            cam = {"name": f"stage-{name[-1]}", "uri": uri, "loop": True, "detect_every_n": 2}
            boxes.append(Box(name, tmp_path / name, {**base, "cameras": [cam]}))
            if len(boxes) == 1:  # the first creates the gallery's tables
                _wait("box-a running", lambda: boxes[0].frames() > 0, 90)
        _wait("frames from both boxes and stored events",
              lambda: all(b.frames() > 20 for b in boxes) and stored() >= 2, 90)

        # 1. a fast restart (every connection cut): video goes on, events go on being stored
        before, took = [b.frames() for b in boxes], pg.restart()
        t = time.monotonic()
        _wait("frames on both boxes after the restart",
              lambda: all(b.frames() >= n + 10 for b, n in zip(boxes, before, strict=True)), 10)
        resume_s = time.monotonic() - t
        n = stored()
        _wait("an event stored after the restart", lambda: stored() > n, 30)

        # 2. the broker restarts: messages wait in each box and are delivered after
        broker.stop()
        time.sleep(3)
        broker.start()

        # 3. an outage: video goes on, events wait in the outboxes, /healthz says why
        pg.stop()
        in_outage = [b.frames() for b in boxes]
        during = sum(len(b.produced()) for b in boxes)
        _wait("events produced while the database is down",
              lambda: sum(len(b.produced()) for b in boxes) >= during + 2, 60)
        degraded = [b for b in boxes if b.outbox.exists() and b.outbox.stat().st_size]
        assert degraded
        h = _wait("/healthz degraded by the gallery sink",
                  lambda: (h := degraded[0].health()) and any(
                      r.startswith("sink gallery:") for r in h["reasons"]) and h, 20)
        assert h["status"] == "degraded" and h["sinks"]["gallery"]["pending"] >= 1
        assert any(r.startswith("gallery: unreachable") for r in h["reasons"]), h["reasons"]
        assert stat.S_IMODE(degraded[0].outbox.stat().st_mode) == 0o600
        assert all(b.frames() > n + 10 for b, n in zip(boxes, in_outage, strict=True))
        pg.start()
        t = time.monotonic()
        back = [b.frames() for b in boxes]
        _wait("video on both boxes within 10 s of the recovery", lambda: all(
            b.frames() >= f + 10 for b, f in zip(boxes, back, strict=True)), 10)
        _wait("/healthz ok on both boxes once the database is back",
              lambda: all(b.health().get("status") == "ok" for b in boxes), 30)
        recover_s = time.monotonic() - t
        _wait("the outboxes replayed and emptied",
              lambda: all(b.outbox.stat().st_size == 0 for b in degraded), 30)

        # 4. a gallery change reaches both boxes
        enroll = subprocess.run(
            [sys.executable, "-m", "app.cli", "enroll", "Ada", str(data_dir / "videos" /
             "obama.jpg"), "--config", str(boxes[0].config)], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=300)
        assert enroll.returncode == 0, enroll.stderr[-2000:]
        t = time.monotonic()
        _wait("the enrollment reaching both boxes",
              lambda: all(b.health()["gallery"]["templates"] == 1 for b in boxes), 10)
        reach_s = time.monotonic() - t

        # a rename reaches both boxes
        version = max(b.health()["gallery"]["version"] for b in boxes)
        _cli("gallery", "rename", "Ada", "Ada Lovelace", "--config", boxes[0].config)
        t = time.monotonic()
        _wait("the rename reaching both boxes", lambda: all(
            (g := b.health()["gallery"])["version"] > version and g["templates"] == 1
            for b in boxes), 10)
        rename_s = time.monotonic() - t
        assert pg.sql("select name from identities") == [("Ada Lovelace",)]

        # 5. the fleet: both boxes and their cameras, from the database
        fleet = _wait("both boxes in `facemoe fleet`", lambda: (f := _fleet(boxes[0])) and len(
            f) == 2 and all(b["state"] == "ok" and b["cameras"] for b in f.values()) and f, 20)
        assert [c["name"] for c in fleet["box-a"]["cameras"]] == ["stage-a"]
        assert [c["name"] for c in fleet["box-b"]["cameras"]] == ["stage-b"]
        assert fleet["box-b"]["cameras"][0]["frames"] > 0 and not fleet["box-a"]["silent"]

        # ... and on `facemoe serve`'s fleet page and API (another program on the database)
        serve = Serve(tmp_path / "serve.log", boxes[0].config)
        try:
            api = _wait("both boxes on serve's /api/boxes", lambda: (
                a := serve.json("/api/boxes")) and len(a) == 2 and a, 90)
            assert {b["box"]: [c["name"] for c in b["cameras"]] for b in api} == {
                "box-a": ["stage-a"], "box-b": ["stage-b"]}
            cams = serve.json("/api/cameras")
            assert sorted((c["box"], c["name"], c["silent"]) for c in cams) == [
                ("box-a", "stage-a", False), ("box-b", "stage-b", False)]
            page = serve.get("/fleet")
            assert all(f'id="box-{b}"' in page for b in ("box-a", "box-b"))
            assert "stage-a" in page and "stage-b" in page and "SILENT</span> (was" not in page
        finally:
            serve.stop()

        # an erasure reaches both boxes: each acknowledges it and the tombstone goes
        _cli("gallery", "remove", "Ada Lovelace", "--config", boxes[0].config)
        _wait("the erasure acknowledged by both boxes",
              lambda: pg.sql("select count(*) from erasures")[0][0] == 0, 10)

        for b in boxes:
            assert b.stop() == 0, b.log.read_text()[-3000:]
        assert {b["state"] for b in _fleet(boxes[0]).values()} == {"stopped"}
        assert "Exception in thread" not in "".join(b.log.read_text() for b in boxes)
    finally:
        for b in boxes:
            b.kill()
    ends = [e["id"] for b in boxes for e in b.produced() if e["type"] == "end"]
    uids = [r[0] for r in pg.sql("select uid from events")]
    assert len(uids) == len(set(uids)), "a stored event is duplicated"
    assert sorted(uids) == sorted(ends), "produced and stored events differ"
    _wait("every event published", lambda: {e["id"] for e in published if e["type"] == "end"}
          >= set(ends), 20)
    sub.loop_stop()
    broker.stop()
    ids = [e["id"] for e in published if e["type"] == "end"]
    print(f"site of 2 boxes: restart {took:.2f} s, video resumed {resume_s:.2f} s after it; "
          f"{len(ends)} events produced = stored = published ({len(ids) - len(set(ids))} "
          f"duplicate MQTT deliveries), 0 stored duplicates; healthy {recover_s:.1f} s after "
          f"the database came back; an enrollment reached both boxes in {reach_s:.1f} s, a "
          f"rename in {rename_s:.1f} s")


def test_a_box_starts_while_its_database_is_down(tmp_path, data_dir, tiny_model_dir,
                                                 yunet_path, pg, no_gallery_key):
    """The box keeps a copy of the gallery it last read (0600): started again while the
    database is stopped, it processes video matching with that copy, says so in /healthz,
    keeps its events in the outbox, and stores them all once the database is back."""
    cfg = {
        "model": {"dir": str(tiny_model_dir), "threads": 1, "batch_size": 8},
        "detector": {"model": str(yunet_path)},
        "tracker": {"max_missed": 3},
        "gallery": {"path": pg.url},
        "cameras": [{"name": "stage", "loop": True, "detect_every_n": 2,
                     "uri": str(data_dir / "videos" / VIDEO)}],
        "daemon": {},
    }
    folder = tmp_path / "box"
    box = Box("box-s", folder, cfg)
    try:
        _wait("the box running", lambda: box.frames() > 10, 90)
        enroll = subprocess.run(
            [sys.executable, "-m", "app.cli", "enroll", "Ada",
             str(data_dir / "videos" / "obama.jpg"), "--config", str(box.config)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert enroll.returncode == 0, enroll.stderr[-2000:]
        _wait("the enrollment", lambda: box.health()["gallery"]["templates"] == 1, 10)
        assert box.stop() == 0
        copy = folder / "gallery-box-s.copy"
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600

        pg.stop()
        box = Box("box-s", folder, cfg)
        _wait("video while the database is down", lambda: box.frames() > 20, 90)
        h = box.health()
        assert h["status"] == "degraded" and h["gallery"]["templates"] == 1
        assert any(r.startswith("gallery: unreachable") for r in h["reasons"]), h["reasons"]
        _wait("events kept in the outbox", lambda: box.outbox.exists()
              and len(box.outbox.read_text().splitlines()) >= 2, 60)
        pg.start()
        _wait("/healthz ok once the database is back",
              lambda: box.health().get("status") == "ok", 30)
        _wait("the outbox replayed", lambda: box.outbox.stat().st_size == 0, 30)
        assert box.stop() == 0, box.log.read_text()[-3000:]
    finally:
        box.kill()
    ends = [e["id"] for e in box.produced() if e["type"] == "end"]
    uids = [r[0] for r in pg.sql("select uid from events")]
    assert sorted(uids) == sorted(ends) and len(uids) == len(set(uids))
