"""Event sinks: where events go (snapshot JPEGs, JSONL file, gallery events table, webhook;
MQTT in app.mqtt)."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import cv2

from app.fsutil import atomic_write, make_dirs, private_file, writer_lock
from app.gallery import EventStore, GalleryError
from app.outbox import Outbox, OutboxError
from app.records import Event

log = logging.getLogger(__name__)


# a sink's report of an incident to the daemon's metrics: (kind, count), e.g. ("dropped", 3)
Count = Callable[[str, int], None]


class SinkError(Exception):
    """A sink could not store events; str() is a single line. `lost`: how many of the events
    it was given are lost (None: all of them)."""

    def __init__(self, message: str, lost: int | None = None) -> None:
        super().__init__(message)
        self.lost = lost


class Sink(Protocol):
    """What the pipeline needs from a sink."""

    def write(self, events: list[Event]) -> None: ...

    def close(self) -> None: ...


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc).splitlines()[0]


class JsonlSink:
    """Appends one JSON object per event (docs/events.md), written to the file line by line.

    A new file is private (0600: events name people). A line is never left partial: when a
    write fails (disk full), the file is truncated back to its last complete line.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise SinkError(f"cannot open events file {self.path}: it is a directory")
        self._fd = -1
        self._open()
        # a regular file is written under `writer_lock`, and opened again when an erasure (or
        # another writer) has replaced it; a device or pipe (/dev/stdout) is written as it is
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        log.debug("appending events to %s", self.path)

    def _open(self) -> None:
        try:
            # O_NOFOLLOW: a symlink planted at the name is refused, not followed
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            why = ("it is a symbolic link" if exc.errno == errno.ELOOP else _reason(exc))
            raise SinkError(f"cannot open events file {self.path}: {why}") from exc
        try:
            private_file(fd, f"events file {self.path}")
        except OSError as exc:
            os.close(fd)
            raise SinkError(str(exc)) from exc
        self._fd = fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def tell(self) -> int:
        """Size of the file in bytes."""
        return os.fstat(self._fd).st_size

    def write(self, events: list[Event]) -> None:
        """Append `events`, one line each."""
        if self._fd < 0:
            raise SinkError(f"events file {self.path} is closed")
        if not self._regular:
            self.append(events)
            return
        with self.locked():
            self.append(events)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the file's writer lock (`app.fsutil.writer_lock`), with the file opened again
        if it was replaced meanwhile (an erasure rewrote it)."""
        try:
            with writer_lock(self.path):
                self._follow()
                yield
        except OSError as exc:  # the lock file cannot be made
            raise SinkError(f"cannot lock events file {self.path}: {_reason(exc)}") from exc

    def _follow(self) -> None:
        try:
            now = os.lstat(self.path)
            same = (now.st_ino, now.st_dev) == (os.fstat(self._fd).st_ino,
                                                os.fstat(self._fd).st_dev)
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)
            self._fd = -1
            self._open()
            log.info("events file %s was replaced: appending to the new one", self.path)

    def append(self, events: list[Event]) -> None:
        """Append `events` (under `locked()` for a regular file)."""
        for ev in events:
            line = (json.dumps(ev.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
            start = self.tell()
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                self._truncate(start)
                raise SinkError(f"cannot write events file {self.path}: {_reason(exc)}") from exc

    def _truncate(self, size: int) -> None:
        try:
            if os.fstat(self._fd).st_size > size:
                os.ftruncate(self._fd, size)
        except OSError as exc:  # e.g. not a regular file
            log.error("cannot remove a partial line from %s: %s", self.path, _reason(exc))

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as exc:
            raise SinkError(f"cannot close events file {self.path}: {_reason(exc)}") from exc


class SnapshotSink:
    """Writes each event's best-face picture (`Event.snapshot_image`) to its `Event.snapshot`
    path (`path`: <dir>/<camera>/<event id>.jpg), privately (directories 0700, files 0600)
    and atomically (a random temporary renamed over the file).

    Both messages of a track name the same file: the `end` event's picture (the track's best
    face) replaces the `recognized` one's. Written before the sinks that send the event, the
    file exists when the message arrives. `purge` deletes snapshots older than
    `retention_days`. A failed picture does not stop the others: `write` raises one SinkError
    for the batch, with the count lost.
    """

    def __init__(self, directory: str | Path, retention_days: float) -> None:
        self.dir, self.retention_days = Path(directory), retention_days

    def path(self, ev: Event) -> str:
        """Where the snapshot of `ev` (and of every message of its track) goes."""
        return str(self.dir / ev.camera / f"{ev.id}.jpg")

    def write(self, events: list[Event]) -> None:
        failed = []
        for ev in events:
            if ev.snapshot and ev.snapshot_image is not None:
                try:
                    self._write(Path(ev.snapshot), ev.snapshot_image)
                except OSError as exc:
                    failed.append(f"{ev.id}: {exc.strerror or exc}")
        if failed:
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise SinkError(failed[0] + more, lost=len(failed))

    @staticmethod
    def _write(path: Path, image) -> None:  # noqa: ANN001 (uint8[H, W, 3] BGR)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise OSError("JPEG encoding failed")
        with atomic_write(path) as fh:  # mode 0600 in folders made 0700
            fh.write(data.tobytes())

    def purge(self, now: float | None = None) -> int:
        """Delete the snapshots older than `retention_days`; how many were deleted."""
        if not self.dir.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        deleted = 0
        for p in self.dir.glob("*/*.jpg"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    deleted += 1
            except OSError:
                pass
        return deleted

    def close(self) -> None:
        """Nothing to release: each picture is written whole by `write`."""


def _refused_for_good(exc: BaseException) -> bool:
    """Whether a database error is about the data written (SQLAlchemy's DataError or
    IntegrityError in its causes), which a retry cannot cure."""
    from sqlalchemy.exc import DataError, IntegrityError

    while exc is not None:
        if isinstance(exc, DataError | IntegrityError):
            return True
        exc = exc.__cause__
    return False


class GallerySink:
    """Stores events in the gallery's event store (`Gallery.event_store`), one transaction
    per `write`.

    With an `outbox` (the daemon's), no event is lost while the database is away: a batch the
    database refuses goes to the outbox file, later events queue behind it (order is kept), and
    `retry()` replays it once the database answers again (`EventStore.add` stores each event id
    once, so a replay never duplicates). Without one, a failed write raises SinkError.

    The store is borrowed: `close()` stops this sink but leaves the gallery open.
    """

    REPLAY_BATCH = 200  # events per replay transaction

    def __init__(self, store: EventStore, crops: int = 0, *, outbox: Outbox | None = None,
                 count: Count | None = None) -> None:
        self._store: EventStore | None = store
        self.crops = crops  # best aligned crops kept per event (for enrollment from a track)
        self.outbox = outbox
        self._count = count or (lambda kind, n: None)
        self.error = ""  # the database's last refusal while events wait in the outbox
        self.stored = 0

    def write(self, events: list[Event]) -> None:
        """Store `events` as one batch (behind any that wait in the outbox)."""
        if self._store is None:
            raise SinkError("gallery sink is closed")
        if self.outbox is not None and len(self.outbox):
            self._keep(events)
            self.retry()
            return
        try:
            self.stored += self._store.add(events, crops=self.crops)
        except GalleryError as exc:
            if self.outbox is None:
                raise SinkError(str(exc)) from exc
            self._keep(events, exc)

    def _keep(self, events: list[Event], exc: GalleryError | None = None) -> None:
        try:
            self.outbox.append(events)
        except OutboxError as err:
            raise SinkError(f"{exc or 'gallery database away'}; and {err}") from err
        self._count("outboxed", len(events))
        if exc is not None:
            self.error = str(exc)
            log.error("%s: %d event(s) kept in the outbox %s until the database is back",
                      exc, len(events), self.outbox.path)

    def retry(self) -> bool:
        """Replay the outbox into the database, oldest first; True when it is empty.

        A batch the database refuses for its data (a value it cannot take, not an outage, a
        lock or a read-only server) is stored event by event, and an event refused on its own
        is set aside in the outbox's `.rejected` file (logged, counted as dropped), so that one
        bad event cannot hold up the others."""
        if self.outbox is None or self._store is None:
            return True
        replayed = 0
        while len(self.outbox):
            with self.outbox.lock:  # an erasure on this box waits for the batch (Outbox.erase)
                n, events = self.outbox.peek(self.REPLAY_BATCH)
                try:
                    self.stored += self._store.add(events, crops=self.crops)
                except GalleryError as exc:
                    if not _refused_for_good(exc) or not self._one_by_one(events):
                        if str(exc) != self.error:
                            log.warning("outbox replay: %s (%d event(s) wait)", exc,
                                        len(self.outbox))
                        self.error = str(exc)
                        return False
                self.outbox.consume(n)
            replayed += n
        if replayed:
            log.warning("gallery database back: %d event(s) replayed from the outbox %s",
                        replayed, self.outbox.path)
        self.error = ""
        return True

    def _one_by_one(self, events: list[Event]) -> bool:
        """Store `events` singly, setting aside those refused; False if the database went
        away meanwhile (those stored are skipped when the batch is replayed again)."""
        for ev in events:
            try:
                self.stored += self._store.add([ev], crops=self.crops)
            except GalleryError as exc:
                if not _refused_for_good(exc):
                    return False
                try:
                    self.outbox.reject(ev, str(exc))
                except OutboxError as err:
                    log.error("%s", err)
                self._count("dropped", 1)
                log.error("gallery refuses event %s (%s/%d): %s; set aside in %s.rejected",
                          ev.id, ev.camera, ev.track_id, exc, self.outbox.path)
        return True

    def pending(self) -> int:
        """Events waiting in the outbox."""
        return len(self.outbox) if self.outbox is not None else 0

    def oldest(self) -> float | None:
        """Monotonic time the oldest event in the outbox was queued (None: none waits)."""
        return self.outbox.oldest() if self.outbox is not None else None

    def close(self) -> None:
        """Stop accepting events; what waits in the outbox stays on disk for the next run."""
        if self.outbox is not None:
            if len(self.outbox):
                log.error("%d event(s) stay in the outbox %s: they are stored when the daemon "
                          "next runs with the database up", len(self.outbox), self.outbox.path)
            self.outbox.close()
        self._store = None


class RotatingJsonlSink:
    """JSON lines like `JsonlSink`, rotated by size: path -> path.1 -> ... -> path.N (dropped)."""

    def __init__(self, path: str | Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = Path(path), max(1, int(max_bytes)), backups
        try:
            make_dirs(self.path.parent)
        except OSError as exc:
            raise SinkError(f"cannot create {self.path.parent}: {_reason(exc)}") from exc
        self._sink = JsonlSink(self.path)

    def write(self, events: list[Event]) -> None:
        if self._sink.closed:
            raise SinkError(f"events file {self.path} is closed")
        with self._sink.locked():  # an erasure rewriting the file or its backups waits
            for ev in events:
                self._sink.append([ev])
                if self._sink.tell() >= self.max_bytes:
                    self._rotate()

    def _rotate(self) -> None:
        self._sink.close()
        try:
            if self.backups == 0:
                self.path.unlink(missing_ok=True)
            else:
                for i in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{i}")
                    if older.exists():
                        older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
                self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        except OSError as exc:
            raise SinkError(f"cannot rotate events file {self.path}: {_reason(exc)}") from exc
        self._sink = JsonlSink(self.path)
        log.info("rotated events file %s", self.path)

    def close(self) -> None:
        self._sink.close()


class WebhookSink:
    """POSTs each event as a JSON object to an http(s) URL, from a thread of its own.

    A slow or failing target never blocks the caller: events wait in a bounded queue (the
    oldest is dropped when it is full, counted and logged) and are sent in order; a failed
    POST (network error, timeout, HTTP 5xx, 408 or 429) is retried after a wait that doubles
    from `retry_initial_s` to `retry_max_s`; other 4xx answers reject that event (logged,
    counted as dropped). With a `secret`, each request carries
    `X-FaceMoE-Signature-256: sha256=<hex HMAC-SHA256 of the body>` (as GitHub's webhooks),
    so the receiver can check that the event comes from this daemon.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 2.0,
        *,
        secret: str | None = None,
        queue: int = 1000,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        count: Count | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise SinkError(f"webhook URL must be http(s): {url}")
        self.url, self.timeout, self.close_timeout = url, timeout, close_timeout
        self._secret = secret.encode() if secret else None
        self.max_queue, self.retry_initial_s, self.retry_max_s = queue, retry_initial_s, retry_max_s
        self._count = count or (lambda kind, n: None)
        self._queue: deque[tuple[float, bytes]] = deque()  # (monotonic time queued, body)
        self._cond = threading.Condition()
        self._busy = self._closing = False
        self.sent = self.dropped = self.retries = 0
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def write(self, events: list[Event]) -> None:
        """Queue `events` (returns at once)."""
        with self._cond:
            if self._closing:
                raise SinkError("webhook sink is closed")
            now = time.monotonic()
            self._queue.extend((now, json.dumps(ev.to_json(), ensure_ascii=False).encode())
                               for ev in events)
            over = len(self._queue) - self.max_queue
            for _ in range(max(0, over)):
                self._queue.popleft()
            self._cond.notify_all()
        if over > 0:
            self._drop(over, f"queue full ({self.max_queue} events): {over} oldest dropped")

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        self._count("dropped", n)
        log.error("webhook %s: %s (%d dropped in all)", self.url, why, self.dropped)

    def pending(self) -> int:
        """Events not yet delivered."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def oldest(self) -> float | None:
        """Monotonic time the oldest undelivered event was queued (None: none waits)."""
        with self._cond:
            return self._queue[0][0] if self._queue else None

    def _run(self) -> None:
        wait = self.retry_initial_s
        while True:
            with self._cond:
                while not self._queue:
                    if self._closing:
                        return
                    self._cond.wait(0.5)
                item, self._busy = self._queue[0], True
                body = item[1]
            error = self._post(body)
            with self._cond:
                self._busy = False
                if error is None or error.startswith("rejected"):
                    if self._queue and self._queue[0] is item:
                        self._queue.popleft()
                    self._cond.notify_all()
            if error is None:
                self.sent += 1
                wait = self.retry_initial_s
            elif error.startswith("rejected"):
                self._drop(1, error)
            else:
                self.retries += 1
                self._count("retry", 1)
                log.warning("webhook %s: %s; retrying in %.1f s (%d waiting)", self.url, error,
                            wait, self.pending())
                with self._cond:
                    if self._cond.wait_for(lambda: self._closing, wait):
                        return
                wait = min(wait * 2, self.retry_max_s)

    def _post(self, body: bytes) -> str | None:
        """POST one event; None when delivered, else why ("rejected ..." when not retried)."""
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json", "User-Agent": "facemoe-edge"}
        if self._secret is not None:
            digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
            headers["X-FaceMoE-Signature-256"] = f"sha256={digest}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                resp.read()
            return None
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                return f"rejected with HTTP {exc.code}"
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return str(reason).splitlines()[0] if str(reason) else type(exc).__name__

    def flush(self, timeout: float) -> bool:
        """Wait until every queued event is delivered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued (up to `timeout` s, default `close_timeout`), then stop; the
        rest is logged as lost."""
        self.flush(self.close_timeout if timeout is None else timeout)
        with self._cond:
            self._closing = True
            left = len(self._queue)
            self._cond.notify_all()
        self._thread.join(self.timeout + 1.0)
        if left:
            self._drop(left, "not delivered at shutdown")
