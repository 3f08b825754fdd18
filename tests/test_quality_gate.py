"""The face-quality gate: crops that carry no identity are never embedded, kept, enrolled or
grouped (a face in a dark audience, a near-black blob, a detection the detector is unsure of)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from app.aggregate import TrackAggregator
from app.align import STORE, align_face
from app.config import EmbedPolicy
from app.enroll import EnrollError, ImageLimits, faces_from_array
from app.quality import exposure, score_quality
from app.records import AlignedFace, Detection
from app.yunet import FaceDetector

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def obama(data_dir: Path, detector: FaceDetector) -> tuple[np.ndarray, Detection]:
    image = cv2.imread(str(data_dir / "videos" / "obama.jpg"))
    (det,) = detector.detect(image)
    return image, det


def _face(track: int, frame: int, image: np.ndarray, det: Detection) -> AlignedFace:
    kept = align_face(image, det.landmarks, STORE)
    return AlignedFace(track, frame, frame / 25, det.bbox, align_face(image, det.landmarks),
                       score_quality(det, kept), kept)


def test_a_lit_face_passes_and_a_dark_one_does_not(obama) -> None:
    image, det = obama
    policy = EmbedPolicy()
    lit = score_quality(det, align_face(image, det.landmarks, STORE))
    assert lit.exposure == 1.0 and policy.carries_identity(lit)
    # the same photo at 8% brightness: the face of someone in a dark audience
    dark_image = (image.astype(np.float32) * 0.08).astype(np.uint8)
    dark = score_quality(det, align_face(dark_image, det.landmarks, STORE))
    assert dark.exposure < policy.min_exposure and not policy.carries_identity(dark)
    assert dark.score < lit.score * 0.25
    # a detection the detector is unsure of (hands and fists scored 0.61-0.73 in the videos)
    unsure = Detection(det.bbox, det.landmarks, 0.68)
    assert not policy.carries_identity(score_quality(unsure, align_face(image, det.landmarks,
                                                                        STORE)))
    flat = np.full((112, 112), 90, np.uint8)  # a uniform blob: bright but no contrast
    assert exposure(flat) == 0.0


def test_gated_crops_are_never_embedded_or_kept(obama) -> None:
    image, det = obama
    dark_image = (image.astype(np.float32) * 0.08).astype(np.uint8)
    agg = TrackAggregator("cam", EmbedPolicy())
    # track 1: dark all along -> nothing embedded, no crop kept, no template (no event)
    assert not any(agg.observe(_face(1, i, dark_image, det)) for i in range(6))
    # track 2: dark, then lit -> only the lit crops are embedded and kept
    decisions = [agg.observe(_face(2, i, dark_image if i < 3 else image, det))
                 for i in range(6)]
    assert decisions[:3] == [False, False, False] and decisions[3]
    s1, s2 = agg.finish(1), agg.finish(2)
    assert s1.template is None and s1.crops == () and s1.frames == 6
    # the lit crops, not the dark ones (those average ~8 grey levels)
    assert len(s2.crops) == 3 and all(c.mean() > 40 and q > 0.1 for q, c in s2.crops)
    assert s2.embedded == 0 and agg.embedded_total == 0  # (no embeddings were added here)


def test_enrollment_refuses_a_dark_photo_with_one_line(obama, detector) -> None:
    image, _ = obama
    dark = (image.astype(np.float32) * 0.08).astype(np.uint8)
    with pytest.raises(EnrollError, match="too dark or flat") as e:
        faces_from_array(dark, "dark.jpg", detector, None, limits=ImageLimits())
    assert "\n" not in str(e.value)
    assert faces_from_array(image, "obama.jpg", detector, None, limits=ImageLimits())
