"""Per-track aggregation: which crops to embed (`EmbedPolicy`, the config's `embed` section),
and one quality-weighted template per track."""

from __future__ import annotations

import logging

import numpy as np

from app.config import EmbedPolicy
from app.openset import face_px
from app.records import AlignedFace, FaceEmbedding, TrackSummary

log = logging.getLogger(__name__)

MIN_WEIGHT = 0.05  # floor on a crop's weight, so a low-quality track still gets a template
KEEP_CROPS = 5  # best aligned crops kept per track (stored with its event for enrollment)


def face_quality(face: AlignedFace) -> float:
    """Quality score of a crop (`app.quality`: size, sharpness, pose and detector score in one
    number); an unscored crop counts as 0."""
    return float(face.quality.score) if face.quality is not None else 0.0


def better(quality: float, than: float) -> bool:
    """The best-face rule: a track's best face is its crop of the highest `face_quality`; of
    equal crops the earliest stays. It picks the event's `best_bbox`, its kept crops and the
    daemon's snapshot."""
    return quality > than


def _normalised(weighted_sum: np.ndarray | None) -> np.ndarray | None:
    if weighted_sum is None:
        return None
    norm = np.linalg.norm(weighted_sum)
    return (weighted_sum / norm).astype(np.float32) if norm > 1e-12 else None


class _Track:
    """Mutable state of one open track."""

    def __init__(self, face: AlignedFace) -> None:
        self.start = face.pts
        self.end = face.pts
        self.frames = 0
        self.best_quality = -1.0
        self.best_bbox: np.ndarray | None = None
        self.best_frame = -1  # frame index of the best face
        self.crops: list[tuple[float, np.ndarray]] = []  # the best KEEP_CROPS, best first
        self.scheduled = 0  # crops the policy sent to the embedder
        self.scheduled_best = -1.0  # best quality among them
        self.since_last = 0  # observed frames since the last scheduled crop
        self.embedded = 0  # embeddings received
        self.gated = 0  # crops the face-quality gate kept out
        self.iod = 0.0  # largest inter-ocular distance (source px) among the embedded crops
        self.weighted_sum: np.ndarray | None = None  # float64[D]


class TrackAggregator:
    """Collects the faces and embeddings of the open tracks of one camera.

    Call `observe` for every aligned face, embed the crops it approves, `add` their
    embeddings, and `finish` a track when the tracker drops it. Policy decisions count a
    crop when it is approved, not when its embedding arrives, so batching does not cause
    extra embeddings.
    """

    def __init__(self, camera: str, policy: EmbedPolicy | None = None) -> None:
        self.camera = camera
        self.policy = policy if policy is not None else EmbedPolicy()
        self.embedded_total = 0  # embeddings added over all tracks
        self._tracks: dict[int, _Track] = {}

    def observe(self, face: AlignedFace) -> bool:
        """Record a sighting of `face.track_id`; True when this crop should be embedded.

        Only crops that pass the face-quality gate (`EmbedPolicy.carries_identity`: a face the
        detector is sure of, not too dark) are embedded or kept; the best of them is the
        track's best face. A track none of whose crops pass gets no template, so no event."""
        track = self._tracks.get(face.track_id)
        if track is None:
            track = self._tracks[face.track_id] = _Track(face)
        track.start = min(track.start, face.pts)
        track.end = max(track.end, face.pts)
        track.frames += 1
        if not self.policy.carries_identity(face.quality):
            track.gated += 1
            return False
        quality = face_quality(face)
        if better(quality, track.best_quality):
            track.best_quality = quality
            track.best_bbox = np.asarray(face.bbox, dtype=np.float32).copy()
            track.best_frame = face.frame_index
        if len(track.crops) < KEEP_CROPS or better(quality, track.crops[-1][0]):
            track.crops.append((quality, face.crop if face.kept is None else face.kept))
            track.crops.sort(key=lambda qc: -qc[0])
            del track.crops[KEEP_CROPS:]
        track.since_last += 1
        embed = self.policy.should_embed(
            track.scheduled, track.scheduled_best, track.since_last, quality
        )
        if embed:
            track.scheduled += 1
            track.scheduled_best = max(track.scheduled_best, quality)
            track.since_last = 0
        return embed

    def add(self, emb: FaceEmbedding) -> None:
        """Accumulate an embedding of an observed, still open track."""
        track = self._tracks.get(emb.face.track_id)
        if track is None:
            raise KeyError(f"embedding for unknown or finished track {emb.face.track_id}")
        vec = np.asarray(emb.vector, dtype=np.float64).ravel()
        norm = np.linalg.norm(vec)
        if not np.isfinite(norm) or norm == 0:
            log.warning("track %d: dropped a zero or non-finite embedding", emb.face.track_id)
            return
        if track.weighted_sum is not None and track.weighted_sum.shape != vec.shape:
            raise ValueError(
                f"track {emb.face.track_id}: embedding dim {vec.size} != {track.weighted_sum.size}"
            )
        weighted = max(face_quality(emb.face), MIN_WEIGHT) * vec / norm
        track.weighted_sum = (
            weighted if track.weighted_sum is None else track.weighted_sum + weighted
        )
        track.embedded += 1
        if emb.face.quality is not None:
            track.iod = max(track.iod, float(emb.face.quality.size))
        self.embedded_total += 1

    def finish(self, track_id: int) -> TrackSummary:
        """Close a track; its template is the quality-weighted mean of its L2-normalised
        embeddings (weight = quality score, floored at MIN_WEIGHT), renormalised."""
        summary = self.summary(track_id)
        del self._tracks[track_id]
        if summary.template is None and summary.embedded > 0:
            log.warning("track %d: embeddings cancel out, no template", track_id)
        return summary

    def summary(self, track_id: int) -> TrackSummary:
        """What is known so far about an open track (`finish` without closing it)."""
        track = self._tracks.get(track_id)
        if track is None:
            raise KeyError(f"unknown or finished track {track_id}")
        return TrackSummary(
            camera=self.camera,
            track_id=track_id,
            start=track.start,
            end=track.end,
            frames=track.frames,
            embedded=track.embedded,
            template=_normalised(track.weighted_sum),
            best_bbox=track.best_bbox,
            best_quality=track.best_quality,
            crops=tuple(track.crops),
            face_px=face_px(track.iod) if track.iod > 0 else None,
        )

    def is_best(self, face: AlignedFace) -> bool:
        """Whether an observed `face` is, so far, the best face of its open track."""
        track = self._tracks.get(face.track_id)
        return track is not None and track.best_frame == face.frame_index

    def face_px(self, track_id: int) -> float | None:
        """The face resolution of an open track's template (its largest embedded face)."""
        track = self._tracks.get(track_id)
        return face_px(track.iod) if track is not None and track.iod > 0 else None

    def template(self, track_id: int) -> np.ndarray | None:
        """The running template of an open track (None before its first embedding)."""
        track = self._tracks.get(track_id)
        return None if track is None else _normalised(track.weighted_sum)

    def open_tracks(self) -> list[int]:
        """Ids of the tracks observed and not yet finished, ascending."""
        return sorted(self._tracks)
