"""Enrollment's inputs (`app.enroll`): huge photos, large portraits, truncated or unreadable
photos, and a video with several people."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def obama_box(data_dir: Path, detector):
    import cv2

    image = cv2.imread(str(data_dir / "videos" / "obama-1080p.jpg"))
    (det,) = detector.detect(image)
    return image, det


def test_huge_photo_is_detected_on_a_small_copy(tmp_path: Path, obama_box, detector) -> None:
    """8000x8000 (the 1080p photo enlarged onto a square canvas): found in seconds."""
    import cv2
    import numpy as np

    from app.enroll import ImageLimits, faces_from_image

    image, _ = obama_box
    canvas = np.zeros((8000, 8000, 3), np.uint8)
    big = cv2.resize(image, (8000, 4500), interpolation=cv2.INTER_LINEAR)
    canvas[1750:6250] = big
    path = tmp_path / "huge.jpg"
    cv2.imwrite(str(path), canvas, [cv2.IMWRITE_JPEG_QUALITY, 80])
    started = time.monotonic()
    (face,) = faces_from_image(path, detector, None)
    assert time.monotonic() - started < 20
    assert face.quality > 0.3 and face.crop.shape == (192, 192, 3)
    with pytest.raises(Exception, match=r"is 8000x8000 pixels \(64 MP\); at most 50 megapixels"):
        faces_from_image(path, detector, None, limits=ImageLimits(max_pixels=50_000_000))


def test_large_portrait_is_enrolled_from_the_whole_face(tmp_path: Path, obama_box, detector,
                                                        default_model_dir: Path) -> None:
    """A 3201x4000 portrait whose face fills the frame: at full size YuNet finds nothing or
    parts of the face; the enrolled crop must be the same face as in the original photo."""
    import cv2
    import numpy as np

    from app.embed import Embedder
    from app.enroll import faces_from_image

    image, det = obama_box
    x, y, w, h = (float(v) for v in det.bbox)
    cw = w * 1.6
    ch = cw * 4000 / 3201
    x0, y0 = int(x + w / 2 - cw / 2), int(max(0, y + h / 2 - ch / 2))
    portrait = cv2.resize(image[y0:int(y0 + ch), x0:int(x0 + cw)], (3201, 4000),
                          interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "portrait.jpg"
    cv2.imwrite(str(path), portrait, [cv2.IMWRITE_JPEG_QUALITY, 90])
    original = tmp_path / "original.jpg"
    cv2.imwrite(str(original), image)
    (face,) = faces_from_image(path, detector, None)
    (reference,) = faces_from_image(original, detector, None)
    embedder = Embedder.from_config(str(default_model_dir), "onnxruntime")
    a, b = np.asarray(embedder.embed_kept([face.crop, reference.crop]), np.float32)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.6


def test_truncated_unreadable_and_poor_photos(tmp_path: Path, data_dir: Path, detector) -> None:
    from app.enroll import EnrollError, ImageLimits, collect, faces_from_image

    videos = data_dir / "videos"
    data = (videos / "biden.jpg").read_bytes()
    truncated = tmp_path / "folder" / "biden-cut.jpg"
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(EnrollError, match="is truncated"):
        faces_from_image(truncated, detector, None)
    (tmp_path / "folder" / "notes.jpg").write_text("not an image\n")
    (tmp_path / "folder" / "obama.jpg").write_bytes((videos / "obama.jpg").read_bytes())
    skipped: list[str] = []
    faces = collect([str(tmp_path / "folder")], detector, skipped=skipped)
    assert [Path(f.source).name for f in faces] == ["obama.jpg"]
    assert len(skipped) == 2
    assert "biden-cut.jpg is truncated" in skipped[0] and "notes.jpg" in skipped[1]
    with pytest.raises(EnrollError, match=r"quality 0\.\d+, below the minimum 0\.99"):
        faces_from_image(videos / "obama.jpg", detector, None,
                         limits=ImageLimits(min_quality=0.99))


def test_video_with_several_people_needs_a_choice(data_dir: Path, detector) -> None:

    from app.enroll import EnrollError, ImageLimits, faces_from_video

    videos = data_dir / "videos"
    walking = videos / "intel_face-demographics-walking.mp4"
    with pytest.raises(EnrollError, match=r"shows 2 people \(track \d+ \(\d+ frames\), track") as e:
        faces_from_video(walking, detector, 8)
    second = int(re.findall(r"track (\d+) \(", str(e.value))[1])
    any_quality = ImageLimits(min_quality=0.0)  # small faces walking past the camera
    by_rank = faces_from_video(walking, detector, 8, face=1, limits=any_quality)
    by_id = faces_from_video(walking, detector, 8, track=second, limits=any_quality)
    assert [f.source for f in by_rank] == [f.source for f in by_id] and len(by_id) == 8
    with pytest.raises(EnrollError, match="no face of quality >= 0.5"):
        faces_from_video(walking, detector, 8, track=second, limits=ImageLimits(min_quality=0.5))
    with pytest.raises(EnrollError, match="has no track 99"):
        faces_from_video(walking, detector, 8, track=99)
    assert len(faces_from_video(videos / "intel_head-pose-face-detection-female.mp4",
                                detector, 8)) == 8
