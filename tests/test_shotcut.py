"""Shot-cut detection on real clips: where the Hamilton clip changes shot, where two clips are
joined, and that no track of the pipeline continues across the join."""

from pathlib import Path

import numpy as np
import pytest

from app.config import AppConfig, TrackerConfig
from app.match import Matcher
from app.pipeline import FacePipeline
from app.runtime import make_detector, make_embedder
from app.shotcut import ShotCutDetector
from app.source import VideoWriter, open_source

pytestmark = pytest.mark.unit

HAMILTON_CUTS = [20, 82, 211]  # first frames of the shots: 0.67 s, 2.74 s and 7.04 s
FEMALE = "intel_head-pose-face-detection-female.mp4"
MALE = "intel_head-pose-face-detection-male.mp4"


def frames(path: Path) -> list[np.ndarray]:
    with open_source(str(path)) as src:
        return [f.image for f in src]


def cuts(images: list[np.ndarray], threshold: float = TrackerConfig().shot_cut_threshold,
         stride: int = 1) -> list[int]:
    """The indices of the frames (every `stride`-th one is looked at) that start a new shot."""
    detector = ShotCutDetector(threshold)
    return [i for i in range(0, len(images), stride) if detector.is_cut(images[i])]


@pytest.fixture(scope="module")
def hamilton(data_dir: Path) -> list[np.ndarray]:
    return frames(data_dir / "videos" / "short_hamilton_clip.mp4")


@pytest.fixture(scope="module")
def joined(data_dir: Path, tmp_path_factory) -> tuple[Path, int, float]:
    """The female head-pose clip followed by the male one (both 12 fps, a face at about the
    same place on either side of the join), written as one H.264 file: (path, first frame of
    the second clip, its media time)."""
    first, second = (frames(data_dir / "videos" / name) for name in (FEMALE, MALE))
    path = tmp_path_factory.mktemp("joined") / "joined.mp4"
    with VideoWriter(path, 12.0, (first[0].shape[1], first[0].shape[0])) as writer:
        for image in first + second:
            writer.write(image)
    return path, len(first), len(first) / 12.0


def test_the_hamilton_clip_cuts_exactly_where_its_shots_change(hamilton):
    assert len(hamilton) == 275
    assert cuts(hamilton) == HAMILTON_CUTS


def test_the_cuts_are_found_at_the_pipelines_detection_rate_and_at_any_size(hamilton):
    """The pipeline looks only at the frames it detects on (here every other one), and at
    whatever size the camera delivers."""
    assert cuts(hamilton, stride=2) == [20, 82, 212]
    small = [np.ascontiguousarray(image[::2, ::2]) for image in hamilton]
    assert cuts(small) == HAMILTON_CUTS


def test_the_threshold_trades_missed_cuts_against_false_ones(hamilton):
    # the cuts score 0.26, 0.22 and 0.49, ordinary frames at most 0.035
    assert cuts(hamilton, threshold=0.3) == [211]
    assert len(cuts(hamilton, threshold=0.02)) > 3  # ordinary motion now splits shots
    assert cuts(hamilton, threshold=0) == []  # 0 = off


def test_the_first_frame_and_a_repeated_frame_are_never_cuts(hamilton):
    detector = ShotCutDetector(0.15)
    assert not detector.is_cut(hamilton[0])
    assert not detector.is_cut(hamilton[0].copy())
    assert detector.is_cut(hamilton[-1])  # the audience after the singer
    assert not ShotCutDetector(0.15).is_cut(hamilton[-1])  # a fresh detector has no past


def test_a_join_of_two_clips_is_one_cut(joined):
    path, join, _ = joined
    images = frames(path)
    assert len(images) == join + 62
    assert cuts(images) == [join]


def test_no_track_continues_across_the_join(joined, yunet_path):
    """With the detector on, every track ends before the join or starts after it; with it off,
    the tracker carries one person's track onto the other's face (they are at about the same
    place), which is what the cut detector is there to prevent."""
    path, _, join_pts = joined
    half = 0.5 / 12.0

    def tracks(threshold: float) -> list:
        cfg = AppConfig(tracker=TrackerConfig(shot_cut_threshold=threshold))
        detector, embedder = make_detector(cfg), make_embedder(cfg)
        empty = Matcher([], np.zeros((0, embedder.dim), np.float32), 0.5)
        pipeline = FacePipeline("joined", cfg, detector, embedder, lambda: empty)
        events = []
        with open_source(str(path), "joined") as src:
            for frame in src:
                events += pipeline.push(frame).events
        events += pipeline.flush()
        return [e for e in events if e.type == "end"]

    ends = tracks(TrackerConfig().shot_cut_threshold)
    assert [e for e in ends if e.end < join_pts - half]  # hers
    assert [e for e in ends if e.start > join_pts - half]  # his
    assert not [e for e in ends if e.start < join_pts - half < e.end]
    assert [e for e in tracks(0.0) if e.start < join_pts - half < e.end]
