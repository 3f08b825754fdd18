"""Typed records passed between pipeline stages (one direction: source -> sinks).

Arrays carry their shape and dtype in the field comment; records are frozen so a stage
can never mutate what an earlier stage produced.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One decoded video frame."""

    camera: str
    index: int  # 0-based frame number within the source
    pts: float  # media time in seconds, from the GStreamer buffer timestamp
    image: np.ndarray = field(repr=False)  # uint8[H, W, 3], BGR
    wall: float | None = None  # Unix time the frame arrived (live cameras); None: when processed

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass(frozen=True)
class Detection:
    """A face found by the detector, in frame pixels."""

    bbox: np.ndarray  # float32[4]: x, y, w, h
    landmarks: np.ndarray  # float32[5, 2]: right eye, left eye, nose, right mouth, left mouth
    score: float


@dataclass(frozen=True)
class TrackedFace:
    """A detection assigned to a track in one frame."""

    track_id: int
    frame_index: int
    pts: float
    detection: Detection


@dataclass(frozen=True)
class Quality:
    """Per-crop quality; `score` in [0, 1] combines the factors (higher is better)."""

    score: float
    size: float  # inter-ocular distance in source pixels
    blur: float  # variance of the Laplacian of the aligned crop
    pose: float  # frontalness in [0, 1] from the landmarks (1 = frontal)
    det_score: float
    exposure: float = 1.0  # brightness and contrast of the face in [0, 1] (0: near black, flat)


@dataclass(frozen=True)
class AlignedFace:
    """A face warped to the model's crop template, and to the canonical kept geometry."""

    track_id: int
    frame_index: int
    pts: float
    bbox: np.ndarray  # float32[4] x, y, w, h in frame pixels
    crop: np.ndarray = field(repr=False)  # uint8[S, S, 3] BGR on the model's template
    quality: Quality | None = None
    # uint8[192, 192, 3] BGR in `app.align.STORE`: what is kept with events for re-embedding
    kept: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class FaceEmbedding:
    """An embedded aligned face."""

    face: AlignedFace
    vector: np.ndarray = field(repr=False)  # float32[D], L2-normalised


@dataclass(frozen=True)
class TrackSummary:
    """What the aggregator knows about a finished track."""

    camera: str
    track_id: int
    start: float
    end: float
    frames: int  # frames in which the track was observed
    embedded: int  # crops embedded for this track
    template: np.ndarray | None = field(repr=False)  # float32[D] L2-normalised, None if no crop
    best_bbox: np.ndarray | None  # float32[4] of the best face (app.aggregate.better)
    best_quality: float
    # the track's best aligned crops, best first: (quality score, uint8[112,112,3] BGR)
    crops: tuple[tuple[float, np.ndarray], ...] = field(default=(), repr=False)
    # resolution of the largest embedded face (`app.openset.face_px`); None: nothing embedded
    face_px: float | None = None


@dataclass(frozen=True)
class Match:
    """Open-set gallery decision for one template."""

    identity: str | None  # None: unknown (best score below threshold)
    score: float  # best cosine similarity (-1 when the gallery is empty)
    candidate: str | None  # best gallery identity regardless of the threshold


# `seen`: an open track was matched to a person whose `recognized` alert the cooldown held
# back (app.alerts); only presence (MQTT) takes it
EVENT_TYPES = ("recognized", "seen", "end")


def new_event_id() -> str:
    """A fresh event id (a random UUID string): unique across cameras, runs and machines."""
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Event:
    """One track, as the sinks see it (the event record of docs/events.md).

    `type` "end" is the record of a finished track (JSONL, SQLite: one per track);
    "recognized" is the early alert sent to MQTT and the webhook while the track is still
    open, as soon as its identity is known (its `end` and `frames` are those seen so far).
    Both messages of one track carry the same `id`.
    """

    camera: str
    track_id: int
    identity: str | None
    score: float
    start: float  # media time (s) of the track's first frame
    end: float  # media time (s) of its last frame (so far, for "recognized")
    frames: int
    best_bbox: tuple[float, float, float, float]
    model: str
    id: str = field(default_factory=new_event_id)
    time: str | None = None  # wall-clock time of `start`, ISO 8601 with the UTC offset
    snapshot: str | None = None  # path of the best-face JPEG when snapshots are on
    candidate: str | None = None  # nearest enrolled identity, even below the threshold
    candidate_score: float | None = None  # its cosine similarity
    zones: tuple[str, ...] = ()  # the camera's named zones the face was seen in
    type: str = "end"  # one of EVENT_TYPES
    # the track's best aligned crops, best first: (quality, uint8[112,112,3] BGR); kept with
    # the event in the gallery (output.event_crops) so a person can be enrolled from a track.
    # Not part of the JSON record.
    crops: tuple[tuple[float, np.ndarray], ...] = field(default=(), repr=False, compare=False)
    # the picture `SnapshotSink` writes to `snapshot`: uint8[H, W, 3] BGR, the track's best face
    # so far with a margin, cut from its frame. Not part of the JSON record.
    snapshot_image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        """The JSON record (docs/events.md): the nine original keys, then the additions."""
        cs = self.candidate_score
        return {
            "camera": self.camera,
            "track_id": int(self.track_id),
            "identity": self.identity,
            "score": round(float(self.score), 6),
            "start": round(float(self.start), 6),
            "end": round(float(self.end), 6),
            "frames": int(self.frames),
            "best_bbox": [round(float(v), 2) for v in self.best_bbox],
            "model": self.model,
            "id": self.id,
            "type": self.type,
            "time": self.time,
            "snapshot": self.snapshot,
            "candidate": self.candidate,
            "candidate_score": None if cs is None else round(float(cs), 6),
            "zones": list(self.zones),
        }
