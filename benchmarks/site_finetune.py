"""Site fine-tune benchmark: a stand-in site, named through the REST API, then fine-tuned.

1. A site from training-side identities only (CelebA subset people; never an LFW evaluation
   identity): each person walks through `--tracks` segments of low-resolution clips (faces
   `--sizes` px wide, blur, sensor noise, x264 at a low bitrate; `benchmarks/lowres_clip.py`'s
   renderer), one photo per segment, spread over `--cameras` clips.
2. `facemoe process` stores the events with their kept crops in a new gallery.
3. A reviewer names them through the REST API: `facemoe serve` with a bearer token, `GET
   /api/events`, then `POST /api/events/{id}/name` with the person the segment showed (events
   that overlap no single segment are left unknown, as a reviewer would skip them).
4. `facemoe finetune --from-gallery` with each recipe (FaceMoE upcycled from SFace, and the
   dense SFace at the same budget), with the LFW before/after check (native and 16 px).

Usage (from the repository root):
  nice -n 10 .venv/bin/python benchmarks/site_finetune.py --out runs/site-bench
      [--people 24] [--tracks 8] [--cameras 3] [--sizes 16 26] [--no-lfw]
      [--recipes moe dense] [--reuse-site]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import lowres_clip  # noqa: E402
from trainer.site import load_site_config  # noqa: E402

RECIPES = {"moe": "configs/finetune-site.yaml", "dense": "configs/finetune-site-dense.yaml"}


def celeba_people(shared: Path, people: int, tracks: int, seed: int
                  ) -> list[tuple[str, list[Path]]]:
    """`people` CelebA-subset identities with at least `tracks` + 2 photos (training-side
    data: one to enroll, one per track, one spare)."""
    root = shared / "data" / "celeba299"
    by_id: dict[str, list[Path]] = {}
    for line in (root / "identities.txt").read_text().splitlines():
        name, ident = line.split()
        by_id.setdefault(ident, []).append(root / name)
    ids = sorted(i for i, files in by_id.items() if len(files) >= tracks + 2)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(ids, people, replace=False)
    return [(f"celeba-{i}", sorted(by_id[i])) for i in chosen]


def render_site(shared: Path, out: Path, people: int, tracks: int, cameras: int,
                sizes: tuple[int, int], seed: int, kbps: int = 400
                ) -> tuple[list[dict], list[tuple[str, Path]]]:
    """Render the clips into `out` (cam<k>.mp4); returns the segments (with camera and times)
    and each person's enrollment photo."""
    from app.config import load_config
    from app.runtime import make_detector

    detector = make_detector(load_config(None))
    rng = np.random.default_rng(seed)
    segments, enroll = [], []
    for name, files in celeba_people(shared, people, tracks, seed):
        photos = [files[i] for i in rng.choice(len(files), len(files), replace=False)]
        usable = [p for p in photos if lowres_clip.face_of(
            cv2.imread(str(p)), detector) is not None]
        # the photos the site may enroll (the first one enroll accepts); never in a clip
        enroll.append((name, usable[:1] + usable[tracks + 1:]))
        for photo in usable[1:tracks + 1]:
            segments.append({"person": name, "photo": photo,
                             "size": int(rng.integers(sizes[0], sizes[1] + 1)),
                             "camera": f"cam{int(rng.integers(cameras))}"})
    rng.shuffle(segments)
    for cam in sorted({s["camera"] for s in segments}):
        mine = [s for s in segments if s["camera"] == cam]
        if (out / f"{cam}.mp4").is_file():  # rendered by an earlier piece: same segments
            segment_times(mine)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            frames = Path(tmp)
            lowres_clip.render(mine, frames, detector, seed + int(cam[3:]))
            lowres_clip.encode(frames, out / f"{cam}.mp4", kbps)
    return segments, enroll


def segment_times(segments: list[dict]) -> None:
    """The start/end that `lowres_clip.render` gives each segment of one clip."""
    index = 0
    for seg in segments:
        index += int(lowres_clip.GAP_S * lowres_clip.FPS)
        seg["start"] = index / lowres_clip.FPS
        index += int(lowres_clip.SEGMENT_S * lowres_clip.FPS)
        seg["end"] = index / lowres_clip.FPS


def facemoe(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"facemoe {' '.join(map(str, args))}: {done.stderr.strip()[-800:]}")
    return done


def truth(event: dict, segments: list[dict]) -> str | None:
    """The person of the one segment of the event's camera that the event falls in."""
    hits = {s["person"] for s in segments if s["camera"] == event["camera"]
            and s["start"] - 0.5 <= event["start"] and event["end"] <= s["end"] + 0.5}
    return hits.pop() if len(hits) == 1 else None


def name_events(client, segments: list[dict], headers: dict[str, str]) -> dict[str, int]:
    """Name every event through the REST API as a reviewer would (`client`: an httpx.Client
    or FastAPI's TestClient); returns counts."""
    events, before = [], None
    while True:
        params = {"limit": 500, **({"before": before} if before else {})}
        page = client.get("/api/events", params=params, headers=headers)
        page.raise_for_status()
        body = page.json()
        events += body["events"]
        before = body["next_before"]
        if before is None:
            break
    counts = {"events": len(events), "named": 0, "confirmed": 0, "skipped": 0, "refused": 0}
    for ev in sorted(events, key=lambda e: e["id"]):
        person = truth(ev, segments)
        if person is None or not ev["crops"]:
            counts["skipped"] += 1
            continue
        if ev["identity"] == person:  # the product named it right: nothing to correct
            counts["confirmed"] += 1
            continue
        r = client.post(f"/api/events/{ev['id']}/name", json={"name": person}, headers=headers)
        counts["named" if r.status_code < 300 else "refused"] += 1
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_name(config: Path, segments: list[dict]) -> dict[str, int]:
    """`facemoe serve` on loopback with a bearer token; name the events through it."""
    import httpx

    from app.web.auth import hash_token

    token = secrets.token_urlsafe(16)
    port = free_port()
    text = config.read_text() + f"web:\n  token_hashes: [{json.dumps(hash_token(token))}]\n"
    config.write_text(text)
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--config", str(config),
                               "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for _ in range(240):
                try:
                    if client.get("/api/events", headers=headers).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None:
                    raise RuntimeError(f"facemoe serve exited: {server.stderr.read()[-800:]}")
                time.sleep(0.5)
            return name_events(client, segments, headers)
    finally:
        server.terminate()
        server.wait(30)


def build_site(shared: Path, work: Path, people: int, tracks: int, cameras: int,
               seed: int, sizes: tuple[int, int] = (18, 32)) -> tuple[Path, Path, dict]:
    """Clips, gallery and app config of the stand-in site, named through the API."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    segments, enroll = render_site(shared, work, people, tracks, cameras, sizes, seed)
    rendered = time.time() - t0
    config = work / "app.yaml"
    config.write_text(f"gallery:\n  path: {work / 'gallery.db'}\n")
    for name, photos in enroll:  # a photo enroll refuses (too dark, too small) is skipped
        if not any(facemoe("enroll", name, p, "--config", config, check=False).returncode == 0
                   for p in photos):
            raise RuntimeError(f"no photo of {name} could be enrolled")
    t1 = time.time()
    for clip in sorted(work.glob("cam*.mp4")):
        facemoe("process", clip, "--config", config, "--no-progress")
    processed = time.time() - t1
    counts = serve_and_name(config, segments)
    info = {"people": people, "tracks_per_person": tracks, "segments": len(segments),
            "face_px": list(sizes),
            "cameras": cameras, "render_s": round(rendered, 1),
            "process_s": round(processed, 1), "review": counts}
    return config, work / "gallery.db", info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("FACEMOE_SHARED") or REPO.parent / "shared")
    ap.add_argument("--out", default="runs/site-bench")
    ap.add_argument("--people", type=int, default=24)
    ap.add_argument("--tracks", type=int, default=8)
    ap.add_argument("--cameras", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", type=int, nargs=2, default=[16, 26], metavar=("LO", "HI"),
                    help="face width range in the clips, px")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES),
                    help="none: build the site only")
    ap.add_argument("--no-lfw", action="store_true", help="skip the LFW before/after check")
    ap.add_argument("--reuse-site", action="store_true",
                    help="fine-tune on the site OUT/site built by an earlier run (a piece)")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    if args.reuse_site:
        config, db = out / "site" / "app.yaml", out / "site" / "gallery.db"
        site = json.loads((out / "site" / "site.json").read_text())
    else:
        config, db, site = build_site(shared, out / "site", args.people, args.tracks,
                                      args.cameras, args.seed, tuple(args.sizes))
        (out / "site" / "site.json").write_text(json.dumps(site, indent=2) + "\n")
    print(json.dumps({"site": site}), flush=True)
    lfw = []
    if args.recipes and not args.no_lfw:
        root = shared / "data" / "lfw" / "lfw-deepfunneled"
        pairs = shared / "data" / "lfw" / "pairs.txt"
        before = out / "lfw-before.json"  # both recipes start from SFace's function: once
        if not before.is_file():
            start = load_site_config(REPO / RECIPES[args.recipes[0]]).model.init_from
            before.write_text(facemoe("eval", "lfw", "--root", root, "--pairs", pairs,
                                      "--probe-res", 16, "--model", start, "--json").stdout)
        lfw = ["--lfw-root", root, "--lfw-pairs", pairs, "--lfw-before", before]
    results = {"site": site}
    for recipe in args.recipes:
        t0 = time.time()
        done = facemoe("finetune", "--config", RECIPES[recipe], "--from-gallery", db,
                       "--app-config", config, "--set", f"run.out_dir={out / recipe}",
                       *lfw, "--json")
        report = json.loads(done.stdout)
        results[recipe] = {
            "wall_s": round(time.time() - t0, 1),
            "site_heldout": report["site_heldout_identification"],
            "lfw": report.get("lfw"), "seconds": report["seconds"],
            "anchor_cosine_to_start": report["anchor_cosine_to_start"],
            "pool": report["pool"], "model_dir": report["model_dir"],
        }
        print(json.dumps({recipe: results[recipe]}), flush=True)
    (out / "site_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
