"""Verification/identification maths as tables, and the official LFW pairs file."""

import numpy as np
import pytest

from trainer.evaluate import (
    best_threshold,
    kfold_accuracy,
    rank_n_identification,
    read_lfw_pairs,
    tar_at_far,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "scores,same,expected_t",
    [
        ([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], 0.5),
        ([0.9, 0.3, 0.6, 0.1], [1, 1, 0, 0], 0.2),  # 3/4 at 0.2 and at 0.75: the lower wins
    ],
)
def test_best_threshold(scores, same, expected_t):
    t = best_threshold(np.array(scores), np.array(same, bool))
    assert t == pytest.approx(expected_t)


def test_kfold_accuracy_perfect_and_chance():
    same = np.tile([True, False], 50)
    folds = np.repeat(np.arange(10), 10)
    assert kfold_accuracy(np.where(same, 0.9, 0.1), same, folds) == (100.0, 0.0)
    acc, _ = kfold_accuracy(np.zeros(100), same, folds)
    assert acc == pytest.approx(50.0)


@pytest.mark.parametrize(
    "far,expected",
    [(0.0, 50.0), (0.25, 75.0), (0.5, 100.0)],
)
def test_tar_at_far(far, expected):
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.75, 0.65, 0.1, 0.0])
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    assert tar_at_far(scores, same, far) == pytest.approx(expected)


def test_rank_n():
    gallery = np.eye(3, dtype=np.float32)
    probes = np.array([[1, 0.2, 0], [0.1, 0, 1], [0.6, 0.5, 0]], np.float32)
    r = rank_n_identification(gallery, np.array([0, 1, 2]), probes, np.array([0, 2, 1]), (1, 2))
    assert r == {"rank1": pytest.approx(200 / 3, abs=0.01), "rank2": 100.0}


def test_official_lfw_pairs(data_dir):
    pairs = read_lfw_pairs(data_dir / "lfw" / "pairs.txt")
    assert len(pairs) == 6000 and sum(p.same for p in pairs) == 3000
    assert {p.fold for p in pairs} == set(range(10))
    assert all(sum(1 for p in pairs if p.fold == k and p.same) == 300 for k in range(10))
    assert pairs[0].left.endswith("_0001.jpg") or pairs[0].left.count("/") == 1


@pytest.mark.parametrize(
    "far,expected_accepted_negatives", [(0.0, 0), (0.1, 1), (0.25, 2), (1.0, 10)]
)
def test_threshold_at_far(far, expected_accepted_negatives):
    from trainer.evaluate import threshold_at_far

    scores = np.r_[np.linspace(0.9, 0.0, 10), 0.99, 0.98]  # 10 negatives, then 2 positives
    same = np.array([False] * 10 + [True] * 2)
    t = threshold_at_far(scores, same, far)
    assert int((scores[~same] >= t).sum()) == expected_accepted_negatives
    assert (scores[~same] >= t).mean() <= far
