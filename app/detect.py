"""The face detector seam: the `Detector` protocol that the pipeline, enrollment and every
other caller use, and the registry of detector kinds (`KINDS`, `create_detector`).

A kind is a module with `create(cfg: DetectorConfig) -> Detector`; the config's
`detector.kind` names it and the config type (`app.config.DetectorConfig`) is the one source
of every default. YuNet (`app.yunet`) is the first kind. The kind's module is imported only
when a detector is made, so reading the config does not load OpenCV.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # the config reads KINDS: importing this module loads neither NumPy nor OpenCV
    from collections.abc import Sequence

    import numpy as np

    from app.config import DetectorConfig
    from app.records import Detection

KINDS = {"yunet": "app.yunet"}  # kind -> the module whose `create(cfg)` makes it


@runtime_checkable
class Detector(Protocol):
    """Finds faces: each a `Detection` (xywh box and 5 landmarks in the image's pixels, the
    order of `app.records.Detection`, and a score in [0, 1]), highest score first."""

    kind: str  # the name it is registered under in KINDS

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        """Faces in a still (uint8[H, W, 3] BGR) that a caller may trust (score at least the
        kind's threshold); ValueError (one line) for an image of another shape or dtype."""
        ...

    def detect_frame(self, image_bgr: np.ndarray,
                     expected: Sequence[np.ndarray] = ()) -> list[Detection]:
        """Faces in a video frame. `expected`: xywh boxes where the tracker expects a face; a
        kind may look harder there and return weaker faces (below the tracker's
        `high_thresh` they only extend a track). A kind that cannot use them ignores them."""
        ...


def create_detector(cfg: DetectorConfig) -> Detector:
    """The detector of kind `cfg.kind`, made from `cfg`."""
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown detector kind {cfg.kind!r}; expected one of "
                         f"{', '.join(KINDS)}")
    return importlib.import_module(KINDS[cfg.kind]).create(cfg)

