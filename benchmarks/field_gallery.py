"""A realistic gallery against every shared video: are strangers kept unknown?

Enrolls 100 LFW evaluation identities (one photo each; evaluation only, as the data's README
allows; nobody who appears in the shared videos: no Obama) plus Lin-Manuel Miranda and Alex
Lacamoire from their stills, then processes every shared video as a user would (`facemoe enroll`,
`facemoe process`). In these videos only Lin-Manuel Miranda and Alex Lacamoire (both in the
Hamilton clip) are enrolled people, so every other name in any event is a stranger named.

Usage: .venv/bin/python benchmarks/field_gallery.py [--model DIR] [--people 100] [--out OUT.json]
Prints one JSON report: strangers named (must be 0), whether Lin and Alex were named, the
score each named and best-scoring unknown event got, and the time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENROLLED = ("Lin-Manuel Miranda", "Alex Lacamoire")
IN_VIDEOS = ("Obama",)  # LFW identities that appear in the shared videos: never enrolled


def facemoe(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("facemoe")
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"facemoe {' '.join(args[:2])} failed: {r.stderr.strip()[-400:]}")
    return r


def lfw_people(data: Path, seed: int) -> list[Path]:
    """The first photo of every LFW evaluation identity in a seeded order, none from the
    videos."""
    names = [x for x in (data / "lfw" / "eval_identities.txt").read_text().split()
             if not any(v in x for v in IN_VIDEOS)]
    rng = np.random.default_rng(seed)
    chosen = [names[i] for i in rng.permutation(len(names))]
    return [data / "lfw" / "lfw-deepfunneled" / x / f"{x}_0001.jpg" for x in chosen]


def enroll_many(photos: list[Path], n: int, db: str, config: Path) -> int:
    """`facemoe enroll NAME PHOTO` for the first `n` photos that enroll (a profile photo is
    refused as a user would see it, and the next person taken), in one process (the model
    loads once); returns how many were refused."""
    sys.path.insert(0, str(REPO))
    from app.config import load_config
    from app.enroll import EnrollError, enroll
    from app.runtime import make_detector, make_embedder, open_gallery

    cfg = load_config(str(config))
    detector, embedder = make_detector(cfg), make_embedder(cfg)
    done = refused = 0
    with open_gallery(db, embedder) as gallery:
        for p in photos:
            if done == n:
                break
            try:  # LFW: the labelled face is the largest
                enroll(p.parent.name.replace("_", " "), [str(p)], detector, embedder, gallery,
                       face=0)
                done += 1
            except EnrollError:
                refused += 1
    return refused


def run(model: str | None, people: int, seed: int, work: Path) -> dict:
    import yaml

    sys.path.insert(0, str(REPO))
    from app.paths import shared

    data = shared() / "data"
    videos = sorted((data / "videos").glob("*.mp4"))
    db = str(work / "gallery.db")
    config = work / "app.yaml"
    cfg = yaml.safe_load((REPO / "configs" / "app.yaml").read_text())
    if model:
        cfg["model"]["dir"] = str(Path(model).resolve())
    config.write_text(yaml.safe_dump(cfg))
    extra = ["--config", str(config)]
    t0 = time.perf_counter()
    refused = enroll_many(lfw_people(data, seed), people, db, config)
    facemoe("enroll", ENROLLED[0], str(data / "videos" / "lin-manuel-miranda.png"),
            "--gallery", db, *extra)
    facemoe("enroll", ENROLLED[1], str(data / "videos" / "alex-lacamoire.png"),
            "--gallery", db, *extra)
    enrolled_s = time.perf_counter() - t0
    report: dict = {"people": people + 2, "photos_refused": refused, "videos": {},
                    "strangers_named": []}
    for v in videos:
        out = work / f"{v.stem}.jsonl"
        facemoe("process", str(v), "--gallery", db, "--events", str(out), "--no-progress",
                *extra)
        events = [json.loads(x) for x in out.read_text().splitlines()]
        ends = [e for e in events if e.get("type", "end") == "end"]
        named = [(e["identity"], round(e["score"], 3), e["track_id"]) for e in ends
                 if e["identity"]]
        wrong = [x for x in named if x[0] not in ENROLLED or "hamilton" not in v.stem]
        report["strangers_named"] += [{"video": v.name, "identity": i, "score": s, "track": t}
                                      for i, s, t in wrong]
        unknown = [e for e in ends if not e["identity"]]
        report["videos"][v.name] = {
            "tracks": len(ends),
            "named": named,
            "best_unknown": max(((e.get("candidate"), round(e["score"], 3)) for e in unknown),
                                key=lambda x: x[1], default=None),
        }
    hamilton = report["videos"].get("short_hamilton_clip.mp4", {"named": []})
    report["lin_named"] = any(n == ENROLLED[0] for n, _, _ in hamilton["named"])
    report["alex_named"] = any(n == ENROLLED[1] for n, _, _ in hamilton["named"])
    report["enroll_s"] = round(enrolled_s, 1)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model artifact (default: the app config's)")
    ap.add_argument("--people", type=int, default=100, help="LFW people enrolled besides the two")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the report JSON here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args.model, args.people, args.seed, Path(tmp))
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0 if not report["strangers_named"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
