"""Quality ordering on real faces (blur, size, pose) and the pose measure on the template."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from app.align import TEMPLATE, align_face
from app.quality import pose_frontalness, score_quality
from app.records import Detection
from app.source import open_source
from app.yunet import FaceDetector

pytestmark = pytest.mark.unit


def _face(detector: FaceDetector, image: np.ndarray) -> tuple[Detection, np.ndarray]:
    found = detector.detect(image)
    assert len(found) == 1
    return found[0], align_face(image, found[0].landmarks)


def test_blurred_copy_scores_lower(detector: FaceDetector, data_dir: Path) -> None:
    image = cv2.imread(str(data_dir / "videos" / "obama-720p.jpg"), cv2.IMREAD_COLOR)
    det, crop = _face(detector, image)
    sharp = score_quality(det, crop)
    blurred = score_quality(det, cv2.GaussianBlur(crop, (0, 0), 2.0))
    assert 0.0 < blurred.score < sharp.score <= 1.0
    assert blurred.blur < 0.5 * sharp.blur
    assert blurred.size == sharp.size and blurred.pose == sharp.pose


def test_small_face_scores_lower(detector: FaceDetector, data_dir: Path) -> None:
    """The same photo at 720p and 240p (face ~53 px wide at 240p)."""
    qualities = {}
    for name in ("obama-720p.jpg", "obama-240p.jpg"):
        image = cv2.imread(str(data_dir / "videos" / name), cv2.IMREAD_COLOR)
        qualities[name] = score_quality(*_face(detector, image))
    big, small = qualities["obama-720p.jpg"], qualities["obama-240p.jpg"]
    assert small.size == pytest.approx(big.size / 3, rel=0.15)
    assert small.score < big.score
    assert small.pose == pytest.approx(big.pose, abs=0.2)  # landmark noise at 240p


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = points.mean(0)
    return (points - centre) @ rot.T + centre


def _moved_nose(x: float | None = None, y: float | None = None) -> np.ndarray:
    points = TEMPLATE.copy()
    points[2] = [x if x is not None else points[2, 0], y if y is not None else points[2, 1]]
    return points


@pytest.mark.parametrize("landmarks, low, high", [
    (TEMPLATE, 0.95, 1.0),  # frontal
    (_rotate(TEMPLATE, 35), 0.95, 1.0),  # in-plane roll does not matter
    (TEMPLATE * 3 + 100, 0.95, 1.0),  # scale and position do not matter
    (_moved_nose(x=47.0), 0.4, 0.6),  # nose half-way to the right eye: half yaw
    (_moved_nose(x=TEMPLATE[0, 0]), 0.0, 0.01),  # nose in front of an eye: profile
    (_moved_nose(y=60.0), 0.3, 0.6),  # nose high: pitched
    (np.repeat(TEMPLATE[:1], 5, axis=0), 0.0, 0.0),  # degenerate
])
def test_pose_table(landmarks: np.ndarray, low: float, high: float) -> None:
    assert low <= pose_frontalness(landmarks) <= high


def test_pose_on_turning_head(detector: FaceDetector, data_dir: Path) -> None:
    """The head-pose clip turns from profile to frontal."""
    poses = []
    with open_source(str(data_dir / "videos" / "intel_head-pose-face-detection-female.mp4")) as src:
        for frame in src:
            for det in detector.detect(frame.image):
                quality = score_quality(det, align_face(frame.image, det.landmarks))
                assert 0.0 <= quality.score <= 1.0 and quality.det_score == det.score
                poses.append(quality.pose)
    assert min(poses) < 0.2 and max(poses) > 0.8
