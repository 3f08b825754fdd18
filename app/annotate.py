"""Draw tracked faces, track ids and names onto a frame (for --annotate videos)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from app.records import Match, TrackedFace

KNOWN = (60, 200, 60)
UNKNOWN = (40, 160, 255)
PENDING = (200, 200, 200)


def draw(
    image: np.ndarray,
    faces: list[TrackedFace],
    labels: dict[int, Match],
    predicted: Sequence[TrackedFace] = (),
) -> np.ndarray:
    """Boxes of the detected `faces` (2 px) and of the `predicted` positions of open tracks
    on frames the detector skipped (1 px), each with its track id and, once matched, the
    name (or unknown) and score of its running match."""
    out = image.copy()
    for f in [*faces, *predicted]:
        x, y, w, h = (int(round(v)) for v in f.detection.bbox)
        m = labels.get(f.track_id)
        if m is None:
            colour, text = PENDING, f"#{f.track_id}"
        elif m.identity is None:
            colour, text = UNKNOWN, f"#{f.track_id} unknown {m.score:.2f}"
        else:
            colour, text = KNOWN, f"#{f.track_id} {m.identity} {m.score:.2f}"
        cv2.rectangle(out, (x, y), (x + w, y + h), colour, 2 if f.detection.score > 0 else 1)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        ty = max(y - 4, th + 4)
        tx = max(0, min(x, out.shape[1] - tw - 5))  # the whole label inside the frame
        cv2.rectangle(out, (tx, ty - th - 4), (tx + tw + 4, ty + 2), colour, -1)
        cv2.putText(
            out, text, (tx + 2, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
        )
    return out
