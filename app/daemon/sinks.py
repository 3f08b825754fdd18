"""Where events go: `open_sinks` builds the sinks a config asks for, for the daemon and for
`facemoe process` alike; `SinkWorker` drives one of the daemon's sinks from a thread and a
queue of its own, so a slow or failing sink (a locked database, a broker away) delays only
itself, never the video path or the other sinks, and says how old its oldest undelivered
event is (`oldest`), which /healthz compares with `health.max_sink_age_s`."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from app.config import AppConfig
from app.gallery import Gallery
from app.outbox import Outbox
from app.records import EVENT_TYPES, Event
from app.sinks import Count, GallerySink, JsonlSink, RotatingJsonlSink, Sink, SinkError, WebhookSink

log = logging.getLogger(__name__)

RETRY_INITIAL_S, RETRY_MAX_S = 1.0, 10.0  # a sink with a `retry()` (the gallery's outbox)


@dataclass(frozen=True)
class SinkSpec:
    """A sink with the event types it takes and how long its events may wait to be written
    together (the gallery's batched commits in the daemon)."""

    name: str
    sink: Sink
    types: tuple[str, ...]  # of EVENT_TYPES
    every_s: float = 0.0


def open_sinks(cfg: AppConfig, gallery: Gallery, *, events_jsonl: str | None,
               live: bool = False, publish: bool = False, outbox: Outbox | None = None,
               box: str | None = None, cameras: list[str] = (),
               identities: Callable[[], list[str]] | None = None,
               count: Callable[[str], Count] | None = None) -> list[SinkSpec]:
    """The event sinks of `cfg`: the gallery's events table (`output.events_sqlite`; with
    `outbox`, events it refuses wait there) and `events_jsonl` (one record per track); with
    `live` (the daemon) the JSONL file rotates (`daemon.jsonl`), the gallery commits in
    batches and MQTT and the webhook (`daemon.mqtt`, `daemon.webhook`) are opened too, with
    `box`, the `cameras` and enrolled `identities` (MQTT discovery) and `count(name)`, the
    incident counter of each; `publish` (`facemoe process --publish`) opens MQTT without
    `live`. If one cannot be opened, those opened are closed again."""
    d, specs = cfg.daemon, []
    counter = count or (lambda name: None)
    try:
        if cfg.output.events_sqlite:  # one record per track
            specs.append(SinkSpec("gallery", GallerySink(
                gallery.event_store, crops=cfg.output.event_crops, outbox=outbox,
                count=counter("gallery")), ("end",), d.sqlite_commit_s if live else 0.0))
        if events_jsonl:  # one record per track
            sink = (RotatingJsonlSink(events_jsonl, int(d.jsonl.max_mb * 1e6), d.jsonl.backups)
                    if live else JsonlSink(events_jsonl))
            specs.append(SinkSpec("jsonl", sink, ("end",)))
        if (live or publish) and d.mqtt:  # every message
            from app.mqtt import MqttSink

            specs.append(SinkSpec("mqtt", MqttSink(
                d.mqtt, box=box, cameras=list(cameras), identities=identities,
                count=counter("mqtt"), close_timeout=d.shutdown_timeout_s / 2), EVENT_TYPES))
        if live and d.webhook:  # the types it is configured for
            w = d.webhook
            specs.append(SinkSpec("webhook", WebhookSink(
                w.url, w.timeout_s, secret=w.secret.get_secret_value() if w.secret else None,
                queue=w.queue, retry_initial_s=w.retry_initial_s, retry_max_s=w.retry_max_s,
                count=counter("webhook"), close_timeout=d.shutdown_timeout_s / 2),
                tuple(w.types)))
    except BaseException:
        for spec in specs:
            try:
                spec.sink.close()
            except SinkError as exc:
                log.error("closing %s sink: %s", spec.name, exc)
        raise
    return specs


class SinkWorker:
    """Feeds `sink` the events of `types` from a bounded queue (`max_queue`; the oldest event is
    dropped when it is full, reported through `failed`) in a thread of its own.

    `every_s` batches: events wait up to that long to be written together (the gallery's
    commits). `failed(name, reason)` is called for every SinkError (the daemon's health and
    metrics). `then(events)`, if given, runs after each write (successful or not): the snapshot
    sink hands the events on to the others, so a snapshot exists when a message names it.
    A sink with `retry()` and `pending()` (the gallery sink and its outbox) is retried while
    events wait, every 1 s doubling to 10 s. A sink with `oldest()` reports its own backlog
    (MQTT's and the webhook's buffers, the outbox). `scrub(event)`, if given, is asked just
    before each write: None drops the event (a person erased while it waited,
    `app.erasure.Forgotten`), else the event to write.
    """

    def __init__(self, name: str, sink: Sink, types: tuple[str, ...], *, every_s: float = 0.0,
                 max_queue: int = 10000, failed: Callable[[str, str], None],
                 then: Callable[[list[Event]], None] | None = None,
                 scrub: Callable[[Event], Event | None] | None = None) -> None:
        self.name, self.sink, self.types, self.every_s = name, sink, types, every_s
        self.max_queue, self._failed, self._then, self._scrub = max_queue, failed, then, scrub
        self._items: deque[tuple[float, Event]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy_since: float | None = None  # queue time of the oldest event being written
        self.written = self.dropped = 0
        self.thread = threading.Thread(target=self._run, name=f"sink-{name}", daemon=True)

    def start(self) -> SinkWorker:
        self.thread.start()
        return self

    def put(self, events: list[Event]) -> None:
        """Queue the events of this sink's types (returns at once)."""
        mine = [ev for ev in events if ev.type in self.types]
        if not mine:
            return
        now = time.monotonic()
        with self._cond:
            if self._closing:
                return
            self._items.extend((now, ev) for ev in mine)
            over = len(self._items) - self.max_queue
            for _ in range(max(0, over)):
                self._items.popleft()
            self._cond.notify_all()
        if over > 0:
            self.dropped += over
            log.error("%s sink: queue full (%d events): %d oldest dropped", self.name,
                      self.max_queue, over)
            self._failed(self.name, f"queue full: {over} event(s) dropped")

    def queued(self) -> int:
        with self._cond:
            return len(self._items) + (self._busy_since is not None)

    def pending(self) -> int:
        """Events (or messages) not yet delivered: queued here and held by the sink."""
        held = self.sink.pending() if hasattr(self.sink, "pending") else 0
        return self.queued() + held

    def oldest(self) -> float | None:
        """Monotonic time the oldest undelivered event was queued (here or in the sink)."""
        with self._cond:
            times = [self._items[0][0]] if self._items else []
            if self._busy_since is not None:
                times.append(self._busy_since)
        held = self.sink.oldest() if hasattr(self.sink, "oldest") else None
        if held is not None:
            times.append(held)
        return min(times) if times else None

    def close(self) -> None:
        """Write what is queued, then close the sink (in the worker thread); see `join`."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def join(self, timeout: float) -> bool:
        self.thread.join(max(0.0, timeout))
        return not self.thread.is_alive()

    def _run(self) -> None:
        retry_wait, next_retry = RETRY_INITIAL_S, 0.0
        can_retry = hasattr(self.sink, "retry") and hasattr(self.sink, "pending")
        last = time.monotonic()
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    due = self._items and (self._closing or now - last >= self.every_s)
                    if due or (self._closing and not self._items):
                        break
                    if can_retry and now >= next_retry and self.sink.pending():
                        break
                    wait = 0.5
                    if self._items:
                        wait = min(wait, self.every_s - (now - last))
                    self._cond.wait(max(0.01, wait))
                batch = [ev for _, ev in self._items] if due else []
                if due:
                    self._busy_since = self._items[0][0]
                    self._items.clear()
                closing = self._closing and not due
            if batch:
                self._write(batch)
                last = time.monotonic()
                with self._cond:
                    self._busy_since = None
            elif closing:
                break
            elif can_retry:  # nothing new: replay what waits, backing off while it fails
                if self._call("retry", self.sink.retry):
                    retry_wait = RETRY_INITIAL_S
                else:
                    retry_wait = min(retry_wait * 2, RETRY_MAX_S)
                next_retry = time.monotonic() + retry_wait
        if can_retry and self.sink.pending():
            self._call("retry", self.sink.retry)  # a last try before the outbox is left on disk
        self._call("close", self.sink.close)

    def _write(self, events: list[Event]) -> None:
        if self._scrub is not None:
            events = [ev for ev in map(self._scrub, events) if ev is not None]
            if not events:
                return
        try:
            self.sink.write(events)
            self.written += len(events)
        except SinkError as exc:
            lost = len(events) if exc.lost is None else exc.lost
            log.error("%s sink: %s (%d event(s) lost)", self.name, exc, lost)
            self._failed(self.name, str(exc))
        finally:
            if self._then is not None:
                self._then(events)

    def _call(self, what: str, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except SinkError as exc:
            log.error("%s sink: %s: %s", self.name, what, exc)
            self._failed(self.name, str(exc))
            return False
