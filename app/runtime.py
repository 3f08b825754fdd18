"""Building the long-lived parts (detector, embedder, gallery, matcher) from the app config."""

from __future__ import annotations

from pathlib import Path

from app.config import AppConfig
from app.detect import FaceDetector, find_detector_model
from app.embed import Embedder
from app.gallery import Gallery
from app.match import Matcher
from app.openset import OpenSet

FALLBACK_THRESHOLD = 0.4


def make_detector(cfg: AppConfig) -> FaceDetector:
    d = cfg.detector
    return FaceDetector(
        find_detector_model(d.model),
        score_threshold=d.score_threshold,
        nms_threshold=d.nms_threshold,
        upscale=d.upscale,
        small_face=d.small_face,
        weak_score=d.weak_score,
        max_looks=d.max_looks,
    )


def make_embedder(cfg: AppConfig) -> Embedder:
    m = cfg.model
    return Embedder.from_config(m.dir, m.backend, m.threads, m.batch_size)


def open_gallery(path: str | Path, embedder: Embedder, *, create: bool = True,
                 key: bytes | None = None) -> Gallery:
    """The gallery for `embedder`'s model; `key` None reads it from the environment."""
    return Gallery(path, embedder.model_name, embedder.model_version, create=create, key=key)


def threshold(cfg: AppConfig, embedder: Embedder) -> float:
    """The one pair threshold (1:1 verification, a photo's score shown against it)."""
    t = cfg.matching.threshold
    if t == "auto":
        return embedder.recommended_threshold or FALLBACK_THRESHOLD
    return float(t)


def open_set(cfg: AppConfig, embedder: Embedder) -> OpenSet:
    """The 1:N rule: the model's calibration at `matching.false_alarm_rate` with threshold
    auto, else the fixed `threshold`."""
    calibration = embedder.backend.manifest.get("calibration")
    if cfg.matching.threshold == "auto" and calibration:
        return OpenSet(calibration=calibration, rate=cfg.matching.false_alarm_rate)
    return OpenSet(fixed=threshold(cfg, embedder))


class GalleryMatcher:
    """A matcher that rebuilds itself when the gallery changes (another process enrolled)."""

    def __init__(self, gallery: Gallery, threshold: float | OpenSet) -> None:
        self.gallery, self.threshold = gallery, threshold
        self._matcher = Matcher.from_gallery(gallery, threshold)

    def __call__(self) -> Matcher:
        if self.gallery.version() != self._matcher.version:
            self._matcher = Matcher.from_gallery(self.gallery, self.threshold)
        return self._matcher
