"""The daemon's alerts end to end: a file camera playing the Hamilton clip at its frame rate,
a real mosquitto broker and a real webhook server on 127.0.0.1, the shipped model.

Lin-Manuel Miranda is announced (`recognized`) on MQTT and the webhook while his close-up
is still playing, with a snapshot written privately before the message; the JSONL file and
the gallery keep one `end` record per track with the same id.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from app.config import AppConfig
from tests.conftest import kill_daemon, stop_daemon
from tests.test_mqtt_sink import Watcher, brokers  # noqa: F401  (brokers: a fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent
LIN = "Lin-Manuel Miranda"


@pytest.mark.slow
@pytest.mark.e2e
def test_daemon_announces_lin_manuel_miranda_on_mqtt_and_the_webhook(
    tmp_path, data_dir, brokers, monkeypatch  # noqa: F811
):
    videos = data_dir / "videos"
    gallery = tmp_path / "gallery.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FACEMOE_HOOK_SECRET": "s3cret"}
    subprocess.run([sys.executable, "-m", "app.cli", "enroll", LIN,
                    str(videos / "lin-manuel-miranda.png"), "--gallery", str(gallery)],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300)
    broker = brokers(tmp_path, ["allow_anonymous true"])
    watcher = Watcher(broker.port, ["facemoe/#"])
    arrivals: dict[str, float] = {}  # event id + type -> wall time it reached the subscriber
    watcher.client.on_message = _timed(watcher, arrivals)
    hooks: list[tuple[dict, str | None]] = []
    hook = _receiver(hooks)
    cfg = {
        "gallery": {"path": str(gallery)},
        "alerts": {"cooldown_s": 0},
        "cameras": [{"name": "stage", "uri": str(videos / "short_hamilton_clip.mp4"),
                     "zones": {"stage_left": [[0, 0], [320, 0], [320, 360], [0, 360]]}}],
        "daemon": {
            "jsonl": {"path": str(tmp_path / "events.jsonl")},
            "snapshots": {"dir": str(tmp_path / "snaps")},
            "sqlite_commit_s": 0.2,
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": "stage-box"},
            "webhook": {"url": f"http://127.0.0.1:{hook.server_address[1]}/hook",
                        "secret": "{FACEMOE_HOOK_SECRET}", "retry_initial_s": 0.1},
            "shutdown_timeout_s": 8,
            "box": "stage-box",
        },
    }
    monkeypatch.setenv("FACEMOE_HOOK_SECRET", "s3cret")
    AppConfig.model_validate(cfg)
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "app.cli", "run", "--config",
                                   str(config)], cwd=REPO_ROOT, env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT)
    try:
        # the clip plays in 9.2 s; its last tracks that carry identity end at 8.0 s (the
        # dark audience after them is kept out by the face-quality gate: no event)
        watcher.wait(lambda m: daemon.poll() is None and any(
            t == "facemoe/events" and json.loads(p)["type"] == "end"
            and json.loads(p)["end"] > 7.5 for t, p, _ in m), 120)
        stop_daemon(daemon, log_path, 30)
    finally:
        kill_daemon(daemon)
        hook.shutdown()
        watcher.close()
    log_text = log_path.read_text()
    messages = [json.loads(p) for p in watcher.payloads("facemoe/events")]
    recognized = [m for m in messages if m["type"] == "recognized" and m["identity"] == LIN]
    assert recognized, log_text[-3000:]
    first = recognized[0]
    started = dt.datetime.fromisoformat(first["time"])
    assert started.utcoffset() is not None
    wall_latency = arrivals[first["id"] + "recognized"] - started.timestamp()
    print(f"daemon: {LIN} announced {wall_latency:.3f} s (wall clock) after the first frame "
          f"of his track; media {first['end'] - first['start']:.3f} s")
    assert wall_latency < 3.0  # the 2-core CI machine also runs other jobs: generous here
    snap = Path(first["snapshot"])
    assert snap.is_file() and stat.S_IMODE(snap.stat().st_mode) == 0o600
    assert snap.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    end = [m for m in messages if m["type"] == "end" and m["id"] == first["id"]]
    assert len(end) == 1 and end[0]["identity"] == LIN and end[0]["snapshot"] == first["snapshot"]
    assert end[0]["zones"] in (["stage_left"], [])

    state = json.loads(watcher.payloads("facemoe/identities/lin_manuel_miranda/stage-box")[-1])
    assert state["name"] == LIN and state["state"] == "away"
    assert watcher.payloads("facemoe/cameras/stage/image")  # the alert's picture, retained
    camera = json.loads(watcher.payloads("facemoe/cameras/stage/state")[-1])
    assert camera["faces"] == camera["unknown"] == 0  # nobody in view after the clip
    assert watcher.payloads("facemoe/availability/stage-box")[0] == "online"
    assert watcher.payloads("facemoe/availability/stage-box")[-1] == "offline"  # clean shutdown

    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert {e["type"] for e in lines} == {"end"}
    assert sorted(e["id"] for e in lines) == sorted(m["id"] for m in messages
                                                    if m["type"] == "end")
    with sqlite3.connect(gallery) as db:
        stored = {r[0] for r in db.execute("select uid from events")}
    assert stored == {e["id"] for e in lines}

    assert [h[0]["id"] for h in hooks] == [m["id"] for m in messages]  # same messages, in order
    assert all(h[1] and h[1].startswith("sha256=") for h in hooks)


def _timed(watcher: Watcher, arrivals: dict[str, float]):
    def on_message(client, userdata, msg):
        now = time.time()
        with watcher.lock:
            watcher.messages.append((msg.topic, msg.payload.decode(errors="replace"),
                                 bool(msg.retain)))
        if msg.topic == "facemoe/events":
            m = json.loads(msg.payload)
            arrivals.setdefault(m["id"] + m["type"], now)

    return on_message


def _receiver(hooks: list) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hooks.append((json.loads(body), self.headers.get("X-FaceMoE-Signature-256")))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
