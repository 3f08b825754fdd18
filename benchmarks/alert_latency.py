"""How soon a person is announced: media seconds from the first frame of a track to the
`recognized` message, over runs of one clip started at different frames.

    python -m benchmarks.alert_latency --gallery G.db --video CLIP.mp4 [--runs 2]
        [--max-fps 5 10 15] [--max-wait 0 0.1 0.25 0.5] [--json]

For every detection rate (detector.max_fps) and batch wait (embed.max_wait_s) of the grid,
`runs` runs each skip the first k frames (k = 0 .. runs - 1), which shifts the detector's
frame phase against the faces. A message's media time is the time of the frame whose
processing produced it; the latency is that minus the track's first frame.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from app.config import load_config
from app.pipeline import FacePipeline
from app.records import Event
from app.runtime import GalleryMatcher, make_detector, make_embedder, open_gallery, threshold
from app.source import open_source


def alerts(video: str, pipeline: FacePipeline, skip: int) -> list[tuple[float, Event]]:
    """(media time of the frame that produced it, message) of every `recognized` message."""
    out = []
    with open_source(video, "clip") as src:
        for i, frame in enumerate(src):
            if i < skip:
                continue
            out += [(frame.pts, e) for e in pipeline.push(frame).events if e.type == "recognized"]
    pipeline.flush()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", required=True)
    p.add_argument("--video", required=True)
    p.add_argument("--identity", default="Lin-Manuel Miranda")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--max-fps", type=float, nargs="+", default=[15.0])
    p.add_argument("--max-wait", type=float, nargs="+", default=[0.25])
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    detector, embedder = make_detector(cfg), make_embedder(cfg)
    gallery = open_gallery(args.gallery, embedder, create=False)
    matcher = GalleryMatcher(gallery, threshold(cfg, embedder))
    latencies, misses, grid = [], 0, []
    for fps in args.max_fps:
        for wait in args.max_wait:
            run_cfg = cfg.model_copy(update={
                "detector": cfg.detector.model_copy(update={"max_fps": fps}),
                "embed": cfg.embed.model_copy(update={"max_wait_s": wait})})
            cell = []
            for skip in range(args.runs):
                pipeline = FacePipeline("clip", run_cfg, detector, embedder, matcher)
                named = [(at, e) for at, e in alerts(args.video, pipeline, skip)
                         if e.identity == args.identity]
                if not named:
                    misses += 1
                    continue
                at, ev = named[0]
                cell.append(round(at - ev.start, 3))
            latencies += cell
            grid.append({"max_fps": fps, "max_wait_s": wait, "latency_s": cell})
            print(f"max_fps={fps:g} max_wait_s={wait:g}: {cell}", file=sys.stderr)
    lat = np.array(latencies)
    report = {"identity": args.identity, "runs": len(lat) + misses, "announced": len(lat),
              "missed": misses, "grid": grid}
    if len(lat):
        report.update({k: round(float(v), 3) for k, v in zip(
            ("min", "p50", "p90", "max"), np.percentile(lat, [0, 50, 90, 100]), strict=True)})
    if args.json:
        print(json.dumps(report))
    else:
        print(" ".join(f"{k}={v}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
