"""A camera of the daemon: its reader thread (GStreamer source, reconnects with backoff), its
bounded frame queue (the oldest frame is dropped when the worker falls behind), its pipeline
(run by the daemon's worker) and its counters and health."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from app.config import CameraConfig, DaemonConfig
from app.daemon.metrics import Metrics
from app.pipeline import FacePipeline
from app.records import Event, Frame, TrackedFace
from app.source import SourceError, open_source, redact_uri

log = logging.getLogger(__name__)

_RECONNECT = object()  # queue marker: the camera's stream broke; end its open tracks


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
            elif ev.type == "recognized":
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
