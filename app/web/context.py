"""What the web layer works with: the services the CLI uses, built once per server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any

from app.clusters import FaceReview, RefreshReport
from app.config import AppConfig
from app.detect import Detector
from app.embed import Embedder
from app.gallery import Gallery, GalleryError
from app.openset import OpenSet
from app.recognize import Recognizer
from app.web.auth import Authenticator
from app.web.timefmt import zone

log = logging.getLogger(__name__)


@dataclass
class WebContext:
    """The gallery, the models and the review service of one server; `cameras` reports the
    daemon's cameras when the daemon serves the app (None under `facemoe serve`)."""

    cfg: AppConfig
    gallery: Gallery
    detector: Detector
    embedder: Embedder
    threshold: float
    auth: Authenticator
    cameras: Callable[[], list[dict[str, Any]]] | None = None
    # the 1:N rule for recognising photos (app.openset); None: `threshold` for everything
    open_set: OpenSet | None = None
    recognizer: Recognizer = field(init=False)
    review: FaceReview = field(init=False)
    _refresh_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.recognizer = Recognizer(self.detector, self.embedder, self.gallery,
                                     self.open_set or self.threshold)
        self.review = FaceReview(self.gallery, self.recognizer, self.cfg.web.cluster_threshold)

    @property
    def tz(self) -> tzinfo:
        """The zone of times on the pages and of filter times without an offset."""
        return zone(self.cfg.web.timezone)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.cfg.web.max_upload_mb * 1024 * 1024)

    def refresh_clusters(self) -> RefreshReport:
        """One refresh at a time (two would cluster the same new events twice)."""
        with self._refresh_lock:
            return self.review.refresh()

    def start_refresher(self, stop: threading.Event) -> None:
        """Group new unknown events every `web.refresh_s` seconds until `stop` is set, so the
        unknown-faces page rarely has to embed while it loads."""
        interval = self.cfg.web.refresh_s
        if not interval:
            return

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    while self.refresh_clusters().pending and not stop.is_set():
                        pass
                except GalleryError as exc:
                    log.warning("grouping unknown faces: %s", exc)
                except Exception:  # a bug must not end the server's background work silently
                    log.exception("grouping unknown faces failed")

        threading.Thread(target=loop, name="face-clusters", daemon=True).start()
