"""End-to-end low-resolution benchmark: does the product name people whose faces are 16-40 px?

A 640x360 clip is rendered from LFW *evaluation* identities (evaluation only, as the data's
README allows): each segment shows one person (a photo not used for enrollment) drifting across
a textured background with the face at one size (16-40 px wide), blurred, with sensor noise,
encoded by x264 at a low bitrate. One high-resolution photo per enrolled person is enrolled;
distractors are never enrolled. The product runs as a user runs it (`facemoe enroll`, `facemoe
process`), and each event is scored against the segment it falls in:
- recall: the enrolled person's segment produced an event naming them;
- false accept: an event named someone else (a wrong enrolled person, or anyone in a
  distractor's segment);
- tracked: the segment produced any event at all (the pipeline saw a face to recognise).

Usage: .venv/bin/python benchmarks/lowres_clip.py [--model DIR] [--sizes 16 20 24 28 32 40]
       [--people 8] [--distractors 4] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app import paths  # noqa: E402
from app.yunet import FaceDetector, find_detector_model  # noqa: E402

FPS, W, H = 25, 640, 360
SEGMENT_S, GAP_S = 2.4, 1.0  # a gap longer than the tracker's max_missed ends each track


def lfw_people(lfw: Path, pairs: Path, n: int, seed: int) -> list[tuple[str, list[Path]]]:
    """Evaluation identities with at least 2 photos (one to enroll, one to appear)."""
    names = sorted({ln.split()[0] for ln in pairs.read_text().splitlines()[1:] if ln.split()})
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    out = []
    for name in names:
        files = sorted((lfw / name).glob("*.jpg"))
        if len(files) >= 2:
            out.append((name, files))
        if len(out) == n:
            break
    return out


def face_of(image: np.ndarray, detector: FaceDetector):
    dets = detector.detect(image)
    if not dets:
        return None
    h, w = image.shape[:2]
    return min(dets, key=lambda d: (d.bbox[0] + d.bbox[2] / 2 - w / 2) ** 2
               + (d.bbox[1] + d.bbox[3] / 2 - h / 2) ** 2)


def background(rng: np.random.Generator) -> np.ndarray:
    """A smooth, textured indoor-like background (no faces)."""
    noise = rng.normal(0, 1, (H // 20, W // 20, 3)).astype(np.float32)
    bg = cv2.resize(noise, (W, H), interpolation=cv2.INTER_CUBIC)
    bg = (bg - bg.min()) / (bg.max() - bg.min() + 1e-6)
    return (60 + 120 * bg).astype(np.uint8)


def render(segments: list[dict], frames_dir: Path, detector: FaceDetector, seed: int) -> int:
    """Write PNG frames; fills each segment's start/end (media seconds)."""
    rng = np.random.default_rng(seed)
    bg = background(rng)
    index = 0

    def write(img: np.ndarray) -> None:
        nonlocal index
        cv2.imwrite(str(frames_dir / f"f{index:05d}.png"), img)
        index += 1

    for seg in segments:
        for _ in range(int(GAP_S * FPS)):
            write(bg)
        photo = cv2.imread(str(seg["photo"]))
        det = face_of(photo, detector)
        scale = seg["size"] / det.bbox[2]
        # the head and shoulders around the face, scaled so the face box is `size` px wide
        x, y, w, h = det.bbox
        cx, cy = x + w / 2, y + h / 2
        half = 1.6 * max(w, h)
        x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
        x1, y1 = int(min(photo.shape[1], cx + half)), int(min(photo.shape[0], cy + half))
        patch = photo[y0:y1, x0:x1]
        pw, ph = max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale))
        patch = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_AREA)
        n = int(SEGMENT_S * FPS)
        sx, sy = rng.uniform(40, W - 40 - pw - 160), rng.uniform(30, H - 30 - ph)
        vx = rng.uniform(1.0, 2.5)  # px per frame: walking slowly across the view
        seg["start"] = index / FPS
        for t in range(n):
            frame = bg.copy()
            px, py = int(sx + vx * t), int(sy + 3 * np.sin(t / 6))
            frame[py : py + ph, px : px + pw] = patch
            frame = cv2.GaussianBlur(frame, (0, 0), 0.7)
            frame = np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8)
            write(frame)
        seg["end"] = index / FPS
    for _ in range(int(GAP_S * FPS)):
        write(bg)
    return index


def encode(frames_dir: Path, out: Path, kbps: int) -> None:
    """x264 at a low bitrate through GStreamer (as a cheap camera stream would be)."""
    cmd = [
        "gst-launch-1.0", "-q", "multifilesrc", f"location={frames_dir}/f%05d.png", "index=0",
        f"caps=image/png,framerate={FPS}/1", "!", "pngdec", "!", "videoconvert", "!",
        "video/x-raw,format=I420", "!", "x264enc", f"bitrate={kbps}", "speed-preset=fast",
        "key-int-max=50", "!", "mp4mux", "!", "filesink", f"location={out}",
    ]
    subprocess.run(cmd, check=True)


def facemoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args],
                          capture_output=True, text=True, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = paths.shared()
    ap.add_argument("--model", default=None, help="model artifact (default: the app config's)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 20, 24, 28, 32, 40])
    ap.add_argument("--people", type=int, default=8, help="enrolled people")
    ap.add_argument("--distractors", type=int, default=4, help="people never enrolled")
    ap.add_argument("--kbps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the report JSON here too")
    args = ap.parse_args()
    lfw = shared / "data" / "lfw" / "lfw-deepfunneled"
    detector = FaceDetector(find_detector_model())
    people = lfw_people(lfw, shared / "data" / "lfw" / "pairs.txt",
                        args.people + args.distractors, args.seed)
    enrolled, distractors = people[: args.people], people[args.people :]
    segments = []
    for name, files in people:
        for k, size in enumerate(args.sizes):
            photo = files[1 + k % (len(files) - 1)]  # never the enrollment photo
            segments.append({"person": name, "enrolled": (name, files) in enrolled,
                             "size": size, "photo": photo})
    np.random.default_rng(args.seed).shuffle(segments)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "frames").mkdir()
        n_frames = render(segments, tmp / "frames", detector, args.seed)
        clip = tmp / "lowres.mp4"
        encode(tmp / "frames", clip, args.kbps)
        cfg = tmp / "app.yaml"
        cfg_text = f"gallery:\n  path: {tmp / 'gallery.db'}\n"
        if args.model:
            cfg_text = f"model:\n  dir: {Path(args.model).resolve()}\n" + cfg_text
        cfg.write_text(cfg_text)
        for name, files in enrolled:
            facemoe("enroll", name, str(files[0]), "--face", "0", "--config", str(cfg))
        events_file = tmp / "events.jsonl"
        t0 = time.perf_counter()
        summary = json.loads(facemoe("process", str(clip), "--config", str(cfg), "--events",
                                     str(events_file), "--no-progress", "--json").stdout)
        seconds = time.perf_counter() - t0
        events = [json.loads(line) for line in events_file.read_text().splitlines()]
    per_size: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for seg in segments:
        evs = [e for e in events if seg["start"] - 0.5 <= e["start"] <= seg["end"] + 0.5]
        named = {e["identity"] for e in evs if e["identity"]}
        row = per_size[seg["size"]]
        row["segments"] += 1
        row["tracked"] += bool(evs)
        if seg["enrolled"]:
            row["enrolled_segments"] += 1
            row["recalled"] += seg["person"] in named
        row["false_accepts"] += len(named - {seg["person"] if seg["enrolled"] else None})
    table = {
        size: {**row, "recall": round(row["recalled"] / max(1, row["enrolled_segments"]), 3),
               "tracked_share": round(row["tracked"] / row["segments"], 3)}
        for size, row in sorted(per_size.items())
    }
    report = {
        "benchmark": "lowres_clip",
        "model": summary.get("model"),
        "frames": n_frames,
        "fps_processed": round(n_frames / seconds, 1),
        "enrolled": len(enrolled),
        "distractors": len(distractors),
        "kbps": args.kbps,
        "per_face_px": table,
        "events": len(events),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
