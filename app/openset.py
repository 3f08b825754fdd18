"""The open-set rule: the score a face needs to be named, for this gallery and this face.

With `matching.threshold: auto` and a model whose manifest carries a calibration (`facemoe
calibrate`, `trainer.calibrate`), the user sets what they care about, `matching.false_alarm_rate`
(the share of strangers' tracks that may be named), and the decision follows from it for the
gallery's number of people (a stranger gets one chance per enrolled person) and the face's
resolution (a 20 px face scores differently from a sharp one). A face is named when either
  - its best score reaches `threshold(N, px)`, whose stranger rate is half the rate, or
  - its best score reaches the one-pair threshold (`floor`) and leads the second-best person
    by `margin(N, px)`, whose stranger rate is the other half: a stranger's best of N scores
    has a close runner-up, one enrolled person's face stands out from all the others even when
    it is small and scores lower (Alex Lacamoire's 26 px track: 0.41, the rest of 102 people
    far below).
A number in `matching.threshold`, a camera's own threshold, or a model without a calibration
give one fixed threshold, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from trainer.calibrate import margin_for, threshold_for
from trainer.preprocess import ARCFACE_112

# inter-ocular distance of the ArcFace 112 template: a face with this many pixels between the
# eyes is a "112 px" face; half of it, a 56 px face (the scale `eval lfw --probe-res` uses)
_IOD_112 = float(np.linalg.norm(np.subtract(ARCFACE_112.points[1], ARCFACE_112.points[0])))


def face_px(iod: float) -> float:
    """Face resolution (the side of an ArcFace crop with this face at 1:1) from the distance
    between the eyes in source pixels."""
    return float(iod) * ARCFACE_112.size / _IOD_112


@lru_cache(maxsize=4096)
def _margin(rule: OpenSet, identities: int, px: int | None) -> float:
    return margin_for(rule.calibration, rule.rate / 2, identities, rule.floor, px)


@dataclass(frozen=True)
class OpenSet:
    """`fixed`: one threshold for everything; else `calibration` (the manifest's) at `rate`."""

    fixed: float | None = None
    calibration: dict[str, Any] | None = field(default=None, repr=False, hash=False,
                                               compare=False)
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
        rate = self.rate if identities < 2 else self.rate / 2  # half for the margin rule
        return round(threshold_for(self.calibration, rate, identities, px), 4)

    @property
    def floor(self) -> float:
        """The one-pair threshold: the margin rule's least score."""
        return self.threshold(1)

    def margin(self, identities: int, px: float | None = None) -> float:
        """The lead over the second-best person with which a score of at least `floor` names
        (inf: no margin rule, as with a fixed threshold or a gallery of one person). Computed
        at the face resolution rounded to 4 px (it moves by thousandths between them)."""
        if self.fixed is not None or identities < 2:
            return float("inf")
        return _margin(self, identities, None if px is None else 4 * max(1, round(px / 4)))

    def describe(self, identities: int) -> str:
        """One line for logs and --json summaries."""
        if self.fixed is not None:
            return f"threshold {self.fixed:.3f} (fixed)"
        lo, hi = self.threshold(identities, 16), self.threshold(identities, None)
        lead = self.margin(identities, None)
        rule = f", or {self.floor:.3f} leading the next person by {lead:.3f}" if np.isfinite(
            lead) else ""
        return (f"threshold {hi:.3f} for sharp faces, {lo:.3f} at 16 px{rule} "
                f"({identities} people, false-alarm rate {self.rate:g} per track)")
