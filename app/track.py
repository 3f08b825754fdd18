"""ByteTrack-style multi-face tracker: Kalman prediction, IoU matching in two score stages.

Each update predicts every track with a constant-velocity Kalman filter, matches high-score
detections to all tracks, then low-score detections to the tracks still unmatched, and
starts tracks only from unmatched high-score detections. Low-score detections come from the
detector's second look at small faces (`app.detect`), or from a detector run with
`score_threshold <= low_thresh`. A gate (minimum IoU plus a bound on the centre displacement
relative to the box size) stops a track from jumping to a face elsewhere in the frame, e.g.
across a shot cut. The gate is scale-aware: a small face moves about as many pixels between
detections as a large one, so the boxes of a track narrower than `min_match_size` are
compared as if enlarged to that width.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment

from app.config import TrackerConfig
from app.records import Detection, TrackedFace

log = logging.getLogger(__name__)

_INVALID = 1e6  # assignment cost of a gated-out pair


class KalmanBoxFilter:
    """Constant-velocity Kalman filter on a box (cx, cy, w, h) with velocities.

    Noise scales with the box size, as in SORT/ByteTrack: a large face may move more pixels
    per frame than a small one.
    """

    _POS_STD = 1.0 / 20.0
    _VEL_STD = 1.0 / 160.0
    # A new track's motion is unknown: up to about a quarter of its size per frame (a small
    # face crossing the frame). ByteTrack's 10 * _VEL_STD took 3-4 detections to learn that
    # a 16 px face moves 8 px per frame, and the predictions lagged half a face behind. Its
    # size changes slowly, so the size velocity keeps ByteTrack's prior (one bad box must
    # not make the track grow).
    _INIT_MOTION_STD = 1.0 / 4.0

    def __init__(self, bbox_xywh: np.ndarray) -> None:
        x, y, w, h = (float(v) for v in bbox_xywh)
        self.mean = np.array([x + w / 2, y + h / 2, w, h, 0, 0, 0, 0], dtype=np.float64)
        size = np.array([w, h, w, h])
        velocity = np.array([self._INIT_MOTION_STD, self._INIT_MOTION_STD,
                             10 * self._VEL_STD, 10 * self._VEL_STD]) * size
        std = np.concatenate([2 * self._POS_STD * size, velocity])
        self.cov = np.diag(std**2)
        self._motion = np.eye(8)
        self._motion[:4, 4:] = np.eye(4)
        self._observe = np.eye(4, 8)

    def _size(self) -> np.ndarray:
        w, h = max(self.mean[2], 1.0), max(self.mean[3], 1.0)
        return np.array([w, h, w, h])

    def predict(self) -> None:
        """Advance the state by one frame."""
        size = self._size()
        noise = np.diag(np.concatenate([self._POS_STD * size, self._VEL_STD * size]) ** 2)
        self.mean = self._motion @ self.mean
        self.cov = self._motion @ self.cov @ self._motion.T + noise

    def update(self, bbox_xywh: np.ndarray) -> None:
        """Correct the state with a measured box."""
        x, y, w, h = (float(v) for v in bbox_xywh)
        measured = np.array([x + w / 2, y + h / 2, w, h])
        innovation_cov = self._observe @ self.cov @ self._observe.T + np.diag(
            (self._POS_STD * self._size()) ** 2
        )
        gain = np.linalg.solve(innovation_cov, self._observe @ self.cov).T
        self.mean = self.mean + gain @ (measured - self._observe @ self.mean)
        self.cov = (np.eye(8) - gain @ self._observe) @ self.cov

    @property
    def bbox(self) -> np.ndarray:
        """Current box as float64[4] x, y, w, h (sides at least 1 px)."""
        return self.bbox_ahead(0)

    def bbox_ahead(self, steps: int) -> np.ndarray:
        """The box `steps` frames ahead at constant velocity, leaving the state unchanged."""
        cx, cy, w, h = self.mean[:4] + steps * self.mean[4:]
        w, h = max(w, 1.0), max(h, 1.0)
        return np.array([cx - w / 2, cy - h / 2, w, h])


class _Track:
    """Mutable per-track state kept by the Tracker."""

    def __init__(self, detection: Detection, frame_index: int) -> None:
        self.filter = KalmanBoxFilter(detection.bbox)
        self.track_id = 0  # assigned on confirmation
        self.hits = 1
        self.last_frame = frame_index


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes along the last axis (broadcast)."""
    iw = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xywh boxes: float64[len(a), len(b)]."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    return _iou(a[:, None, :], b[None, :, :])


def _grown(boxes: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """xywh boxes scaled by `factor` about their centres (factor broadcast over the boxes)."""
    size = boxes[..., 2:] * factor[..., None]
    return np.concatenate([boxes[..., :2] + (boxes[..., 2:] - size) / 2, size], axis=-1)


def gated_iou(tracks: np.ndarray, detections: np.ndarray, min_size: float,
              max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale-aware overlap of predicted track boxes and detections (xywh).

    Each pair is compared after scaling both boxes about their centres by the factor that
    makes the track's box `min_size` wide (1 for wider tracks): a 16 px face that moved
    16 px still overlaps its track, while a detection of a very different size still
    scores low, because both boxes grow alike. Returns IoU float64[T, D] and the centre
    gate bool[T, D]: the centre moved at most `max_shift` times the enlarged track size.
    """
    t = np.asarray(tracks, dtype=np.float64).reshape(-1, 4)
    d = np.asarray(detections, dtype=np.float64).reshape(-1, 4)
    factor = np.maximum(min_size / np.maximum(t[:, 2], 1e-6), 1.0)[:, None]  # [T, 1]
    grown_t = _grown(t, factor[:, 0])
    grown_d = _grown(d[None, :, :], factor)  # [T, D, 4]: each row grown by its track's factor
    iou = _iou(grown_t[:, None, :], grown_d)
    centre_t = t[:, :2] + t[:, 2:] / 2
    centre_d = d[:, :2] + d[:, 2:] / 2
    shift = np.linalg.norm(centre_t[:, None, :] - centre_d[None, :, :], axis=2)
    limit = max_shift * grown_t[:, 2:].max(axis=1)
    return iou, shift <= limit[:, None]


class Tracker:
    """Assigns stable integer ids (from 1) to faces across the frames of one stream."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._last_frame: int | None = None

    def _match(self, tracks: list[_Track], detections: list[Detection],
               min_iou: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
        """Gated optimal assignment: (pairs (track i, det j), unmatched tracks, unmatched dets)."""
        if not tracks or not detections:
            return [], list(range(len(tracks))), list(range(len(detections)))
        predicted = np.stack([t.filter.bbox for t in tracks])
        boxes = np.stack([d.bbox for d in detections])
        iou, near = gated_iou(predicted, boxes, self.config.min_match_size,
                              self.config.max_center_shift)
        valid = (iou >= min_iou) & near
        cost = np.where(valid, 1.0 - iou, _INVALID)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if valid[i, j]]
        matched_t = {i for i, _ in pairs}
        matched_d = {j for _, j in pairs}
        return (pairs, [i for i in range(len(tracks)) if i not in matched_t],
                [j for j in range(len(detections)) if j not in matched_d])

    def update(self, frame_index: int, pts: float,
               detections: list[Detection]) -> tuple[list[TrackedFace], list[int]]:
        """Track one frame's detections.

        Returns the faces of confirmed tracks matched in this frame (by track id) and the
        ids of tracks that ended at this update. `frame_index` must increase; gaps (a
        detector run every N frames) are predicted through and count as missed frames.
        """
        cfg = self.config
        if self._last_frame is not None and frame_index <= self._last_frame:
            raise ValueError(f"frame_index must increase: {frame_index} after {self._last_frame}")
        previous = self._last_frame
        # Tracks that already missed more than max_missed frames in a gap end unmatched.
        finished = [t.track_id for t in self._tracks
                    if t.track_id and frame_index - t.last_frame - 1 > cfg.max_missed]
        self._tracks = [t for t in self._tracks if frame_index - t.last_frame - 1 <= cfg.max_missed]
        steps = 1 if previous is None else frame_index - previous
        for track in self._tracks:
            for _ in range(steps):
                track.filter.predict()

        high = [d for d in detections if d.score >= cfg.high_thresh]
        low = [d for d in detections if cfg.low_thresh <= d.score < cfg.high_thresh]

        pairs, rest, new_high = self._match(self._tracks, high, cfg.match_iou)
        matched = [(self._tracks[i], high[j]) for i, j in pairs]
        unmatched = [self._tracks[i] for i in rest]
        pairs_low, _, _ = self._match(unmatched, low, cfg.low_match_iou)
        matched += [(unmatched[i], low[j]) for i, j in pairs_low]

        for track, detection in matched:
            track.filter.update(detection.bbox)
            track.hits += 1
            track.last_frame = frame_index
        matched_ids = {id(track) for track, _ in matched}

        kept: list[_Track] = []
        for track in self._tracks:
            if id(track) not in matched_ids:
                if track.track_id == 0:  # unconfirmed and missed: a one-off detection
                    continue
                if frame_index - track.last_frame > cfg.max_missed:
                    finished.append(track.track_id)
                    continue
            kept.append(track)
        for j in new_high:
            track = _Track(high[j], frame_index)
            kept.append(track)
            matched.append((track, high[j]))
        self._tracks = kept
        self._last_frame = frame_index

        faces = []
        for track, detection in matched:
            if track.track_id == 0 and track.hits >= cfg.min_hits:
                track.track_id = self._next_id
                self._next_id += 1
                log.debug("track %d starts at frame %d", track.track_id, frame_index)
            if track.track_id:
                faces.append(TrackedFace(track.track_id, frame_index, pts, detection))
        faces.sort(key=lambda face: face.track_id)
        if finished:
            log.debug("tracks %s end at frame %d", finished, frame_index)
        return faces, finished

    def finish_all(self) -> list[int]:
        """End every confirmed track (end of stream); the tracker can then start a new stream."""
        finished = sorted(t.track_id for t in self._tracks if t.track_id)
        self._tracks = []
        self._last_frame = None
        return finished

    def expected(self, frame_index: int) -> list[np.ndarray]:
        """Where every open track (confirmed or not) expects its face in frame `frame_index`:
        predicted xywh boxes, for the detector's second look at small faces."""
        if self._last_frame is None or frame_index <= self._last_frame:
            return []
        return [t.filter.bbox_ahead(frame_index - self._last_frame) for t in self._tracks
                if frame_index - t.last_frame - 1 <= self.config.max_missed]

    @property
    def active_ids(self) -> list[int]:
        """Ids of confirmed tracks that have not ended."""
        return sorted(t.track_id for t in self._tracks if t.track_id)
