"""YuNet detector on the shared stills and on the Intel clips with ~15-25 px faces."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest

from app import paths
from app.source import open_source
from app.track import iou_matrix
from app.yunet import DETECTOR_FILE, FaceDetector, find_detector_model
from benchmarks.synthetic_faces import Walk, load_sprites, render

pytestmark = pytest.mark.unit


def _still(data_dir: Path, name: str) -> np.ndarray:
    image = cv2.imread(str(data_dir / "videos" / name), cv2.IMREAD_COLOR)  # drops PNG alpha
    assert image is not None
    return image


@pytest.mark.parametrize("name, faces", [("lin-manuel-miranda.png", 1), ("two_people.jpg", 2),
                                         ("obama-240p.jpg", 1)])
def test_stills(detector: FaceDetector, data_dir: Path, name: str, faces: int) -> None:
    image = _still(data_dir, name)
    found = detector.detect(image)
    assert len(found) == faces
    height, width = image.shape[:2]
    for det in found:
        assert det.bbox.dtype == np.float32 and det.bbox.shape == (4,)
        assert det.landmarks.dtype == np.float32 and det.landmarks.shape == (5, 2)
        assert 0.6 <= det.score <= 1.0
        x, y, w, h = det.bbox
        assert 0 <= x and 0 <= y and x + w <= width + 1 and y + h <= height + 1
        # Landmarks inside the box; image-left eye (index 0) left of the other one.
        top_left, bottom_right = det.bbox[:2] - 2, det.bbox[:2] + det.bbox[2:] + 2
        assert np.all((det.landmarks >= top_left) & (det.landmarks <= bottom_right))
        assert det.landmarks[0, 0] < det.landmarks[1, 0]
    if faces == 2:  # Obama left, Biden right; results are sorted by score
        assert {bool(d.bbox[0] < width / 2) for d in found} == {True, False}
        assert found[0].score >= found[1].score


def test_upscale_maps_back_to_source_pixels(yunet_path: Path, data_dir: Path) -> None:
    image = _still(data_dir, "two_people.jpg")
    small = cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    plain = sorted(FaceDetector(yunet_path).detect(small), key=lambda d: d.bbox[0])
    upscaled = sorted(FaceDetector(yunet_path, upscale=2.0).detect(small), key=lambda d: d.bbox[0])
    assert len(plain) == len(upscaled) == 2
    for a, b in zip(plain, upscaled, strict=True):
        assert np.abs(a.bbox - b.bbox).max() < 0.1 * a.bbox[2]
        assert np.abs(a.landmarks - b.landmarks).max() < 0.1 * a.bbox[2]


@pytest.mark.parametrize("clip, per_frame", [("intel_classroom.mp4", 4),
                                             ("intel_face-demographics-walking.mp4", 2)])
def test_tiny_faces_in_intel_clips(detector: FaceDetector, data_dir: Path, clip: str,
                                   per_frame: int) -> None:
    """480x270 clips whose faces are about 11-25 px wide (inter-ocular distance ~6-8 px)."""
    with open_source(str(data_dir / "videos" / clip)) as source:
        frames = [frame.image for frame in source][::4]
    counts, widths = [], []
    for image in frames:
        found = detector.detect(image)
        counts.append(len(found))
        widths += [float(d.bbox[2]) for d in found]
    assert np.median(counts) >= per_frame
    assert 10 <= np.median(widths) <= 25


def test_size_cache_handles_changing_sizes(detector: FaceDetector, data_dir: Path) -> None:
    image = _still(data_dir, "two_people.jpg")
    half = cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    assert len(detector.detect(half)) == 2
    assert len(detector.detect(image)) == 2
    assert detector.detect(np.zeros((64, 96, 3), np.uint8)) == []
    with pytest.raises(ValueError):
        detector.detect(np.zeros((64, 96), np.uint8))


def test_find_detector_model(tmp_path: Path, yunet_path: Path, shared_dir: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_detector_model(yunet_path) == yunet_path
    monkeypatch.setenv("FACEMOE_DETECTOR", str(yunet_path))
    assert find_detector_model() == yunet_path
    monkeypatch.delenv("FACEMOE_DETECTOR")
    assert find_detector_model().name == DETECTOR_FILE
    # Without <checkout>/models/detector: the shared folder (FACEMOE_SHARED) is used.
    monkeypatch.setattr(paths, "CHECKOUT", tmp_path)
    monkeypatch.delenv("FACEMOE_HOME", raising=False)
    monkeypatch.setenv("FACEMOE_SHARED", str(shared_dir))
    assert find_detector_model() == shared_dir / "models" / DETECTOR_FILE
    monkeypatch.setenv("FACEMOE_SHARED", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError) as info:
        find_detector_model()
    assert str(tmp_path / "models" / "detector") in str(info.value)
    assert str(tmp_path / "elsewhere") in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        find_detector_model(tmp_path / "none.onnx")
    assert str(tmp_path / "none.onnx") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="none.onnx"):
        FaceDetector(tmp_path / "none.onnx")


def _hit(truth: np.ndarray, detections: list) -> bool:
    return any(iou_matrix(truth, d.bbox)[0, 0] >= 0.3 for d in detections)


@pytest.mark.slow
def test_second_look_finds_small_faces_the_frame_pass_misses(yunet_path: Path,
                                                             data_dir: Path) -> None:
    """24 frames, each with one blurred, noisy, JPEG-compressed 16 px face: the full-frame
    pass misses some; a second look where the face is expected (a track's predicted box)
    finds most of those, only there, and maps the boxes back to frame pixels. Looks at weak
    full-frame detections (no track) return only faces scoring score_threshold or more.
    `detect` (stills: enrollment photos, LFW) takes no second look."""
    plain = FaceDetector(yunet_path)
    looking = FaceDetector(yunet_path, small_face=32, weak_score=1.0)
    seeded = FaceDetector(yunet_path, small_face=32, weak_score=0.3)
    missed = found = plain_hits = seeded_hits = 0
    for k, sprite in enumerate(load_sprites(data_dir, 24, seed=2)):
        walk = Walk(sprite, 16, (100 + 20 * k, 150), (6.0, 0.0))
        image = next(render([walk], 1, seed=k))
        truth = walk.box(0)
        hit = functools.partial(_hit, truth)
        looks = looking.looks
        if hit(plain.detect(image)):
            plain_hits += 1
            looking.detect_frame(image, [truth])
            assert looking.looks == looks  # found by the frame pass: no second look
        else:
            missed += 1
            found += hit(looking.detect_frame(image, [truth]))
        with_seeds = seeded.detect_frame(image)
        assert all(d.score >= seeded.score_threshold for d in with_seeds)
        seeded_hits += hit(with_seeds)
    assert missed >= 4 and found >= missed / 2
    assert seeded_hits > plain_hits
    looks = seeded.looks
    assert len(seeded.detect(image)) == len(plain.detect(image))  # stills: the frame pass only
    assert seeded.looks == looks
