"""The open-set rule: the score a face needs to be named, for this gallery and this face.

With `matching.threshold: auto` and a model whose manifest carries a calibration (`facemoe
calibrate`, `trainer.calibrate`), the user sets what they care about, `matching.false_alarm_rate`
(the share of strangers' tracks that may be named), and the threshold follows from it for the
gallery's number of people (a stranger gets one chance per enrolled person) and the face's
resolution (a 20 px face scores differently from a sharp one). A number in
`matching.threshold`, a camera's own threshold, or a model without a calibration give one fixed
threshold, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.calibrate import threshold_for
from trainer.preprocess import ARCFACE_112

# inter-ocular distance of the ArcFace 112 template: a face with this many pixels between the
# eyes is a "112 px" face; half of it, a 56 px face (the scale `eval lfw --probe-res` uses)
_IOD_112 = float(np.linalg.norm(np.subtract(ARCFACE_112.points[1], ARCFACE_112.points[0])))


def face_px(iod: float) -> float:
    """Face resolution (the side of an ArcFace crop with this face at 1:1) from the distance
    between the eyes in source pixels."""
    return float(iod) * ARCFACE_112.size / _IOD_112


@dataclass(frozen=True)
class OpenSet:
    """`fixed`: one threshold for everything; else `calibration` (the manifest's) at `rate`."""

    fixed: float | None = None
    calibration: dict[str, Any] | None = field(default=None, repr=False)
    rate: float = 1e-3

    def __post_init__(self) -> None:
        if self.fixed is None and not self.calibration:
            raise ValueError("an open-set rule needs a fixed threshold or a calibration")

    @property
    def calibrated(self) -> bool:
        return self.fixed is None

    def threshold(self, identities: int, px: float | None = None) -> float:
        """The score a probe needs against a gallery of `identities` people, its face at `px`
        (None: a sharp photo)."""
        if self.fixed is not None:
            return self.fixed
        return round(threshold_for(self.calibration, self.rate, identities, px), 4)

    def describe(self, identities: int) -> str:
        """One line for logs and --json summaries."""
        if self.fixed is not None:
            return f"threshold {self.fixed:.3f} (fixed)"
        lo, hi = self.threshold(identities, 16), self.threshold(identities, None)
        return (f"threshold {hi:.3f} for sharp faces, {lo:.3f} at 16 px "
                f"({identities} people, false-alarm rate {self.rate:g} per track)")
