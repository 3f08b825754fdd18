"""Reliability under long runs and hostile inputs (issue 12): descriptors, temporaries, limits."""

from __future__ import annotations

import gc
import os
import re
import time
from pathlib import Path

import pytest

from app.source import SourceError, open_source
from benchmarks.rtsp_camera import free_port
from tests.conftest import facemoe

pytestmark = pytest.mark.unit


def _fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_source_open_close_keeps_descriptors_flat(data_dir: Path) -> None:
    clip = str(data_dir / "videos" / "short_hamilton_clip.mp4")
    dead = f"rtsp://127.0.0.1:{free_port()}/cam"
    for _ in range(3):  # warm-up: GStreamer loads plugins and starts its shared threads once
        with open_source(clip) as src:
            next(iter(src))
        with pytest.raises(SourceError):
            open_source(dead, timeout=2)
    before = _fds()
    for _ in range(200):
        with open_source(clip) as src:
            next(iter(src))
    after_files = _fds()
    for _ in range(200):
        with pytest.raises(SourceError):
            open_source(dead, timeout=2)
    after_failed = _fds()
    assert after_files - before <= 2, (before, after_files)
    assert after_failed - before <= 2, (before, after_failed)


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
        before = _fds()
        while cam.reconnects < 110:
            assert time.monotonic() < deadline, f"only {cam.reconnects} reconnects"
            time.sleep(0.05)
        after = _fds()
    finally:
        daemon.stopping.set()
        cam.thread.join(10)
        daemon.gallery.close()
    assert after - before <= 2, (before, after)


def test_repeated_log_lines_are_collapsed() -> None:
    import logging

    from app.logs import RepeatFilter

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.repeat")
    handler = Keep()
    repeat = RepeatFilter(window_s=0.2)
    handler.addFilter(repeat)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(1000):
            logger.error("camera %s: down", "a")
        logger.error("camera %s: down", "b")
        time.sleep(0.25)
        logger.error("camera %s: down", "a")
    finally:
        logger.removeHandler(handler)
    assert records == ["camera a: down", "camera b: down",
                       "camera a: down (repeated 999 more time(s) before)"]


def test_systemd_unit_bounds_descriptors() -> None:
    unit = (Path(__file__).resolve().parent.parent / "deploy" / "facemoe.service").read_text()
    assert "\nLimitNOFILE=" in unit


# --- temporaries ---------------------------------------------------------------------------


def _plant(directory: Path, names: list[str], victim: Path) -> None:
    for name in names:
        (directory / name).symlink_to(victim)


def test_export_does_not_follow_a_planted_temporary(tmp_path: Path, no_gallery_key) -> None:
    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import crops, unit

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    # every name the old code could pick (it used the pid) and the VideoWriter's ".part"
    _plant(out, [f".g.zip.{pid}.tmp" for pid in range(os.getpid() - 5, os.getpid() + 5)],
           victim)
    rng = np.random.default_rng(0)
    with Gallery(tmp_path / "a.db", "facemoe-edge", "0.1.0") as g:
        g.enroll("alice", unit(rng, 2), ["a", "b"], [0.5, 0.5], crops(rng, 2))
        with pytest.raises(Exception, match="is a directory"):
            g.export(out)
        g.export(out / "g.zip")
    assert victim.read_text() == "precious\n"
    assert os.stat(out / "g.zip").st_mode & 0o777 == 0o600


def test_annotated_video_does_not_follow_a_planted_part_file(tmp_path: Path) -> None:
    import numpy as np

    from app.source import VideoWriter

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "out.mp4"
    _plant(tmp_path, ["out.mp4.part"], victim)
    with VideoWriter(target, 25.0, (64, 48)) as writer:
        for i in range(10):
            writer.write(np.full((48, 64, 3), i * 20, np.uint8))
    assert victim.read_text() == "precious\n"
    assert os.stat(target).st_mode & 0o777 == 0o600
    with open_source(str(target)) as src:
        assert len(list(src)) == 10
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(SourceError, match="is a directory"):
        VideoWriter(tmp_path, 25.0, (64, 48))


def test_manifest_write_does_not_follow_a_planted_temporary(tmp_path: Path) -> None:
    from trainer.manifest import write_json_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    _plant(tmp_path, ["manifest.json.tmp"], victim)
    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "manifest.json").read_text() == '{\n  "a": 1\n}\n'


def test_process_refuses_directory_targets_before_work(tmp_path: Path, data_dir: Path) -> None:
    import subprocess
    import sys

    clip = data_dir / "videos" / "short_hamilton_clip.mp4"
    for flag in ("--annotate", "--events"):
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "process", str(clip), flag, str(tmp_path),
             "--gallery", str(tmp_path / "none.db")],
            capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).resolve().parent.parent)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"facemoe: error: {flag} {tmp_path} is a directory; give a file name"]


# --- config ranges -------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", ["-1", "2.5", ".nan", "1"])
@pytest.mark.parametrize("command", ["process", "run"])
def test_validate_config_refuses_thresholds_out_of_range(tmp_path: Path, command: str,
                                                         threshold: str) -> None:
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"matching:\n  min_frames: 2\n  threshold: {threshold}\n")
    proc = facemoe(command, "--config", str(cfg), "--validate-config")
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "matching.threshold (line 3)" in lines[0], proc.stderr
    assert "(-1, 1)" in lines[0]


def test_validate_config_warns_outside_sane_band_and_accepts(tmp_path: Path) -> None:
    cfg = tmp_path / "app.yaml"  # run refuses a config without a camera
    cfg.write_text("matching:\n  threshold: -0.5\ncameras:\n  - name: door\n"
                   "    uri: /dev/video0\n")
    proc = facemoe("run", "--config", str(cfg), "--validate-config")
    assert proc.returncode == 0 and proc.stdout.strip() == "config ok", proc.stderr
    assert "almost everyone will be named" in proc.stderr


def test_config_reports_every_error_with_lines(tmp_path: Path) -> None:
    from app.config import ConfigError, load_config

    cfg = tmp_path / "app.yaml"
    cfg.write_text(
        "embed:\n"
        "  every_n: 0\n"            # line 2: would raise ValueError in process
        "  min_gain: -1\n"          # line 3
        "daemon:\n"
        "  metrics_port: 70000\n"   # line 5
        "  reconnect:\n"
        "    initial_s: 10\n"
        "    max_s: 1\n"            # line 8 area: max_s < initial_s
        "  mqtt:\n"
        "    host: localhost\n"
        "    port: 0\n"             # line 11
        "cameras:\n"
        "  - name: a\n"
        "    uri: rtsp://127.0.0.1/x\n"
        "    threshold: 3\n")       # line 15
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    text = str(info.value)
    assert "\n" not in text and "6 errors" in text, text
    for part in ("embed.every_n (line 2)", "embed.min_gain (line 3)",
                 "daemon.metrics_port (line 5)", "daemon.reconnect (line 7)",
                 "daemon.mqtt.port (line 11)", "cameras.0.threshold (line 15)"):
        assert part in text, (part, text)


def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "app.yaml"
    cfg.write_bytes(b"gallery:\n  path: caf\xe9.db\n")
    proc = facemoe("process", "--config", str(cfg), "--validate-config")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"facemoe: error: {cfg}: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"]


def test_shipped_configs_still_validate() -> None:
    """Each shipped app config loads, and what it resolves to is itself a valid config that
    means the same (the resolved config written next to outputs can be read back)."""
    from app.config import AppConfig, load_config

    root = Path(__file__).resolve().parent.parent / "configs"
    shipped = sorted(root.glob("app*.yaml"))
    assert shipped
    for path in shipped:
        cfg = load_config(path)
        assert AppConfig.model_validate(cfg.model_dump(mode="json")) == cfg, path


# --- health and sinks ----------------------------------------------------------------------


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


def _healthz(port: int) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _until(what: str, cond, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


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

        code, h = _until("drops to show", dropping, 20)
        assert code == 503 and h["status"] == "degraded"
        assert "camera door: dropped" in " ".join(h["reasons"])
        assert any(r.startswith("camera dead: reconnecting") for r in h["reasons"])
        # a worker that keeps up: the drops leave the window
        threading.Thread(target=daemon._work, daemon=True).start()
        _until("drops to clear", lambda: _healthz(port)[1]["cameras"]["door"]["problem"] is None,
               30)
        daemon.workers["jsonl"].start().put([event(1)])  # the JSONL sink's own thread
        code, h = _until("the failed write to show", lambda: (r := _healthz(port))[0] == 503
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


# --- privacy -------------------------------------------------------------------------------


def test_gallery_remove_erases_jsonl_lines_and_snapshots(tmp_path: Path,
                                                          default_model_dir: Path,
                                                          no_gallery_key) -> None:
    import dataclasses
    import json

    import numpy as np
    import yaml

    from app.gallery import Gallery
    from app.sinks import JsonlSink
    from tests.gallery_helpers import event
    from trainer.manifest import model_id, read_manifest

    snaps, jsonl, extra = tmp_path / "snaps", tmp_path / "ev" / "events.jsonl", tmp_path / "p.jsonl"
    jsonl.parent.mkdir()
    ada = [dataclasses.replace(event(i, "Ada"), snapshot=str(snaps / "cam0" / f"{event(i).id}.jpg"))
           for i in (1, 2, 3)]
    bob = dataclasses.replace(event(4, "Bob"), candidate="Ada", candidate_score=0.3)
    unknown = dataclasses.replace(event(5, None), candidate="Ada", candidate_score=0.2)
    (snaps / "cam0").mkdir(parents=True)
    for ev in [*ada, bob]:
        (snaps / "cam0" / f"{ev.id}.jpg").write_bytes(b"\xff\xd8jpeg")
    for path, events in ((jsonl.with_name("events.jsonl.1"), [ada[0], bob]),
                         (jsonl, [ada[1], unknown]), (extra, [ada[2]])):
        sink = JsonlSink(path)
        sink.write(events)
        sink.close()
    dim = int(read_manifest(default_model_dir)["embedding_dim"])
    db = tmp_path / "g.db"
    with Gallery(db, *model_id(read_manifest(default_model_dir))) as g:
        g.enroll("Ada", np.random.default_rng(0).normal(size=(1, dim)), ["a.jpg"], [0.9])
        g.add_events([ada[0], ada[1], bob])
    cfg = tmp_path / "app.yaml"
    cfg.write_text(yaml.safe_dump({"daemon": {"jsonl": {"path": str(jsonl)},
                                              "snapshots": {"dir": str(snaps)}}}))
    proc = facemoe("gallery", "remove", "Ada", "--gallery", str(db), "--config", str(cfg),
                "--events-jsonl", str(extra), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["events_deleted"] == 2
    assert report["jsonl_lines_removed"] == 3 and report["jsonl_candidates_cleared"] == 2
    assert len(report["jsonl_files_rewritten"]) == 3 and report["errors"] == []
    assert sorted(report["snapshots_deleted"]) == sorted(ev.snapshot for ev in ada)
    assert [p.name for p in (snaps / "cam0").iterdir()] == [f"{bob.id}.jpg"]
    everything = "".join(p.read_text() for p in (jsonl, jsonl.with_name("events.jsonl.1"), extra))
    assert "Ada" not in everything
    assert [json.loads(x)["track_id"] for x in everything.splitlines()] == [5, 4]
    assert os.stat(jsonl).st_mode & 0o777 == 0o600
    with Gallery(db, *model_id(read_manifest(default_model_dir))) as g:
        assert [s.event.candidate for s in g.stored_events()] == [None]


@pytest.mark.parametrize("name", ["Ada\u200bLovelace", "Ada\u202eecalevoL", "\u2066Ada\u2069",
                                  "Ada\ufeff"])
def test_names_with_invisible_characters_are_refused(tmp_path: Path, name: str,
                                                     no_gallery_key) -> None:
    import numpy as np

    from app.gallery import Gallery, GalleryError
    from tests.gallery_helpers import unit

    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as g:
        with pytest.raises(GalleryError, match="invisible format characters"):
            g.enroll(name, unit(np.random.default_rng(0), 1), ["a"], [0.5])
        g.enroll("Ada Lovelace", unit(np.random.default_rng(0), 1), ["a"], [0.5])
        with pytest.raises(GalleryError, match="invisible"):
            g.rename("Ada Lovelace", name)


def test_audit_names_the_real_user_not_logname(tmp_path: Path, monkeypatch,
                                               no_gallery_key) -> None:
    import pwd

    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import unit

    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "mallory")
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as g:
        g.enroll("Ada", unit(np.random.default_rng(0), 1), ["a"], [0.5])
        users = {row.user for row in g.audit()}
    assert users == {pwd.getpwuid(os.getuid()).pw_name}


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


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 2 MiB tmpfs (needs root; skipped elsewhere), unmounted afterwards."""
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_gallery_reads_work_on_a_full_disk(full_disk: Path, default_model_dir: Path,
                                           no_gallery_key) -> None:
    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import event
    from trainer.manifest import model_id, read_manifest

    db = full_disk / "g.db"
    manifest = read_manifest(default_model_dir)
    with Gallery(db, *model_id(manifest)) as g:  # the disk fills while it is open
        g.enroll("Ada", np.random.default_rng(0).normal(size=(2, manifest["embedding_dim"])),
                 ["a.jpg", "b.jpg"], [0.9, 0.8])
        g.add_events([event(1, "Ada")])
        fd = os.open(full_disk / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
    for action, expected in (("check", f"{db}: ok"), ("list", "Ada\t2\t"),
                             ("events", "    id  camera")):
        proc = facemoe("gallery", action, "--gallery", str(db))
        assert proc.returncode == 0, (action, proc.stderr)
        assert proc.stdout.startswith(expected), (action, proc.stdout)


# --- corruption ----------------------------------------------------------------------------


def _flip_bit(db: Path, template_id: int, byte: int, bit: int) -> None:
    import sqlite3

    con = sqlite3.connect(db)
    (blob,) = con.execute("SELECT vector FROM templates WHERE id = ?", (template_id,)).fetchone()
    data = bytearray(blob)
    data[byte] ^= 1 << bit
    con.execute("UPDATE templates SET vector = ? WHERE id = ?", (bytes(data), template_id))
    con.commit()
    con.close()


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [False, True])
def test_one_flipped_bit_is_found_and_only_that_template_is_left_out(
        tmp_path: Path, data_dir: Path, default_model_dir: Path, monkeypatch,
        encrypted: bool) -> None:
    import base64

    from app.gallery import Gallery
    from trainer.manifest import model_id, read_manifest

    monkeypatch.delenv("FACEMOE_GALLERY_KEY_FILE", raising=False)
    monkeypatch.delenv("FACEMOE_GALLERY_KEY", raising=False)
    if encrypted:
        monkeypatch.setenv("FACEMOE_GALLERY_KEY", base64.b64encode(os.urandom(32)).decode())
    db = tmp_path / "g.db"
    videos = data_dir / "videos"
    for name, photo in (("Barack Obama", "obama-240p.jpg"), ("Joe Biden", "biden.jpg")):
        proc = facemoe("enroll", name, str(videos / photo), "--gallery", str(db), timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert facemoe("gallery", "check", "--gallery", str(db)).returncode == 0
    # a low mantissa bit of one float: the vector stays finite and (nearly) unit length
    _flip_bit(db, 1, byte=(40 if encrypted else 4 * 17), bit=0)
    proc = facemoe("gallery", "check", "--gallery", str(db))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"facemoe: error: gallery {db} has 1 corrupt template(s) (re-enroll them or restore "
        "from a backup or an export): 'Barack Obama' template 1: checksum mismatch"]
    with Gallery(db, *model_id(read_manifest(default_model_dir)), create=False) as g:
        names, matrix = g.matrix()
        assert names == ["Joe Biden"] and matrix.shape[0] == 1
        assert [str(c) for c in g.corrupt_templates] == [
            "'Barack Obama' template 1: checksum mismatch"]


def test_template_without_checksum_is_still_checked(tmp_path: Path, no_gallery_key) -> None:
    """Rows of older releases have no checksum: a vector that is no longer unit length, or
    not finite, is still found."""
    import sqlite3

    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import unit

    db = tmp_path / "g.db"
    with Gallery(db, "facemoe-edge", "0.1.0") as g:
        g.enroll("Ada", unit(np.random.default_rng(0), 2), ["a", "b"], [0.5, 0.5])
    con = sqlite3.connect(db)
    con.execute("UPDATE templates SET checksum = NULL")
    con.commit()
    con.close()
    _flip_bit(db, 2, byte=3, bit=6)  # an exponent bit of the first float
    with Gallery(db, "facemoe-edge", "0.1.0") as g:
        problems = g.verify()
        assert len(problems) == 1 and problems[0].template_id == 2
        assert "not unit length" in problems[0].problem or "non-finite" in problems[0].problem
        assert g.matrix()[1].shape[0] == 1


# --- enrollment inputs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def obama_box(data_dir: Path, detector):
    import cv2

    image = cv2.imread(str(data_dir / "videos" / "obama-1080p.jpg"))
    (det,) = detector.detect(image)
    return image, det


def test_huge_photo_is_detected_on_a_small_copy(tmp_path: Path, obama_box, detector) -> None:
    """8000x8000 (the 1080p photo enlarged onto a square canvas): found in seconds."""
    import cv2
    import numpy as np

    from app.enroll import ImageLimits, faces_from_image

    image, _ = obama_box
    canvas = np.zeros((8000, 8000, 3), np.uint8)
    big = cv2.resize(image, (8000, 4500), interpolation=cv2.INTER_LINEAR)
    canvas[1750:6250] = big
    path = tmp_path / "huge.jpg"
    cv2.imwrite(str(path), canvas, [cv2.IMWRITE_JPEG_QUALITY, 80])
    started = time.monotonic()
    (face,) = faces_from_image(path, detector, None)
    assert time.monotonic() - started < 20
    assert face.quality > 0.3 and face.crop.shape == (192, 192, 3)
    with pytest.raises(Exception, match=r"is 8000x8000 pixels \(64 MP\); at most 50 megapixels"):
        faces_from_image(path, detector, None, limits=ImageLimits(max_pixels=50_000_000))


def test_large_portrait_is_enrolled_from_the_whole_face(tmp_path: Path, obama_box, detector,
                                                        default_model_dir: Path) -> None:
    """A 3201x4000 portrait whose face fills the frame: at full size YuNet finds nothing or
    parts of the face; the enrolled crop must be the same face as in the original photo."""
    import cv2
    import numpy as np

    from app.embed import Embedder
    from app.enroll import faces_from_image

    image, det = obama_box
    x, y, w, h = (float(v) for v in det.bbox)
    cw = w * 1.6
    ch = cw * 4000 / 3201
    x0, y0 = int(x + w / 2 - cw / 2), int(max(0, y + h / 2 - ch / 2))
    portrait = cv2.resize(image[y0:int(y0 + ch), x0:int(x0 + cw)], (3201, 4000),
                          interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "portrait.jpg"
    cv2.imwrite(str(path), portrait, [cv2.IMWRITE_JPEG_QUALITY, 90])
    original = tmp_path / "original.jpg"
    cv2.imwrite(str(original), image)
    (face,) = faces_from_image(path, detector, None)
    (reference,) = faces_from_image(original, detector, None)
    embedder = Embedder.from_config(str(default_model_dir), "onnxruntime")
    a, b = np.asarray(embedder.embed_kept([face.crop, reference.crop]), np.float32)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.6


def test_truncated_unreadable_and_poor_photos(tmp_path: Path, data_dir: Path, detector) -> None:
    from app.enroll import EnrollError, ImageLimits, collect, faces_from_image

    videos = data_dir / "videos"
    data = (videos / "biden.jpg").read_bytes()
    truncated = tmp_path / "folder" / "biden-cut.jpg"
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(EnrollError, match="is truncated"):
        faces_from_image(truncated, detector, None)
    (tmp_path / "folder" / "notes.jpg").write_text("not an image\n")
    (tmp_path / "folder" / "obama.jpg").write_bytes((videos / "obama.jpg").read_bytes())
    skipped: list[str] = []
    faces = collect([str(tmp_path / "folder")], detector, skipped=skipped)
    assert [Path(f.source).name for f in faces] == ["obama.jpg"]
    assert len(skipped) == 2
    assert "biden-cut.jpg is truncated" in skipped[0] and "notes.jpg" in skipped[1]
    with pytest.raises(EnrollError, match=r"quality 0\.\d+, below the minimum 0\.99"):
        faces_from_image(videos / "obama.jpg", detector, None,
                         limits=ImageLimits(min_quality=0.99))


def test_video_with_several_people_needs_a_choice(data_dir: Path, detector) -> None:
    import re

    from app.enroll import EnrollError, ImageLimits, faces_from_video

    videos = data_dir / "videos"
    walking = videos / "intel_face-demographics-walking.mp4"
    with pytest.raises(EnrollError, match=r"shows 2 people \(track \d+ \(\d+ frames\), track") as e:
        faces_from_video(walking, detector, 8)
    second = int(re.findall(r"track (\d+) \(", str(e.value))[1])
    any_quality = ImageLimits(min_quality=0.0)  # small faces walking past the camera
    by_rank = faces_from_video(walking, detector, 8, face=1, limits=any_quality)
    by_id = faces_from_video(walking, detector, 8, track=second, limits=any_quality)
    assert [f.source for f in by_rank] == [f.source for f in by_id] and len(by_id) == 8
    with pytest.raises(EnrollError, match="no face of quality >= 0.5"):
        faces_from_video(walking, detector, 8, track=second, limits=ImageLimits(min_quality=0.5))
    with pytest.raises(EnrollError, match="has no track 99"):
        faces_from_video(walking, detector, 8, track=99)
    assert len(faces_from_video(videos / "intel_head-pose-face-detection-female.mp4",
                                detector, 8)) == 8


# --- import limits -------------------------------------------------------------------------


def _real_export(tmp_path: Path, data_dir: Path) -> Path:
    """An export of two LFW people, with their photos as 192x192 kept crops."""
    import cv2
    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import unit

    lfw = data_dir / "lfw" / "lfw-deepfunneled"
    rng = np.random.default_rng(0)
    with Gallery(tmp_path / "src.db", "facemoe-edge", "0.1.0") as g:
        for name in ("Zydrunas_Ilgauskas", "Joan_Collins"):
            photo = cv2.imread(str(lfw / name / f"{name}_0001.jpg"))
            crop = cv2.resize(photo[29:221, 29:221], (192, 192))
            g.enroll(name.replace("_", " "), unit(rng, 1), [f"{name}_0001.jpg"], [0.7], [crop])
        return Path(g.export(tmp_path / "g.zip").path)


def _tampered(src: Path, dest: Path, *, replace: dict[str, bytes | int] | None = None,
              manifest_edit=None) -> Path:
    """A copy of an export with members replaced (bytes, or an int: that many zero bytes,
    deflated) and the manifest edited, re-checksummed so only the content is at fault."""
    import hashlib
    import json
    import zipfile

    from app.gallery.transfer import _TRAILER

    replace = replace or {}
    with zipfile.ZipFile(src) as zin:
        manifest = json.loads(zin.read("manifest.json"))
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                name = info.filename
                if name == "manifest.json":
                    continue
                new = replace.get(name)
                if isinstance(new, int):  # a bomb: written in chunks, hashed on the way
                    digest = hashlib.sha256()
                    with zout.open(name, "w", force_zip64=True) as fh:
                        for _ in range(new >> 20):
                            fh.write(b"\0" * (1 << 20))
                            digest.update(b"\0" * (1 << 20))
                    manifest["entries"][name] = digest.hexdigest()
                    continue
                data = zin.read(name) if new is None else new
                manifest["entries"][name] = hashlib.sha256(data).hexdigest()
                zout.writestr(name, data)
            if manifest_edit is not None:
                manifest_edit(manifest)
            zout.writestr("manifest.json", json.dumps(manifest))
            zout.comment = _TRAILER + b"0" * 64
    data = bytearray(dest.read_bytes())
    data[-64:] = hashlib.sha256(bytes(data[:-64])).hexdigest().encode()
    dest.write_bytes(bytes(data))
    return dest


def _import_in_child(export: Path, db: Path) -> tuple[str, float, float]:
    """(error or 'ok', seconds, growth of the peak RSS in MB) of an import in a fresh
    process (the imports and the gallery are loaded before the peak is first read)."""
    import subprocess
    import sys

    script = (
        "import resource, sys, time\n"
        "from app.gallery import Gallery, GalleryError\n"
        "result = 'ok'\n"
        "with Gallery(sys.argv[2], 'facemoe-edge', '0.1.0') as g:\n"
        "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    t = time.monotonic()\n"
        "    try:\n"
        "        g.import_file(sys.argv[1])\n"
        "    except GalleryError as e:\n"
        "        result = str(e)\n"
        "print(result); print(time.monotonic() - t)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(export), str(db)],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent,
                          env={**os.environ, "FACEMOE_GALLERY_KEY": ""})
    assert proc.returncode == 0, proc.stderr
    result, seconds, rss = proc.stdout.strip().splitlines()
    return result, float(seconds), float(rss)


@pytest.mark.slow
def test_import_refuses_a_zip_bomb_from_the_directory(tmp_path: Path, data_dir: Path,
                                                      no_gallery_key) -> None:
    import zipfile

    good = _real_export(tmp_path, data_dir)
    with zipfile.ZipFile(good) as zf:
        crop = next(n for n in zf.namelist() if n.endswith(".jpg"))
    bomb = _tampered(good, tmp_path / "bomb.zip", replace={crop: 1 << 30})
    assert bomb.stat().st_size < 4 << 20
    result, seconds, rss = _import_in_child(bomb, tmp_path / "dst.db")
    assert result == (f"export {bomb} is not a valid FaceMoE gallery export: member {crop} "
                      f"would unpack to {1 << 30} bytes (at most {1 << 20} in an archive of "
                      f"4 entries)")
    assert seconds < 5 and rss < 100, (seconds, rss)
    assert _import_in_child(good, tmp_path / "ok.db")[0] == "ok"


def _with_manifest(src: Path, dest: Path, manifest: bytes) -> Path:
    """`src` with its manifest replaced by `manifest` (deflated), whole-file sum redone."""
    import hashlib
    import zipfile

    from app.gallery.transfer import _TRAILER

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename != "manifest.json":
                zout.writestr(info.filename, zin.read(info))
        zout.writestr("manifest.json", manifest)
        zout.comment = _TRAILER + b"0" * 64
    data = bytearray(dest.read_bytes())
    data[-64:] = hashlib.sha256(bytes(data[:-64])).hexdigest().encode()
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.slow
def test_import_bounds_the_manifest_to_the_archive(tmp_path: Path, data_dir: Path,
                                                   no_gallery_key) -> None:
    """A ~130 KB archive whose manifest inflates to 128 MB of `{},` is refused from the zip
    directory (before: json.loads of all of it, 3.36 GB); one nested 2,000 deep is refused
    in one line (before: a RecursionError traceback)."""
    good = _real_export(tmp_path, data_dir)
    bomb = _with_manifest(good, tmp_path / "manifest-bomb.zip",
                          b"[" + b"{}," * ((128 << 20) // 3) + b"{}]")
    assert bomb.stat().st_size < 1 << 20
    result, seconds, rss = _import_in_child(bomb, tmp_path / "a.db")
    assert result.startswith(f"export {bomb} is not a valid FaceMoE gallery export: member "
                             f"manifest.json would unpack to "), result
    assert seconds < 5 and rss < 100, (seconds, rss)

    levels = "".join(f'["{k:08x}{k * 2654435761 % 2**32:08x}",' for k in range(2000))
    nested = _with_manifest(good, tmp_path / "nested.zip", (levels + "]" * 2000).encode())
    result, _, _ = _import_in_child(nested, tmp_path / "b.db")
    assert result == (f"export {nested} is not a valid FaceMoE gallery export: its manifest "
                      f"nests deeper than 16 levels")


@pytest.mark.slow
def test_import_refuses_padded_crops(tmp_path: Path, data_dir: Path, no_gallery_key) -> None:
    """Crops padded with zeros up to the crop limit deflate to almost nothing: refused by
    their inflation from the directory (before: 1.3 MB of them took 1.13 GB)."""
    import zipfile

    good = _real_export(tmp_path, data_dir)
    with zipfile.ZipFile(good) as zf:
        crops = {n: zf.read(n) for n in zf.namelist() if n.endswith(".jpg")}
    padded = _tampered(good, tmp_path / "padded.zip",
                       replace={n: jpeg + bytes((1 << 20) - len(jpeg) - 1)
                                for n, jpeg in crops.items()})
    result, seconds, rss = _import_in_child(padded, tmp_path / "dst.db")
    assert "would inflate" in result and "(at most 4)" in result, result
    assert "\n" not in result and seconds < 5 and rss < 50, (seconds, rss)


@pytest.mark.parametrize("case, message", [
    ("crop_not_jpeg", "the stored crop is not a readable JPEG"),
    ("crop_too_big", "the stored crop is 500x500, not 192x192 or 112x112"),
    ("long_source", "source must be a string of at most 1024 characters"),
    ("nan_quality", "quality nan is not in [0, 1]"),
    ("bad_date", "date 9999-01-01T00:00:00+00:00 is out of range"),
    ("long_name", "identity name is too long"),
    ("inf_vector", "imported vectors must be finite"),
])
def test_import_validates_crops_and_fields(tmp_path: Path, data_dir: Path, no_gallery_key,
                                           case: str, message: str) -> None:
    import json
    import zipfile

    import cv2
    import numpy as np

    from app.gallery import Gallery, GalleryError

    good = _real_export(tmp_path, data_dir)
    with zipfile.ZipFile(good) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    template = manifest["identities"][0]["templates"][0]
    replace: dict[str, bytes | int] = {}
    edit = None
    if case == "crop_not_jpeg":
        replace[template["crop"]] = b"\xff\xd8 not really a jpeg"
    elif case == "crop_too_big":
        replace[template["crop"]] = cv2.imencode(".jpg", np.zeros((500, 500, 3), np.uint8))[1]
        replace[template["crop"]] = replace[template["crop"]].tobytes()
    elif case == "inf_vector":
        vec = np.zeros(manifest["dim"], "<f4")
        vec[0] = np.inf
        replace[template["vector"]] = vec.tobytes()
    else:
        def edit(m: dict) -> None:
            t = m["identities"][0]["templates"][0]
            if case == "long_source":
                t["source"] = "x" * 5000
            elif case == "nan_quality":
                t["quality"] = float("nan")
            elif case == "bad_date":
                t["created_at"] = "9999-01-01T00:00:00+00:00"
            elif case == "long_name":
                m["identities"][0]["name"] = "y" * 300
    bad = _tampered(good, tmp_path / "bad.zip", replace=replace, manifest_edit=edit)
    with Gallery(tmp_path / "dst.db", "facemoe-edge", "0.1.0") as g:
        with pytest.raises(GalleryError, match=re.escape(message)) as err:
            g.import_file(bad)
        assert "\n" not in str(err.value)
        assert g.identities() == []


# --- small ones ----------------------------------------------------------------------------


def test_token_in_camera_url_is_redacted() -> None:
    from app.source import redact_uri

    assert redact_uri("rtsp://admin:pw@10.0.0.1:554/live?token=s3cr3t&channel=1") == (
        "rtsp://admin:***@10.0.0.1:554/live?token=***&channel=1")
    assert redact_uri("http://cam/mjpg?api_key=abc") == "http://cam/mjpg?api_key=***"
    assert redact_uri("rtsp://cam/live?channel=1&subtype=0") == "rtsp://cam/live?channel=1&subtype=0"
    with pytest.raises(SourceError) as err:
        open_source(f"rtsp://127.0.0.1:{free_port()}/live?token=s3cr3t", timeout=2)
    assert "s3cr3t" not in str(err.value) and "token=***" in str(err.value)


def test_events_limit_must_be_positive(tmp_path: Path, no_gallery_key) -> None:
    proc = facemoe("gallery", "events", "--limit", "-5", "--gallery", str(tmp_path / "g.db"))
    assert proc.returncode == 2
    assert "--limit: must be at least 1, got -5" in proc.stderr


@pytest.mark.slow
def test_key_file_is_accepted_where_the_key_is_needed(tmp_path: Path, data_dir: Path,
                                                      monkeypatch) -> None:
    import base64

    monkeypatch.delenv("FACEMOE_GALLERY_KEY", raising=False)
    monkeypatch.delenv("FACEMOE_GALLERY_KEY_FILE", raising=False)
    key = tmp_path / "key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    db = str(tmp_path / "g.db")
    videos = data_dir / "videos"
    done = facemoe("enroll", "Barack Obama", str(videos / "obama.jpg"), "--gallery", db,
                "--key-file", str(key), timeout=300)
    assert done.returncode == 0, done.stderr
    for argv in (["gallery", "list"], ["gallery", "events"], ["gallery", "check"],
                 ["gallery", "rename", "Barack Obama", "Obama"]):
        done = facemoe(*argv, "--gallery", db, "--key-file", str(key))
        assert done.returncode == 0, (argv, done.stderr)
    done = facemoe("gallery", "list", "--gallery", db)
    assert done.returncode == 1 and "encrypted" in done.stderr
    done = facemoe("process", str(videos / "intel_head-pose-face-detection-female.mp4"),
                "--gallery", db, "--key-file", str(key), "--no-progress", timeout=300)
    assert done.returncode == 0, done.stderr
    config = tmp_path / "daemon.yaml"
    config.write_text(f"gallery:\n  path: {db}\ncameras:\n  - name: door\n    uri: "
                      f"{videos / 'intel_head-pose-face-detection-female.mp4'}\n")
    done = facemoe("run", "--validate-config", "--config", str(config), "--key-file", str(key))
    assert done.returncode == 0, done.stderr


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
        _until("threads to be released", lambda: threading.active_count() <= baseline + 1, 10)
        for s in stalled:
            s.close()
    finally:
        daemon.http.shutdown()
        daemon.gallery.close()
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_gstreamer_criticals_go_through_python_logging(caplog, capfd) -> None:
    import logging

    from app.source import Gst, init_gstreamer

    init_gstreamer()
    with caplog.at_level(logging.WARNING, logger="app.source.glib"):
        for _ in range(3):
            Gst.Caps.new_empty().get_structure(0)  # a GStreamer-CRITICAL assertion
    assert "GStreamer-CRITICAL" not in capfd.readouterr().err
    messages = [r.getMessage() for r in caplog.records if r.name == "app.source.glib"]
    assert len(messages) == 3 and messages[0].startswith(
        "GStreamer-CRITICAL: gst_caps_get_structure: assertion")
