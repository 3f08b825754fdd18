"""Which `alerts.unknown_min_quality` lets unknown faces be announced: the crop quality of a
clip's unknown tracks, and how many of them reach `alerts.unknown_after` good embeddings at
each bound.

    python -m benchmarks.unknown_quality --gallery G.db --video CLIP.mp4 [--json]

(The README's demo gallery: `facemoe enroll` Lin-Manuel Miranda and Alex Lacamoire from the
shared stills, then the Hamilton clip.)
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from app.config import load_config
from app.process import process_video
from app.runtime import make_detector, make_embedder, open_gallery, open_set

BOUNDS = (0.1, 0.05, 0.03, 0.02, 0.01)


def measure(video: str, gallery_path: str, config: str | None = None) -> dict:
    from app import pipeline as stage

    cfg = load_config(config)
    quality: dict[int, list[float]] = defaultdict(list)  # track -> crop quality scores
    named: dict[int, str | None] = {}
    original = stage.FacePipeline.update_labels

    def observe(self, faces):  # noqa: ANN001, ANN202
        quality_of = [(f.track_id, f.quality.score) for f in faces if f.quality is not None]
        for track, score in quality_of:
            quality[track].append(score)
        original(self, faces)
        named.update((t, m.identity) for t, m in self.labels.items())

    stage.FacePipeline.update_labels = observe
    try:
        embedder = make_embedder(cfg)
        with open_gallery(gallery_path, embedder) as gallery:
            process_video(video, cfg, make_detector(cfg), embedder, gallery,
                          open_set(cfg, embedder), progress=False)
    finally:
        stage.FacePipeline.update_labels = original
    unknown = [t for t in quality if named.get(t) is None]
    scores = np.array([q for t in unknown for q in quality[t]])
    need = cfg.alerts.unknown_after
    return {
        "unknown_tracks": len(unknown),
        "crops": int(scores.size),
        "quality_p50_p90_p99": ([round(float(v), 4) for v in np.percentile(scores, [50, 90, 99])]
                                if scores.size else None),
        "announced_at": {str(b): sum(sum(q >= b for q in quality[t]) >= need for t in unknown)
                         for b in BOUNDS},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", required=True)
    ap.add_argument("--video", required=True)
    ap.add_argument("--config")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = measure(args.video, args.gallery, args.config)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
