"""Shot-cut detection: a track never continues across a cut, wherever the next face appears."""

from __future__ import annotations

import cv2
import numpy as np


class ShotCutDetector:
    """1 - correlation of hue/saturation histograms of consecutive (downscaled) frames.

    `threshold` trades missed cuts (too high: a track may carry one person's identity onto
    the next shot's face) against false cuts (too low: a fast pan or a flash splits a track).
    On the shared clips, cuts score 0.22-0.49 and ordinary frames at most 0.035.
    """

    def __init__(self, threshold: float = 0.15) -> None:
        self.threshold = threshold
        self._prev: np.ndarray | None = None

    def is_cut(self, image: np.ndarray) -> bool:
        small = cv2.resize(image, (64, 36), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
        cv2.normalize(hist, hist)
        prev, self._prev = self._prev, hist
        if prev is None or self.threshold <= 0:
            return False
        return 1.0 - cv2.compareHist(prev, hist, cv2.HISTCMP_CORREL) > self.threshold
