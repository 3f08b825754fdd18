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
