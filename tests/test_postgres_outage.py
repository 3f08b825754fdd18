"""A box survives its PostgreSQL gallery: the daemon (a subprocess on a looped file camera)
keeps processing video through a `pg_ctl restart -m fast` and through a stopped server; the
events it could not store wait in its outbox and are stored once the server is back; every
event produced (the JSONL file) is stored exactly once, and /healthz says "degraded", naming
the gallery and its sink, while the database is away. The server is one this test starts and
restarts itself (tests/services.py); the test skips with a reason where it cannot start one."""

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
from tests.services import Postgres, free_port
from tests.test_daemon import _health, _wait

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pg():
    server = Postgres()
    yield server
    server.close()


def test_daemon_survives_postgres_restart_and_outage(tmp_path, data_dir, tiny_model_dir,
                                                     yunet_path, pg):
    port, jsonl, outbox = free_port(), tmp_path / "events.jsonl", tmp_path / "outbox.jsonl"
    cfg = {
        "model": {"dir": str(tiny_model_dir), "threads": 1, "batch_size": 8},
        "detector": {"model": str(yunet_path)},
        "tracker": {"max_missed": 3},
        "gallery": {"path": pg.url},
        "cameras": [{"name": "stage", "loop": True, "detect_every_n": 2,
                     "uri": str(data_dir / "videos" / "short_hamilton_clip.mp4")}],
        "daemon": {"box": "box-a", "metrics_port": port, "stats_interval_s": 5,
                   "jsonl": {"path": str(jsonl)}, "sqlite_commit_s": 0.5,
                   "gallery_poll_s": 0.5, "outbox": str(outbox),
                   "health": {"max_sink_age_s": 3}, "shutdown_timeout_s": 10},
    }
    AppConfig.model_validate(cfg)
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "run", "--config", str(config)], cwd=REPO_ROOT,
            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def health() -> dict:
        assert daemon.poll() is None, log_path.read_text()[-3000:]
        return _health(port) or {}

    def frames() -> int:
        return health().get("cameras", {}).get("stage", {}).get("frames", 0)

    def produced() -> list[dict]:
        if not jsonl.exists():
            return []
        return [json.loads(line) for line in jsonl.read_text().splitlines()]

    def stored() -> int:
        return pg.sql("select count(*) from events")[0][0]

    try:
        _wait("frames and a stored event", lambda: frames() > 20 and stored() >= 1, 90)

        # 1. a fast restart (every connection cut): video goes on, events go on being stored
        before, took = frames(), pg.restart()
        t = time.monotonic()
        _wait("frames after the restart", lambda: frames() >= before + 10, 10)
        resume_s = time.monotonic() - t
        n = stored()
        _wait("an event stored after the restart", lambda: stored() > n, 30)
        assert "Exception in thread" not in log_path.read_text()

        # 2. an outage: video goes on, events wait in the outbox, /healthz says why
        pg.stop()
        in_outage, during = frames(), len(produced())
        _wait("events produced while the database is down",
              lambda: len(produced()) >= during + 2, 60)
        h = _wait("/healthz degraded by the gallery sink",
                  lambda: (h := health()) and any(r.startswith("sink gallery:")
                                                  for r in h["reasons"]) and h, 20)
        assert h["status"] == "degraded"
        assert any(r.startswith("gallery: unreachable") for r in h["reasons"]), h["reasons"]
        assert h["sinks"]["gallery"]["pending"] >= 2
        assert frames() > in_outage + 20  # the video path never waited for the database
        assert stat.S_IMODE(outbox.stat().st_mode) == 0o600
        assert len(outbox.read_text().splitlines()) >= 2
        pg.start()
        t = time.monotonic()
        _wait("/healthz ok once the database is back",
              lambda: health().get("status") == "ok", 30)
        recover_s = time.monotonic() - t
        assert outbox.stat().st_size == 0  # replayed and emptied

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log_path.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(5)
    ends = [e["id"] for e in produced() if e["type"] == "end"]
    rows = pg.sql("select uid from events")
    uids = [r[0] for r in rows]
    assert len(uids) == len(set(uids)), "a stored event is duplicated"
    assert sorted(uids) == sorted(ends), "produced and stored events differ"
    print(f"postgres outage: restart {took:.2f} s, video resumed {resume_s:.2f} s after it; "
          f"{len(ends)} events produced = stored, 0 duplicates; healthy {recover_s:.1f} s "
          "after the server came back")
