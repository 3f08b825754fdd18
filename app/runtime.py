"""Building the long-lived parts (detector, embedder, gallery, matcher) from the app config."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from app.config import AppConfig
from app.detect import Detector, create_detector
from app.embed import Embedder
from app.fsutil import atomic_write
from app.gallery import Gallery, GalleryError
from app.match import Matcher
from app.openset import OpenSet

log = logging.getLogger(__name__)

FALLBACK_THRESHOLD = 0.4


def make_detector(cfg: AppConfig) -> Detector:
    return create_detector(cfg.detector)


def make_embedder(cfg: AppConfig) -> Embedder:
    m = cfg.model
    return Embedder.from_config(m.dir, m.backend, m.threads, m.batch_size)


def open_gallery(path: str | Path, embedder: Embedder, *, create: bool = True,
                 key: bytes | None = None, defer_open: bool = False) -> Gallery:
    """The gallery for `embedder`'s model; `key` None reads it from the environment;
    `defer_open`: see `Store`."""
    return Gallery(path, embedder.model_name, embedder.model_version, create=create, key=key,
                   defer_open=defer_open)


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


class GalleryWatch:
    """The daemon's matcher, kept fresh off the video thread.

    `__call__` (the worker, per track) only returns the current matcher: it never touches the
    database. `run` (a thread of its own) checks the gallery's version every `poll_s` seconds,
    and at once after `reload.set()` (SIGHUP), and swaps in a rebuilt matcher when it changed.
    While the database cannot be reached the last good matcher stays in use: video goes on,
    `problem()` says since when, and the next successful check picks up what changed.
    `on_change()`, if given, runs in that thread after the first successful check and after
    every change (the box's part of erasures: `app.erasure.erase_on_box`); a GalleryError
    from it is logged and it runs again at the next check.
    """

    def __init__(self, gallery: Gallery, threshold: float | OpenSet, poll_s: float,
                 cache: Path | None = None,
                 on_change: Callable[[], object] | None = None) -> None:
        self.gallery, self.threshold, self.poll_s, self.cache = gallery, threshold, poll_s, cache
        self.on_change = on_change
        self._synced = False  # on_change ran since the last change
        self.reload = threading.Event()
        self.failing_since: float | None = None  # monotonic time of the first failed check
        self.error = ""
        self.checks = self.failures = 0
        if gallery.store.opened:
            self._rebuild()  # the first copy: must load
        else:  # the database is away: start from the copy saved when it was last read
            self.matcher = self._load()
            self.failing_since, self.error = time.monotonic(), "unreachable at start"

    def __call__(self) -> Matcher:
        return self.matcher

    def run(self, stopping: threading.Event) -> None:
        """Check until `stopping` is set (set `reload` too, to wake it at once). On
        PostgreSQL a change NOTIFYed by the writer (`Database.bump_version`) wakes it at once;
        the poll every `poll_s` stays, for other databases and for a lost listener."""
        listener = None
        try:
            while not stopping.is_set():
                if listener is None:
                    listener = self._listen()
                forced = self._wait(listener)
                if forced is None:  # the listener broke: poll until it is back
                    listener = None
                    forced = self.reload.wait(self.poll_s)
                if stopping.is_set():
                    break
                self.reload.clear()
                self.check(force=forced)
        finally:
            if listener is not None:
                listener.close()

    def _listen(self):  # noqa: ANN202
        try:
            return self.gallery.store.db.listen()
        except GalleryError as exc:
            log.debug("%s; polling", exc)
            return None

    def _wait(self, listener) -> bool | None:  # noqa: ANN001
        """Wait up to `poll_s` for a change notice or `reload`: True when reload was set,
        False otherwise; None when the listener failed."""
        if listener is None:
            return self.reload.wait(self.poll_s)
        deadline = time.monotonic() + self.poll_s
        try:
            while not self.reload.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if list(listener.notifies(timeout=min(left, 0.5), stop_after=1)):
                    return False  # changed: check now
        except Exception as exc:  # noqa: BLE001  (psycopg.Error, a closed connection)
            log.debug("gallery change listener: %s", exc)
            try:
                listener.close()
            except Exception:  # noqa: BLE001
                pass
            return None
        return True

    def check(self, *, force: bool = False) -> bool:
        """Compare the gallery's version with the matcher's, rebuilding it on a change (or when
        `force`); False when the database could not be read (the old matcher is kept)."""
        self.checks += 1
        try:
            first = not self.gallery.store.opened
            self.gallery.store.open()  # a gallery whose database was away at start: once
            if first or force or self.gallery.version() != self.matcher.version:
                self._rebuild()
                self._synced = False
                log.info("gallery reloaded (version %s, %d templates)", self.matcher.version,
                         len(self.matcher))
            if not self._synced and self.on_change is not None:
                self.on_change()
            self._synced = True
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

    _PURPOSE = b"gallery-copy"

    def _rebuild(self) -> None:
        """A matcher of the gallery as it is now (as `Matcher.from_gallery`: the version is
        read first, so a race costs an extra rebuild, never a missed one), kept on disk too."""
        version = self.gallery.version()
        names, matrix = self.gallery.matrix()
        self.matcher = Matcher(names, matrix, self.threshold, version=version, normalised=True)
        self._save(names, matrix, version)

    def _save(self, names: list[str], matrix: np.ndarray, version: int) -> None:
        """Keep a copy of the templates on disk (0600, sealed with the gallery's key when it
        has one), so that the daemon can start while the database is away."""
        if self.cache is None:
            return
        buf = io.BytesIO()
        np.savez(buf, names=np.array(names, dtype=str), matrix=matrix, version=np.int64(version),
                 about=np.array([self.gallery.location, self.gallery.model]))
        try:
            with atomic_write(self.cache) as fh:
                fh.write(self.gallery.store.sealer.seal(buf.getvalue(), self._PURPOSE))
        except OSError as exc:
            log.warning("cannot keep a copy of the gallery in %s: %s", self.cache,
                        exc.strerror or exc)

    def _load(self) -> Matcher:
        """The matcher saved by `_save` for this gallery and model; GalleryError if none."""
        where, model = self.gallery.location, self.gallery.model
        why = f"gallery {where} cannot be reached and no copy of it is kept"
        if self.cache is None or not self.cache.is_file():
            raise GalleryError(f"{why} ({self.cache or 'no copy configured'})")
        try:
            raw = self.gallery.store.sealer.unseal(self.cache.read_bytes(), self._PURPOSE)
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                about = [str(x) for x in z["about"]]
                names, matrix = [str(x) for x in z["names"]], z["matrix"].astype(np.float32)
                version = int(z["version"])
        except (OSError, ValueError, KeyError, GalleryError) as exc:
            raise GalleryError(f"{why}: the copy {self.cache} is unreadable ({exc})") from exc
        if about != [where, model]:
            raise GalleryError(f"{why}: the copy {self.cache} is of {about[0]} ({about[1]})")
        log.warning("gallery %s cannot be reached: matching with the copy of version %d kept "
                    "in %s (%d templates) until it answers", where, version, self.cache,
                    len(names))
        return Matcher(names, matrix, self.threshold, version=version, normalised=True)

    def problem(self) -> str | None:
        """Why matching is degraded (the gallery cannot be read), or None."""
        if self.failing_since is None:
            return None
        return (f"unreachable for {time.monotonic() - self.failing_since:.0f} s, matching with "
                f"the last good copy (version {self.matcher.version}): {self.error}")
