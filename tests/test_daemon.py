"""The daemon (`facemoe run`) against real local RTSP cameras on 127.0.0.1.

Two GstRtspServer subprocesses replay real clips (H.264 passed through, looped); the
daemon runs as a subprocess; one camera server is killed and restarted mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from app.config import AppConfig, CameraConfig
from app.sinks import RotatingJsonlSink
from benchmarks.rtsp_camera import RtspCamera, free_port, rtsp_available
from tests.conftest import kill_daemon, open_fds, stop_daemon
from tests.gallery_helpers import EVENT_KEYS, event

REPO_ROOT = Path(__file__).resolve().parent.parent
WALKING = "intel_face-demographics-walking.mp4"  # 35 frames, people walking towards the camera


def _get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
        return r.status, r.read()


def _healthz(port: int) -> tuple[int, dict]:
    """/healthz's status (503: degraded) and its JSON body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503: degraded, with the same JSON body
        return e.code, json.loads(e.read())


def _health(port: int) -> dict | None:
    """/healthz's JSON body; None while nothing answers."""
    try:
        return _healthz(port)[1]
    except OSError:
        return None


def _wait(what: str, cond, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


@pytest.mark.e2e
@pytest.mark.slow
def test_daemon_reconnects_and_shuts_down_cleanly(tmp_path, data_dir, tiny_model_dir, yunet_path):
    if not rtsp_available():
        pytest.skip("GstRtspServer typelib (gir1.2-gst-rtsp-server-1.0) not installed")
    videos = data_dir / "videos"
    cam_a = RtspCamera(videos / "short_hamilton_clip.mp4")
    cam_b = RtspCamera(videos / "intel_head-pose-face-detection-female.mp4")
    metrics_port = free_port()
    events_jsonl = tmp_path / "events.jsonl"
    gallery = tmp_path / "gallery.db"
    cfg = {
        "model": {"dir": str(tiny_model_dir), "threads": 1, "batch_size": 8},
        "detector": {"model": str(yunet_path)},
        "tracker": {"max_missed": 5},
        "gallery": {"path": str(gallery)},
        "cameras": [
            {"name": "a", "uri": cam_a.url, "detect_every_n": 2},
            {"name": "b", "uri": cam_b.url},
        ],
        "daemon": {
            "metrics_port": metrics_port,
            "stats_interval_s": 2,
            "frame_timeout_s": 2,
            "reconnect": {"initial_s": 0.5, "max_s": 1.0},
            "jsonl": {"path": str(events_jsonl)},
            "sqlite_commit_s": 0.5,
            "snapshots": {"dir": str(tmp_path / "snaps")},
            "shutdown_timeout_s": 5,
        },
    }
    AppConfig.model_validate(cfg)
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "daemon.log"
    daemon = None
    try:
        cam_a.start()
        cam_b.start()
        with log_path.open("w") as log_file:
            cmd = [sys.executable, "-m", "app.cli", "run", "--config", str(config)]
            daemon = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

        def cams():
            assert daemon.poll() is None, log_path.read_text()[-3000:]
            h = _health(metrics_port)
            return h["cameras"] if h else None

        _wait(
            "frames from both cameras",
            lambda: (c := cams()) and c["a"]["frames"] > 10 and c["b"]["frames"] > 10,
            40,
        )
        cam_a.kill()
        _wait("camera a to fail and reconnect", lambda: cams()["a"]["reconnects"] >= 1, 15)
        at_restart = cams()
        assert at_restart["a"]["state"] != "running"
        cam_a.start()
        _wait(
            "camera a to resume and camera b to go on",
            lambda: (
                (c := cams())["a"]["frames"] > at_restart["a"]["frames"] + 10
                and c["a"]["state"] == "running"
                and c["b"]["frames"] > at_restart["b"]["frames"] + 10
            ),
            25,
        )

        # a hung camera (TCP open, no data): no frame for frame_timeout_s -> reconnect
        before = cams()["a"]
        os.kill(cam_a.proc.pid, signal.SIGSTOP)
        _wait("camera a to time out", lambda: cams()["a"]["reconnects"] > before["reconnects"], 15)
        os.kill(cam_a.proc.pid, signal.SIGCONT)
        _wait(
            "camera a to resume after the hang",
            lambda: (
                (c := cams())["a"]["frames"] > before["frames"] + 10
                and c["a"]["state"] == "running"
            ),
            25,
        )

        status, body = _get(metrics_port, "/metrics")
        text = body.decode()
        assert status == 200
        assert 'facemoe_reconnects_total{camera="a"}' in text
        assert 'facemoe_frames_total{camera="b"}' in text
        assert "facemoe_stage_seconds_bucket" in text
        health = _health(metrics_port)
        assert health["cameras"]["b"]["reconnects"] == 0

        daemon.send_signal(signal.SIGHUP)
        _wait("the gallery reload", lambda: "gallery reloaded" in log_path.read_text(), 5)
        t = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(15)
        stop_s = time.monotonic() - t
        log_text = log_path.read_text()
        assert rc == 0, log_text[-3000:]
        assert stop_s < 10, f"stopped in {stop_s:.1f} s"
        assert "stats a[" in log_text
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(5)
        cam_a.kill()
        cam_b.kill()

    lines = [json.loads(line) for line in events_jsonl.read_text().splitlines()]
    with sqlite3.connect(gallery) as db:
        rows = db.execute("select camera, track_id from events order by id").fetchall()
    assert len(lines) > 0, log_text[-3000:]
    assert sorted((e["camera"], e["track_id"]) for e in lines) == sorted(rows)
    assert {e["camera"] for e in lines} <= {"a", "b"}
    for e in lines:
        assert set(e) == EVENT_KEYS
        assert e["end"] >= e["start"]
    snaps = list((tmp_path / "snaps").glob("*/*.jpg"))
    assert 0 < len(snaps) <= len(lines)  # best face per event (events without a crop have none)
    print(f"daemon: {len(lines)} events, {len(snaps)} snapshots, stopped in {stop_s:.2f} s")


@pytest.mark.unit
def test_rotating_jsonl_keeps_backups(tmp_path):
    path = tmp_path / "ev.jsonl"
    sink = RotatingJsonlSink(path, max_bytes=800, backups=2)
    sink.write([event(i, None) for i in range(20)])
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock")  # writers' lock
    assert files == ["ev.jsonl", "ev.jsonl.1", "ev.jsonl.2"]
    ids = [
        json.loads(line)["track_id"]
        for name in ("ev.jsonl.2", "ev.jsonl.1", "ev.jsonl")
        for line in (tmp_path / name).read_text().splitlines()
    ]
    assert ids == sorted(ids) and ids[-1] == 19  # newest last, oldest rotated away
    assert all((tmp_path / n).stat().st_size < 1200 for n in files)


@pytest.mark.unit
def test_frame_queue_drops_oldest_frames_but_keeps_markers():
    from app.daemon import _RECONNECT, FrameQueue

    q = FrameQueue(2)
    assert [q.put(x) for x in ("f0", _RECONNECT, "f1", "f2", "f3")] == [False] * 3 + [True] * 2
    items = [q.take() for _ in range(len(q))]
    assert items[0] is _RECONNECT and [i[1] for i in items[1:]] == ["f2", "f3"]
    assert q.take() is None and len(q) == 0


@pytest.mark.unit
def test_camera_config_validation():
    base = {"cameras": [{"name": "door", "uri": "rtsp://127.0.0.1:8554/door"}]}
    cfg = AppConfig.model_validate(base)
    assert cfg.cameras[0].enabled and cfg.daemon.metrics_port == 0
    with pytest.raises(ValueError, match="unique"):
        AppConfig.model_validate({"cameras": base["cameras"] * 2})
    with pytest.raises(ValueError):
        AppConfig.model_validate({"cameras": [{"name": "x", "uri": "a", "fps": 3}]})
    with pytest.raises(ValueError):
        AppConfig.model_validate({"daemon": {"webhook": {"url": "ftp://x"}}})


@pytest.mark.e2e
@pytest.mark.slow
def test_person_enrolled_while_running_is_matched_without_restart(tmp_path, data_dir):
    """Another process enrolls Lin-Manuel Miranda into the running daemon's gallery: the daemon
    (a looped file camera, the shipped model) names him on the next pass of his close-up."""
    videos = data_dir / "videos"
    events_jsonl = tmp_path / "events.jsonl"
    gallery = tmp_path / "gallery.db"
    metrics_port = free_port()
    cfg = {
        "gallery": {"path": str(gallery)},
        "cameras": [
            {"name": "stage", "uri": str(videos / "short_hamilton_clip.mp4"), "loop": True}
        ],
        "daemon": {
            "metrics_port": metrics_port,
            "jsonl": {"path": str(events_jsonl)},
            "sqlite_commit_s": 0.5,
            "shutdown_timeout_s": 5,
        },
    }
    AppConfig.model_validate(cfg)
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "daemon.log"

    def identities():
        if not events_jsonl.exists():
            return []
        return [json.loads(line)["identity"] for line in events_jsonl.read_text().splitlines()]

    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "run", "--config", str(config)],
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait(
            "the daemon's first events",
            lambda: daemon.poll() is None and len(identities()) >= 3,
            60,
        )
        assert not [i for i in identities() if i]  # nobody enrolled yet: all unknown
        enrolled = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "enroll",
                "Lin-Manuel Miranda",
                str(videos / "lin-manuel-miranda.png"),
                "--gallery",
                str(gallery),
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert enrolled.returncode == 0, enrolled.stderr[-2000:]
        _wait(
            "an event naming the newly enrolled person",
            lambda: daemon.poll() is None and "Lin-Manuel Miranda" in identities(),
            60,
        )
        stop_daemon(daemon, log_path, 15)
    finally:
        kill_daemon(daemon)


@pytest.mark.unit
def test_a_camera_runs_without_the_daemon(data_dir, no_gallery_key):
    """A camera gets its pipeline, the settings, a stop event, the metrics and a put callback:
    it reads a file camera to its end, wakes the worker per item, and counts what it did."""
    import threading

    import numpy as np

    from app.config import DaemonConfig, load_config
    from app.daemon import _RECONNECT, Camera, Metrics
    from app.match import Matcher
    from app.pipeline import FacePipeline
    from app.runtime import make_detector, make_embedder

    cfg = load_config()
    embedder = make_embedder(cfg)
    nobody = Matcher([], np.zeros((0, embedder.dim), np.float32), 0.5)
    cc = CameraConfig(name="hall", uri=str(data_dir / "videos" / WALKING))
    puts = []
    metrics = Metrics()
    cam = Camera(cc, FacePipeline("hall", cfg, make_detector(cfg), embedder, lambda: nobody),
                 DaemonConfig(frame_queue=100), threading.Event(), metrics,
                 lambda: puts.append(len(cam.queue)))
    assert not [k for k, v in vars(cam).items() if type(v).__name__ == "Daemon"]
    cam.thread.start()
    cam.thread.join(30)
    assert cam.state == "finished" and cam.error == "end of stream" and cam.reconnects == 0
    assert len(puts) == 36 and puts[-1] == 36  # 35 frames and the end-of-stream marker
    events = []
    while (item := cam.take()) is not None:
        events += cam.flush() if item is _RECONNECT else cam.process(*item)
    assert cam.frames == 35 and cam.dropped == 0
    ends = [e for e in events if e.type == "end"]
    assert ends and cam.events == len(ends) and cam.last_event is not None
    text = generate_latest(metrics.registry).decode()
    assert 'facemoe_frames_total{camera="hall"} 35.0' in text
    assert f'facemoe_events_total{{camera="hall"}} {len(ends)}.0' in text


@pytest.mark.unit
def test_snapshots_cut_the_best_face_and_every_sink_names_them(tmp_path, data_dir,
                                                               no_gallery_key):
    """Snapshots are a sink written first: each end event in the JSONL file and the gallery
    names its snapshot, a private JPEG of the face at the event's best_bbox (the one
    best-face rule) with its margin; the gallery's batched commit is flushed at the end."""
    import stat

    import cv2

    from app.daemon import Daemon
    from app.source import open_source

    snaps, jsonl = tmp_path / "snaps", tmp_path / "events.jsonl"
    cfg = AppConfig.model_validate({
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "cameras": [{"name": "hall", "uri": str(data_dir / "videos" / WALKING)}],
        "daemon": {"jsonl": {"path": str(jsonl)}, "snapshots": {"dir": str(snaps)},
                   "sqlite_commit_s": 3600},
    })
    daemon = Daemon(cfg)
    try:
        cam = daemon.cameras[0]
        for w in daemon.workers.values():
            w.start()
        with open_source(cam.cc.uri) as src:
            for frame in src:
                size = frame.size
                daemon._emit(cam, cam.process(time.monotonic(), frame))
        daemon._emit(cam, cam.flush())
        daemon.stop_sinks(time.monotonic() + 30)  # every sink written and closed
        stored = {e.id: e for e in daemon.gallery.events()}
        pictures = [daemon.gallery.pages.event_snapshot_jpeg(s.id)
                    for s in daemon.gallery.stored_events()]
    finally:
        daemon.gallery.close()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines and {e["id"] for e in lines} == set(stored)
    assert stat.S_IMODE(snaps.stat().st_mode) == stat.S_IMODE((snaps / "hall").stat().st_mode)
    assert stat.S_IMODE((snaps / "hall").stat().st_mode) == 0o700
    for e in lines:
        assert e["snapshot"] == str(snaps / "hall" / f"{e['id']}.jpg")
        assert stored[e["id"]].snapshot is None  # the gallery keeps the picture, not a path
        path = Path(e["snapshot"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        x, y, w, h = e["best_bbox"]
        x0, y0 = max(0, int(x - 0.2 * w)), max(0, int(y - 0.2 * h))
        x1, y1 = min(size[0], int(x + 1.2 * w)), min(size[1], int(y + 1.2 * h))
        assert cv2.imread(str(path)).shape[:2] == (y1 - y0, x1 - x0)
    assert sorted(p.name for p in (snaps / "hall").iterdir()) == sorted(
        f"{e['id']}.jpg" for e in lines)
    assert len(pictures) == len(lines) and all(p[:3] == b"\xff\xd8\xff" for p in pictures)


@pytest.mark.unit
@pytest.mark.slow
def test_daemon_dead_camera_keeps_descriptors_flat(tmp_path: Path, tiny_model_dir: Path,
                                                   yunet_path: Path, no_gallery_key) -> None:
    from app.config import AppConfig
    from app.daemon import Daemon

    cfg = AppConfig.model_validate({
        "model": {"dir": str(tiny_model_dir), "threads": 1},
        "detector": {"model": str(yunet_path)},
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "cameras": [{"name": "dead", "uri": f"rtsp://127.0.0.1:{free_port()}/cam"}],
        "daemon": {"frame_timeout_s": 2, "reconnect": {"initial_s": 0.01, "max_s": 0.01}},
    })
    daemon = Daemon(cfg)
    cam = daemon.cameras[0]
    cam.thread.start()
    try:
        deadline = time.monotonic() + 120
        while cam.reconnects < 10:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = open_fds()
        while cam.reconnects < 110:
            assert time.monotonic() < deadline, f"only {cam.reconnects} reconnects"
            time.sleep(0.05)
        after = open_fds()
    finally:
        daemon.stopping.set()
        cam.thread.join(10)
        daemon.gallery.close()
    assert after - before <= 2, (before, after)



@pytest.mark.unit
def test_healthz_degraded_on_drops_sink_failure_and_reconnect(
        tmp_path: Path, data_dir: Path, tiny_model_dir: Path, yunet_path: Path,
        no_gallery_key) -> None:
    import threading

    from app.config import AppConfig
    from app.daemon import Daemon
    from tests.gallery_helpers import event

    port = free_port()
    cfg = AppConfig.model_validate({
        "model": {"dir": str(tiny_model_dir), "threads": 1},
        "detector": {"model": str(yunet_path)},
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "cameras": [{"name": "door", "loop": True,
                     "uri": str(data_dir / "videos" / "short_hamilton_clip.mp4")},
                    {"name": "dead", "uri": f"rtsp://127.0.0.1:{free_port()}/cam",
                     "enabled": True}],
        "daemon": {"metrics_port": port, "frame_queue": 1, "frame_timeout_s": 2,
                   "reconnect": {"initial_s": 0.2, "max_s": 0.2},
                   "jsonl": {"path": "/dev/full"},  # every write fails: ENOSPC
                   "health": {"window_s": 3, "max_drop_rate": 0.5}},
    })
    daemon = Daemon(cfg)
    door, dead = daemon.cameras
    daemon._serve_http()
    threading.Thread(target=daemon._monitor, daemon=True).start()
    door.thread.start()
    dead.thread.start()
    try:
        # no worker yet: the queue of one frame overflows, nearly every frame is dropped
        def dropping() -> tuple[int, dict] | None:
            code, h = _healthz(port)
            problems = [h["cameras"][c]["problem"] or "" for c in ("door", "dead")]
            ok = problems[0].startswith("dropped") and problems[1].startswith("reconnecting")
            return (code, h) if ok else None

        code, h = _wait("drops to show", dropping, 20)
        assert code == 503 and h["status"] == "degraded"
        assert "camera door: dropped" in " ".join(h["reasons"])
        assert any(r.startswith("camera dead: reconnecting") for r in h["reasons"])
        # a worker that keeps up: the drops leave the window
        threading.Thread(target=daemon._work, daemon=True).start()
        _wait("drops to clear", lambda: _healthz(port)[1]["cameras"]["door"]["problem"] is None,
               30)
        daemon.workers["jsonl"].start().put([event(1)])  # the JSONL sink's own thread
        code, h = _wait("the failed write to show", lambda: (r := _healthz(port))[0] == 503
                         and any(x.startswith("sink jsonl") for x in r[1]["reasons"]) and r, 10)
        assert any(r.startswith("sink jsonl: failed") and "No space left" in r
                   for r in h["reasons"]), h["reasons"]
        assert "camera door" not in " ".join(h["reasons"])
    finally:
        daemon.stopping.set()
        for cam in daemon.cameras:
            cam.thread.join(10)
        daemon.http.shutdown()
        daemon.gallery.close()


@pytest.mark.unit
def test_daemon_refuses_plain_snapshots_of_an_encrypted_gallery(
        tmp_path: Path, tiny_model_dir: Path, yunet_path: Path, monkeypatch) -> None:
    import base64

    from app.config import AppConfig, ConfigError
    from app.daemon import Daemon

    monkeypatch.delenv("FACEMOE_GALLERY_KEY_FILE", raising=False)
    monkeypatch.setenv("FACEMOE_GALLERY_KEY", base64.b64encode(os.urandom(32)).decode())
    raw = {"model": {"dir": str(tiny_model_dir), "threads": 1},
           "detector": {"model": str(yunet_path)},
           "gallery": {"path": str(tmp_path / "gallery.db")},
           "cameras": [{"name": "a", "uri": f"rtsp://127.0.0.1:{free_port()}/x"}],
           "daemon": {"snapshots": {"dir": str(tmp_path / "snaps")}}}
    with pytest.raises(ConfigError, match="encrypted"):
        Daemon(AppConfig.model_validate(raw))
    raw["daemon"]["snapshots"]["allow_unencrypted"] = True
    daemon = Daemon(AppConfig.model_validate(raw))
    try:
        import dataclasses

        import numpy as np

        from tests.gallery_helpers import event

        ev = dataclasses.replace(event(1), snapshot=str(tmp_path / "snaps" / "a" / "x.jpg"),
                                 snapshot_image=np.zeros((32, 32, 3), np.uint8))
        daemon._sinks["snapshots"].write([ev])
    finally:
        daemon.gallery.close()
    assert os.stat(tmp_path / "snaps").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "snaps" / "a").st_mode & 0o777 == 0o700
    assert os.stat(ev.snapshot).st_mode & 0o777 == 0o600


@pytest.mark.unit
@pytest.mark.slow
def test_stalled_http_clients_are_dropped_without_tracebacks(
        tmp_path: Path, tiny_model_dir: Path, yunet_path: Path, monkeypatch, caplog,
        no_gallery_key) -> None:
    import logging
    import socket
    import threading

    import app.daemon.http as daemon_http
    from app.config import AppConfig
    from app.daemon import Daemon

    monkeypatch.setattr(daemon_http, "_HTTP_TIMEOUT_S", 1.0)
    port = free_port()
    daemon = Daemon(AppConfig.model_validate({
        "model": {"dir": str(tiny_model_dir), "threads": 1},
        "detector": {"model": str(yunet_path)},
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "cameras": [{"name": "a", "uri": f"rtsp://127.0.0.1:{free_port()}/x"}],
        "daemon": {"metrics_port": port}}))
    daemon._serve_http()
    try:
        baseline = threading.active_count()
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        for s in stalled[:5]:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # a request that never ends
        time.sleep(0.3)
        assert threading.active_count() <= baseline + 16
        time.sleep(1.5)  # past the timeout: every stalled connection is closed
        code, health = _healthz(port)
        assert code == 503 and health["cameras"]["a"]["state"] == "starting"
        _wait("threads to be released", lambda: threading.active_count() <= baseline + 1, 10)
        for s in stalled:
            s.close()
    finally:
        daemon.http.shutdown()
        daemon.gallery.close()
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
