"""Image -> the chosen aligned face: the one way every command that starts from a photo gets its
face (enroll from photos, folders and uploads; eval lfw and eval ident; explain; data prepare).

`read_image` decodes a photo file within bounds (refusing truncated and oversized files),
`detect_faces` finds the faces of a photo of any size on downscaled copies, `choose_face`
picks one by a rule, `find_face` does both and `aligned_face` also aligns the face onto a
`CropTemplate`. The rules:

- "only": the photo's one face; several are refused, asking for `--face N` (enroll);
- "largest": the largest box (eval ident, explain, data prepare);
- "central": the box whose centre is nearest the image centre (LFW, whose images are centred);
- an int N: the N-th largest (0 = largest), as `--face N` asks.

Videos choose among tracks, not faces (the longest track, `--track`, or `--face N` = the N-th
longest: `app.enroll.faces_from_video`); every tracked face is aligned as here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from app.align import align_face
from app.detect import Detector
from app.records import Detection
from trainer.preprocess import CropTemplate

MAX_SIDE = 1920  # detection runs on a copy at most this long; alignment on the original
MAX_PIXELS = 100_000_000  # a photo file above this is refused
UPLOAD_MAX_PIXELS = 40_000_000  # a web upload above this (e.g. 7,700 x 5,200) is refused
_PYRAMID = (640, 1280)  # YuNet misses faces much larger than ~600 px: try small copies first

Choice = Literal["only", "largest", "central"] | int


class FaceError(ValueError):
    """The photo cannot be read, or has no face the rule accepts; the message says why in one
    line."""


@dataclass(frozen=True)
class Face:
    detection: Detection  # in the photo's own pixels
    crop: np.ndarray  # uint8[size, size, 3] BGR on the template asked for


def _truncated(data: bytes) -> bool:
    """A JPEG without its end marker or a PNG without IEND: the decoder fills in grey."""
    if data[:2] == b"\xff\xd8":
        return b"\xff\xd9" not in data[-4096:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-64:]
    return False


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, BMP or WebP header; None when not found."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return (1 + int.from_bytes(data[24:27], "little"),
                    1 + int.from_bytes(data[27:30], "little"))
        if chunk == b"VP8 ":
            w, h = struct.unpack("<HH", data[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L" and len(data) >= 25:
            b = int.from_bytes(data[21:25], "little")
            return (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return w, h
            i += 2 + length
    return None


def _check_pixels(what: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels or 0 in (width, height):
        raise FaceError(f"{what} is {width}x{height} pixels ({width * height / 1e6:.0f} MP); "
                        f"at most {max_pixels / 1e6:.0f} megapixels are accepted")


def decode_image(data: bytes, what: str, *, max_pixels: int = MAX_PIXELS,
                 max_bytes: int | None = None, known_formats: bool = False) -> np.ndarray:
    """uint8[H, W, 3] BGR from an encoded photo within the limits; FaceError (one line) else.

    The size in a JPEG, PNG, WebP or BMP header is checked before decoding, so a small file
    that would decode into a huge bitmap is refused first; `known_formats` (uploads) refuses
    every other format, whose size cannot be read without decoding. Truncated JPEG and PNG
    files are refused (the decoder would fill in grey)."""
    if not data:
        raise FaceError(f"{what} is empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise FaceError(f"{what} is {len(data) / 1e6:.1f} MB; at most "
                        f"{max_bytes / 1e6:.1f} MB is accepted")
    size = _header_size(data)
    if size is None and known_formats:
        raise FaceError(f"{what} is not a JPEG, PNG, WebP or BMP image")
    if size is not None:
        _check_pixels(what, *size, max_pixels)
    if _truncated(data):
        raise FaceError(f"{what} is truncated (incomplete file)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise FaceError(f"cannot read {what}: not a decodable image")
    _check_pixels(what, image.shape[1], image.shape[0], max_pixels)
    return image


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A photo file as uint8 BGR (`decode_image`); FaceError (one line) for unreadable,
    truncated or oversized."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FaceError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return decode_image(data, f"image {path}", max_pixels=max_pixels)


def _scaled(det: Detection, factor: float) -> Detection:
    return Detection(bbox=(np.asarray(det.bbox) * factor).astype(np.float32),
                     landmarks=(np.asarray(det.landmarks) * factor).astype(np.float32),
                     score=det.score)


def _overlap(det: Detection, other: Detection) -> tuple[float, float]:
    """(IoU of the two boxes, share of `det`'s box inside `other`'s)."""
    x, y, w, h = (float(v) for v in det.bbox)
    ox, oy, ow, oh = (float(v) for v in other.bbox)
    iw = max(0.0, min(x + w, ox + ow) - max(x, ox))
    ih = max(0.0, min(y + h, oy + oh) - max(y, oy))
    inter = iw * ih
    return inter / max(w * h + ow * oh - inter, 1e-6), inter / max(w * h, 1e-6)


def detect_faces(detector: Detector, image: np.ndarray,
                 max_side: int = MAX_SIDE) -> list[Detection]:
    """Faces of a photo of any size, in its own pixels, detected on downscaled copies; highest
    score first.

    Copies whose longest side is 640, 1280 and `max_side` (never larger than the photo) are
    searched from the smallest: a face found on a smaller copy wins over the boxes a larger
    copy finds inside it (YuNet sees parts of a face that fills a large photo as faces), the
    same face found again on a larger copy (IoU > 0.7) replaces it with its more precise
    landmarks, and a huge photo never reaches the detector at full size. A photo no longer
    than 640 px is searched once, at its own size.
    """
    height, width = image.shape[:2]
    longest = max(height, width)
    sides = sorted({*(s for s in _PYRAMID if s < min(longest, max_side)), min(longest, max_side)})
    found: list[Detection] = []
    for side in sides:
        factor = side / longest
        copy = image if factor == 1 else cv2.resize(
            image, (max(1, round(width * factor)), max(1, round(height * factor))),
            interpolation=cv2.INTER_AREA)
        coarse = list(found)
        for det in detector.detect(copy):
            det = _scaled(det, 1 / factor)
            overlaps = [(i, *_overlap(det, f)) for i, f in enumerate(coarse)]
            same = [i for i, iou, _ in overlaps if iou > 0.7]
            if same:
                found[same[0]] = det
            elif not any(inside > 0.5 or _overlap(coarse[i], det)[1] > 0.5
                         for i, _, inside in overlaps):
                found.append(det)
    return sorted(found, key=lambda d: -d.score)


def _area(det: Detection) -> float:
    return float(det.bbox[2]) * float(det.bbox[3])


def choose_face(dets: list[Detection], choice: Choice, source: str,
                shape: tuple[int, ...] | None = None) -> Detection:
    """The face `choice` names among `dets` (see the module docstring); `shape` (the image's)
    is needed for "central". FaceError when there is none, or several for "only"."""
    if not dets:
        raise FaceError(f"no face found in {source}")
    ranked = sorted(dets, key=lambda d: -_area(d))  # stable: equal boxes keep their order
    if choice == "largest":
        return ranked[0]
    if choice == "central":
        if shape is None:
            raise ValueError('choose_face(..., "central") needs the image shape')
        cy, cx = shape[0] / 2, shape[1] / 2
        return min(dets, key=lambda d: (float(d.bbox[0] + d.bbox[2] / 2) - cx) ** 2
                   + (float(d.bbox[1] + d.bbox[3] / 2) - cy) ** 2)
    if choice == "only":
        if len(ranked) > 1:
            raise FaceError(f"{source} has {len(ranked)} faces; choose one with --face N "
                            "(0 = largest, 1 = next largest, ...)")
        return ranked[0]
    if isinstance(choice, int) and not isinstance(choice, bool) and choice >= 0:
        if choice >= len(ranked):
            raise FaceError(f"{source} has {len(ranked)} faces; --face {choice} does not exist")
        return ranked[choice]
    raise ValueError(f"unknown face choice {choice!r}")


def find_face(image: np.ndarray, detector: Detector, choice: Choice, *, source: str,
              max_side: int = MAX_SIDE) -> Detection:
    """The chosen face of a decoded BGR photo (`detect_faces`, then `choose_face`); `source`
    names the photo in errors."""
    return choose_face(detect_faces(detector, image, max_side), choice, source, image.shape)


def aligned_face(image: np.ndarray, detector: Detector, choice: Choice,
                 template: CropTemplate, *, source: str, max_side: int = MAX_SIDE) -> Face:
    """The chosen face of a decoded BGR photo (`find_face`), aligned from its original pixels
    onto `template`."""
    det = find_face(image, detector, choice, source=source, max_side=max_side)
    return Face(det, align_face(image, det.landmarks, template))
