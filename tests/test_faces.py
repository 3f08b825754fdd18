"""`app.faces`: image -> the chosen aligned face (enroll, eval, explain, data prepare)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from app.align import ARCFACE_112, STORE
from app.faces import FaceError, aligned_face, choose_face, detect_faces, find_face, read_image
from trainer.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pairs(data_dir: Path) -> Path:
    return data_dir / "deepface_pairs"


@pytest.fixture(scope="module")
def composite(pairs: Path) -> np.ndarray:
    """Two real photos on one 1280x720 canvas: img1.jpg enlarged 1.5x in the top-left corner
    (the largest face) and img17.jpg halved at the centre (the central, smaller face)."""
    big = read_image(pairs / "img1.jpg")
    big = cv2.resize(big, (big.shape[1] * 3 // 2, big.shape[0] * 3 // 2))[:720]
    small = read_image(pairs / "img17.jpg")
    small = cv2.resize(small, (small.shape[1] // 2, small.shape[0] // 2))
    canvas = np.zeros((720, 1280, 3), np.uint8)
    canvas[: big.shape[0], : big.shape[1]] = big
    y0, x0 = 360 - small.shape[0] // 2, 640 - small.shape[1] // 2
    canvas[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    return canvas


def _centre(det) -> tuple[float, float]:
    x, y, w, h = (float(v) for v in det.bbox)
    return x + w / 2, y + h / 2


def test_largest_central_and_asked_face_of_a_composite(composite, detector) -> None:
    dets = detect_faces(detector, composite)
    assert len(dets) == 2
    largest = find_face(composite, detector, "largest", source="composite")
    central = find_face(composite, detector, "central", source="composite")
    lx, ly = _centre(largest)
    cx, cy = _centre(central)
    assert lx < 400 and ly < 400 and largest.bbox[2] > 150  # img1's face, top left
    assert abs(cx - 640) < 60 and abs(cy - 360) < 60 and central.bbox[2] < 100  # img17's
    assert find_face(composite, detector, 0, source="c").bbox.tolist() == largest.bbox.tolist()
    assert find_face(composite, detector, 1, source="c").bbox.tolist() == central.bbox.tolist()
    with pytest.raises(FaceError, match=r"^composite has 2 faces; choose one with --face N"):
        find_face(composite, detector, "only", source="composite")
    with pytest.raises(FaceError, match=r"^composite has 2 faces; --face 2 does not exist$"):
        find_face(composite, detector, 2, source="composite")


def test_aligned_face_is_cut_from_the_original_pixels(composite, detector, pairs) -> None:
    """The central face of the composite, aligned onto a template, is the face of the photo it
    was pasted from (same person, same framing): close to that photo's own aligned face."""
    for template in (ARCFACE_112, STORE):
        face = aligned_face(composite, detector, "central", template, source="composite")
        assert face.crop.shape == (template.size, template.size, 3)
        alone = read_image(pairs / "img17.jpg")
        own = aligned_face(alone, detector, "only", template, source="img17").crop
        # the pasted copy is half size: compare coarse structure, not pixels
        small = [cv2.resize(c, (24, 24), interpolation=cv2.INTER_AREA).astype(np.float32)
                 for c in (face.crop, own)]
        other = aligned_face(composite, detector, "largest", template, source="c").crop
        far = cv2.resize(other, (24, 24), interpolation=cv2.INTER_AREA).astype(np.float32)
        assert np.abs(small[0] - small[1]).mean() < 0.5 * np.abs(far - small[1]).mean()


def test_choice_among_the_faces_of_a_group_photo(pairs, detector) -> None:
    image = read_image(pairs / "selfie-many-people.jpg")
    dets = detect_faces(detector, image)
    assert len(dets) >= 4
    areas = [float(d.bbox[2] * d.bbox[3]) for d in dets]
    largest = choose_face(dets, "largest", "selfie")
    assert float(largest.bbox[2] * largest.bbox[3]) == max(areas)
    central = choose_face(dets, "central", "selfie", image.shape)
    h, w = image.shape[:2]
    dist = [(_centre(d)[0] - w / 2) ** 2 + (_centre(d)[1] - h / 2) ** 2 for d in dets]
    assert _centre(central) == _centre(dets[int(np.argmin(dist))])
    assert central is not largest
    ranked = sorted(areas, reverse=True)
    assert [float(choose_face(dets, i, "s").bbox[2] * choose_face(dets, i, "s").bbox[3])
            for i in range(len(dets))] == ranked
    with pytest.raises(FaceError, match="^no face found in blank$"):
        choose_face([], "largest", "blank")
    with pytest.raises(ValueError, match="needs the image shape"):
        choose_face(dets, "central", "selfie")
    with pytest.raises(ValueError, match="unknown face choice"):
        choose_face(dets, "smallest", "selfie")


def test_a_small_photo_is_searched_once_at_its_own_size(pairs, detector) -> None:
    """Photos up to 640 px (LFW, the test sets) get exactly the detector's own faces."""
    image = read_image(pairs / "couple.jpg")
    assert max(image.shape[:2]) <= 640
    ours = sorted(d.bbox.tolist() for d in detect_faces(detector, image))
    plain = sorted(d.bbox.tolist() for d in detector.detect(image))
    assert ours == plain and len(ours) == 2


def test_read_image_refuses_what_it_cannot_use(tmp_path: Path, pairs: Path) -> None:
    data = (pairs / "img1.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FaceError, match=r"^image .*cut\.jpg is truncated \(incomplete file\)$"):
        read_image(cut)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(FaceError, match="notes.png: not a decodable image$"):
        read_image(text)
    with pytest.raises(FaceError, match="^cannot read image .*missing.jpg: No such file"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(FaceError,
                       match=r"is 355x480 pixels \(0 MP\); at most 0 megapixels are accepted"):
        read_image(pairs / "img1.jpg", max_pixels=100_000)
    tif = tmp_path / "img1.tif"
    assert cv2.imwrite(str(tif), read_image(pairs / "img1.jpg"))
    assert read_image(tif).shape == (480, 355, 3)


def test_one_suffix_set_for_every_reader() -> None:
    import app.dataprep
    import app.enroll
    import app.evaluate
    import trainer.data

    assert {".tif", ".tiff", ".jpg", ".pgm", ".webp"} <= IMAGE_SUFFIXES
    assert not IMAGE_SUFFIXES & VIDEO_SUFFIXES
    for module in (app.dataprep, app.enroll, app.evaluate, trainer.data):
        assert module.IMAGE_SUFFIXES is IMAGE_SUFFIXES, module.__name__
    assert app.enroll.VIDEO_SUFFIXES is VIDEO_SUFFIXES
