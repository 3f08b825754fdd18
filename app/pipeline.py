"""One camera's data path:
frames -> detect -> track -> align -> quality -> embed -> aggregate -> match.

`TrackedFront.step(frame)` is its front (detect -> shot cut -> track -> kept crop -> quality),
which video enrollment (app.enroll) also runs. `FacePipeline.push(frame)` returns the messages
of that frame: `recognized` alerts for open tracks that just became known (app.alerts) and the
`end` events of the tracks that ended; `flush()` ends the remaining tracks. Both
`facemoe process` and the daemon drive it. The detector is any `app.detect.Detector`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import cv2
import numpy as np

from app.aggregate import TrackAggregator
from app.alerts import Announcer
from app.align import STORE, align_face
from app.config import AppConfig, CameraConfig, TrackerConfig
from app.detect import Detector
from app.embed import Embedder
from app.match import Matcher
from app.quality import score_quality
from app.records import (
    AlignedFace,
    Detection,
    Event,
    FaceEmbedding,
    Frame,
    Match,
    Quality,
    TrackedFace,
    TrackSummary,
    new_event_id,
)
from app.shotcut import ShotCutDetector
from app.track import Tracker

log = logging.getLogger(__name__)


class StageTimes:
    """Wall seconds spent per stage, summed over the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


class EmbedBatch:
    """Crops waiting for the embedder, from one pipeline or shared by several cameras.

    Sharing one batch across the daemon's cameras fills the embedder's batches from all of
    them; any pipeline that needs its results (a track is ending) runs the whole batch.
    """

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.items: list[tuple[FacePipeline, AlignedFace]] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, pipeline: FacePipeline, face: AlignedFace) -> None:
        self.items.append((pipeline, face))

    def oldest(self, pipeline: FacePipeline) -> float | None:
        """Media time of the oldest crop of `pipeline` waiting here (None: none waits)."""
        return min((f.pts for p, f in self.items if p is pipeline), default=None)

    def run(self, times: StageTimes) -> None:
        """Embed every waiting crop in one call and hand each vector to its pipeline."""
        if not self.items:
            return
        items, self.items = self.items, []
        with times("embed"):
            vectors = self.embedder.embed([face.crop for _, face in items])
        owners: dict[int, FacePipeline] = {}
        for (pipeline, face), vec in zip(items, vectors, strict=True):
            pipeline.aggregator.add(FaceEmbedding(face, vec))
            owners[id(pipeline)] = pipeline
        for pipeline in owners.values():
            pipeline.update_labels([f for p, f in items if p is pipeline])


@dataclass(frozen=True)
class SeenFace:
    """A tracked face of one frame, with its crop in the kept geometry and its quality."""

    face: TrackedFace
    kept: np.ndarray  # uint8[S, S, 3] BGR aligned to app.align.STORE
    quality: Quality


class TrackedFront:
    """The front of the data path for one video: detect -> shot cut -> track -> kept crop ->
    quality, frame by frame (the pipeline and video enrollment both run it)."""

    def __init__(self, detector: Detector, tracking: TrackerConfig | None = None,
                 times: StageTimes | None = None,
                 wanted: Callable[[Detection], bool] | None = None) -> None:
        """`wanted`: which detections to keep (the camera's masks and minimum face width)."""
        tracking = tracking or TrackerConfig()
        self.detector = detector
        self.tracker = Tracker(tracking)
        self.cuts = ShotCutDetector(tracking.shot_cut_threshold)
        self.times = times or StageTimes()
        self.wanted = wanted
        self.detections = 0

    def step(self, frame: Frame) -> tuple[list[SeenFace], list[int]]:
        """The faces tracked in `frame` and the ids of the tracks that ended with it."""
        with self.times("detect"):
            found = self.detector.detect_frame(frame.image, self.tracker.expected(frame.index))
            dets = [d for d in found if self.wanted is None or self.wanted(d)]
        self.detections += len(dets)
        with self.times("track"):
            ended = self.tracker.finish_all() if self.cuts.is_cut(frame.image) else []
            faces, finished = self.tracker.update(frame.index, frame.pts, dets)
        with self.times("align"):
            seen = []
            for f in faces:
                kept = align_face(frame.image, f.detection.landmarks, STORE)
                seen.append(SeenFace(f, kept, score_quality(f.detection, kept)))
        return seen, ended + finished


@dataclass(frozen=True)
class FrameResult:
    """What the pipeline saw in one frame (for annotation) and the messages it produced."""

    faces: list[TrackedFace]  # detected in this frame
    labels: dict[int, Match]  # running match per visible track (None before its first embedding)
    events: list[Event]  # `recognized` alerts and `end` events (Event.type)
    # open tracks where the detector did not run on this frame: their predicted boxes
    predicted: list[TrackedFace] = field(default_factory=list)
    # faces of this frame that are now their track's best face (app.aggregate.better)
    best: list[TrackedFace] = field(default_factory=list)


@dataclass
class _TrackState:
    """What the pipeline adds to the aggregator's view of an open track."""

    id: str  # the event id shared by the track's `recognized` and `end` messages
    wall: float  # Unix time of its first frame
    pts: float  # media time of its last detection
    bbox: np.ndarray  # float32[4] of its last detection
    velocity: np.ndarray  # float32[4] px per media second, from its last two detections
    zones: set[str] = field(default_factory=set)
    good: int = 0  # embeddings of crops of at least alerts.unknown_min_quality
    seen: str | None = None  # the person its running match named last (a message said so)


def _polygon(points: list[tuple[float, float]]) -> np.ndarray:
    return np.asarray(points, dtype=np.float32).reshape(-1, 1, 2)


def _inside(polygon: np.ndarray, bbox: np.ndarray) -> bool:
    """Whether the centre of an x, y, w, h box lies in (or on) the polygon."""
    centre = (float(bbox[0] + bbox[2] / 2), float(bbox[1] + bbox[3] / 2))
    return cv2.pointPolygonTest(polygon, centre, False) >= 0


def iso_time(wall: float) -> str:
    """Unix time as local ISO 8601 with its UTC offset (milliseconds)."""
    return datetime.fromtimestamp(wall).astimezone().isoformat(timespec="milliseconds")


PREDICT_HORIZON_S = 1.0  # predicted boxes are drawn this long after a track's last detection


class FacePipeline:
    def __init__(
        self,
        camera: str,
        cfg: AppConfig,
        detector: Detector,
        embedder: Embedder,
        matcher: Callable[[], Matcher],
        times: StageTimes | None = None,
        batch: EmbedBatch | None = None,
        settings: CameraConfig | None = None,
    ) -> None:
        """`settings`: the camera's own min_face, threshold, masks and zones, if any."""
        self.camera, self.cfg = camera, cfg
        self.detector, self.embedder, self.matcher = detector, embedder, matcher
        self.aggregator = TrackAggregator(camera, cfg.embed)
        self.times = times or StageTimes()
        self.front = TrackedFront(detector, cfg.tracker, self.times, self._wanted)
        self.batch = batch if batch is not None else EmbedBatch(embedder)
        self.labels: dict[int, Match] = {}
        self.frames = self.tracks_finished = 0
        self._last_detect: float | None = None
        self.min_face = cfg.detector.min_face
        self.threshold: float | None = None  # None: the matcher's own
        self.masks: list[np.ndarray] = []
        self.zones: dict[str, np.ndarray] = {}
        if settings is not None:
            if settings.min_face is not None:
                self.min_face = settings.min_face
            self.threshold = settings.threshold
            self.masks = [_polygon(p) for p in settings.masks]
            self.zones = {name: _polygon(p) for name, p in settings.zones.items()}
        self.announcer = Announcer(cfg.alerts)
        self._state: dict[int, _TrackState] = {}
        self._alerts: list[Event] = []  # recognized messages waiting for the next push
        self._pts = 0.0  # media time of the latest frame

    def push(self, frame: Frame) -> FrameResult:
        self.frames += 1
        self._pts = frame.pts
        if not self._detect_now(frame):
            predicted = self._predicted(frame)
            return FrameResult([], self._labels(predicted), self._take_alerts(), predicted)
        wall = frame.wall if frame.wall is not None else time.time()
        seen, finished = self.front.step(frame)
        faces = [s.face for s in seen]
        best = []
        with self.times("align"):
            for s in seen:
                f = s.face
                self._follow(f, wall)
                aligned = AlignedFace(
                    f.track_id,
                    f.frame_index,
                    f.pts,
                    f.detection.bbox,
                    align_face(frame.image, f.detection.landmarks, self.embedder.template),
                    s.quality,
                    s.kept,
                )
                if self.aggregator.observe(aligned):
                    self.batch.add(self, aligned)
                if self.aggregator.is_best(aligned):
                    best.append(f)
        oldest = self.batch.oldest(self)
        waited = oldest is not None and frame.pts - oldest >= self.cfg.embed.max_wait_s
        if len(self.batch) >= self.embedder.batch_size or finished or waited:
            self.batch.run(self.times)
        events = self._take_alerts() + self._finish(finished)
        return FrameResult(faces, self._labels(faces), events, best=best)

    @property
    def detections(self) -> int:
        """Detections kept so far (after the camera's masks and minimum face width)."""
        return self.front.detections

    def _wanted(self, d: Detection) -> bool:
        """Detections outside the camera's masks and at least `min_face` wide."""
        return d.bbox[2] >= self.min_face and not any(_inside(m, d.bbox) for m in self.masks)

    def _follow(self, f: TrackedFace, wall: float) -> None:
        """Update a track's last box, velocity and zones from its detection in this frame."""
        bbox = np.asarray(f.detection.bbox, dtype=np.float32)
        st = self._state.get(f.track_id)
        if st is None:
            st = self._state[f.track_id] = _TrackState(
                new_event_id(), wall, f.pts, bbox, np.zeros(4, np.float32)
            )
        elif f.pts > st.pts:
            st.velocity = (bbox - st.bbox) / np.float32(f.pts - st.pts)
            st.pts, st.bbox = f.pts, bbox
        st.zones.update(name for name, zone in self.zones.items() if _inside(zone, bbox))

    def _predicted(self, frame: Frame) -> list[TrackedFace]:
        """Open tracks' boxes extrapolated to a frame the detector skipped (for annotation)."""
        out = []
        for tid in self.front.tracker.active_ids:
            st = self._state.get(tid)
            if st is None or frame.pts - st.pts > PREDICT_HORIZON_S:
                continue
            bbox = st.bbox + st.velocity * np.float32(frame.pts - st.pts)
            det = Detection(bbox.astype(np.float32), np.zeros((5, 2), np.float32), 0.0)
            out.append(TrackedFace(tid, frame.index, frame.pts, det))
        return out

    def _labels(self, faces: list[TrackedFace]) -> dict[int, Match]:
        return {f.track_id: self.labels[f.track_id] for f in faces if f.track_id in self.labels}

    def _take_alerts(self) -> list[Event]:
        alerts, self._alerts = self._alerts, []
        return alerts

    def _detect_now(self, frame: Frame) -> bool:
        """The detection rate: every n-th frame, and at most `max_fps` per second of media time."""
        d = self.cfg.detector
        if frame.index % d.every_n_frames:
            return False
        # 2% slack so that a 30 fps source with max_fps 15 detects on exactly every 2nd frame
        last = self._last_detect
        if d.max_fps and last is not None and frame.pts - last < 0.98 / d.max_fps:
            return False
        self._last_detect = frame.pts
        return True

    def flush(self) -> list[Event]:
        """End every open track (end of a file, a camera going away, shutdown)."""
        self.batch.run(self.times)
        return self._take_alerts() + self._finish(self.front.tracker.finish_all())

    def _decide(self, m: Match) -> Match:
        """The camera's own threshold, when it has one, decides instead of the matcher's."""
        if self.threshold is None or m.candidate is None:
            return m
        return Match(m.candidate if m.score >= self.threshold else None, m.score, m.candidate)

    def update_labels(self, faces: list[AlignedFace]) -> None:
        """Re-match the running templates of tracks that just got embeddings (for annotation
        and the `recognized` alerts)."""
        min_quality = self.cfg.alerts.unknown_min_quality
        with self.times("aggregate"):
            matcher = self.matcher()
            for f in faces:
                st = self._state.get(f.track_id)
                if st is not None and f.quality is not None and f.quality.score >= min_quality:
                    st.good += 1
            for tid in sorted({f.track_id for f in faces}):
                template = self.aggregator.template(tid)
                if template is None or tid not in self.aggregator.open_tracks():
                    continue
                m = self.labels[tid] = self._decide(
                    matcher.match(template, self.aggregator.face_px(tid)))
                st = self._state.get(tid)
                if st is None:
                    continue
                kind = None
                if self.announcer.decide(tid, m, st.good, self._pts):
                    kind = "recognized"
                elif m.identity is not None and m.identity != st.seen:
                    kind = "seen"  # in the cooldown: no alert, but the person is here
                if m.identity is not None:
                    st.seen = m.identity
                if kind is not None:
                    self._alerts.append(self._event(self.aggregator.summary(tid), m, kind))

    def _finish(self, track_ids: list[int]) -> list[Event]:
        events = []
        with self.times("match"):
            matcher = self.matcher() if track_ids else None
            for tid in track_ids:
                self.labels.pop(tid, None)
                if tid not in self.aggregator.open_tracks():
                    self._state.pop(tid, None)
                    continue  # a track the tracker ended before any frame reached the aligner
                summary = self.aggregator.finish(tid)
                self.announcer.finish(tid, summary.end)
                self.tracks_finished += 1
                if summary.frames < self.cfg.matching.min_frames or summary.template is None:
                    self._state.pop(tid, None)
                    continue
                m = self._decide(matcher.match(summary.template, summary.face_px))
                events.append(self._event(summary, m, "end"))
                self._state.pop(tid, None)
        return events

    def _event(self, s: TrackSummary, m: Match, kind: str) -> Event:
        bbox = tuple(float(v) for v in (s.best_bbox if s.best_bbox is not None else np.zeros(4)))
        st = self._state.get(s.track_id)
        return Event(
            camera=self.camera,
            track_id=s.track_id,
            identity=m.identity,
            score=m.score,
            start=s.start,
            end=s.end,
            frames=s.frames,
            best_bbox=bbox,
            model=self.embedder.model,
            id=st.id if st is not None else new_event_id(),
            time=iso_time(st.wall) if st is not None else None,
            candidate=m.candidate,
            candidate_score=m.score if m.candidate is not None else None,
            zones=tuple(sorted(st.zones)) if st is not None else (),
            type=kind,
            crops=s.crops if kind == "end" else (),
        )
