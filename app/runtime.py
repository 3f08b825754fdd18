"""Building the long-lived parts (detector, embedder, gallery, matcher) from the app config."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from app.config import AppConfig
from app.detect import FaceDetector, find_detector_model
from app.embed import Embedder
from app.gallery import Gallery, GalleryError
from app.match import Matcher

log = logging.getLogger(__name__)

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
    t = cfg.matching.threshold
    if t == "auto":
        return embedder.recommended_threshold or FALLBACK_THRESHOLD
    return float(t)


class GalleryMatcher:
    """A matcher that rebuilds itself when the gallery changes (another process enrolled)."""

    def __init__(self, gallery: Gallery, threshold: float) -> None:
        self.gallery, self.threshold = gallery, threshold
        self._matcher = Matcher.from_gallery(gallery, threshold)

    def __call__(self) -> Matcher:
        if self.gallery.version() != self._matcher.version:
            self._matcher = Matcher.from_gallery(self.gallery, self.threshold)
        return self._matcher


class GalleryWatch:
    """The daemon's matcher, kept fresh off the video thread.

    `__call__` (the worker, per track) only returns the current matcher: it never touches the
    database. `run` (a thread of its own) checks the gallery's version every `poll_s` seconds,
    and at once after `reload.set()` (SIGHUP), and swaps in a rebuilt matcher when it changed.
    While the database cannot be reached the last good matcher stays in use: video goes on,
    `problem()` says since when, and the next successful check picks up what changed.
    """

    def __init__(self, gallery: Gallery, threshold: float, poll_s: float) -> None:
        self.gallery, self.threshold, self.poll_s = gallery, threshold, poll_s
        self.matcher = Matcher.from_gallery(gallery, threshold)  # the first copy: must load
        self.reload = threading.Event()
        self.failing_since: float | None = None  # monotonic time of the first failed check
        self.error = ""
        self.checks = self.failures = 0

    def __call__(self) -> Matcher:
        return self.matcher

    def run(self, stopping: threading.Event) -> None:
        """Check until `stopping` is set (set `reload` too, to wake it at once)."""
        while not stopping.is_set():
            forced = self.reload.wait(self.poll_s)
            if stopping.is_set():
                break
            self.reload.clear()
            self.check(force=forced)

    def check(self, *, force: bool = False) -> bool:
        """Compare the gallery's version with the matcher's, rebuilding it on a change (or when
        `force`); False when the database could not be read (the old matcher is kept)."""
        self.checks += 1
        try:
            if force or self.gallery.version() != self.matcher.version:
                self.matcher = Matcher.from_gallery(self.gallery, self.threshold)
                log.info("gallery reloaded (version %s, %d templates)", self.matcher.version,
                         len(self.matcher))
        except GalleryError as exc:
            self.failures += 1
            self.error = str(exc)
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                log.error("%s; matching goes on with the last good copy of the gallery "
                          "(version %s, %d templates)", exc, self.matcher.version,
                          len(self.matcher))
            return False
        if self.failing_since is not None:
            log.warning("gallery %s reachable again after %.1f s", self.gallery.location,
                        time.monotonic() - self.failing_since)
            self.failing_since, self.error = None, ""
        return True

    def problem(self) -> str | None:
        """Why matching is degraded (the gallery cannot be read), or None."""
        if self.failing_since is None:
            return None
        return (f"unreachable for {time.monotonic() - self.failing_since:.0f} s, matching with "
                f"the last good copy (version {self.matcher.version}): {self.error}")
