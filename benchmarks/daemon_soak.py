"""Daemon soak: N loopback RTSP cameras (640x360, 25 fps) through `facemoe run` for M minutes.

Starts N GstRtspServer subprocesses on 127.0.0.1, each serving short_hamilton_clip.mp4
(re-encoded once up front to exactly 25 fps, then looped without re-encoding), enrolls
Lin-Manuel Miranda into a temporary gallery with the CLI, runs the daemon as a subprocess with
the default model and /metrics on a free port, samples its RSS (/proc/PID/status VmRSS) and
/metrics every 10 s, and stops it with SIGTERM (exit code must be 0). Figures are measured
over the M minutes after a warm-up (default 60 s): processed fps per camera, dropped frames,
reconnects, events, frame-to-event latency p95 (facemoe_event_latency_seconds) and memory
growth (target < 50 MB). Prints one JSON object on stdout. Not a test.

With `--lock-s S` another process holds the gallery database's write lock for S seconds in the
middle of the measured time (issue 22: the database locked for 60 s): /healthz is read every
second meanwhile, and at the end every event the JSONL sink wrote must be stored in the gallery
exactly once ("events_lost" and "events_duplicated", both expected 0).

    .venv/bin/python benchmarks/daemon_soak.py                    # 4 cameras, 10 minutes
    .venv/bin/python benchmarks/daemon_soak.py --minutes 1 --cameras 2 --out soak.json
    .venv/bin/python benchmarks/daemon_soak.py --cameras 1 --lock-s 60   # locked mid-run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from app.paths import shared as shared_dir  # noqa: E402
from benchmarks.rtsp_camera import RtspCamera, free_port  # noqa: E402

SAMPLE_S = 10.0
GROWTH_TARGET_MB = 50.0

def transcode_25fps(clip: Path, out: Path) -> dict:
    """Re-encode the clip once to exactly 640x360 at 25 fps (H.264, 2 s GOP, no B-frames)."""
    import gi

    gi.require_version("Gst", "1.0")
    from gi.repository import Gst

    Gst.init(None)
    t = time.monotonic()
    pipe = Gst.parse_launch(
        f"filesrc location={clip} ! qtdemux ! h264parse ! avdec_h264 ! videoconvert ! "
        "videoscale ! videorate ! video/x-raw,format=I420,width=640,height=360,framerate=25/1 ! "
        "x264enc speed-preset=ultrafast tune=zerolatency key-int-max=50 bitrate=1500 ! "
        f"h264parse ! mp4mux ! filesink location={out}")
    pipe.set_state(Gst.State.PLAYING)
    msg = pipe.get_bus().timed_pop_filtered(
        120 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    pipe.set_state(Gst.State.NULL)
    if msg is None or msg.type != Gst.MessageType.EOS:
        err = msg.parse_error()[0].message if msg is not None else "timeout"
        raise SystemExit(f"transcoding {clip} to 25 fps failed: {err}")
    return {"source": str(clip), "served": str(out), "fps": 25, "size": "640x360",
            "transcode_s": round(time.monotonic() - t, 2)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def stop(daemon: subprocess.Popen) -> int:
    """SIGTERM (the daemon flushes its tracks), SIGKILL after 30 s; the exit code."""
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        return daemon.wait(5)


def scrape(port: int) -> dict:
    """/metrics as {(sample name, sorted label items): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def health(port: int) -> dict | None:
    """/healthz's JSON (503 "degraded" carries the same body); None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())
    except OSError:
        return None


class GalleryLock(threading.Thread):
    """Holds the SQLite gallery's write lock (BEGIN IMMEDIATE, as another writer would) from
    `at` (monotonic) for `seconds`, reading /healthz every second while it lasts and afterwards
    until it no longer names the gallery sink. `result` says when it named it (a camera the
    loaded machine makes drop frames is reported too, and is not what is measured here)."""

    def __init__(self, gallery: Path, port: int, at: float, seconds: float):
        super().__init__(daemon=True)
        self.gallery, self.port, self.at, self.seconds = gallery, port, at, seconds
        self.result: dict = {}
        self.stop = threading.Event()

    def run(self) -> None:
        if self.stop.wait(max(0.0, self.at - time.monotonic())):
            return
        db = sqlite3.connect(self.gallery, isolation_level=None, timeout=60)
        db.execute("BEGIN IMMEDIATE")
        t0 = time.monotonic()
        reads, named, first_named, reasons = 0, 0, None, set()
        try:
            while (now := time.monotonic()) - t0 < self.seconds and not self.stop.is_set():
                h = health(self.port) or {"status": "no answer", "reasons": []}
                reads += 1
                reasons.update(r.split(":")[0] for r in h.get("reasons", []))
                if h["status"] == "degraded" and self._names_gallery(h):
                    named += 1
                    first_named = first_named if first_named is not None else now - t0
                self.stop.wait(1.0)
        finally:
            db.execute("ROLLBACK")
            db.close()
        released = time.monotonic()
        cleared = None
        while not self.stop.is_set() and time.monotonic() - released < 120:
            h = health(self.port)
            if h is not None and not self._names_gallery(h):
                cleared = time.monotonic() - released
                break
            self.stop.wait(0.5)
        self.result = {
            "held_s": round(released - t0, 1),
            "health_reads": reads,
            "reads_degraded_naming_gallery": named,
            "gallery_named_after_s": None if first_named is None else round(first_named, 1),
            "reasons_seen": sorted(reasons),
            "gallery_cleared_after_release_s": None if cleared is None else round(cleared, 1),
        }

    @staticmethod
    def _names_gallery(h: dict) -> bool:
        return any(r.startswith("sink gallery") for r in h.get("reasons", []))


def stored_once(jsonl: Path, gallery: Path) -> dict:
    """Events the JSONL sink wrote (all rotated files) against the gallery's stored uids."""
    ids = []
    for f in sorted(jsonl.parent.glob(jsonl.name + "*")):
        ids += [json.loads(line)["id"] for line in f.read_text().splitlines() if line.strip()]
    with sqlite3.connect(gallery, timeout=60) as db:
        uids = [r[0] for r in db.execute("select uid from events")]
    return {"events_written_jsonl": len(ids), "events_stored": len(uids),
            "events_lost": len(set(ids) - set(uids)),
            "events_duplicated": len(uids) - len(set(uids))}


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def histogram(m: dict, name: str, **labels) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) buckets of one labelled histogram, ascending."""
    want = set(labels.items())
    rows = [(float(dict(k)["le"]), v) for (n, k), v in m.items()
            if n == f"{name}_bucket" and want <= set(k)]
    return sorted(rows)


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus histogram_quantile: linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # above the highest finite bucket
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


def delta(end: list[tuple[float, float]], start: list[tuple[float, float]]):
    before = dict(start)
    return [(b, c - before.get(b, 0.0)) for b, c in end]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="measured time after warm-up")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the start figures")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, events)")
    p.add_argument("--lock-s", type=float, default=0.0,
                   help="hold the gallery database's write lock this long mid-run (0: never)")
    return p.parse_args()


def write_config(tmp: Path, cams: list, metrics_port: int) -> Path:
    """The shipped app.yaml with a gallery, the cameras, /metrics and a JSONL sink in `tmp`."""
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "app.yaml").read_text())
    cfg["gallery"] = {"path": str(tmp / "gallery.db")}
    cfg["cameras"] = [{"name": f"cam{i}", "uri": c.url} for i, c in enumerate(cams)]
    cfg.setdefault("daemon", {}).update(
        metrics_port=metrics_port, stats_interval_s=60,
        jsonl={"path": str(tmp / "events.jsonl"), "max_mb": 100, "backups": 5})
    config = tmp / "daemon.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


def main() -> int:
    args = parse_args()
    command = shlex.join([sys.executable, *sys.argv])

    shared = shared_dir()
    clip = shared / "data" / "videos" / "short_hamilton_clip.mp4"
    photo = shared / "data" / "videos" / "lin-manuel-miranda.png"
    for f in (clip, photo):
        if not f.exists():
            raise SystemExit(f"{f} not found (set FACEMOE_SHARED to the shared folder)")

    tmp = Path(tempfile.mkdtemp(prefix="facemoe-soak-"))
    print(f"soak: working in {tmp}", file=sys.stderr)
    source = transcode_25fps(clip, tmp / "clip25.mp4")

    cams = [RtspCamera(tmp / "clip25.mp4") for _ in range(args.cameras)]
    daemon: subprocess.Popen | None = None
    lock: GalleryLock | None = None
    log_path = tmp / "daemon.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for c in cams:
            c.start()
        metrics_port = free_port()
        config = write_config(tmp, cams, metrics_port)

        enroll = subprocess.run(
            [sys.executable, "-m", "app.cli", "enroll", "Lin-Manuel Miranda", str(photo),
             "--config", str(config)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if enroll.returncode != 0:
            raise SystemExit(f"enroll failed:\n{enroll.stdout}{enroll.stderr}")

        with log_path.open("w") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "run", "--config", str(config)],
                cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        names = [f"cam{i}" for i in range(args.cameras)]

        def alive() -> None:
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited ({daemon.returncode}):\n"
                                 + log_path.read_text()[-3000:])

        while True:  # wait for /metrics
            alive()
            try:
                scrape(metrics_port)
                break
            except OSError as exc:
                if time.monotonic() - t0 > 120:
                    tail = log_path.read_text()[-3000:]
                    raise SystemExit(f"no /metrics after 120 s:\n{tail}") from exc
                time.sleep(0.5)

        if args.lock_s > 0:  # centred in the measured time
            warm_at = t0 + args.warmup
            lock = GalleryLock(tmp / "gallery.db", metrics_port,
                               warm_at + (args.minutes * 60 - args.lock_s) / 2, args.lock_s)
            lock.start()
        samples, start, end = _sample(daemon.pid, metrics_port, names, t0, args, alive)

        if lock is not None:
            lock.join(180)
        t_stop = time.monotonic()
        rc = stop(daemon)
        stop_s = time.monotonic() - t_stop
        once = stored_once(tmp / "events.jsonl", tmp / "gallery.db")
    finally:
        if lock is not None:
            lock.stop.set()
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(5)
        for c in cams:
            c.kill()

    (t_a, m_a, rss_a), (t_b, m_b, rss_b) = start, end
    secs = t_b - t_a
    per_camera, p95_all = _figures(m_a, m_b, names, secs)
    growth = rss_b - rss_a
    result = {
        "benchmark": "daemon_soak",
        "command": command,
        "cameras": args.cameras,
        "stream": {**source, "transport": "RTSP over 127.0.0.1, H.264 passed through"},
        "cpu_cores": os.cpu_count(),
        "warmup_s": args.warmup,
        "measured_s": round(secs, 1),
        "per_camera": per_camera,
        "total_processed_fps": round(sum(c["processed_fps"] for c in per_camera.values()), 2),
        "dropped_total": sum(c["dropped"] for c in per_camera.values()),
        "events_total": sum(c["events"] for c in per_camera.values()),
        "event_latency_p95_s": None if p95_all is None else round(p95_all, 3),
        "rss_start_mb": round(rss_a, 1),
        "rss_end_mb": round(rss_b, 1),
        "rss_growth_mb": round(growth, 1),
        "rss_growth_target_mb": GROWTH_TARGET_MB,
        "rss_growth_ok": growth < GROWTH_TARGET_MB,
        "exit_code": rc,
        "stop_s": round(stop_s, 2),
        **once,
        "gallery_lock": lock.result if lock is not None else None,
        "samples": samples,
    }
    return report(result, args, tmp)


def report(result: dict, args: argparse.Namespace, tmp: Path) -> int:
    """Print (and with --out write) the JSON, drop the temp folder unless --keep; the exit
    code: 1 when the daemon did not stop cleanly or an event was lost or stored twice."""
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    if args.keep:
        print(f"soak: kept {tmp}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if result["exit_code"] != 0:
        print(f"soak: the daemon exited with {result['exit_code']} after SIGTERM",
              file=sys.stderr)
        return 1
    if result["events_lost"] or result["events_duplicated"]:
        print(f"soak: {result['events_lost']} event(s) lost, {result['events_duplicated']} "
              "stored twice", file=sys.stderr)
        return 1
    return 0


def _sample(pid: int, metrics_port: int, names: list[str], t0: float,
            args: argparse.Namespace, alive: Callable[[], None]
            ) -> tuple[list[dict], tuple, tuple]:
    """Scrape /metrics every SAMPLE_S seconds: the samples, and (time, metrics, RSS) at the
    end of the warm-up and at the end of the measured minutes."""
    warmup_s, minutes = args.warmup, args.minutes
    samples = []
    start = end = None
    warm_at = t0 + warmup_s
    end_at = warm_at + minutes * 60
    next_at = time.monotonic()
    while True:
        alive()
        now = time.monotonic()
        m = scrape(metrics_port)
        rss = rss_mb(pid)
        samples.append({
            "t_s": round(now - t0, 1), "rss_mb": round(rss, 1),
            "frames": {n: value(m, "facemoe_frames_total", camera=n) for n in names},
            "dropped": {n: value(m, "facemoe_frames_dropped_total", camera=n) for n in names},
            "fps": {n: round(value(m, "facemoe_fps", camera=n), 2) for n in names}})
        print(f"soak: t={now - t0:6.1f} s rss={rss:7.1f} MB fps="
              + " ".join(f"{v:.1f}" for v in samples[-1]["fps"].values()), file=sys.stderr)
        if start is None and now >= warm_at:
            start = (now, m, rss)
        if start is not None and now >= end_at:
            end = (now, m, rss)
            break
        next_at += SAMPLE_S
        time.sleep(max(0.0, min(next_at, end_at if start else warm_at) - time.monotonic()))
    return samples, start, end


def _figures(m_a: dict, m_b: dict, names: list[str], secs: float
             ) -> tuple[dict[str, dict], float | None]:
    """Per camera: processed fps, frames, drops, reconnects, events and latency percentiles
    between two scrapes `secs` apart; and every camera's event latency p95 together."""
    per_camera = {}
    for n in names:
        frames = value(m_b, "facemoe_frames_total", camera=n) - value(
            m_a, "facemoe_frames_total", camera=n)
        lat = delta(histogram(m_b, "facemoe_event_latency_seconds", camera=n),
                    histogram(m_a, "facemoe_event_latency_seconds", camera=n))
        frame_h = delta(histogram(m_b, "facemoe_stage_seconds", camera=n, stage="frame"),
                        histogram(m_a, "facemoe_stage_seconds", camera=n, stage="frame"))
        queue_h = delta(histogram(m_b, "facemoe_stage_seconds", camera=n, stage="queue"),
                        histogram(m_a, "facemoe_stage_seconds", camera=n, stage="queue"))
        p95 = quantile(lat, 0.95)
        per_camera[n] = {
            "processed_fps": round(frames / secs, 2),
            "frames": int(frames),
            "dropped": int(value(m_b, "facemoe_frames_dropped_total", camera=n)
                           - value(m_a, "facemoe_frames_dropped_total", camera=n)),
            "reconnects": int(value(m_b, "facemoe_reconnects_total", camera=n)),
            "events": int(value(m_b, "facemoe_events_total", camera=n)
                          - value(m_a, "facemoe_events_total", camera=n)),
            "event_latency_p95_s": None if p95 is None else round(p95, 3),
            "frame_ms_p95": _ms(quantile(frame_h, 0.95)),
            "queue_ms_p95": _ms(quantile(queue_h, 0.95)),
        }
    all_lat: dict[float, float] = {}  # every camera's events together
    for n in names:
        for b, c in delta(histogram(m_b, "facemoe_event_latency_seconds", camera=n),
                          histogram(m_a, "facemoe_event_latency_seconds", camera=n)):
            all_lat[b] = all_lat.get(b, 0.0) + c
    p95_all = quantile(sorted(all_lat.items()), 0.95)
    return per_camera, p95_all


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


if __name__ == "__main__":
    sys.exit(main())
