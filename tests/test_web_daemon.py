"""The daemon serves the review UI and API on its HTTP port (`daemon.web: true`), next to
/metrics and /healthz, with a cameras page of each camera's state, fps, drops, reconnects
and last event."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install -e .[web])")

from app.config import AppConfig  # noqa: E402
from benchmarks.rtsp_camera import free_port  # noqa: E402
from tests.conftest import kill_daemon, stop_daemon

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_gallery_key")]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:  # 503 "degraded" comes with its JSON body
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


@pytest.mark.slow
def test_the_daemon_serves_the_review_ui_with_a_cameras_page(tmp_path: Path,
                                                             data_dir: Path) -> None:
    port = free_port()
    cfg = {
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "cameras": [{"name": "hall",
                     "uri": str(data_dir / "videos" / "intel_face-demographics-walking.mp4")},
                    {"name": "gone", "uri": str(tmp_path / "no-such-camera.mp4")}],
        "daemon": {"metrics_port": port, "web": True, "sqlite_commit_s": 0.2,
                   "frame_queue": 64,  # all 35 frames are processed, even on a busy machine
                   "shutdown_timeout_s": 5},
    }
    AppConfig.model_validate(cfg)
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "app.cli", "run", "--config", config],
                                  cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, cams = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            assert daemon.poll() is None, log_path.read_text()[-3000:]
            status, body = _get(port, "/api/cameras")
            if status == 200:
                cams = json.loads(body)
                if cams[0]["state"] == "finished" and cams[0]["events"] > 0:
                    break
            time.sleep(0.5)
        assert cams and cams[0]["name"] == "hall" and cams[0]["frames"] == 35, cams
        assert cams[0]["last_event"] is not None and cams[0]["dropped"] >= 0
        assert cams[0]["box"] and not cams[0]["silent"] and cams[0]["clash"] == []
        status, page = _get(port, "/cameras")  # the old address leads to the fleet page
        assert status == 200 and '<a href="/events?camera=hall">hall</a>' in page
        assert '<a href="/fleet" class="on">Fleet</a>' in page
        assert _get(port, "/metrics")[1].count("facemoe_frames_total") >= 1
        status, body = _get(port, "/healthz")  # the daemon's one /healthz, also under the UI
        health = json.loads(body)
        assert health["cameras"]["hall"]["frames"] == 35
        assert status == 503 and health["status"] == "degraded"  # camera "gone" reconnects
        assert any(r.startswith("camera gone:") for r in health["reasons"]), health["reasons"]
        time.sleep(0.5)  # the sink's batched commit
        events = json.loads(_get(port, "/api/events")[1])["events"]
        assert events and all(e["camera"] == "hall" for e in events)
        stop_daemon(daemon, log_path, 20)
    finally:
        kill_daemon(daemon)
