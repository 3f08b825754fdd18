"""Enrollment outlier rejection: a face of someone else among an identity's photos is left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.enroll import find_outliers
from app.gallery import Gallery

pytestmark = pytest.mark.unit


def _cluster(rng: np.random.Generator, n: int, dim: int = 64, spread: float = 0.5) -> np.ndarray:
    centre = rng.normal(size=dim)
    centre /= np.linalg.norm(centre)
    v = centre + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_odd_one_out_rejected() -> None:
    rng = np.random.default_rng(3)
    vecs = np.concatenate([_cluster(rng, 4), _cluster(rng, 1)])
    reject, sims, bound = find_outliers(vecs)
    assert reject.tolist() == [False, False, False, False, True]
    assert sims[4] < bound < float(np.median(sims[:4]))


def test_consistent_templates_all_kept() -> None:
    reject, _, _ = find_outliers(_cluster(np.random.default_rng(4), 8))
    assert not reject.any()


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_templates_never_rejected(n: int) -> None:
    rng = np.random.default_rng(5)
    vecs = np.concatenate([_cluster(rng, 1), _cluster(rng, 1)])[:n]
    reject, _, bound = find_outliers(vecs)
    assert not reject.any() and bound == float("-inf")


def test_disabled_with_none_margin() -> None:
    rng = np.random.default_rng(6)
    vecs = np.concatenate([_cluster(rng, 4), _cluster(rng, 1)])
    assert not find_outliers(vecs, margin=None)[0].any()


def test_real_faces_other_person_rejected(data_dir: Path, tmp_path: Path) -> None:
    """4 CelebA photos of one person + 1 of another, through the real detector and embedder."""
    from app.config import load_config
    from app.enroll import enroll
    from app.runtime import make_detector, make_embedder

    root = data_dir / "celeba299"
    ids: dict[str, list[Path]] = {}
    for line in (root / "identities.txt").read_text().splitlines():
        fname, ident = line.split()
        ids.setdefault(ident, []).append(root / fname)
    same, other = ids["7499"][:4], ids["7488"][:1]
    cfg = load_config(None)
    detector, embedder = make_detector(cfg), make_embedder(cfg)
    with Gallery(tmp_path / "g.db", "facemoe-edge", "test") as gallery:
        report = enroll("alice", [str(p) for p in same + other], detector, embedder, gallery,
                        face=0)
        assert [r.source for r in report.rejected] == [str(other[0])]
        assert [f.source for f in report.faces] == [str(p) for p in same]
        assert len(gallery.templates("alice")) == 4
        r = report.rejected[0]
        assert r.similarity < r.bound and "medoid" in r.reason


@pytest.mark.parametrize(
    "threshold,margin", [(None, 0.3), (0.463, 0.3007), (0.9338, 0.0371), (0.0, 0.56)]
)
def test_the_auto_margin_follows_the_models_cosine_scale(threshold, margin) -> None:
    from app.enroll import auto_outlier_margin

    assert auto_outlier_margin(threshold) == pytest.approx(margin, abs=1e-4)
