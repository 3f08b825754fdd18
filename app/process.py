"""`facemoe process VIDEO`: the offline data path over one video file, top to bottom."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from app.annotate import draw
from app.config import AppConfig
from app.daemon.sinks import SinkSpec, open_sinks
from app.detect import FaceDetector
from app.embed import Embedder
from app.gallery import Gallery
from app.openset import OpenSet
from app.pipeline import FacePipeline, StageTimes
from app.records import Event
from app.runtime import GalleryMatcher
from app.source import VideoWriter, open_source

log = logging.getLogger(__name__)


@dataclass
class ProcessSummary:
    video: str
    camera: str
    frames: int = 0
    seconds: float = 0.0
    media_seconds: float = 0.0
    detections: int = 0
    tracks: int = 0
    events: list[Event] = field(default_factory=list)  # one `end` event per track
    alerts: list[Event] = field(default_factory=list)  # `recognized` messages
    embedded_crops: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    backend: str = ""
    model: str = ""
    rule: str = ""  # the open-set rule at the start (app.openset)
    annotated: str | None = None

    def as_json(self) -> dict:
        return {
            "video": self.video,
            "camera": self.camera,
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "fps": round(self.frames / self.seconds, 2) if self.seconds else 0.0,
            "media_seconds": round(self.media_seconds, 3),
            "detections": self.detections,
            "tracks": self.tracks,
            "events": len(self.events),
            "identified": sorted({e.identity for e in self.events if e.identity}),
            "recognized": len(self.alerts),
            "embedded_crops": self.embedded_crops,
            "stages": self.stages,
            "backend": self.backend,
            "model": self.model,
            "rule": self.rule,
            "annotated": self.annotated,
        }


def video_fingerprint(video: str) -> str:
    """What identifies a video's content cheaply: sha256 of its size, first and last MiB (the
    URI itself for a stream)."""
    path = Path(video)
    if not path.is_file():
        return video
    size, chunk = path.stat().st_size, 1 << 20
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(chunk))
        if size > chunk:
            fh.seek(max(chunk, size - chunk))
            h.update(fh.read())
    return h.hexdigest()


def event_id(fingerprint: str, camera: str, track_id: int) -> str:
    """The id of a `process` event: derived from the video and the track, so processing the
    same file again gives the same ids and the gallery stores its events once."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL,
                          f"facemoe-process:{fingerprint}:{camera}:{int(track_id)}"))


def process_video(
    video: str,
    cfg: AppConfig,
    detector: FaceDetector,
    embedder: Embedder,
    gallery: Gallery,
    threshold: float | OpenSet,
    *,
    events_jsonl: str | None = None,
    annotate: str | None = None,
    camera: str | None = None,
    progress: bool = True,
    publish: bool = False,
) -> ProcessSummary:
    """`publish`: also send the alerts, tracks and presence to `daemon.mqtt` (MQTT and Home
    Assistant), as box `daemon.box`, as the daemon does."""
    camera = camera or Path(video).stem
    times = StageTimes()
    matcher = GalleryMatcher(gallery, threshold)
    pipeline = FacePipeline(camera, cfg, detector, embedder, matcher, times)
    sinks = open_sinks(cfg, gallery, events_jsonl=events_jsonl, publish=publish,
                       box=cfg.daemon.box, cameras=[camera],
                       identities=lambda: sorted(set(matcher().names)))
    summary = ProcessSummary(
        video=str(video),
        camera=camera,
        backend=embedder.backend.name,
        model=embedder.model,
        rule=matcher().open_set.describe(matcher().identities),
        annotated=annotate,
    )
    log.info("%s: %s", camera, summary.rule)
    started = time.perf_counter()
    writer = None
    fingerprint = video_fingerprint(video)
    source = open_source(video, camera)
    try:
        total = None
        if source.duration and source.fps:
            total = int(round(source.duration * source.fps))
        bar = tqdm(
            total=total, unit="frame", desc=Path(video).name, disable=not progress, leave=False
        )
        frames = iter(source)
        while True:
            with times("decode"):
                frame = next(frames, None)
            if frame is None:
                break
            result = pipeline.push(frame)
            summary.media_seconds = frame.pts
            if annotate:
                with times("annotate"):
                    if writer is None:
                        writer = VideoWriter(annotate, source.fps or 25.0, frame.size)
                    writer.write(
                        draw(frame.image, result.faces, result.labels, result.predicted)
                    )
            _emit(sinks, _ids(result.events, fingerprint), summary, times)
            bar.update(1)
        _emit(sinks, _ids(pipeline.flush(), fingerprint), summary, times)
        bar.close()
        if writer is not None:
            with times("annotate"):
                writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.discard()
        source.close()
        for s in sinks:
            s.sink.close()
    summary.seconds = time.perf_counter() - started
    summary.frames = pipeline.frames
    summary.detections = pipeline.detections
    summary.tracks = pipeline.tracks_finished
    summary.embedded_crops = pipeline.aggregator.embedded_total
    summary.stages = times.as_dict()
    return summary


def _ids(events: list[Event], fingerprint: str) -> list[Event]:
    return [replace(e, id=event_id(fingerprint, e.camera, e.track_id)) for e in events]


def _emit(
    sinks: list[SinkSpec], events: list[Event], summary: ProcessSummary, times: StageTimes
) -> None:
    """Each sink gets the events of its types (the files and the gallery: `end`, one record
    per track; MQTT with --publish: every message); `recognized` ones go to the summary."""
    summary.alerts.extend(e for e in events if e.type == "recognized")
    if not events:
        return
    with times("sinks"):
        for s in sinks:
            mine = [e for e in events if e.type in s.types]
            if mine:
                s.sink.write(mine)
    summary.events.extend(e for e in events if e.type == "end")
