"""Track aggregation: selective-embedding policy, the quality-weighted template and the
best-face rule."""

from __future__ import annotations

import numpy as np
import pytest

from app.aggregate import EmbedPolicy, TrackAggregator, better, face_quality
from app.records import AlignedFace, FaceEmbedding, Quality

pytestmark = pytest.mark.unit


def face(track_id: int, frame: int, q: float | None, bbox=(0.0, 0.0, 40.0, 40.0)) -> AlignedFace:
    quality = None if q is None else Quality(q, size=30.0, blur=100.0, pose=1.0, det_score=0.9)
    return AlignedFace(
        track_id=track_id,
        frame_index=frame,
        pts=frame / 25.0,
        bbox=np.array(bbox, dtype=np.float32),
        crop=np.full((112, 112, 3), frame % 256, dtype=np.uint8),
        quality=quality,
    )


def embed_frames(policy: EmbedPolicy, qualities: list[float]) -> list[int]:
    agg = TrackAggregator("cam0", policy)
    return [i for i, q in enumerate(qualities) if agg.observe(face(1, i, q))]


@pytest.mark.parametrize(
    ("policy", "qualities", "embedded"),
    [
        # first 3, then every 10th observed frame after the last embedded one
        (EmbedPolicy(), [0.5] * 25, [0, 1, 2, 12, 22]),
        # quality gain: 0.61 >= 0.5 + 0.1, 0.72 >= 0.61 + 0.1; 0.55, 0.65, 0.3 are not worth it
        (EmbedPolicy(first_n=1, every_n=100), [0.5, 0.55, 0.61, 0.65, 0.72, 0.3], [0, 2, 4]),
        # a gain resets the periodic counter: the next periodic one is 3 frames after frame 2
        (EmbedPolicy(first_n=1, every_n=3), [0.2, 0.2, 0.9, 0.2, 0.2, 0.2, 0.2], [0, 2, 5]),
        (EmbedPolicy(first_n=1, every_n=3), [0.2] * 7, [0, 3, 6]),
        # first crops are embedded whatever their quality
        (EmbedPolicy(first_n=3, every_n=100), [0.9, 0.1, 0.1, 0.1, 0.95], [0, 1, 2]),
        # the cap wins over everything
        (EmbedPolicy(first_n=3, max_per_track=2), [0.1, 0.5, 0.9, 1.0], [0, 1]),
        (EmbedPolicy(first_n=0, every_n=1, max_per_track=4), [0.5] * 6, [0, 1, 2, 3]),
        # first_n=0: the first crop still beats "nothing embedded yet"
        (EmbedPolicy(first_n=0, every_n=100), [0.3, 0.3, 0.45], [0, 2]),
    ],
)
def test_policy_table(policy: EmbedPolicy, qualities: list[float], embedded: list[int]) -> None:
    assert embed_frames(policy, qualities) == embedded


def test_policy_is_per_track() -> None:
    agg = TrackAggregator("cam0", EmbedPolicy(first_n=2, every_n=100))
    decisions = [agg.observe(face(t, i, 0.5)) for i in range(3) for t in (1, 2)]
    assert decisions == [True, True, True, True, False, False]


@pytest.mark.parametrize(
    "bad",
    [{"first_n": -1}, {"every_n": 0}, {"max_per_track": 0}, {"min_gain": -0.1}],
)
def test_policy_validation(bad: dict) -> None:
    with pytest.raises(ValueError, match="greater than or equal"):
        EmbedPolicy(**bad)


S5 = 1 / np.sqrt(5)


@pytest.mark.parametrize(
    ("vectors", "qualities", "expected"),
    [
        ([[1, 0]], [0.7], [1, 0]),
        ([[1, 0], [0, 1]], [1.0, 0.5], [2 * S5, S5]),  # (1, 0.5) / |.|
        ([[3, 0], [0, 0.5]], [0.5, 0.5], [np.sqrt(0.5), np.sqrt(0.5)]),  # inputs normalised
        ([[1, 0], [0, 1]], [0.95, 0.0], [0.95 / np.hypot(0.95, 0.05), 0.05 / np.hypot(0.95, 0.05)]),
        ([[1, 0], [0, 1]], [0.2, None], [0.2 / np.hypot(0.2, 0.05), 0.05 / np.hypot(0.2, 0.05)]),
        ([[1, 0], [0, 1], [-1, 0]], [0.6, 0.3, 0.2], [0.4 / 0.5, 0.3 / 0.5]),  # (0.4, 0.3)
        ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [0.01, 0.01, 0.01], [1 / np.sqrt(3)] * 3),
    ],
)
def test_weighted_template_table(vectors, qualities, expected) -> None:
    agg = TrackAggregator("cam0", EmbedPolicy(first_n=100))
    for i, (v, q) in enumerate(zip(vectors, qualities, strict=True)):
        f = face(5, i, q)
        assert agg.observe(f)
        agg.add(FaceEmbedding(face=f, vector=np.array(v, dtype=np.float32)))
    summary = agg.finish(5)
    assert summary.template.dtype == np.float32
    np.testing.assert_allclose(summary.template, expected, atol=1e-6)
    assert np.linalg.norm(summary.template) == pytest.approx(1.0, abs=1e-6)
    assert summary.embedded == len(vectors)


def test_track_bookkeeping() -> None:
    agg = TrackAggregator("gate", EmbedPolicy())
    rng = np.random.default_rng(3)
    qualities = [0.3, 0.8, 0.5, None, 0.6]
    for i, q in enumerate(qualities):
        f = face(7, 10 + i, q, bbox=(i, i, 40.0, 40.0))
        agg.observe(f)
        agg.observe(face(8, 10 + i, 0.5))
        if i < 2:
            agg.add(FaceEmbedding(face=f, vector=rng.normal(size=16).astype(np.float32)))
    assert agg.open_tracks() == [7, 8]
    assert agg.embedded_total == 2

    summary = agg.finish(7)
    assert (summary.camera, summary.track_id) == ("gate", 7)
    assert summary.start == pytest.approx(10 / 25) and summary.end == pytest.approx(14 / 25)
    assert summary.frames == 5 and summary.embedded == 2
    assert summary.best_quality == pytest.approx(0.8)
    np.testing.assert_array_equal(summary.best_bbox, [1, 1, 40, 40])
    assert summary.crops[0][1][0, 0, 0] == 11  # the best face (quality 0.8) first
    assert summary.template.shape == (16,)
    assert agg.open_tracks() == [8]

    unembedded = agg.finish(8)
    assert unembedded.template is None and unembedded.embedded == 0
    assert agg.open_tracks() == [] and agg.embedded_total == 2


def test_unknown_tracks_and_dim_mismatch() -> None:
    agg = TrackAggregator("cam0", EmbedPolicy())
    f = face(1, 0, 0.5)
    with pytest.raises(KeyError):
        agg.add(FaceEmbedding(face=f, vector=np.ones(4, np.float32)))
    with pytest.raises(KeyError):
        agg.finish(1)
    agg.observe(f)
    agg.add(FaceEmbedding(face=f, vector=np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="dim 3 != 4"):
        agg.add(FaceEmbedding(face=f, vector=np.ones(3, np.float32)))
    agg.finish(1)
    with pytest.raises(KeyError):
        agg.finish(1)


def test_the_best_face_is_the_highest_quality_and_the_earliest_of_equals() -> None:
    assert better(0.81, 0.8) and not better(0.8, 0.8) and not better(0.79, 0.8)
    agg = TrackAggregator("gate")
    qualities = [None, 0.0, 0.5, 0.8, 0.8, 0.3]  # an unscored crop counts as 0
    now_best = []
    for i, q in enumerate(qualities):
        f = face(7, i, q, bbox=(i, 0.0, 40.0 + i, 40.0))
        assert face_quality(f) == (q or 0.0)
        agg.observe(f)
        now_best.append(agg.is_best(f))
    assert now_best == [True, False, True, True, False, False]
    summary = agg.finish(7)
    assert summary.best_quality == pytest.approx(0.8)
    np.testing.assert_array_equal(summary.best_bbox, [3, 0, 43, 40])  # the first 0.8
    assert summary.crops[0][1][0, 0, 0] == 3  # the kept crops follow the same rule
    assert [q for q, _ in summary.crops] == pytest.approx([0.8, 0.8, 0.5, 0.3, 0.0])
    assert not agg.is_best(face(7, 3, 0.8))  # a finished track has no best face any more
