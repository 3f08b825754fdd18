"""Faces in a still image against the gallery (`facemoe recognize`, `POST /api/recognize`) and
two photos of one person or not (`facemoe compare`, `POST /api/verify`).

Images are read and their faces found by `app.faces` (bounded decoding, detection on
downscaled copies of large photos, the face-choice rules), as for enrollment.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from app.align import STORE, align_face
from app.detect import Detector
from app.embed import Embedder
from app.faces import choose_face, detect_faces
from app.gallery import Gallery
from app.openset import OpenSet, face_px

log = logging.getLogger(__name__)

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


class Recognizer:
    """Detector, embedder and a snapshot of the gallery's templates (refreshed when the gallery
    changes; None for `verify` only). Safe to share between threads: model calls are
    serialised."""

    def __init__(self, detector: Detector, embedder: Embedder, gallery: Gallery | None,
                 threshold: float | OpenSet) -> None:
        """`threshold`: a number, or the open-set rule (`app.openset`), whose threshold for
        one pair decides `verify` and for the gallery's people and the face's resolution
        decides `recognize`."""
        self.detector, self.embedder, self.gallery = detector, embedder, gallery
        self.open_set = (threshold if isinstance(threshold, OpenSet)
                         else OpenSet(fixed=float(threshold)))
        self.threshold = self.open_set.threshold(1)  # one pair (verify)
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

    def faces(self, image: np.ndarray, *, min_score: float = 0.0,
              limit: int = 0) -> tuple[list, np.ndarray]:
        """Detections (largest first) and their unit embeddings float32[N, D]; only faces whose
        detector score reaches `min_score`, and only the `limit` largest (0: all)."""
        with self.model_lock:
            dets = sorted(detect_faces(self.detector, image),
                          key=lambda d: -float(d.bbox[2] * d.bbox[3]))
            dets = [d for d in dets if float(d.score) >= min_score][:limit or None]
            crops = [align_face(image, d.landmarks, STORE) for d in dets]
            vecs = self.embedder.embed_kept(crops) if crops else np.zeros((0, self.embedder.dim))
        vecs = np.asarray(vecs, np.float32)
        if len(vecs):
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return dets, vecs

    def recognize(self, image: np.ndarray, top: int = 3) -> list[FaceResult]:
        dets, vecs = self.faces(image)
        people = len(set(self._templates()[0]))
        out = []
        for det, cands in zip(dets, self.nearest(vecs, top), strict=True):
            marks = np.asarray(det.landmarks, np.float64).reshape(5, 2)
            needed = self.open_set.threshold(
                people, face_px(float(np.linalg.norm(marks[1] - marks[0]))))
            named = cands[0].name if cands and cands[0].score >= needed else None
            out.append(FaceResult(tuple(float(v) for v in det.bbox[:4]), float(det.score),
                                  named, cands))
        return out

    def verify(self, a: np.ndarray, b: np.ndarray,
               names: tuple[str, str] = ("the first image", "the second image")) -> Verification:
        """The largest face of each image: cosine similarity, and same person when it
        reaches the threshold. `names` name the images in errors."""
        found = []
        for label, image in zip(names, (a, b), strict=True):
            dets, vecs = self.faces(image)
            det = choose_face(dets, "largest", label)  # FaceError when there is none
            found.append((tuple(float(v) for v in det.bbox[:4]), vecs[dets.index(det)]))
        score = float(np.dot(found[0][1], found[1][1]))
        return Verification(score, score >= self.threshold, self.threshold,
                            found[0][0], found[1][0])
