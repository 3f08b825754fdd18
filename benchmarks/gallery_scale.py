"""Gallery at scale: enrollment throughput, file size per identity, load time, 1:N search time.

Builds a gallery of random L2-normalised vectors (no crops; one template per identity),
then measures it the way the app uses it: the two-pass search (int8 first pass, exact
float32 re-score; app/match.py) against the exact float32 search over every row.
Prints one JSON object on stdout. Not a test.

    .venv/bin/python benchmarks/gallery_scale.py                  # 100,000 identities, 512-d
    .venv/bin/python benchmarks/gallery_scale.py --identities 20000 --encrypt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.gallery import Enrollment, Gallery  # noqa: E402
from app.match import Matcher  # noqa: E402

MODEL = ("bench-model", "1")


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def file_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--identities", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--single", type=int, default=300,
                   help="identities enrolled one transaction each (as `facemoe enroll` does)")
    p.add_argument("--batch", type=int, default=5000, help="identities per enroll_many call")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--encrypt", action="store_true", help="AES-GCM encryption at rest")
    p.add_argument("--db", help="gallery file to build (default: a temporary one, deleted)")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    tmp = tempfile.TemporaryDirectory()
    db = Path(args.db) if args.db else Path(tmp.name) / "gallery.db"
    key = os.urandom(32) if args.encrypt else None
    n, dim = args.identities, args.dim
    single = min(args.single, n)
    result: dict = {"identities": n, "dim": dim, "encrypted": args.encrypt, "crops": False}

    with Gallery(db, *MODEL, key=key) as g:
        vecs = unit(rng, single, dim)
        t = time.perf_counter()
        for i in range(single):
            g.enroll(f"person-{i:07d}", vecs[i:i + 1], ["bench"], [0.5])
        dt = time.perf_counter() - t
        result["enroll_single_per_s"] = round(single / dt, 1)
        result["enroll_single_ms"] = round(1000 * dt / single, 2)

        t, done = time.perf_counter(), single
        while done < n:
            m = min(args.batch, n - done)
            vecs = unit(rng, m, dim)
            g.enroll_many([Enrollment(f"person-{done + i:07d}", vecs[i:i + 1], ["bench"], [0.5])
                           for i in range(m)])
            done += m
        dt = time.perf_counter() - t
        result["enroll_bulk_per_s"] = round((n - single) / dt, 1) if n > single else None
        result["build_s"] = round(dt, 2)

    result["db_bytes"] = file_bytes(db)
    result["db_bytes_per_identity"] = round(result["db_bytes"] / n, 1)

    t = time.perf_counter()
    g = Gallery(db, *MODEL, key=key, create=False)
    result["open_s"] = round(time.perf_counter() - t, 4)
    t = time.perf_counter()
    matcher = Matcher.from_gallery(g, threshold=0.5)
    result["matcher_load_s"] = round(time.perf_counter() - t, 3)
    assert len(matcher) == n

    names, mat = matcher.names, matcher._matrix  # probes: noisy copies of enrolled templates
    picks = rng.integers(0, n, args.queries)
    probes = mat[picks] + 0.6 * unit(rng, args.queries, dim)  # cosine ~0.86 to the owner
    times = []
    hits = 0
    for j, probe in enumerate(probes):
        t = time.perf_counter()
        m = matcher.match(probe)
        times.append(time.perf_counter() - t)
        hits += m.identity == names[picks[j]]
    ms = np.array(times) * 1000
    result["search_ms_median"] = round(float(np.median(ms)), 3)
    result["search_ms_p95"] = round(float(np.percentile(ms, 95)), 3)
    # the same search without the int8 first pass: one exact float32 product over all rows
    exact = Matcher(names, mat, 0.5, normalised=True, coarse_min_templates=n + 1)
    unknown = unit(rng, args.queries, dim)  # probes of nobody enrolled: the closest race
    times, agree = [], 0
    for probe in np.concatenate([probes, unknown]):
        t = time.perf_counter()
        e = exact.match(probe)
        times.append(time.perf_counter() - t)
        m = matcher.match(probe)
        agree += (m.candidate, round(m.score, 5)) == (e.candidate, round(e.score, 5))
    result["search_exact_ms_median"] = round(float(np.median(times)) * 1000, 3)
    result["two_pass_agrees_with_exact"] = agree / (2 * len(probes))
    t = time.perf_counter()
    matcher.match_many(probes)
    result["search_batched_ms_per_query"] = round(
        1000 * (time.perf_counter() - t) / len(probes), 3)
    result["search_top1_correct"] = hits / len(probes)

    t = time.perf_counter()
    g.identities()
    result["list_identities_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    g.remove("person-0000000")  # with VACUUM of the whole file
    result["remove_with_vacuum_s"] = round(time.perf_counter() - t, 2)
    result["db_bytes_after_remove"] = file_bytes(db)
    g.close()
    print(json.dumps(result))
    tmp.cleanup()


if __name__ == "__main__":
    main()
