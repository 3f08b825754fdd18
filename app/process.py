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
from app.detect import Detector
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
    detector: Detector,
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


# --- many videos: a worker pool ----------------------------------------------------------------

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".ts", ".m4v", ".mpg",
                            ".mpeg", ".flv", ".wmv", ".3gp"})


def find_videos(paths: list[str]) -> list[str]:
    """The videos to process: files and URIs as given, folders searched recursively for files
    with a video suffix (sorted), each once. ValueError (one line) for a path that does not
    exist or a folder without videos."""
    out: list[str] = []
    for given in paths:
        p = Path(given).expanduser()
        if "://" in given:
            out.append(given)
        elif p.is_dir():
            found = sorted(str(f) for f in p.rglob("*")
                           if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
            if not found:
                raise ValueError(f"no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) in "
                                 f"{given}")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise ValueError(f"no such file or folder: {given}")
    return list(dict.fromkeys(out))


def shard(videos: list[str], spec: str) -> list[str]:
    """Every N-th video from the K-th (`spec` "K/N", 0 <= K < N), for spreading one list over N
    machines (GNU parallel, a Kubernetes Indexed Job's $JOB_COMPLETION_INDEX)."""
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: give K/N, e.g. 0/4") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard {spec!r}: K must be from 0 to N-1")
    return videos[k::n]


@dataclass(frozen=True)
class Batch:
    """What a worker needs to process videos on its own (pickled into each worker process)."""

    cfg: AppConfig
    gallery: str
    key: bytes | None
    events_jsonl: str | None
    camera: str | None = None  # None: each file's stem
    create: bool = False  # --allow-empty-gallery
    publish: bool = False  # --publish: MQTT and Home Assistant too


_worker: dict = {}  # per worker process: the models and the opened gallery


def _start_worker(batch: Batch) -> None:
    from app.runtime import make_detector, make_embedder, open_gallery, open_set

    embedder = make_embedder(batch.cfg)
    _worker.update(batch=batch, detector=make_detector(batch.cfg), embedder=embedder,
                   gallery=open_gallery(batch.gallery, embedder, create=batch.create,
                                        key=batch.key),
                   rule=open_set(batch.cfg, embedder))


def _process_one(video: str) -> tuple[str, ProcessSummary | None, str | None]:
    """(video, its summary without crops, None) or (video, None, the one-line error)."""
    w = _worker
    batch: Batch = w["batch"]
    if not batch.create and not w["gallery"].identities():
        return video, None, (f"gallery {batch.gallery} is empty: enroll someone first "
                             "(facemoe enroll NAME PHOTO) or pass --allow-empty-gallery")
    try:
        summary = process_video(video, batch.cfg, w["detector"], w["embedder"], w["gallery"],
                                w["rule"], events_jsonl=batch.events_jsonl,
                                camera=batch.camera or Path(video).stem, progress=False,
                                publish=batch.publish)
    except Exception as exc:  # noqa: BLE001  (one bad file must not stop the others)
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return video, None, text
    summary.events = [replace(e, crops=(), snapshot_image=None) for e in summary.events]
    summary.alerts = [replace(e, crops=(), snapshot_image=None) for e in summary.alerts]
    return video, summary, None


def process_many(videos: list[str], batch: Batch, *, jobs: int = 1, progress: bool = True
                 ) -> list[tuple[str, ProcessSummary | None, str | None]]:
    """Process `videos` with `jobs` worker processes (each loads the models and opens the
    gallery once), one progress bar over the files; results in the order of `videos`. Event
    ids stay derived from each file and track, so a re-run (or two machines given the same
    file) stores nothing twice. A file that fails is reported with its one-line error and the
    others go on."""
    results: dict[str, tuple[str, ProcessSummary | None, str | None]] = {}
    bar = tqdm(total=len(videos), unit="file", desc="process", disable=not progress)
    try:
        if jobs <= 1:
            _start_worker(batch)
            try:
                for video in videos:
                    results[video] = _process_one(video)
                    _tick(bar, results[video])
            finally:
                _worker.pop("gallery").close()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: GStreamer's and onnxruntime's threads do not survive a fork
            with ProcessPoolExecutor(min(jobs, len(videos)) or 1,
                                     mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_start_worker, initargs=(batch,)) as pool:
                for done in as_completed([pool.submit(_process_one, v) for v in videos]):
                    video, summary, error = done.result()
                    results[video] = (video, summary, error)
                    _tick(bar, results[video])
    finally:
        bar.close()
    return [results[v] for v in videos]


def _tick(bar: tqdm, result: tuple[str, ProcessSummary | None, str | None]) -> None:
    video, summary, error = result
    if error is not None:
        log.error("%s: %s", video, error)
    bar.set_postfix_str(Path(video).name, refresh=False)
    bar.update(1)
