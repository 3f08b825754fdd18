"""Faces in a still image against the gallery (`facemoe recognize`, `POST /api/recognize`) and
two photos of one person or not (`facemoe compare`, `POST /api/verify`).

Images from users are bounded before they are decoded: at most `MAX_IMAGE_BYTES` of data
and `MAX_IMAGE_PIXELS` pixels (read from the PNG/JPEG/WebP/BMP header, so a small file that
would decode into a huge bitmap is refused first).
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from app.align import STORE, align_face
from app.detect import FaceDetector
from app.embed import Embedder
from app.gallery import Gallery

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # 40 MP, e.g. 7,700 x 5,200


class ImageError(Exception):
    """An image the user gave cannot be used; str() is one line."""


@dataclass(frozen=True)
class Candidate:
    name: str
    score: float  # cosine similarity of the identity's closest template


@dataclass(frozen=True)
class FaceResult:
    """One face of an image: box (x, y, w, h in pixels), detector score, the identity when the
    best score reaches the threshold (else None) and the nearest identities, best first."""

    box: tuple[float, float, float, float]
    detector_score: float
    identity: str | None
    candidates: list[Candidate] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"box": [round(v, 1) for v in self.box],
                "detector_score": round(self.detector_score, 4), "identity": self.identity,
                "candidates": [{"name": c.name, "score": round(c.score, 4)}
                               for c in self.candidates]}


@dataclass(frozen=True)
class Verification:
    score: float
    same: bool
    threshold: float
    box_a: tuple[float, float, float, float]
    box_b: tuple[float, float, float, float]

    def as_json(self) -> dict:
        return {"score": round(self.score, 4), "same": self.same,
                "threshold": round(self.threshold, 4),
                "box_a": [round(v, 1) for v in self.box_a],
                "box_b": [round(v, 1) for v in self.box_b]}


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


def decode_image(data: bytes, what: str = "the image", *,
                 max_bytes: int = MAX_IMAGE_BYTES,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """uint8[H, W, 3] BGR from encoded image bytes, within the limits, else ImageError."""
    if not data:
        raise ImageError(f"{what} is empty")
    if len(data) > max_bytes:
        raise ImageError(f"{what} is {len(data) / 1e6:.1f} MB; at most "
                         f"{max_bytes / 1e6:.1f} MB is accepted")
    size = _header_size(data)
    if size is None:
        raise ImageError(f"{what} is not a JPEG, PNG, WebP or BMP image")
    if size[0] * size[1] > max_pixels or 0 in size:
        raise ImageError(f"{what} is {size[0]}x{size[1]} pixels; at most "
                         f"{max_pixels / 1e6:.0f} megapixels are accepted")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"{what} could not be decoded (corrupt or unsupported)")
    return image


def read_image(path: str | Path, **limits: int) -> np.ndarray:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {p}: {exc.strerror}") from exc
    return decode_image(data, str(p), **limits)


class Recognizer:
    """Detector, embedder and a snapshot of the gallery's templates (refreshed when the gallery
    changes; None for `verify` only). Safe to share between threads: model calls are
    serialised."""

    def __init__(self, detector: FaceDetector, embedder: Embedder, gallery: Gallery | None,
                 threshold: float) -> None:
        self.detector, self.embedder, self.gallery = detector, embedder, gallery
        self.threshold = float(threshold)
        self.model_lock = threading.Lock()  # the detector is not thread-safe
        self._snapshot: tuple[int, list[str], np.ndarray] | None = None

    def _templates(self) -> tuple[list[str], np.ndarray]:
        if self.gallery is None:
            return [], np.zeros((0, 0), np.float32)
        version = self.gallery.version()
        snap = self._snapshot
        if snap is None or snap[0] != version:
            names, matrix = self.gallery.matrix()
            snap = self._snapshot = (version, names, matrix)
        return snap[1], snap[2]

    def nearest(self, vectors: np.ndarray, top: int = 3) -> list[list[Candidate]]:
        """The `top` nearest identities (max cosine over their templates) of each unit row."""
        names, matrix = self._templates()
        vecs = np.asarray(vectors, np.float32)
        if not names or len(vecs) == 0 or matrix.shape[1] != vecs.shape[1]:
            return [[] for _ in range(len(vecs))]
        scores = vecs @ matrix.T  # [K, M]
        out = []
        for row in scores:
            k = min(len(row), max(top * 16, 64))
            best = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
            seen: dict[str, float] = {}
            for j in best[np.argsort(-row[best], kind="stable")]:
                if names[j] not in seen:
                    seen[names[j]] = float(row[j])
                    if len(seen) == top:
                        break
            out.append([Candidate(n, s) for n, s in seen.items()])
        return out

    def faces(self, image: np.ndarray) -> tuple[list, np.ndarray]:
        """Detections (largest first) and their unit embeddings float32[N, D]."""
        with self.model_lock:
            dets = sorted(self.detector.detect(image), key=lambda d: -float(d.bbox[2] * d.bbox[3]))
            crops = [align_face(image, d.landmarks, STORE) for d in dets]
            vecs = self.embedder.embed_kept(crops) if crops else np.zeros((0, self.embedder.dim))
        vecs = np.asarray(vecs, np.float32)
        if len(vecs):
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return dets, vecs

    def recognize(self, image: np.ndarray, top: int = 3) -> list[FaceResult]:
        dets, vecs = self.faces(image)
        out = []
        for det, cands in zip(dets, self.nearest(vecs, top), strict=True):
            named = cands[0].name if cands and cands[0].score >= self.threshold else None
            out.append(FaceResult(tuple(float(v) for v in det.bbox[:4]), float(det.score),
                                  named, cands))
        return out

    def verify(self, a: np.ndarray, b: np.ndarray) -> Verification:
        """The largest face of each image: cosine similarity, and same person when it
        reaches the threshold."""
        found = []
        for label, image in (("the first image", a), ("the second image", b)):
            dets, vecs = self.faces(image)
            if not dets:
                raise ImageError(f"no face found in {label}")
            found.append((tuple(float(v) for v in dets[0].bbox[:4]), vecs[0]))
        score = float(np.dot(found[0][1], found[1][1]))
        return Verification(score, score >= self.threshold, self.threshold,
                            found[0][0], found[1][0])
