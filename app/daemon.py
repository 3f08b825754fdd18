"""`facemoe run`: the long-running daemon over many live cameras.

Threads:
  - one reader per camera: GStreamer source -> a bounded frame queue (the oldest frame is
    dropped when the worker falls behind); on a failure (SourceError, end of a live stream,
    no frame for `frame_timeout_s`) it tells the worker to end the camera's open tracks and
    reconnects with exponential backoff; other cameras are unaffected;
  - one worker: round-robins the camera queues through one `FacePipeline` per camera (all
    sharing one detector and embedder) and hands events to the sink queue;
  - one sink thread: snapshots (written first, so a message's snapshot exists when it
    arrives), SQLite (batched commits) and rotating JSONL (`end` events: one per track),
    MQTT and the webhook (`recognized` alerts too; each sends from a thread of its own and
    buffers while its target is away); a slow or failing sink never blocks the video path;
  - a monitor (stats line, Prometheus gauges) and an HTTP server (/metrics, /healthz).
SIGTERM/SIGINT: stop the readers, end every open track, write its event, exit 0.
SIGHUP: reload the gallery matrix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from app import paths
from app.config import AppConfig, CameraConfig, ConfigError, DaemonConfig
from app.gallery import Gallery
from app.gallery.errors import one_line
from app.mqtt import MqttSink
from app.outbox import Outbox
from app.pipeline import EmbedBatch, FacePipeline, StageTimes
from app.records import EVENT_TYPES, Event, Frame, TrackedFace
from app.runtime import GalleryWatch, make_detector, make_embedder, open_gallery, threshold
from app.sinks import (
    GallerySink,
    RotatingJsonlSink,
    Sink,
    SnapshotSink,
    WebhookSink,
)
from app.sinkworker import SinkWorker
from app.source import SourceError, init_gstreamer, open_source, redact_uri

log = logging.getLogger(__name__)

_RECONNECT = object()  # queue marker: the camera's stream broke; end its open tracks
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# frame to event: a track ends `tracker.max_missed` detections after its last frame
_EVENT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


_HTTP_TIMEOUT_S = 10.0  # per socket operation of a /metrics or /healthz client
_HTTP_MAX_CLIENTS = 16  # connections served at once; more are closed at once


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `_HTTP_MAX_CLIENTS` at once; a client error
    (timeout, reset) is one debug line, never a traceback in the log."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(_HTTP_MAX_CLIENTS)

    def process_request(self, request, client_address) -> None:  # noqa: ANN001
        if not self._slots.acquire(blocking=False):
            log.warning("HTTP: %d clients already connected; closing a new connection from %s",
                        _HTTP_MAX_CLIENTS, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        log.debug("HTTP client %s: %s", client_address[0], sys.exc_info()[1])


class Metrics:
    """The daemon's Prometheus metrics in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        cam = ["camera"]
        self.frames = Counter("facemoe_frames", "frames processed", cam, registry=r)
        self.dropped = Counter("facemoe_frames_dropped", "frames dropped (queue full)", cam,
                               registry=r)
        self.reconnects = Counter("facemoe_reconnects", "camera reconnects", cam, registry=r)
        self.events = Counter("facemoe_events", "events (finished tracks)", cam, registry=r)
        self.recognized = Counter("facemoe_recognized", "'recognized' alerts (open tracks)",
                                  cam, registry=r)
        self.events_dropped = Counter("facemoe_events_dropped", "events dropped (sink queue full)",
                                      registry=r)
        self.sink_errors = Counter("facemoe_sink_errors", "failed sink writes", ["sink"],
                                   registry=r)
        self.sink_incidents = Counter(
            "facemoe_sink_incidents",
            "MQTT/webhook incidents: kind=disconnect (connection lost), retry (failed send, "
            "retried), dropped (a full buffer dropped its oldest message, or a rejected event)",
            ["sink", "kind"], registry=r)
        self.corrupt_templates = Gauge(
            "facemoe_gallery_corrupt_templates",
            "templates left out of matching because they are corrupt (see `gallery check`)",
            registry=r)
        self.sink_pending = Gauge("facemoe_sink_pending", "messages waiting for delivery",
                                  ["sink"], registry=r)
        self.sink_oldest = Gauge(
            "facemoe_sink_oldest_seconds",
            "age of the oldest event or message a sink has not delivered (0: none waits)",
            ["sink"], registry=r)
        self.fps = Gauge("facemoe_fps", "processed frames per second", cam, registry=r)
        self.queue = Gauge("facemoe_queue_depth", "frames waiting", cam, registry=r)
        self.up = Gauge("facemoe_camera_up", "1 while the camera delivers frames", cam, registry=r)
        self.latency = Histogram("facemoe_stage_seconds", "per-frame stage latency",
                                 ["camera", "stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.event_latency = Histogram(
            "facemoe_event_latency_seconds",
            "seconds from the arrival of a track's last frame to its event reaching the sinks",
            cam, buckets=_EVENT_BUCKETS, registry=r)


class FrameQueue:
    """A bounded, thread-safe frame queue that drops its oldest frame when full.

    Items are (enqueue time, Frame) pairs or the `_RECONNECT` marker; markers are never
    dropped and do not count against the bound, so a camera failure always reaches the worker
    in order.
    """

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self._items: deque = deque()
        self._frames = 0
        self._lock = threading.Lock()

    def put(self, item) -> bool:
        """Append a Frame or `_RECONNECT`; True when the oldest frame was dropped for it."""
        dropped = False
        with self._lock:
            if item is not _RECONNECT:
                if self._frames >= self.max_frames:
                    for i, x in enumerate(self._items):
                        if x is not _RECONNECT:
                            del self._items[i]
                            self._frames -= 1
                            dropped = True
                            break
                item = (time.monotonic(), item)
                self._frames += 1
            self._items.append(item)
        return dropped

    def take(self):
        """The oldest item, or None when empty."""
        with self._lock:
            if not self._items:
                return None
            item = self._items.popleft()
            if item is not _RECONNECT:
                self._frames -= 1
            return item

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class Camera:
    """A camera's reader thread, frame queue, pipeline and counters.

    It gets what it uses and nothing of the daemon: its pipeline, the daemon's settings, the
    stop event, the metrics, and `on_put`, called after each item it queues (to wake the
    worker)."""

    def __init__(self, cc: CameraConfig, pipeline: FacePipeline, settings: DaemonConfig,
                 stopping: threading.Event, metrics: Metrics,
                 on_put: Callable[[], None]) -> None:
        self.cc, self.name, self.pipeline, self.settings = cc, cc.name, pipeline, settings
        self.stopping, self.metrics, self.on_put = stopping, metrics, on_put
        self.queue = FrameQueue(settings.frame_queue)
        self.state = "starting"
        self.error = ""
        self.frames = self.dropped = self.reconnects = self.events = 0
        self.last_event: float | None = None  # wall-clock time of the last event
        self.last_frame = 0.0  # monotonic time of the last frame read
        self.latencies: dict[str, deque[float]] = {}
        self.fps_window: deque[tuple[float, int]] = deque(maxlen=16)
        # (monotonic, frames, dropped) once a second, for the drop rate over health.window_s
        self.drop_window: deque[tuple[float, int, int]] = deque(
            maxlen=int(settings.health.window_s) + 2)
        self.arrivals: deque[tuple[float, float]] = deque(maxlen=4096)  # (pts, monotonic)
        self._arrivals_lock = threading.Lock()
        self.best: dict[int, np.ndarray] = {}  # track id -> its best face so far, with a margin
        self.source = None
        self.thread = threading.Thread(target=self._read, name=f"cam-{cc.name}", daemon=True)
        self._next_index = 0
        self._pts_base = 0.0

    # --- reader thread -------------------------------------------------------------------
    def _read(self) -> None:
        cfg = self.settings
        backoff = cfg.reconnect.initial_s
        is_file = "://" not in self.cc.uri and not self.cc.uri.startswith("/dev/")
        while not self.stopping.is_set():
            ended = False
            try:
                self.source = open_source(self.cc.uri, self.name, loop=self.cc.loop,
                                          timeout=cfg.frame_timeout_s)
                if self.stopping.is_set():
                    break
                self.state, self.error = "running", ""
                first_pts, last_pts, prev_rel = None, 0.0, None
                paced = not self.source.is_live  # files play at their frame rate, like a camera
                for frame in self.source:
                    if self.stopping.is_set():
                        break
                    if first_pts is None:
                        first_pts, started = frame.pts, time.monotonic()
                    if paced:
                        delay = started + (frame.pts - first_pts) - time.monotonic()
                        if delay > 0 and self.stopping.wait(min(delay, 1.0)):
                            break
                    rel = frame.pts - first_pts
                    if not paced and prev_rel is not None:
                        self._count_upstream_drops(rel - prev_rel)
                    prev_rel = rel
                    last_pts = self._pts_base + frame.pts - first_pts
                    with self._arrivals_lock:
                        self.arrivals.append((last_pts, time.monotonic()))
                    self._put(dataclasses.replace(frame, index=self._next_index, pts=last_pts,
                                                  wall=time.time()))
                    self._next_index += 1
                    backoff = cfg.reconnect.initial_s
                else:
                    ended = True
                    self.error = "end of stream"
                self._pts_base = last_pts + 0.04
            except SourceError as exc:
                self.error = str(exc)
            finally:
                if self.source is not None:
                    self.source.close()
            if self.stopping.is_set():
                break
            self._put(_RECONNECT)
            if ended and is_file and not self.cc.loop:
                self.state = "finished"
                log.info("camera %s: file ended", self.name)
                return
            self.state = "reconnecting"
            self.reconnects += 1
            self.metrics.reconnects.labels(self.name).inc()
            log.warning("camera %s: %s; reconnecting in %.1f s", self.name, self.error, backoff)
            if self.stopping.wait(backoff):
                break
            backoff = min(backoff * 2, cfg.reconnect.max_s)
        self.state = "stopped"

    def _count_upstream_drops(self, gap: float) -> None:
        """Frames a live source's leaky appsink dropped before our queue, from a timestamp gap
        between consecutive frames of one connection: n frame intervals = n - 1 lost frames."""
        fps = self.source.fps if self.source is not None else 0.0
        missed = round(gap * fps) - 1 if fps > 0 else 0
        if missed > 0:
            self.dropped += missed
            self.metrics.dropped.labels(self.name).inc(missed)

    def _put(self, item) -> None:
        if item is not _RECONNECT:
            self.last_frame = time.monotonic()
        if self.queue.put(item):
            self.dropped += 1
            self.metrics.dropped.labels(self.name).inc()
        self.on_put()

    def take(self):
        return self.queue.take()

    def depth(self) -> int:
        return len(self.queue)

    def stop(self) -> None:
        """Unblock the reader; closing may wait on a hung server, so not in the caller's thread."""
        src = self.source
        if src is not None:
            threading.Thread(target=src.close, name=f"close-{self.name}", daemon=True).start()

    # --- worker thread -------------------------------------------------------------------
    def process(self, queued_at: float, frame: Frame) -> list[Event]:
        """Run a queued frame through the pipeline; its events, counted."""
        times = self.pipeline.times
        before = dict(times.seconds)
        t = time.perf_counter()
        result = self.pipeline.push(frame)
        total = time.perf_counter() - t
        self._observe("queue", time.monotonic() - queued_at)
        self._observe("frame", total)
        for stage, secs in times.seconds.items():
            if secs != before.get(stage, 0.0):
                self._observe(stage, secs - before.get(stage, 0.0))
        self.frames += 1
        self.metrics.frames.labels(self.name).inc()
        if self.settings.snapshots.dir:
            self._keep_best(frame, result.best)
        return self._count(result.events)

    def flush(self) -> list[Event]:
        """End the camera's open tracks (its stream broke, or shutdown); their events."""
        return self._count(self.pipeline.flush())

    def _count(self, events: list[Event]) -> list[Event]:
        for ev in events:
            if ev.type == "end":
                self.events += 1
                self.last_event = time.time()
                self.metrics.events.labels(self.name).inc()
            else:
                self.metrics.recognized.labels(self.name).inc()
        return events

    def _observe(self, stage: str, seconds: float) -> None:
        self.latencies.setdefault(stage, deque(maxlen=1000)).append(seconds)
        self.metrics.latency.labels(self.name, stage).observe(seconds)

    def _keep_best(self, frame: Frame, best: list[TrackedFace]) -> None:
        """Keep the picture of each face that is now its track's best (the pipeline's rule,
        app.aggregate.better): the face with a 20% margin, cut from the frame."""
        h, w = frame.image.shape[:2]
        for f in best:
            x, y, bw, bh = (float(v) for v in f.detection.bbox)
            x0, y0 = max(0, int(x - 0.2 * bw)), max(0, int(y - 0.2 * bh))
            x1, y1 = min(w, int(x + 1.2 * bw)), min(h, int(y + 1.2 * bh))
            if x1 > x0 and y1 > y0:
                self.best[f.track_id] = frame.image[y0:y1, x0:x1].copy()
        if len(self.best) > 64 and frame.index % 100 == 0:  # tracks that ended without an event
            open_ids = set(self.pipeline.aggregator.open_tracks())
            self.best = {k: v for k, v in self.best.items() if k in open_ids}

    def arrival(self, pts: float) -> float | None:
        """Monotonic arrival time of the frame at `pts` (the latest frame at or before it)."""
        with self._arrivals_lock:
            for frame_pts, at in reversed(self.arrivals):
                if frame_pts <= pts + 1e-6:
                    return at
        return None

    def snapshot(self, ev: Event) -> np.ndarray | None:
        """The best face crop of the event's track so far (kept until the track's end)."""
        return self.best.get(ev.track_id) if ev.type != "end" else self.best.pop(ev.track_id, None)

    def percentiles(self, stage: str) -> tuple[float, float]:
        values = list(self.latencies.get(stage, ()))
        if not values:
            return 0.0, 0.0
        p50, p95 = np.percentile(values, [50, 95])
        return float(p50), float(p95)

    def drop_rate(self, now: float, window_s: float) -> float:
        """Share of this camera's frames dropped (queue full or upstream) in the window."""
        samples = [s for s in self.drop_window if now - s[0] <= window_s + 1.0]
        samples.append((now, self.frames, self.dropped))
        _, frames0, dropped0 = samples[0]
        dropped = self.dropped - dropped0
        total = dropped + self.frames - frames0 + self.depth()
        return dropped / total if total > 0 else 0.0

    def problem(self, now: float) -> str | None:
        """Why this camera makes the daemon degraded, or None."""
        h = self.settings.health
        if self.state in ("reconnecting", "starting", "stopped"):
            return f"{self.state}" + (f": {self.error}" if self.error else "")
        rate = self.drop_rate(now, h.window_s)
        if rate > h.max_drop_rate:
            return (f"dropped {rate:.0%} of frames in the last {h.window_s:g} s "
                    f"(bound {h.max_drop_rate:.0%})")
        return None

    def health(self, now: float) -> dict:
        return {"state": self.state, "problem": self.problem(now), "uri": redact_uri(self.cc.uri),
                "frames": self.frames,
                "dropped": self.dropped, "reconnects": self.reconnects, "events": self.events,
                "queue": self.depth(), "fps": round(self.fps(), 2),
                "last_frame_age_s": round(now - self.last_frame, 3) if self.last_frame else None,
                "error": self.error or None}

    def fps(self) -> float:
        w = self.fps_window
        if len(w) < 2 or w[-1][0] <= w[0][0]:
            return 0.0
        return (w[-1][1] - w[0][1]) / (w[-1][0] - w[0][0])


class Daemon:
    def __init__(self, cfg: AppConfig, key: bytes | None = None) -> None:
        self.cfg = cfg
        cams = [c for c in cfg.cameras if c.enabled]
        if not cams:
            raise ConfigError("no enabled camera in the config (add a `cameras:` list)")
        init_gstreamer()  # once, here: initialising from several reader threads at once races
        self.detector, self.embedder = make_detector(cfg), make_embedder(cfg)
        # one embedding batch for every camera: crops from all of them fill each embedder call
        self.embed_batch = EmbedBatch(self.embedder)
        self.gallery: Gallery = open_gallery(cfg.gallery.path, self.embedder, create=True,
                                             key=key)
        if not self.gallery.identities():
            log.warning("the gallery %s is empty: every face will be reported as unknown",
                        cfg.gallery.path)
        snaps = cfg.daemon.snapshots
        if snaps.dir and self.gallery.store.sealer.encrypted and not snaps.allow_unencrypted:
            self.gallery.close()
            raise ConfigError(
                f"daemon.snapshots.dir: the gallery {cfg.gallery.path} is encrypted but "
                "snapshots are plain JPEG files; remove snapshots.dir or set "
                "snapshots.allow_unencrypted: true")
        self.threshold = threshold(cfg, self.embedder)
        # the worker's matcher: refreshed by a thread of its own, never on the video path
        self.watch = GalleryWatch(self.gallery, self.threshold, cfg.daemon.gallery_poll_s)
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.fatal: str | None = None  # why a thread died: the daemon stops, exit code 1
        self.cameras = [Camera(c, self._pipeline(c), cfg.daemon, self.stopping, self.metrics,
                               self.wake.set) for c in cams]
        self.started = time.monotonic()
        self.http: ThreadingHTTPServer | None = None
        self.web = None  # uvicorn.Server of the review UI (daemon.web)
        self._snapshots = (SnapshotSink(snaps.dir, snaps.retention_days) if snaps.dir
                           else None)
        self._sink_failures: dict[str, tuple[float, str]] = {}  # sink -> (monotonic, reason)
        self._failures_lock = threading.Lock()
        self.workers = self._open_sinks()  # name -> its worker, in the order they are fed
        self.web_auth = self._web_auth() if cfg.daemon.web else None

    def _web_auth(self):
        """The review UI's users (checked before any camera starts)."""
        from app.web.auth import AuthConfigError, Authenticator

        try:
            return Authenticator(self.cfg.web, self.cfg.daemon.metrics_host)
        except AuthConfigError as exc:
            raise ConfigError(str(exc)) from exc

    def matcher(self):
        return self.watch.matcher

    @property
    def _sinks(self) -> dict[str, Sink]:
        """The open sinks by name, in the order they are written."""
        return {name: w.sink for name, w in self.workers.items()}

    def _pipeline(self, cc: CameraConfig) -> FacePipeline:
        """A camera's pipeline: the shared detector, embedder, matcher and embedding batch,
        with the camera's own settings."""
        cfg = self.cfg
        if cc.detect_every_n is not None:
            cfg = cfg.model_copy(update={"detector": cfg.detector.model_copy(
                update={"every_n_frames": cc.detect_every_n})})
        return FacePipeline(cc.name, cfg, self.detector, self.embedder, self.matcher,
                            StageTimes(), self.embed_batch, settings=cc)

    # --- sinks ---------------------------------------------------------------------------
    def _open_sinks(self) -> dict[str, SinkWorker]:
        """A worker (thread and queue) per sink. The snapshot sink, when on, is fed first and
        hands each batch on to the others once its pictures are written (a message's snapshot
        exists when it arrives); the others are fed side by side, none waits for another."""
        d, specs = self.cfg.daemon, []
        if self.cfg.output.events_sqlite:  # one record per track; batched commits
            box = d.box
            outbox = Outbox(d.outbox or self._default_outbox(box), self.gallery.store.sealer,
                            crops=self.cfg.output.event_crops)
            specs.append(("gallery", GallerySink(self.gallery.event_store,
                                                 crops=self.cfg.output.event_crops,
                                                 outbox=outbox, count=self._counter("gallery")),
                          ("end",), d.sqlite_commit_s))
        jsonl = d.jsonl.path or self.cfg.output.events_jsonl
        if jsonl:  # one record per track
            specs.append(("jsonl", RotatingJsonlSink(jsonl, int(d.jsonl.max_mb * 1e6),
                                                     d.jsonl.backups), ("end",), 0.0))
        if d.mqtt:  # every message
            specs.append(("mqtt", MqttSink(
                d.mqtt, box=d.box, cameras=[c.name for c in self.cameras],
                identities=lambda: sorted(set(self.watch.matcher.names)),
                count=self._counter("mqtt"), close_timeout=d.shutdown_timeout_s / 2),
                EVENT_TYPES, 0.0))
        if d.webhook:  # the types it is configured for
            w = d.webhook
            specs.append(("webhook", WebhookSink(
                w.url, w.timeout_s, secret=w.secret.get_secret_value() if w.secret else None,
                queue=w.queue, retry_initial_s=w.retry_initial_s, retry_max_s=w.retry_max_s,
                count=self._counter("webhook"), close_timeout=d.shutdown_timeout_s / 2),
                tuple(w.types), 0.0))
        workers = {name: SinkWorker(name, sink, types, every_s=every, max_queue=d.event_queue,
                                    failed=self._sink_failed) for name, sink, types, every in specs}
        if self._snapshots is not None:  # both messages of a track name the same file
            snaps = SinkWorker("snapshots", self._snapshots, EVENT_TYPES,
                               max_queue=d.event_queue, failed=self._sink_failed,
                               then=self._dispatch)
            workers = {"snapshots": snaps, **workers}
        return workers

    def _default_outbox(self, box: str) -> Path:
        """Next to a SQLite gallery file; else in the home (`app.paths`)."""
        path = self.gallery.store.db.path
        if path is not None:
            return path.with_name(path.name + ".outbox")
        return paths.home() / f"outbox-{box}.jsonl"

    def stop_sinks(self, deadline: float) -> None:
        """Let every sink write what it has queued and close it, by `deadline` (monotonic)."""
        # the snapshots first: they hand their last events on to the others
        stages = [[w for n, w in self.workers.items() if n == "snapshots"],
                  [w for n, w in self.workers.items() if n != "snapshots"]]
        for stage in stages:
            for w in stage:
                w.close()
            for w in stage:
                if not w.join(max(0.5, deadline - time.monotonic())):
                    log.error("%s sink did not finish in time; %d event(s) not written",
                              w.name, w.queued())

    def _dispatch(self, events: list[Event]) -> None:
        """Hand events to every sink but the snapshots (their worker calls this after it)."""
        for name, w in self.workers.items():
            if name != "snapshots":
                w.put(events)

    def _counter(self, sink: str) -> Callable[[str, int], None]:
        def count(kind: str, n: int) -> None:
            self.metrics.sink_incidents.labels(sink, kind).inc(n)
            if kind == "dropped":
                self._sink_failed(sink, f"{n} message(s) dropped")

        return count

    def _sink_failed(self, sink: str, reason: str) -> None:
        self.metrics.sink_errors.labels(sink).inc()
        with self._failures_lock:
            self._sink_failures[sink] = (time.monotonic(), reason)

    def _emit(self, cam: Camera, events: list[Event]) -> None:
        """Queue a camera's events for the sinks. With snapshots on, an event whose track has
        a best-face picture names its snapshot file and carries the picture."""
        out = []
        for ev in events:
            crop = cam.snapshot(ev) if self._snapshots is not None else None
            if crop is not None:  # both messages of a track name the same file
                ev = dataclasses.replace(ev, snapshot=self._snapshots.path(ev),
                                         snapshot_image=crop)
            out.append(ev)
            at = cam.arrival(ev.end)
            if at is not None and ev.type == "end":
                self.metrics.event_latency.labels(cam.name).observe(time.monotonic() - at)
        if not out:
            return
        if "snapshots" in self.workers:
            self.workers["snapshots"].put(out)
        else:
            self._dispatch(out)

    # --- worker --------------------------------------------------------------------------
    def _work(self) -> None:
        while not self.stopping.is_set():
            busy = False
            for cam in self.cameras:
                item = cam.take()
                if item is None:
                    continue
                busy = True
                if item is _RECONNECT:
                    self._emit(cam, cam.flush())
                else:
                    self._emit(cam, cam.process(*item))
                if self.stopping.is_set():
                    break
            if not busy:
                self.wake.wait(0.1)
                self.wake.clear()

    # --- monitor and HTTP ----------------------------------------------------------------
    def _monitor(self) -> None:
        interval = self.cfg.daemon.stats_interval_s
        next_stats = time.monotonic() + interval
        next_purge = time.monotonic()
        while not self.stopping.wait(1.0):
            now = time.monotonic()
            self.metrics.corrupt_templates.set(len(self.gallery.corrupt_templates))
            for name, w in self.workers.items():
                self.metrics.sink_pending.labels(name).set(w.pending())
                oldest = w.oldest()
                self.metrics.sink_oldest.labels(name).set(0.0 if oldest is None else now - oldest)
            for cam in self.cameras:
                cam.fps_window.append((now, cam.frames))
                cam.drop_window.append((now, cam.frames, cam.dropped))
                self.metrics.fps.labels(cam.name).set(cam.fps())
                self.metrics.queue.labels(cam.name).set(cam.depth())
                self.metrics.up.labels(cam.name).set(
                    1 if cam.state == "running" and now - cam.last_frame < 5 else 0)
            if now >= next_stats:
                next_stats = now + interval
                log.info("stats %s", self.stats_line())
            if now >= next_purge and self._snapshots is not None:
                next_purge = now + 3600
                self._snapshots.purge()

    def stats_line(self) -> str:
        parts = []
        for cam in self.cameras:
            f50, f95 = cam.percentiles("frame")
            d50, d95 = cam.percentiles("detect")
            e50, e95 = cam.percentiles("embed")
            parts.append(f"{cam.name}[{cam.state}] fps={cam.fps():.1f} frames={cam.frames} "
                         f"dropped={cam.dropped} reconnects={cam.reconnects} queue={cam.depth()} "
                         f"events={cam.events} frame_ms p50/p95={f50 * 1e3:.1f}/{f95 * 1e3:.1f} "
                         f"detect_ms={d50 * 1e3:.1f}/{d95 * 1e3:.1f} "
                         f"embed_ms={e50 * 1e3:.1f}/{e95 * 1e3:.1f}")
        pending = "".join(f" {name}_pending={w.pending()}" for name, w in self.workers.items())
        return "; ".join(parts) + f";{pending}"

    def health(self) -> dict:
        """"degraded" with a reason per camera and sink when a camera is not delivering
        (reconnecting) or drops more than `health.max_drop_rate` of its frames, or a sink
        failed within `health.window_s`; else "ok"."""
        now = time.monotonic()
        window = self.cfg.daemon.health.window_s
        cams = {c.name: c.health(now) for c in self.cameras}
        reasons = [f"camera {name}: {c['problem']}" for name, c in cams.items() if c["problem"]]
        with self._failures_lock:
            failures = dict(self._sink_failures)
        sinks = {}
        for name, (at, reason) in sorted(failures.items()):
            age = now - at
            sinks[name] = {"last_failure_age_s": round(age, 1), "last_failure": reason}
            if age <= window:
                reasons.append(f"sink {name}: failed {age:.0f} s ago ({reason})")
        pending, bound = {}, self.cfg.daemon.health.max_sink_age_s
        for name, w in self.workers.items():
            pending[name] = w.pending()
            oldest = w.oldest()
            age = 0.0 if oldest is None else now - oldest
            sinks.setdefault(name, {}).update(pending=pending[name], oldest_age_s=round(age, 1))
            if age > bound:
                reasons.append(f"sink {name}: oldest undelivered event {age:.0f} s old (bound "
                               f"{bound:g} s; {pending[name]} waiting)")
        gallery = self.watch.problem()
        if gallery:
            reasons.append(f"gallery: {gallery}")
        return {"status": "degraded" if reasons else "ok", "reasons": reasons,
                "uptime_s": round(now - self.started, 1), "model": self.embedder.model,
                "box": self.cfg.daemon.box,
                "gallery": {"version": self.watch.matcher.version,
                            "templates": len(self.watch.matcher), "problem": gallery},
                "cameras": cams, "sinks": sinks, "sinks_pending": pending}

    def healthz(self) -> tuple[int, dict]:
        """The one /healthz answer of both HTTP servers: 200 "ok" or 503 "degraded"."""
        health = self.health()
        return (200 if health["status"] == "ok" else 503), health

    def camera_status(self) -> list[dict]:
        """Each camera's state and counters, for the review UI's cameras page."""
        now = time.monotonic()
        out = []
        for c in self.cameras:
            h = c.health(now)
            last = c.last_event
            out.append({"name": c.name, "state": h["state"], "fps": h["fps"],
                        "frames": h["frames"], "dropped": h["dropped"],
                        "reconnects": h["reconnects"], "events": h["events"],
                        "last_frame_age_s": h["last_frame_age_s"], "error": h["error"],
                        "last_event": datetime.fromtimestamp(last, timezone.utc)
                        if last else None})
        return out

    def _serve_web(self) -> None:
        """The review UI and API (`daemon.web`) on the metrics port, with /metrics and
        /healthz, under uvicorn in a thread. The web app gets a detector of its own (the
        worker's is not shared between threads) and the daemon's embedder and gallery."""
        import uvicorn
        from fastapi.responses import JSONResponse, Response

        from app.web.app import create_app
        from app.web.context import WebContext

        d = self.cfg.daemon
        ctx = WebContext(self.cfg, self.gallery, make_detector(self.cfg), self.embedder,
                         self.threshold, self.web_auth, cameras=self.camera_status)
        app = create_app(ctx)
        ctx.start_refresher(self.stopping)

        @app.get("/metrics", include_in_schema=False)
        def metrics() -> Response:
            return Response(generate_latest(self.metrics.registry),
                            media_type=CONTENT_TYPE_LATEST)

        @app.get("/healthz", include_in_schema=False)
        def healthz() -> JSONResponse:
            code, health = self.healthz()
            return JSONResponse(health, status_code=code)

        self.web = uvicorn.Server(uvicorn.Config(app, host=d.metrics_host, port=d.metrics_port,
                                                 log_level="warning", access_log=False))
        threading.Thread(target=self.web.run, name="web", daemon=True).start()
        log.info("review UI on http://%s:%d/, metrics on /metrics, health on /healthz",
                 d.metrics_host, d.metrics_port)

    def _serve_http(self) -> None:
        d = self.cfg.daemon
        if d.web:
            self._serve_web()
            return
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            timeout = _HTTP_TIMEOUT_S  # a client that stalls is dropped, its thread freed

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body = generate_latest(daemon.metrics.registry)
                    ctype, code = CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    code, health = daemon.healthz()
                    body, ctype = json.dumps(health).encode(), "application/json"
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.http = _BoundedHTTPServer((d.metrics_host, d.metrics_port), Handler)
        threading.Thread(target=self.http.serve_forever, name="http", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", d.metrics_host,
                 self.http.server_address[1])

    # --- lifecycle -----------------------------------------------------------------------
    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.watch.reload.set())
        hook, threading.excepthook = threading.excepthook, self._thread_died
        try:
            return self._run()
        finally:
            threading.excepthook = hook

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        """Any thread that ends on an exception stops the daemon with exit code 1, so that
        systemd (Restart=on-failure) restarts it, rather than a process that lives on without
        its worker or sinks."""
        name = args.thread.name if args.thread is not None else "?"
        log.critical("thread %s died: %s: %s", name, args.exc_type.__name__,
                     one_line(args.exc_value) if args.exc_value is not None else "",
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        if self.fatal is None:
            self.fatal = f"thread {name} died ({args.exc_type.__name__})"
        self.stopping.set()

    def _run(self) -> int:
        if self.cfg.daemon.metrics_port:
            self._serve_http()
        worker = threading.Thread(target=self._work, name="worker", daemon=True)
        for w in self.workers.values():
            w.start()
        worker.start()
        threading.Thread(target=self._monitor, name="monitor", daemon=True).start()
        threading.Thread(target=self.watch.run, args=(self.stopping,), name="gallery-watch",
                         daemon=True).start()
        for cam in self.cameras:
            cam.thread.start()
        log.info("daemon running: %d camera(s): %s", len(self.cameras),
                 ", ".join(f"{c.name}={redact_uri(c.cc.uri)}" for c in self.cameras))
        while not self.stopping.wait(0.5):
            pass
        return self.shutdown(worker)

    def shutdown(self, worker: threading.Thread) -> int:
        deadline = time.monotonic() + self.cfg.daemon.shutdown_timeout_s
        log.info("shutting down%s", f": {self.fatal}" if self.fatal else "")
        for cam in self.cameras:
            cam.stop()
        self.wake.set()
        self.watch.reload.set()
        worker.join(max(0.1, deadline - time.monotonic()))
        if worker.is_alive():
            log.error("worker did not stop in time; open tracks are lost")
        else:
            for cam in self.cameras:  # frames still queued are dropped; open tracks end now
                try:
                    self._emit(cam, cam.flush())
                except Exception as exc:  # noqa: BLE001  (after a dead worker: log, go on)
                    log.error("camera %s: open tracks lost at shutdown: %s", cam.name,
                              one_line(exc))
        self.stop_sinks(deadline)
        for cam in self.cameras:
            cam.thread.join(max(0.0, deadline - time.monotonic()))
        log.info("stats %s", self.stats_line())
        if self.http is not None:
            self.http.shutdown()
        if self.web is not None:
            self.web.should_exit = True
        self.gallery.close()
        if self.fatal:
            log.critical("stopped: %s (exit code 1)", self.fatal)
            return 1
        log.info("stopped")
        return 0


def run_daemon(cfg: AppConfig, key: bytes | None = None) -> int:
    return Daemon(cfg, key=key).run()
