"""Small moving faces: the share of face segments that get a track, per face size.

Renders synthetic clips (benchmarks/synthetic_faces.py: real CelebA faces from
../shared/data drifting across a 640x360 frame at 5-8 px per frame, with blur, sensor noise,
motion smear and JPEG compression), runs them through the app's `FacePipeline` with the
default config (detection at most 15 times per second: every 2nd frame at 25 fps) and
the default embedder, and reports per face size (YuNet box width, px):

- tracked: share of segments (one face's pass across the frame) with a confirmed track,
- one_track: share of segments whose detection frames are covered >= 90% by a single id,
- coverage: mean share of a segment's detection frames reported under its longest track,
- ids: mean number of track ids per segment (1 is ideal),
- fps: frames per second through the pipeline (rendering excluded).

    .venv/bin/python benchmarks/small_faces.py                    # 16/20/24/32 px, 24 segments each
    .venv/bin/python benchmarks/small_faces.py --segments 8 --sizes 16 20
    .venv/bin/python benchmarks/small_faces.py --set detector.upscale=2 --set detector.small_face=0

Prints one JSON object. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app.config import AppConfig, load_config  # noqa: E402
from app.embed import Embedder  # noqa: E402
from app.match import Matcher  # noqa: E402
from app.pipeline import FacePipeline  # noqa: E402
from app.records import Frame  # noqa: E402
from app.runtime import make_detector  # noqa: E402
from app.track import iou_matrix  # noqa: E402
from benchmarks.synthetic_faces import Walk, load_sprites, render, visible  # noqa: E402

FPS = 25.0
FRAMES = 64
DETECT_EVERY = 2  # the default detector.max_fps (15) on 25 fps video: every 2nd frame
SIZE = (640, 360)


def walks_for(sprites: list, size: float, rng: np.random.Generator) -> list[Walk]:
    """Two faces of `size` px, one in each half of the frame, crossing it in opposite directions
    at 5-8 px per frame and up to 20 degrees off horizontal."""
    walks = []
    for k, sprite in enumerate(sprites):
        speed = rng.uniform(5, 8)
        angle = np.radians(rng.uniform(-20, 20))
        vx, vy = speed * np.cos(angle) * (1 if k == 0 else -1), speed * np.sin(angle)
        height = size * sprite.box[3] / sprite.box[2]
        x_end = SIZE[0] - size - 4
        x0 = rng.uniform(4, x_end - abs(vx) * (FRAMES - 1))
        x0 = x0 if vx > 0 else x0 + abs(vx) * (FRAMES - 1)
        band = (SIZE[1] / 2) * k
        y_lo = band + 4 + max(0.0, -vy * (FRAMES - 1))
        y_hi = band + SIZE[1] / 2 - height - 4 - max(0.0, vy * (FRAMES - 1))
        y0 = rng.uniform(y_lo, max(y_lo, y_hi))
        walks.append(Walk(sprite, size, (x0, y0), (vx, vy)))
    return walks


def run_clip(pipeline: FacePipeline, walks: list[Walk], seed: int) -> tuple[list[dict], float]:
    """Push one clip; per walk {detection frame: track id or None}; seconds in the pipeline."""
    seen: list[dict[int, int | None]] = [{} for _ in walks]
    spent = 0.0
    for index, image in enumerate(render(walks, FRAMES, SIZE, seed=seed)):
        frame = Frame(camera="bench", index=index, pts=index / FPS, image=image)
        t = time.perf_counter()
        result = pipeline.push(frame)
        spent += time.perf_counter() - t
        if index % DETECT_EVERY:
            continue
        for k, walk in enumerate(walks):
            if not visible(walk, index, SIZE):
                continue
            truth = walk.box(index)
            ids = [f.track_id for f in result.faces
                   if iou_matrix(truth, f.detection.bbox)[0, 0] >= 0.3]
            seen[k][index] = ids[0] if ids else None
    t = time.perf_counter()
    pipeline.flush()
    return seen, spent + time.perf_counter() - t


def summarise(segments: list[dict[int, int | None]]) -> dict:
    tracked = one = 0
    coverage, ids = [], []
    for seen in segments:
        labels = [v for v in seen.values() if v is not None]
        counts = {tid: labels.count(tid) for tid in set(labels)}
        longest = max(counts.values(), default=0)
        tracked += bool(labels)
        one += longest >= 0.9 * len(seen)
        coverage.append(longest / max(len(seen), 1))
        ids.append(len(counts))
    n = len(segments)
    return {"segments": n, "tracked": round(tracked / n, 3), "one_track": round(one / n, 3),
            "coverage": round(float(np.mean(coverage)), 3), "ids": round(float(np.mean(ids)), 2)}


def with_overrides(cfg: AppConfig, items: list[str]) -> AppConfig:
    """The config with each KEY=VALUE (dotted key, YAML value) set, validated again."""
    raw = cfg.model_dump()
    for item in items:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return AppConfig.model_validate(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(REPO_ROOT.parent / "shared"))
    parser.add_argument("--model-dir", default=None, help="embedder artifact (default: config)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[16, 20, 24, 32])
    parser.add_argument("--segments", type=int, default=24, help="segments per size (even)")
    parser.add_argument("--config", help="app config (default: the shipped configs/app.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. detector.upscale=2")
    args = parser.parse_args()
    cfg = with_overrides(load_config(args.config), args.set)
    model_dir = args.model_dir or cfg.model.dir
    detector = make_detector(cfg)
    embedder = Embedder.from_config(model_dir, cfg.model.backend, cfg.model.threads,
                                    cfg.model.batch_size)
    empty = Matcher([], np.zeros((0, embedder.dim), np.float32), 0.5)
    sprites = load_sprites(Path(args.shared) / "data", 64)
    rng = np.random.default_rng(0)
    report, frames, seconds = {}, 0, 0.0
    for size in args.sizes:
        segments = []
        for clip in range(args.segments // 2):
            pair = [sprites[(2 * clip) % len(sprites)], sprites[(2 * clip + 1) % len(sprites)]]
            pipeline = FacePipeline("bench", cfg, detector, embedder, lambda: empty)
            seen, spent = run_clip(pipeline, walks_for(pair, size, rng), seed=clip)
            segments += seen
            frames += FRAMES
            seconds += spent
        report[f"{size:g}px"] = summarise(segments)
    report["fps"] = round(frames / seconds, 1)
    report["overrides"] = args.set
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
