"""Dead-camera soak: `facemoe run` with one live and one dead camera, watching resources.

One GstRtspServer subprocess on 127.0.0.1 serves short_hamilton_clip.mp4 (looped); the second
camera points at a 127.0.0.1 port where nothing listens, so it fails and reconnects all the
time (backoff shortened to `--backoff` seconds). The daemon runs as a subprocess with the
shipped config and model; every `--sample` seconds this samples its open descriptors
(/proc/PID/fd), RSS and thread count (/proc/PID/status) and its reconnect counter, and
finally stops it with SIGTERM (exit code must be 0). Figures are compared between the end of
the warm-up and the end of the run: targets are a flat descriptor count and RSS growth below
20 MB. Prints one JSON object on stdout. Not a test.

    .venv/bin/python benchmarks/dead_camera_soak.py                     # 10 minutes
    .venv/bin/python benchmarks/dead_camera_soak.py --minutes 3 --out soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.daemon_soak import scrape, shared_dir, stop, value  # noqa: E402
from benchmarks.rtsp_camera import RtspCamera, free_port  # noqa: E402

RSS_TARGET_MB = 20.0


def proc_figures(pid: int) -> dict:
    """Open descriptors, RSS (MB) and threads of a process."""
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_mb": round(int(status["VmRSS"].split()[0]) / 1024.0, 1),
            "threads": int(status["Threads"])}


def health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="measured time after warm-up")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the start figures")
    p.add_argument("--backoff", type=float, default=0.5,
                   help="the dead camera's reconnect wait (initial and max), seconds")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (log, events)")
    args = p.parse_args()
    command = shlex.join([sys.executable, *sys.argv])

    clip = shared_dir() / "data" / "videos" / "short_hamilton_clip.mp4"
    if not clip.exists():
        raise SystemExit(f"{clip} not found (set FACEMOE_SHARED to the shared folder)")
    tmp = Path(tempfile.mkdtemp(prefix="facemoe-deadcam-"))
    print(f"soak: working in {tmp}", file=sys.stderr)
    live = RtspCamera(clip)
    dead_url = f"rtsp://127.0.0.1:{free_port()}/dead?token=not-logged"
    daemon: subprocess.Popen | None = None
    log_path = tmp / "daemon.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FACEMOE_GALLERY_KEY", None)
    env.pop("FACEMOE_GALLERY_KEY_FILE", None)
    samples: list[dict] = []
    try:
        live.start()
        port = free_port()
        cfg = yaml.safe_load((REPO_ROOT / "configs" / "app.yaml").read_text())
        cfg["gallery"] = {"path": str(tmp / "gallery.db")}
        cfg["cameras"] = [{"name": "live", "uri": live.url}, {"name": "dead", "uri": dead_url}]
        cfg.setdefault("daemon", {}).update(
            metrics_port=port, stats_interval_s=30, frame_timeout_s=5,
            reconnect={"initial_s": args.backoff, "max_s": args.backoff},
            jsonl={"path": str(tmp / "events.jsonl")})
        config = tmp / "daemon.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        with log_path.open("w") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "run", "--config", str(config)],
                cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while True:  # wait for /metrics
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited ({daemon.returncode}):\n"
                                 + log_path.read_text()[-3000:])
            try:
                scrape(port)
                break
            except OSError as exc:
                if time.monotonic() - t0 > 180:
                    raise SystemExit("no /metrics after 180 s:\n"
                                     + log_path.read_text()[-3000:]) from exc
                time.sleep(0.5)
        start = None
        warm_at = t0 + args.warmup
        end_at = warm_at + args.minutes * 60
        while True:
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited ({daemon.returncode}):\n"
                                 + log_path.read_text()[-3000:])
            now = time.monotonic()
            m = scrape(port)
            code, h = health(port)
            sample = {"t_s": round(now - t0, 1), **proc_figures(daemon.pid),
                      "reconnects_dead": value(m, "facemoe_reconnects_total", camera="dead"),
                      "frames_live": value(m, "facemoe_frames_total", camera="live"),
                      "healthz": code, "log_bytes": log_path.stat().st_size}
            samples.append(sample)
            print("soak: " + " ".join(f"{k}={v}" for k, v in sample.items()), file=sys.stderr)
            if start is None and now >= warm_at:
                start = sample
            if start is not None and now >= end_at:
                break
            time.sleep(max(0.0, min(now + args.sample, end_at if start else warm_at)
                           - time.monotonic()))
        end = samples[-1]
        rc = stop(daemon)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(5)
        live.kill()
    log_text = log_path.read_text(errors="replace")
    result = {
        "command": command, "minutes": args.minutes, "warmup_s": args.warmup,
        "backoff_s": args.backoff, "exit_code": rc,
        "start": start, "end": end,
        "fds_delta": end["fds"] - start["fds"],
        "rss_growth_mb": round(end["rss_mb"] - start["rss_mb"], 1),
        "threads_delta": end["threads"] - start["threads"],
        "reconnects_in_window": end["reconnects_dead"] - start["reconnects_dead"],
        "fds_max": max(s["fds"] for s in samples),
        "log_bytes": len(log_text.encode()),
        "token_in_log": "not-logged" in log_text,
        "gstreamer_critical_lines": log_text.count("CRITICAL"),
        "tracebacks": log_text.count("Traceback"),
        "targets": {"fds_flat": end["fds"] - start["fds"] <= 2,
                    "rss_growth_below_mb": RSS_TARGET_MB,
                    "rss_ok": end["rss_mb"] - start["rss_mb"] < RSS_TARGET_MB},
        "samples": samples,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.keep:
        for f in sorted(tmp.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        tmp.rmdir()
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
