"""The detector seam (`app.detect.Detector`): the pipeline and enrollment use only the protocol.

A second kind is built here from the protocol's contract alone: `Recorded` returns, for an
image it was given annotations for (matched by its exact pixels), the faces recorded there,
and no face elsewhere. Its annotations are the boxes and 5 landmarks that the shared CelebA
teacher file stores for each photo. With it, the real enrollment (photos) and the real
pipeline (real SFace embedder, real gallery and matcher) run on real frames, a photo of the
person moving across a textured backdrop, and name the person; YuNet is never loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.config import AppConfig, DetectorConfig
from app.detect import KINDS, Detector, create_detector
from app.embed import Embedder
from app.enroll import enroll
from app.pipeline import FacePipeline
from app.records import Detection, Frame
from app.runtime import GalleryMatcher, open_gallery
from benchmarks.synthetic_faces import background

pytestmark = pytest.mark.e2e


def _key(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


class Recorded:
    """A detector kind that knows the faces of given images (by their exact pixels)."""

    kind = "recorded"

    def __init__(self) -> None:
        self.faces: dict[str, list[Detection]] = {}
        self.calls = 0
        self.expected_seen = 0  # calls that were told where the tracker expects a face

    def record(self, image: np.ndarray, faces: list[Detection]) -> None:
        self.faces[_key(image)] = sorted(faces, key=lambda d: -d.score)

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
            raise ValueError(f"expected uint8[H, W, 3] BGR image, got {image_bgr.dtype}"
                             f"{list(image_bgr.shape)}")
        self.calls += 1
        return list(self.faces.get(_key(image_bgr), []))

    def detect_frame(self, image_bgr: np.ndarray,
                     expected: Sequence[np.ndarray] = ()) -> list[Detection]:
        self.expected_seen += bool(len(expected))
        return self.detect(image_bgr)


@pytest.fixture(scope="module")
def person(data_dir: Path) -> tuple[list[Path], list[Detection]]:
    """The single-face CelebA photos (YuNet score >= 0.9, face >= 60 px) of the identity with
    the most of them, and each photo's recorded face."""
    t = np.load(data_dir / "teacher" / "dlib_resnet_v1.npz")
    ids = dict(line.split() for line in
               (data_dir / "celeba299" / "identities.txt").read_text().splitlines())
    by_id: dict[str, list[int]] = {}
    for i, p in enumerate(t["paths"]):
        name = Path(str(p)).name
        if (str(p).startswith("celeba299/") and t["n_faces"][i] == 1 and t["boxes"][i][2] >= 60
                and t["det_scores"][i] >= 0.9 and name in ids):
            by_id.setdefault(ids[name], []).append(i)
    rows = max(by_id.values(), key=len)[:4]
    assert len(rows) == 4
    faces = [Detection(t["boxes"][i].astype(np.float32),
                       t["landmarks"][i].reshape(5, 2).astype(np.float32),
                       float(t["det_scores"][i])) for i in rows]
    return [data_dir / str(t["paths"][i]) for i in rows], faces


def _moved(face: Detection, dx: float, dy: float) -> Detection:
    shift = np.array([dx, dy], np.float32)
    bbox = face.bbox.copy()
    bbox[:2] += shift
    return Detection(bbox, face.landmarks + shift, face.score)


def test_yunet_is_the_first_registered_kind_and_the_config_default(yunet_path: Path):
    assert next(iter(KINDS)) == "yunet" and DetectorConfig().kind == "yunet"
    detector = create_detector(DetectorConfig(model=str(yunet_path)))
    assert detector.kind == "yunet" and isinstance(detector, Detector)
    # made without a config, it takes the config type's defaults (the one source)
    from app.yunet import FaceDetector

    plain, cfg = FaceDetector(yunet_path), DetectorConfig()
    assert (plain.score_threshold, plain.small_face, plain.weak_score, plain.max_looks) == (
        cfg.score_threshold, cfg.small_face, cfg.weak_score, cfg.max_looks)
    with pytest.raises(ValueError, match="unknown detector kind 'recorded'"):
        create_detector(DetectorConfig.model_construct(kind="recorded"))


def test_enrollment_and_the_pipeline_run_on_another_kind(tmp_path: Path, person,
                                                         default_model_dir: Path,
                                                         no_gallery_key: None):
    photos, faces = person
    detector = Recorded()
    assert isinstance(detector, Detector)
    for path, face in zip(photos[:3], faces[:3], strict=True):
        detector.record(cv2.imread(str(path), cv2.IMREAD_COLOR), [face])

    embedder = Embedder.from_config(str(default_model_dir), "onnxruntime", 1, 8)
    gallery = open_gallery(tmp_path / "gallery.db", embedder)
    report = enroll("them", [str(p) for p in photos[:3]], detector, embedder, gallery)
    assert len(report.faces) + len(report.rejected) == 3 and report.faces

    # 30 frames at 10 fps from a still camera: the fourth photo drifting right
    photo, face = cv2.imread(str(photos[3]), cv2.IMREAD_COLOR), faces[3]
    h, w = photo.shape[:2]
    backdrop = background((480, 320), seed=0)
    frames = []
    for k in range(30):
        image = backdrop.copy()
        x, y = 40 + 4 * k, 60
        image[y: y + h, x: x + w] = photo
        detector.record(image, [_moved(face, x, y)])
        frames.append(Frame("seam", k, k / 10, image))
    # and the backdrop with nobody in it: no face, no track
    frames.append(Frame("seam", 30, 3.0, backdrop.copy()))

    cfg = AppConfig()
    threshold = embedder.recommended_threshold
    pipeline = FacePipeline("seam", cfg, detector, embedder, GalleryMatcher(gallery, threshold))
    events = [e for f in frames for e in pipeline.push(f).events] + pipeline.flush()
    ends = [e for e in events if e.type == "end"]
    assert len(ends) == 1
    (end,) = ends
    assert end.identity == "them" and end.score >= threshold
    assert end.frames >= 10 and end.start < end.end
    assert pipeline.detections == sum(1 for f in frames if detector.faces.get(_key(f.image)))
    assert detector.expected_seen > 0  # the tracker told the detector where it expects faces
    gallery.close()
