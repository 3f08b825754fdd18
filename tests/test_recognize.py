"""`app.recognize` finds faces the way enrollment does (`app.faces`): a large photo whose face
YuNet only sees whole on a downscaled copy gives one face, not one per part of the face; and
uploads are decoded within bounds, refusing a small file that would decode into a huge
bitmap before decoding it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import pytest

from app.embed import Embedder
from app.faces import FaceError, decode_image, read_image
from app.recognize import Recognizer
from app.yunet import FaceDetector

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def recognizer(yunet_path: Path, default_model_dir: Path) -> Recognizer:
    embedder = Embedder.from_config(str(default_model_dir), "onnxruntime", 1, 8)
    return Recognizer(FaceDetector(yunet_path), embedder, None, 0.9)


@pytest.fixture(scope="module")
def lin(data_dir: Path):
    return read_image(data_dir / "videos" / "lin-manuel-miranda.png")


def test_a_large_photo_gives_one_face(recognizer: Recognizer, lin):
    big = cv2.resize(lin, None, fx=2, fy=2)  # 1408 x 1224: YuNet alone sees two "faces"
    assert len(recognizer.detector.detect(big)) == 2
    faces = recognizer.recognize(big)
    assert len(faces) == 1
    (x, y, w, h), (sx, sy, sw, sh) = faces[0].box, (2 * v for v in recognizer.recognize(lin)[0].box)
    iw, ih = min(x + w, sx + sw) - max(x, sx), min(y + h, sy + sh) - max(y, sy)
    assert iw > 0 and ih > 0 and iw * ih / (w * h + sw * sh - iw * ih) > 0.7  # the same face
    v = recognizer.verify(big, lin)
    assert v.same and v.score > 0.95  # the same photo at twice the size


def test_verify_needs_a_face_in_each_image(recognizer: Recognizer, lin):
    blank = lin * 0
    with pytest.raises(FaceError, match="^no face found in the second image$"):
        recognizer.verify(lin, blank)
    with pytest.raises(FaceError, match="^no face found in grey.jpg$"):
        recognizer.verify(lin, blank, ("lin.png", "grey.jpg"))


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\0\0\0\0IEND\xaeB`\x82")


def test_uploads_are_bounded_before_decoding(lin):
    ok, jpeg = cv2.imencode(".jpg", lin)
    assert decode_image(jpeg.tobytes(), "the image", known_formats=True).shape == lin.shape
    with pytest.raises(FaceError, match="^the image is 100000x100000 pixels .*megapixels"):
        decode_image(_png_header(100_000, 100_000), "the image", max_pixels=40_000_000)
    with pytest.raises(FaceError, match="^the image is empty$"):
        decode_image(b"", "the image")
    with pytest.raises(FaceError, match=r"MB; at most 0\.0 MB is accepted$"):
        decode_image(jpeg.tobytes(), "the image", max_bytes=10)
    with pytest.raises(FaceError, match="^the image is truncated"):
        decode_image(jpeg.tobytes()[: len(jpeg) // 2], "the image")
    ok, tiff = cv2.imencode(".tif", lin)
    with pytest.raises(FaceError, match="not a JPEG, PNG, WebP or BMP image$"):
        decode_image(tiff.tobytes(), "the image", known_formats=True)
    assert decode_image(tiff.tobytes(), "image x.tif").shape == lin.shape  # a file may be TIFF
