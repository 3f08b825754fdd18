"""Crop templates from the manifest, the kept (STORE) geometry and re-cutting it for any model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from app.align import STORE, align_face, degrade_to, recut, stored_geometry
from app.yunet import FaceDetector
from trainer.models.resnet import DLIB_150
from trainer.preprocess import ARCFACE_112, CropTemplate

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def obama(data_dir, yunet_path):
    image = cv2.imread(str(data_dir / "videos" / "obama.jpg"))
    (det,) = FaceDetector(str(yunet_path)).detect(image)
    return image, det.landmarks


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / err)


@pytest.mark.parametrize("template", [ARCFACE_112, DLIB_150], ids=["arcface112", "dlib150"])
def test_recut_of_a_kept_crop_matches_direct_alignment(obama, template) -> None:
    image, lm = obama
    direct = align_face(image, lm, template)
    via_store = recut(align_face(image, lm, STORE), template)
    assert via_store.shape == direct.shape == (template.size, template.size, 3)
    assert _psnr(direct, via_store) > 27  # two interpolations blur a little, nothing moves
    # a geometry off by one pixel would not come close
    shifted = align_face(image, np.asarray(lm).reshape(5, 2) + 1.0 / 0.69, template)
    assert _psnr(direct, shifted) < 25


def test_store_holds_every_template_inside_the_crop() -> None:
    """The kept crop contains the whole ArcFace crop and dlib chip (no border fill needed)."""
    from app.align import similarity_transform

    for t in (ARCFACE_112, DLIB_150):
        m = similarity_transform(t.array, STORE)  # model crop coords -> STORE coords
        corners = np.array([[0, 0], [t.size, 0], [0, t.size], [t.size, t.size]], float)
        mapped = corners @ m[:, :2].T + m[:, 2]
        assert mapped.min() >= -1e-3 and mapped.max() <= STORE.size + 1e-3, (t.size, mapped)


def test_old_112_crops_are_still_recut() -> None:
    crop = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    assert stored_geometry(crop) == ARCFACE_112
    assert recut(crop, ARCFACE_112) is crop
    assert recut(crop, DLIB_150).shape == (150, 150, 3)
    with pytest.raises(ValueError, match="192x192 or 112x112"):
        stored_geometry(np.zeros((100, 100, 3), np.uint8))


def test_degrade_to_gives_the_face_the_resolution_of_an_n_px_arcface_crop(obama) -> None:
    image, lm = obama
    kept = align_face(image, lm, STORE)
    low = degrade_to(kept, 16)
    assert low.shape == kept.shape
    # the ArcFace view of the degraded crop carries what a 16x16 ArcFace crop carries
    direct16 = cv2.resize(
        cv2.resize(align_face(image, lm), (16, 16), interpolation=cv2.INTER_AREA), (112, 112),
        interpolation=cv2.INTER_CUBIC,
    )
    assert _psnr(recut(low, ARCFACE_112), direct16) > 27

    def at(n: int) -> np.ndarray:
        small = cv2.resize(align_face(image, lm), (n, n), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC)

    # closer to a 16 px ArcFace crop than to the neighbouring resolutions (a wrong factor,
    # e.g. the kept crop's full width taken as the ArcFace crop's, lands elsewhere)
    view = recut(low, ARCFACE_112)
    assert _psnr(view, at(16)) > max(_psnr(view, at(12)), _psnr(view, at(21)))
    assert _psnr(recut(low, ARCFACE_112), align_face(image, lm)) < _psnr(
        recut(degrade_to(kept, 48), ARCFACE_112), align_face(image, lm)
    )


@pytest.mark.parametrize(
    "spec,error",
    [
        ({"size": 112}, "malformed"),
        ({"size": 112, "points": [[1, 2]] * 4}, "5 points"),
        ({"size": 4, "points": [[1, 2]] * 5}, "5 points and a size"),
        ({"size": 112, "points": "x"}, "malformed"),
    ],
)
def test_malformed_manifest_templates_are_refused(spec, error) -> None:
    with pytest.raises(ValueError, match=error):
        CropTemplate.from_manifest({"crop_template": spec})


def test_artifacts_without_a_template_use_arcface() -> None:
    assert CropTemplate.from_manifest({}) == ARCFACE_112
    assert CropTemplate.from_manifest({"crop_template": DLIB_150.to_manifest()}) == DLIB_150
