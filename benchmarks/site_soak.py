"""Site soak: `--boxes` daemons (`facemoe run`, shipped config and model) with `--cameras`
looped file cameras each, on one throwaway PostgreSQL gallery and one mosquitto broker (Debian
packages, started here: tests/services.py), the database restarted (`pg_ctl restart -m fast`)
every `--restart-every` seconds for `--minutes`.

After each restart it times how long until every box has its gallery back (no gallery problem
in /healthz) and nothing waiting for it (gallery sink pending 0): the recovery time. At the end
every daemon is stopped with SIGTERM (exit code must be 0) and each box's events JSONL (what it
produced) is compared with the database: lost = produced but not stored, duplicates = stored
more than once. Prints one JSON object on stdout. Not a test.

    .venv/bin/python benchmarks/site_soak.py                        # 10 min, 2 x 2, every 120 s
    .venv/bin/python benchmarks/site_soak.py --minutes 4 --restart-every 60 --out soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from app.paths import shared  # noqa: E402
from benchmarks.daemon_soak import health  # noqa: E402
from tests.services import Mosquitto, Postgres, free_port  # noqa: E402

VIDEOS = ("short_hamilton_clip.mp4", "intel_face-demographics-walking.mp4",
          "intel_head-pose-face-detection-female.mp4", "intel_classroom.mp4")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--restart-every", type=float, default=120.0, metavar="S")
    ap.add_argument("--boxes", type=int, default=2)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args()
    videos = shared() / "data" / "videos"
    work = Path(tempfile.mkdtemp(prefix="facemoe-site-soak-"))
    pg, broker = Postgres(), Mosquitto(work / "broker")
    boxes = []
    try:
        for b in range(args.boxes):
            name = f"box-{chr(ord('a') + b)}"
            folder = work / name
            folder.mkdir()
            port = free_port()
            cfg = {
                "gallery": {"path": pg.url},
                "cameras": [{"name": f"{name}-cam{c}", "loop": True, "detect_every_n": 3,
                             "uri": str(videos / VIDEOS[(b * args.cameras + c) % len(VIDEOS)])}
                            for c in range(args.cameras)],
                "daemon": {"box": name, "metrics_port": port, "stats_interval_s": 60,
                           "jsonl": {"path": str(folder / "events.jsonl")},
                           "outbox": str(folder / "outbox.jsonl"),
                           "mqtt": {"host": "127.0.0.1", "port": broker.port},
                           "health": {"max_drop_rate": 1.0}, "shutdown_timeout_s": 20},
            }
            (folder / "daemon.yaml").write_text(yaml.safe_dump(cfg))
            log = (folder / "daemon.log").open("w")
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "run", "--config", str(folder / "daemon.yaml")],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
            boxes.append((name, port, proc, folder))
            deadline = time.monotonic() + 120
            while not (health(port) or {}).get("cameras") and time.monotonic() < deadline:
                time.sleep(1)  # one at a time: the first creates the tables
        started = time.monotonic()
        end = started + args.minutes * 60
        recoveries, restarts = [], 0
        next_restart = started + args.restart_every
        while time.monotonic() < end:
            if time.monotonic() < next_restart:
                time.sleep(1)
                continue
            took = pg.restart()
            restarts += 1
            t = time.monotonic()
            while time.monotonic() < t + 120:
                hs = [health(port) for _, port, _, _ in boxes]
                if all(h and not h["gallery"]["problem"] and h["sinks"]["gallery"]["pending"] == 0
                       for h in hs):
                    break
                time.sleep(0.2)
            recoveries.append(round(time.monotonic() - t + took, 2))
            print(f"restart {restarts}: pg_ctl {took:.2f} s, all boxes caught up "
                  f"{recoveries[-1]:.2f} s after it began", file=sys.stderr)
            next_restart += args.restart_every
        frames = {name: sum(c["frames"] for c in health(port)["cameras"].values())
                  for name, port, _, _ in boxes}
        codes = {}
        for _, _, proc, _ in boxes:
            proc.send_signal(signal.SIGTERM)
        for name, _, proc, _ in boxes:
            codes[name] = proc.wait(60)
        produced = [json.loads(line)["id"] for _, _, _, folder in boxes
                    for line in (folder / "events.jsonl").read_text().splitlines()]
        stored = [r[0] for r in pg.sql("select uid from events")]
        result = {
            "minutes": args.minutes, "boxes": args.boxes, "cameras_per_box": args.cameras,
            "restart_every_s": args.restart_every, "restarts": restarts,
            "frames": frames, "events_produced": len(produced), "events_stored": len(stored),
            "lost": len(set(produced) - set(stored)),
            "duplicates": len(stored) - len(set(stored)),
            "recovery_s": recoveries, "worst_recovery_s": max(recoveries, default=None),
            "exit_codes": codes, "work_dir": str(work),
        }
    finally:
        for _, _, proc, _ in boxes:
            if proc.poll() is None:
                proc.kill()
        broker.stop()
        pg.close()
    text = json.dumps(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = not result["lost"] and not result["duplicates"] and set(codes.values()) == {0}
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
