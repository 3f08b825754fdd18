"""Reliability under long runs and hostile inputs (issue 12): descriptors, temporaries, limits."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest

from app.source import SourceError, open_source
from benchmarks.rtsp_camera import free_port


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
    from engine.manifest import write_json_atomic

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
