"""Matcher: open-set threshold, max over an identity's templates, empty gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.gallery import Gallery
from app.match import Matcher
from app.records import Match

pytestmark = pytest.mark.unit

# alice: templates e1 and e2; bob: one template at cos 0.9 to e1 (and 0.436 to e2).
NAMES = ["alice", "bob", "alice"]
MATRIX = np.array(
    [[1.0, 0.0, 0.0], [0.9, np.sqrt(1 - 0.81), 0.0], [0.0, 1.0, 0.0]], dtype=np.float32
)


@pytest.mark.parametrize(
    ("probe", "threshold", "identity", "score", "candidate"),
    [
        ([1.0, 0.0, 0.0], 0.5, "alice", 1.0, "alice"),  # max (1.0) beats bob, mean (0.5) would not
        ([1.0, 0.0, 0.0], 1.01, None, 1.0, "alice"),  # above every score: unknown
        ([0.0, 0.0, 1.0], 0.3, None, 0.0, "alice"),  # orthogonal to all: unknown
        ([0.0, 0.0, 1.0], -0.5, "alice", 0.0, "alice"),  # threshold is inclusive of >=
        ([0.0, 0.6, 0.8], 0.5, "alice", 0.6, "alice"),  # matched by alice's second template
        ([0.0, 0.6, 0.8], 0.61, None, 0.6, "alice"),
        ([0.9, 0.43589, 0.0], 0.95, "bob", 1.0, "bob"),
        ([0.8, 0.6, 0.0], 0.9, "bob", 0.98153, "bob"),  # 0.72 + 0.6 * 0.43589
        ([0.8, 0.6, 0.0], 0.99, None, 0.98153, "bob"),
        ([-0.6, -0.8, 0.0], -0.7, "alice", -0.6, "alice"),  # all negative: best is -0.6
        ([-0.6, -0.8, 0.0], -0.5, None, -0.6, "alice"),
        ([4.0, 3.0, 0.0], 0.9, "bob", 0.98153, "bob"),  # probe is normalised: cosine score
    ],
)
@pytest.mark.parametrize("coarse_min", [10**9, 1], ids=["exact", "int8-first-pass"])
def test_open_set_threshold(probe, threshold, identity, score, candidate, coarse_min) -> None:
    matcher = Matcher(NAMES, MATRIX, threshold, coarse_min_templates=coarse_min)
    assert (matcher._coarse is not None) == (coarse_min == 1)
    result = matcher.match(np.array(probe, dtype=np.float32))
    assert result.identity == identity
    assert result.candidate == candidate
    assert result.score == pytest.approx(score, abs=1e-4)


def test_match_many_equals_match() -> None:
    rng = np.random.default_rng(7)
    mat = rng.normal(size=(20, 32)).astype(np.float32)
    names = [f"id{i % 6}" for i in range(20)]
    probes = rng.normal(size=(9, 32)).astype(np.float32)
    matcher = Matcher(names, mat, threshold=0.2)
    many = matcher.match_many(probes)
    for m, p in zip(many, probes, strict=True):  # same decision one by one (BLAS may round)
        one = matcher.match(p)
        assert (m.identity, m.candidate) == (one.identity, one.candidate)
        assert m.score == pytest.approx(one.score, abs=1e-6)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    scores = unit(probes) @ unit(mat).T
    for k, m in enumerate(many):
        j = int(np.argmax(scores[k]))
        assert m.candidate == names[j]
        assert m.score == pytest.approx(float(scores[k, j]), abs=1e-5)
        assert m.identity == (names[j] if scores[k, j] >= 0.2 else None)


def test_int8_first_pass_finds_the_exact_best() -> None:
    """The two-pass search (int8 candidates, exact float32 re-score) gives the same identity
    and score as the exact search, for near and far probes and duplicated templates."""
    rng = np.random.default_rng(3)
    m, d = 30_000, 512
    mat = rng.standard_normal((m, d), dtype=np.float32)
    mat[1000] = mat[29_000]  # an exact duplicate: the lower row must win, as np.argmax does
    names = [f"person-{i % 20_000}" for i in range(m)]  # some identities have 2 templates
    two_pass = Matcher(names, mat, 0.5, coarse_min_templates=20_000)
    exact = Matcher(names, mat, 0.5, coarse_min_templates=10**9)
    assert two_pass._coarse is not None and exact._coarse is None
    owners = rng.integers(0, m, 60)
    probes = np.concatenate([
        mat[owners] / np.linalg.norm(mat[owners], axis=1, keepdims=True)
        + rng.standard_normal((60, d), dtype=np.float32) * (0.5 / np.sqrt(d)),  # cos ~0.9
        rng.standard_normal((60, d), dtype=np.float32),  # nobody: best scores ~0.19, close
        mat[[29_000, 1000]],
    ])
    for probe in probes:
        got, want = two_pass.match(probe), exact.match(probe)
        assert (got.identity, got.candidate) == (want.identity, want.candidate)
        assert got.score == pytest.approx(want.score, abs=1e-5)
    assert two_pass.match(mat[29_000]).candidate == names[1000]
    many = two_pass.match_many(probes)
    assert [x.candidate for x in many] == [exact.match(p).candidate for p in probes]
    assert sum(x.identity is not None for x in many) >= 60  # the near probes are named


@pytest.mark.parametrize("dim", [0, 3, 512])
def test_empty_gallery(dim: int) -> None:
    matcher = Matcher([], np.zeros((0, dim), np.float32), threshold=0.3)
    assert len(matcher) == 0
    assert matcher.match(np.ones(512, np.float32)) == Match(None, -1.0, None)
    assert matcher.match_many(np.ones((3, 512), np.float32)) == [Match(None, -1.0, None)] * 3


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="2 names"):
        Matcher(["a", "b"], MATRIX, 0.5)
    matcher = Matcher(NAMES, MATRIX, 0.5)
    with pytest.raises(ValueError, match="template dim 4 != gallery dim 3"):
        matcher.match(np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        matcher.match_many(np.ones(3, np.float32))


def test_from_gallery(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    vecs = rng.normal(size=(3, 8)).astype(np.float32)
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as g:
        empty = Matcher.from_gallery(g, 0.5)
        assert empty.version == 0 and empty.match(vecs[0]) == Match(None, -1.0, None)
        g.enroll("alice", vecs[:2], ["a", "b"], [0.5, 0.5])
        g.enroll("bob", vecs[2:], ["c"], [0.5])
        matcher = Matcher.from_gallery(g, 0.5)
        assert matcher.version == g.version() != empty.version
        assert len(matcher) == 3
        assert matcher.match(vecs[1] * 5.0) == Match("alice", pytest.approx(1.0), "alice")
        assert matcher.match(vecs[2]).identity == "bob"
