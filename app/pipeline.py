"""One camera's data path:
frames -> detect -> track -> align -> quality -> embed -> aggregate -> match.

`FacePipeline.push(frame)` returns the events of the tracks that ended at that frame;
`flush()` ends the remaining tracks. Both `facemoe process` and the daemon drive it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from app.aggregate import TrackAggregator
from app.align import align_face
from app.config import AppConfig
from app.detect import FaceDetector
from app.embed import Embedder
from app.match import Matcher
from app.quality import score_quality
from app.records import AlignedFace, Event, FaceEmbedding, Frame, Match, TrackedFace, TrackSummary
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
            pipeline.update_labels({f.track_id for p, f in items if p is pipeline})


@dataclass(frozen=True)
class FrameResult:
    """What the pipeline saw in one frame (for annotation) and the events it finished."""

    faces: list[TrackedFace]
    labels: dict[int, Match]  # running match per visible track (None before its first embedding)
    events: list[Event]


class FacePipeline:
    def __init__(
        self,
        camera: str,
        cfg: AppConfig,
        detector: FaceDetector,
        embedder: Embedder,
        matcher: Callable[[], Matcher],
        times: StageTimes | None = None,
        batch: EmbedBatch | None = None,
    ) -> None:
        self.camera, self.cfg = camera, cfg
        self.detector, self.embedder, self.matcher = detector, embedder, matcher
        self.tracker = Tracker(cfg.tracker)
        self.cuts = ShotCutDetector(cfg.tracker.shot_cut_threshold)
        self.aggregator = TrackAggregator(camera, cfg.embed)
        self.times = times or StageTimes()
        self.batch = batch if batch is not None else EmbedBatch(embedder)
        self.labels: dict[int, Match] = {}
        self.frames = self.detections = self.tracks_finished = 0
        self._last_detect: float | None = None

    def push(self, frame: Frame) -> FrameResult:
        self.frames += 1
        if not self._detect_now(frame):
            return FrameResult([], {}, [])
        with self.times("detect"):
            dets = [
                d
                for d in self.detector.detect_frame(
                    frame.image, self.tracker.expected(frame.index)
                )
                if d.bbox[2] >= self.cfg.detector.min_face
            ]
        self.detections += len(dets)
        with self.times("track"):
            cut = self.cuts.is_cut(frame.image)
            ended = self.tracker.finish_all() if cut else []
            faces, finished = self.tracker.update(frame.index, frame.pts, dets)
            finished = ended + finished
        with self.times("align"):
            for f in faces:
                crop = align_face(frame.image, f.detection.landmarks)
                aligned = AlignedFace(
                    f.track_id,
                    f.frame_index,
                    f.pts,
                    f.detection.bbox,
                    crop,
                    score_quality(f.detection, crop),
                )
                if self.aggregator.observe(aligned):
                    self.batch.add(self, aligned)
        if len(self.batch) >= self.embedder.batch_size or finished:
            self.batch.run(self.times)
        events = self._finish(finished)
        return FrameResult(
            faces,
            {f.track_id: self.labels[f.track_id] for f in faces if f.track_id in self.labels},
            events,
        )

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
        return self._finish(self.tracker.finish_all())

    def update_labels(self, track_ids: set[int]) -> None:
        """Re-match the running templates of tracks that just got embeddings (for annotation)."""
        with self.times("aggregate"):
            matcher = self.matcher()
            for tid in track_ids:
                template = self.aggregator.template(tid)
                if template is not None:
                    self.labels[tid] = matcher.match(template)

    def _finish(self, track_ids: list[int]) -> list[Event]:
        events = []
        with self.times("match"):
            matcher = self.matcher() if track_ids else None
            for tid in track_ids:
                self.labels.pop(tid, None)
                if tid not in self.aggregator.open_tracks():
                    continue  # a track the tracker ended before any frame reached the aligner
                summary = self.aggregator.finish(tid)
                self.tracks_finished += 1
                if summary.frames < self.cfg.matching.min_frames or summary.template is None:
                    continue
                events.append(self._event(summary, matcher.match(summary.template)))
        return events

    def _event(self, s: TrackSummary, m: Match) -> Event:
        bbox = tuple(float(v) for v in (s.best_bbox if s.best_bbox is not None else np.zeros(4)))
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
            crops=s.crops,
        )
