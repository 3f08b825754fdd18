"""The daemon: cameras, worker, sinks, monitor and HTTP wired together (see app.daemon)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path

from app import paths
from app.config import AppConfig, CameraConfig, ConfigError
from app.daemon.camera import _RECONNECT, Camera
from app.daemon.http import serve_http, serve_web
from app.daemon.metrics import Metrics
from app.daemon.sinks import SinkWorker, open_sinks
from app.erasure import Forgotten
from app.gallery import Gallery
from app.gallery.errors import GalleryError, one_line
from app.gallery.fleet import Fleet
from app.outbox import Outbox
from app.pipeline import EmbedBatch, FacePipeline, StageTimes
from app.records import EVENT_TYPES, Event
from app.runtime import (
    GalleryWatch,
    make_detector,
    make_embedder,
    open_gallery,
    open_set,
    threshold,
)
from app.sinks import (
    Sink,
    SnapshotSink,
)
from app.source import init_gstreamer, redact_uri

log = logging.getLogger(__name__)


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
        # a gallery on a database server that is away starts from the copy kept on disk
        self.gallery: Gallery = open_gallery(cfg.gallery.path, self.embedder, create=True,
                                             key=key, defer_open=True)
        snaps = cfg.daemon.snapshots
        if snaps.dir and self.gallery.store.sealer.encrypted and not snaps.allow_unencrypted:
            self.gallery.close()
            raise ConfigError(
                f"daemon.snapshots.dir: the gallery {cfg.gallery.path} is encrypted but "
                "snapshots are plain JPEG files; remove snapshots.dir or set "
                "snapshots.allow_unencrypted: true")
        self.threshold = threshold(cfg, self.embedder)
        self.open_set = open_set(cfg, self.embedder)  # the 1:N rule (app.openset)
        self.forgotten = Forgotten()  # people erased while their events were in flight
        # the worker's matcher: refreshed by a thread of its own, never on the video path
        try:
            self.watch = GalleryWatch(
                self.gallery, self.open_set, cfg.daemon.gallery_poll_s,
                cache=None if self.gallery.store.db.is_sqlite else self._state_file("gallery"),
                on_change=self._erase_here)
        except GalleryError:
            self.gallery.close()
            raise
        if self.gallery.store.opened and not self.watch.matcher.names:
            log.warning("the gallery %s is empty: every face will be reported as unknown",
                        self.gallery.location)
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.fatal: str | None = None  # why a thread died: the daemon stops, exit code 1
        self.fleet = Fleet(self.gallery.store)
        self.started_at = datetime.now(timezone.utc)
        self._conflicts: dict[str, str] = {}  # camera -> another live box that has it too
        self.cameras = [Camera(c, self._pipeline(c), cfg.daemon, self.stopping, self.metrics,
                               self.wake.set) for c in cams]
        self.started = time.monotonic()
        self.http: ThreadingHTTPServer | None = None
        self.web = None  # uvicorn.Server of the review UI (daemon.web)
        self._snapshots = (SnapshotSink(snaps.dir, snaps.retention_days) if snaps.dir
                           else None)
        self._sink_failures: dict[str, tuple[float, str]] = {}  # sink -> (monotonic, reason)
        self._failures_lock = threading.Lock()
        self.outbox: Outbox | None = None  # the gallery sink's (made by _open_sinks)
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
        d = self.cfg.daemon
        outbox = self.outbox = (Outbox(self._state_file("outbox"), self.gallery.store.sealer,
                                       crops=self.cfg.output.event_crops)
                                if self.cfg.output.events_sqlite else None)
        specs = open_sinks(self.cfg, self.gallery, live=True, outbox=outbox, box=d.box,
                           events_jsonl=d.jsonl.path or self.cfg.output.events_jsonl,
                           cameras=[c.name for c in self.cameras],
                           identities=lambda: sorted(set(self.watch.matcher.names)),
                           count=self._counter)
        workers = {s.name: SinkWorker(s.name, s.sink, s.types, every_s=s.every_s,
                                      max_queue=d.event_queue, failed=self._sink_failed,
                                      scrub=self.forgotten.scrub)
                   for s in specs}
        if self._snapshots is not None:  # both messages of a track name the same file
            snaps = SinkWorker("snapshots", self._snapshots, EVENT_TYPES,
                               max_queue=d.event_queue, failed=self._sink_failed,
                               then=self._dispatch, scrub=self.forgotten.scrub)
            workers = {"snapshots": snaps, **workers}
        return workers

    def _erase_here(self) -> None:
        """This box's part of the erasures it has not acknowledged (run by the gallery watch
        at start and after every gallery change): its JSONL lines, spooled snapshots and
        outbox entries of the person (`app.erasure.erase_on_box`)."""
        from app.erasure import Outputs, erase_on_box

        erase_on_box(self.gallery, self.cfg.daemon.box, Outputs.of(self.cfg),
                     self.outbox, self.forgotten)

    def _state_file(self, what: str) -> Path:
        """Where this box keeps its outbox (`daemon.outbox`; default next to a SQLite gallery
        file, else in the home, `app.paths`) and, beside it, its copy of a database server's
        gallery (`gallery-<box>.copy`)."""
        d = self.cfg.daemon
        path = self.gallery.store.db.path
        if d.outbox:
            outbox = Path(d.outbox)
        elif path is not None:
            outbox = path.with_name(path.name + ".outbox")
        else:
            outbox = paths.home() / f"outbox-{d.box}.jsonl"
        return outbox if what == "outbox" else outbox.with_name(f"gallery-{d.box}.copy")

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
        (reconnecting) or drops more than `health.max_drop_rate` of its frames, a sink failed
        within `health.window_s` or its oldest undelivered event is older than
        `health.max_sink_age_s`, the gallery cannot be read (matching goes on with the last
        good copy), or another live box has a camera of the same name; else "ok"."""
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
        for cam, box in sorted(self._conflicts.items()):
            reasons.append(f"camera {cam}: box {box} has a camera of that name too (camera "
                           "names must be unique on a site)")
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

    def _heartbeats(self) -> None:
        """Write this box's heartbeat every `daemon.heartbeat_s` (and "stopped" at the end);
        a database that is away is reported by the gallery watch, not here."""
        every = self.cfg.daemon.heartbeat_s
        while True:
            stopped = self.stopping.wait(every)
            self.beat("stopped" if stopped else None)
            if stopped:
                return

    def beat(self, state: str | None = None) -> None:
        """One heartbeat: state, cameras and reasons; camera name clashes are remembered for
        /healthz and logged once."""
        health = self.health()
        cams = [{**{k: v for k, v in c.items() if k != "last_event"},
                 "last_event": c["last_event"].isoformat() if c["last_event"] else None}
                for c in self.camera_status()]
        try:
            clashes = self.fleet.beat(self.cfg.daemon.box, self.started_at,
                                      state or health["status"], cams, health["reasons"],
                                      live_s=max(60.0, 3 * self.cfg.daemon.heartbeat_s))
        except GalleryError as exc:
            log.debug("heartbeat not written: %s", exc)
            return
        for cam, box in clashes.items():
            if self._conflicts.get(cam) != box:
                log.error("camera %s: box %s has a camera of that name too; camera names must "
                          "be unique on a site (events of both are told apart by box only in "
                          "the logs)", cam, box)
        self._conflicts = clashes

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

    def _serve_http(self) -> None:
        """/metrics and /healthz, or the review UI with them (`daemon.web`)."""
        if self.cfg.daemon.web:
            self.web = serve_web(self)
        else:
            self.http = serve_http(self)

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
        heartbeats = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        heartbeats.start()
        self._heartbeat_thread = heartbeats
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
        beats = getattr(self, "_heartbeat_thread", None)
        if beats is not None:  # its last heartbeat says "stopped"
            beats.join(max(0.5, deadline - time.monotonic()))
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
