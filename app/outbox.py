"""The daemon's outbox: events the gallery database could not take, kept on local disk in order
until it is back.

One JSON object per line: the event record (`Event.to_json`), its kept aligned crops and its
best-face picture (JPEG, sealed with the gallery's key when it is encrypted, base64). The file
is private (0600, made with O_NOFOLLOW: a planted symlink is refused), every append is fsync'ed
before `append` returns, and a line cut short by a crash is dropped when the file is opened
again. Replay reads from the front (`peek`) and moves on only once the database has committed
(`consume`); when everything is replayed the file is emptied. A crash between a commit and
`consume` replays a few events twice: the gallery stores each event id once (`EventStore.add`),
so none is duplicated. `erase` drops the entries of an erased person (the box's part of an
erasure, `app.erasure.erase_on_box`). The methods may be called from several threads.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from pathlib import Path

from app.fsutil import atomic_write, make_dirs
from app.gallery.codec import decode_crop, encode_crop
from app.gallery.seal import CROP, SNAPSHOT, Sealer
from app.records import Event

log = logging.getLogger(__name__)


class OutboxError(Exception):
    """The outbox file cannot be opened or written (str() is one line)."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc).splitlines()[0]


def event_of(record: dict, crops: tuple = (), snapshot_image=None) -> Event:  # noqa: ANN001
    """The `Event` of a JSON event record (`Event.to_json`)."""
    return Event(
        camera=record["camera"], track_id=int(record["track_id"]), identity=record["identity"],
        score=float(record["score"]), start=float(record["start"]), end=float(record["end"]),
        frames=int(record["frames"]), best_bbox=tuple(float(v) for v in record["best_bbox"]),
        model=record["model"], id=record["id"], time=record.get("time"),
        snapshot=record.get("snapshot"), candidate=record.get("candidate"),
        candidate_score=record.get("candidate_score"), zones=tuple(record.get("zones") or ()),
        type=record.get("type", "end"), crops=crops, snapshot_image=snapshot_image)


def _decode_picture(jpeg: bytes):  # noqa: ANN202  (uint8[H, W, 3] BGR)
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("the kept snapshot is not a readable JPEG")
    return img


class Outbox:
    """An append-only file of events waiting for the database (see the module doc)."""

    def __init__(self, path: str | Path, sealer: Sealer | None = None, crops: int = 0) -> None:
        self.path, self.sealer, self.crops = Path(path), sealer or Sealer(None), crops
        # (file offset, monotonic time queued) of each waiting event, oldest first
        self._entries: list[tuple[int, float]] = []
        self._fd = -1
        self.lock = threading.RLock()  # held by a replay from peek to consume
        if self.path.is_symlink() or self.path.exists():  # else made by the first append
            self._open()
            self._load()

    def _open(self) -> None:
        try:
            make_dirs(self.path.parent)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                               | os.O_NOFOLLOW, 0o600)
            os.fchmod(self._fd, 0o600)
        except OSError as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {_reason(exc)}") from exc

    def _load(self) -> None:
        """Index the events a previous run left; drop a last line cut short by a crash."""
        data = self._read(0)
        good, offset, now = 0, 0, time.monotonic()
        for line in data.split(b"\n")[:-1]:
            try:
                json.loads(line)
            except ValueError:
                log.error("outbox %s: an unreadable line at byte %d skipped", self.path, offset)
            else:
                self._entries.append((offset, now))
            offset += len(line) + 1
            good = offset
        if good < len(data):
            log.warning("outbox %s: a partial last line (%d bytes) dropped", self.path,
                        len(data) - good)
            os.ftruncate(self._fd, good)
        if self._entries:
            log.warning("outbox %s: %d event(s) from an earlier run wait for the gallery",
                        self.path, len(self._entries))

    def _read(self, offset: int) -> bytes:
        size = os.fstat(self._fd).st_size
        return os.pread(self._fd, max(0, size - offset), offset)

    def __len__(self) -> int:
        return len(self._entries)

    def oldest(self) -> float | None:
        """Monotonic time the oldest waiting event was queued (an earlier run's: when this
        one opened the file), or None when empty."""
        return self._entries[0][1] if self._entries else None

    def append(self, events: list[Event]) -> None:
        """Add `events` at the end, on disk (fsync'ed) when this returns."""
        if not events:
            return
        lines = [json.dumps(self._record(ev), ensure_ascii=False).encode() + b"\n"
                 for ev in events]
        with self.lock:
            self._append(lines)

    def _record(self, ev: Event) -> dict:
        item = {"event": ev.to_json(), "crops": [
            [float(q), base64.b64encode(self.sealer.seal(encode_crop(c), CROP)).decode()]
            for q, c in ev.crops[:self.crops]]}
        if ev.snapshot_image is not None:
            item["snapshot"] = base64.b64encode(
                self.sealer.seal(encode_crop(ev.snapshot_image), SNAPSHOT)).decode()
        return item

    def _append(self, lines: list[bytes]) -> None:
        if self._fd < 0:
            self._open()
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(b"".join(lines))
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise OutboxError(f"cannot write the outbox {self.path}: {_reason(exc)}") from exc
        now, offset = time.monotonic(), start
        for line in lines:
            self._entries.append((offset, now))
            offset += len(line)

    def peek(self, n: int) -> tuple[int, list[Event]]:
        """The first `n` waiting events, in order, with their crops: (how many entries they
        cover, the events); an entry that cannot be read back is logged and left out."""
        with self.lock:
            entries = self._entries[:n]
            if not entries:
                return 0, []
            base = entries[0][0]
            data = self._read(base)
        out = []
        for offset, _ in entries:
            line = data[offset - base:data.index(b"\n", offset - base)]
            try:
                item = json.loads(line)
                crops = tuple(
                    (float(q), decode_crop(self.sealer.unseal(base64.b64decode(c), CROP),
                                           "outbox crop")) for q, c in item.get("crops", ()))
                picture = item.get("snapshot")
                if picture is not None:
                    picture = _decode_picture(self.sealer.unseal(base64.b64decode(picture),
                                                                 SNAPSHOT))
                out.append(event_of(item["event"], crops, picture))
            except Exception as exc:  # noqa: BLE001  (one bad line must not block the rest)
                log.error("outbox %s: an unreadable event at byte %d left out: %s", self.path,
                          offset, exc)
        return len(entries), out

    def consume(self, n: int) -> None:
        """The first `n` events are stored: forget them (the file is emptied when none wait)."""
        with self.lock:
            del self._entries[:n]
            if not self._entries and self._fd >= 0:
                os.ftruncate(self._fd, 0)

    def erase(self, names: set[str], uids: set[str]) -> set[str]:
        """Drop the waiting events of an erased person (whose id is in `uids` or identity in
        `names`) and clear `names` as candidates; the file is replaced atomically (0600).
        Returns the ids of the events dropped. A replay holds `lock` from `peek` to `consume`
        (`GallerySink.retry`), so this never runs between them."""
        with self.lock:
            if not self._entries:
                return set()
            data = self._read(0)
            kept: list[tuple[bytes, float]] = []
            dropped: set[str] = set()
            cleared = 0
            for offset, queued in self._entries:
                line = data[offset:data.index(b"\n", offset)]
                try:
                    item = json.loads(line)
                    record = item["event"]
                except (ValueError, KeyError, TypeError):
                    kept.append((line, queued))
                    continue
                if record.get("identity") in names or str(record.get("id")) in uids:
                    dropped.add(str(record.get("id")))
                    continue
                if record.get("candidate") in names:
                    record["candidate"] = record["candidate_score"] = None
                    line = json.dumps(item, ensure_ascii=False).encode()
                    cleared += 1
                kept.append((line, queued))
            if not dropped and not cleared:
                return set()
            try:
                with atomic_write(self.path) as fh:  # 0600; the old file stays on a failure
                    fh.write(b"".join(line + b"\n" for line, _ in kept))
            except OSError as exc:
                raise OutboxError(f"cannot rewrite the outbox {self.path}: {_reason(exc)}"
                                  ) from exc
            self.close()
            self._open()
            self._entries, offset = [], 0
            for line, queued in kept:
                self._entries.append((offset, queued))
                offset += len(line) + 1
            return dropped

    def reject(self, event: Event, reason: str) -> None:
        """Set an event the database refuses (while it answers) aside, with the reason, in
        `<path>.rejected` (0600, one JSON object a line), for an operator to look at."""
        path = self.path.with_name(self.path.name + ".rejected")
        line = json.dumps({"reason": reason, "event": event.to_json()}, ensure_ascii=False)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutboxError(f"cannot write {path}: {_reason(exc)}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
