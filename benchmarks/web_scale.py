"""Review UI and API latency on a large gallery: 10,000 identities and 100,000 events.

Builds a gallery for the shipped model: identities with one template each (random unit
vectors, a real face crop as their photo), events spread over 8 cameras with one kept crop
each (a real face crop), 10% of them unknown with cached embeddings, so pages measure their
steady state (the first cluster refresh, which groups the 10,000 unknown events, is timed on
its own). Then requests the pages and API routes in-process (FastAPI's TestClient, no
network) and prints p50/p95 latency per route as one JSON object on stdout. Not a test.

    .venv/bin/python benchmarks/web_scale.py                         # 10,000 / 100,000
    .venv/bin/python benchmarks/web_scale.py --identities 1000 --events 10000 --repeat 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from app.align import STORE, align_face  # noqa: E402
from app.config import load_config  # noqa: E402
from app.gallery import Enrollment, Gallery  # noqa: E402
from app.gallery.db import EventCropRow, EventEmbeddingRow, EventRow, utcnow  # noqa: E402
from app.runtime import make_detector, make_embedder, threshold  # noqa: E402
from app.web.app import create_app  # noqa: E402
from app.web.auth import Authenticator  # noqa: E402
from app.web.context import WebContext  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "videos"


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def face_crop(detector, path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    det = max(detector.detect(image), key=lambda d: d.bbox[2] * d.bbox[3])
    return align_face(image, det.landmarks, STORE)


def build(db: Path, embedder, crop: np.ndarray, identities: int, events: int,
          seed: int = 0) -> Gallery:
    rng = np.random.default_rng(seed)
    g = Gallery(db, embedder.model_name, embedder.model_version)
    names = [f"person-{i:05d}" for i in range(identities)]
    vecs = unit(rng, identities, embedder.dim)
    for s in range(0, identities, 2000):
        g.enroll_many([Enrollment(n, vecs[i:i + 1], ["bench"], [0.8], [crop])
                       for i, n in enumerate(names[s:s + 2000], start=s)])
    jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    now = utcnow()
    store = g.store
    model = embedder.model
    batch = 10_000
    for s in range(0, events, batch):
        n = min(batch, events - s)
        unknown = rng.random(n) < 0.1
        who = rng.integers(0, identities, n)
        rows = [{"camera": f"cam{int(c)}", "track_id": s + k,
                 "identity": None if unknown[k] else names[who[k]],
                 "score": float(rng.uniform(0.2, 0.9)), "start": 0.0, "end": 2.0, "frames": 30,
                 "bbox_x": 10.0, "bbox_y": 10.0, "bbox_w": 60.0, "bbox_h": 80.0,
                 "model": model, "created_at": now}
                for k, c in enumerate(rng.integers(0, 8, n))]
        emb = unit(rng, int(unknown.sum()), embedder.dim)

        def work(session, rows=rows, unknown=unknown, emb=emb) -> None:
            store.claim(session)
            ids = list(session.scalars(insert(EventRow).returning(EventRow.id,
                                                                  sort_by_parameter_order=True),
                                       rows).all())
            session.execute(insert(EventCropRow), [{"event_id": i, "quality": 0.8,
                                                    "crop": jpeg} for i in ids])
            un = [i for i, u in zip(ids, unknown, strict=True) if u]
            session.execute(insert(EventEmbeddingRow), [
                {"event_id": i, "model": model, "vector": v.astype("<f4").tobytes()}
                for i, v in zip(un, emb, strict=True)])

        store.db.write("bench events", work)
    return g


def timed(client: TestClient, method: str, url: str, repeat: int, **kw) -> dict:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = client.request(method, url, **kw)
        times.append(time.perf_counter() - t)
        if r.status_code >= 400:
            raise SystemExit(f"{method} {url}: {r.status_code} {r.text[:200]}")
    p50, p95 = np.percentile(times, [50, 95]) * 1000
    return {"p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--db", help="gallery file to build (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --db: measure the gallery already there instead of building it")
    args = ap.parse_args()
    cfg = load_config(None)
    detector, embedder = make_detector(cfg), make_embedder(cfg)
    crop = face_crop(detector, SHARED / "obama.jpg")
    tmp = tempfile.TemporaryDirectory()
    db = Path(args.db) if args.db else Path(tmp.name) / "bench.db"
    t = time.perf_counter()
    if args.reuse and db.exists():
        gallery = Gallery(db, embedder.model_name, embedder.model_version, create=False)
    else:
        gallery = build(db, embedder, crop, args.identities, args.events)
    built = time.perf_counter() - t
    ctx = WebContext(cfg, gallery, detector, embedder, threshold(cfg, embedder),
                     Authenticator(cfg.web, "127.0.0.1", env={}))
    client = TestClient(create_app(ctx))
    t = time.perf_counter()
    client.get("/api/clusters")
    first_refresh = time.perf_counter() - t
    some_event = args.events // 2
    mid = args.identities // 2
    image = (SHARED / "two_people.jpg").read_bytes()
    routes = {
        "GET /events": ("GET", "/events"),
        "GET /events?unknown": ("GET", "/events?unknown=true"),
        "GET /events?camera": ("GET", "/events?camera=cam3"),
        "GET /events?identity": ("GET", f"/events?identity=person-{mid:05d}"),
        "GET /events?before (page 1000)": ("GET", f"/events?before={some_event}"),
        "GET /events/{id}": ("GET", f"/events/{some_event}"),
        "GET /api/events?limit=50": ("GET", "/api/events?limit=50"),
        "GET /api/events/{id}/crops/0": ("GET", f"/api/events/{some_event}/crops/0"),
        "GET /clusters": ("GET", "/clusters"),
        "GET /api/clusters": ("GET", "/api/clusters"),
        "GET /gallery": ("GET", "/gallery"),
        "GET /gallery?offset (middle)": ("GET", f"/gallery?offset={mid}"),
        "GET /gallery?search": ("GET", f"/gallery?search=person-{mid:05d}"),
        "GET /gallery/{id}": ("GET", f"/gallery/{mid}"),
        "GET /api/identities": ("GET", "/api/identities"),
        "GET /api/templates/{id}/crop": ("GET", f"/api/templates/{mid}/crop"),
    }
    results = {name: timed(client, m, url, args.repeat) for name, (m, url) in routes.items()}
    results["POST /api/recognize (2 faces)"] = timed(
        client, "POST", "/api/recognize", max(3, args.repeat // 3),
        files={"image": ("two_people.jpg", image, "image/jpeg")})
    info = gallery.info()
    print(json.dumps({
        "identities": info["identities"], "events": info["events"],
        "event_crops": info["event_crops"], "gallery_bytes": info.get("bytes"),
        "build_s": round(built, 1), "first_cluster_refresh_s": round(first_refresh, 1),
        "clusters": client.get("/api/clusters").json()["total"],
        "repeat": args.repeat, "latency": results}, indent=1))
    gallery.close()


if __name__ == "__main__":
    main()
