"""Erasing a person: the one service that `gallery remove`, the web's delete page and
`DELETE /api/identities/{id}` call.

`erase(gallery, outputs, name=... | identity_id=...)`:
1. the gallery deletes the identity, its templates, crops and the events that name it by any
   name only it carried, clears those names as candidates, and writes a tombstone, in one
   transaction (`Gallery.erasures.begin`);
2. the lines of those events (by their ids, or naming it) go from the events JSONL files and
   their rotated backups, its names are cleared as candidates there, the snapshots of its
   events are deleted, and its retained MQTT state is cleared (where a broker is configured);
3. the tombstone is marked done and the file compacted.
A failure in 2 (disk full, a broker away) leaves the tombstone unfinished: the erasure is
reported as unfinished, `gallery check` lists it, and running the same removal again finishes
it.

On a site of several boxes, each box's daemon learns of the tombstone through its gallery watch
(the version the erasure bumped, NOTIFYed on PostgreSQL) and runs `erase_on_box`: the same
erasure of its own JSONL lines and spooled snapshots, plus the events of the person still
waiting in its outbox, then acknowledges it; the tombstone goes once every box has
(`Erasures.ack`). Every writer of an events file holds its writer lock
(`app.fsutil.writer_lock`), so a daemon appending to a file that an erasure rewrites waits and
then appends to the new file: no line is lost and none escapes the erasure. Events of the person
still in flight on the box when it learns of the erasure (queued for a sink, or of a track that
was open) are dropped before any sink writes them (`Forgotten`, which the box's sink workers ask).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from app.config import AppConfig, MqttConfig
from app.fsutil import atomic_write, writer_lock
from app.gallery import Gallery
from app.gallery.erasures import Tombstone
from app.outbox import Outbox, OutboxError
from app.records import Event

log = logging.getLogger(__name__)


@dataclass
class ErasureReport:
    removed: str = ""
    events_deleted: int = 0
    jsonl_lines_removed: int = 0
    jsonl_candidates_cleared: int = 0
    jsonl_files_rewritten: list[str] = field(default_factory=list)
    snapshots_deleted: list[str] = field(default_factory=list)
    mqtt_topics_cleared: int = 0
    outbox_events_removed: int = 0
    models_to_retrain: list[str] = field(default_factory=list)  # fine-tuned on their faces
    errors: list[str] = field(default_factory=list)
    unfinished: bool = False  # the tombstone stays: run the removal again

    def as_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (f"removed {self.removed!r} with its templates, crops and {self.events_deleted} "
                f"event(s); {self.jsonl_lines_removed} JSONL line(s) removed and "
                f"{self.jsonl_candidates_cleared} candidate mention(s) cleared in "
                f"{len(self.jsonl_files_rewritten)} file(s); "
                f"{len(self.snapshots_deleted)} snapshot(s) deleted")
        if self.mqtt_topics_cleared:
            text += f"; {self.mqtt_topics_cleared} retained MQTT topic(s) cleared"
        if self.outbox_events_removed:
            text += f"; {self.outbox_events_removed} event(s) removed from the outbox"
        if self.models_to_retrain:
            text += (f"\nmodels trained on their faces (retrain without them): "
                     f"{', '.join(self.models_to_retrain)}")
        text += "".join(f"\nnot erased: {e}" for e in self.errors)
        if self.unfinished:
            text += "\nthe erasure is unfinished: run the same removal again to finish it"
        return text


@dataclass(frozen=True)
class Outputs:
    """Where the product wrote events outside the gallery (from the app config)."""

    jsonl_paths: tuple[str, ...] = ()
    snapshot_dir: str | None = None
    mqtt: MqttConfig | None = None

    @classmethod
    def of(cls, cfg: AppConfig, extra_jsonl: tuple[str, ...] | list[str] = ()) -> Outputs:
        d = cfg.daemon
        paths = [p for p in (d.jsonl.path, cfg.output.events_jsonl, *extra_jsonl) if p]
        return cls(tuple(str(p) for p in paths), d.snapshots.dir, d.mqtt)


def _jsonl_files(path: Path) -> list[Path]:
    """`path` and its rotated backups (path.1, path.2, ...)."""
    backup = re.compile(re.escape(path.name) + r"\.\d+")
    found = [path] if path.is_file() else []
    if path.parent.is_dir():
        found += sorted(p for p in path.parent.iterdir() if backup.fullmatch(p.name))
    return found


def _rewrite(path: Path, names: set[str], uids: set[str], report: ErasureReport) -> set[str]:
    """Drop the lines of `path` whose event id is in `uids` or whose identity is in `names`;
    clear `names` as candidates. Returns the event ids (and snapshot paths) of the dropped
    lines."""
    kept: list[str] = []
    dropped: set[str] = set()
    removed = cleared = 0
    with path.open("rb") as fh:
        lines = fh.read().decode("utf-8", "surrogateescape").splitlines()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        if not isinstance(record, dict):
            kept.append(line)
            continue
        if record.get("identity") in names or str(record.get("id")) in uids:
            removed += 1
            dropped.update(str(record[k]) for k in ("id", "snapshot") if record.get(k))
            continue
        if record.get("candidate") in names:
            record["candidate"] = record["candidate_score"] = None
            cleared += 1
            line = json.dumps(record, ensure_ascii=False)
        kept.append(line)
    if removed or cleared:
        mode = path.stat().st_mode & 0o777
        with atomic_write(path, mode) as fh:
            fh.write("".join(f"{line}\n" for line in kept).encode("utf-8", "surrogateescape"))
        report.jsonl_files_rewritten.append(str(path))
        report.jsonl_lines_removed += removed
        report.jsonl_candidates_cleared += cleared
    return dropped


def _erase_files(tomb: Tombstone, names: set[str], outputs: Outputs,
                 report: ErasureReport, more_ids: set[str] = frozenset()) -> None:
    ids, snaps = set(tomb.event_uids) | set(more_ids), set(tomb.snapshots)
    for base in dict.fromkeys(Path(p).expanduser() for p in outputs.jsonl_paths):
        try:
            with writer_lock(base):  # the daemon appending to it (or rotating it) waits
                for path in _jsonl_files(base):
                    try:
                        for item in _rewrite(path, names, set(tomb.event_uids), report):
                            (snaps if item.endswith(".jpg") else ids).add(item)
                    except OSError as exc:
                        report.errors.append(f"{path}: {exc.strerror or exc}")
        except OSError as exc:  # the lock file cannot be made (a folder that does not exist)
            if base.parent.is_dir():
                report.errors.append(f"{base}: {exc.strerror or exc}")
    candidates = {Path(s) for s in snaps}
    if outputs.snapshot_dir and Path(outputs.snapshot_dir).is_dir():
        root = Path(outputs.snapshot_dir)
        candidates.update(p for uid in ids if re.fullmatch(r"[0-9A-Za-z-]+", uid)
                          for p in root.glob(f"*/{uid}.jpg"))
    for path in sorted(candidates):
        try:
            path.unlink()
            report.snapshots_deleted.append(str(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            report.errors.append(f"{path}: {exc.strerror or exc}")


def _finish(gallery: Gallery, tomb: Tombstone, outputs: Outputs) -> ErasureReport:
    report = ErasureReport(removed=tomb.name, events_deleted=tomb.events_deleted,
                           models_to_retrain=gallery.trained.models_of(tomb.identity_id))
    names = set(tomb.names) - gallery.erasures.names_in_use(tomb.names)
    _erase_files(tomb, names, outputs, report)
    if outputs.mqtt is not None and names:
        from app.mqtt import clear_retained

        try:
            report.mqtt_topics_cleared = clear_retained(outputs.mqtt, sorted(names))
        except Exception as exc:  # noqa: BLE001  (paho, sockets: the erasure stays unfinished)
            report.errors.append(f"MQTT: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    if report.errors:
        for error in report.errors:
            log.error("erasing %r: %s", tomb.name, error)
        gallery.erasures.failed(tomb, "; ".join(report.errors))
        report.unfinished = True
        return report
    gallery.erasures.finish(tomb)
    gallery.compact()
    return report


def erase(gallery: Gallery, outputs: Outputs, *, name: str | None = None,
          identity_id: int | None = None) -> ErasureReport:
    """Erase a person by their current name or their identity id (see the module); a
    person whose earlier erasure did not finish is finished. GalleryError when there is
    no such identity and no unfinished erasure of it."""
    tomb = gallery.erasures.begin(name=name, identity_id=identity_id)
    return _finish(gallery, tomb, outputs)


def finish_pending(gallery: Gallery, outputs: Outputs) -> list[ErasureReport]:
    """Run every unfinished erasure again."""
    return [_finish(gallery, tomb, outputs) for tomb in gallery.erasures.pending()]


class Forgotten:
    """The names a box has erased and when it learned of each, so that an event still in
    flight then (queued for a sink, or of a track already open) is not written after the
    erasure: `scrub` drops an event naming an erased person whose track started before the box
    learned of it, and clears such a name as another event's nearest candidate. A track that
    starts later may name the person again only because someone enrolled that name anew."""

    def __init__(self) -> None:
        self._learned: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def learn(self, names: set[str] | tuple[str, ...], at: datetime | None = None) -> None:
        at = at or datetime.now(UTC)
        with self._lock:
            for n in names:
                self._learned[n] = max(at, self._learned.get(n, at))

    def _erased(self, name: str | None, started: datetime | None) -> bool:
        if name is None:
            return False
        with self._lock:
            learned = self._learned.get(name)
        return learned is not None and (started is None or started <= learned)

    def scrub(self, ev: Event) -> Event | None:
        """`ev` as a sink may write it: None when it names an erased person."""
        if not self._learned:
            return ev
        started = _started(ev)
        if self._erased(ev.identity, started):
            return None
        if self._erased(ev.candidate, started):
            return replace(ev, candidate=None, candidate_score=None)
        return ev


def _started(ev: Event) -> datetime | None:
    """The wall-clock start of an event's track (None: unknown, taken as before anything)."""
    try:
        t = datetime.fromisoformat(ev.time) if ev.time else None
    except ValueError:
        return None
    return t if t is None or t.tzinfo is not None else t.replace(tzinfo=UTC)


def erase_on_box(gallery: Gallery, box: str, outputs: Outputs,
                 outbox: Outbox | None = None,
                 forgotten: Forgotten | None = None) -> list[ErasureReport]:
    """A box's part of every erasure it has not acknowledged yet: the person's events still in
    flight on it are forgotten first (`forgotten`, which its sink workers ask), then its JSONL
    lines and spooled snapshots of the person (`outputs`: this box's), the person's events
    waiting in its `outbox` (and their snapshots), then the acknowledgement. An erasure that
    fails here (disk full) is logged and tried again at the next gallery change or start.
    GalleryError when the database cannot be read."""
    reports = []
    for tomb in gallery.erasures.for_box(box):
        report = ErasureReport(removed=tomb.name)
        names = set(tomb.names) - gallery.erasures.names_in_use(tomb.names)
        if forgotten is not None:
            forgotten.learn(names)
        dropped: set[str] = set()
        if outbox is not None:
            try:
                dropped = outbox.erase(names, set(tomb.event_uids))
                report.outbox_events_removed = len(dropped)
            except OutboxError as exc:
                report.errors.append(str(exc))
        _erase_files(tomb, names, outputs, report, dropped)
        if report.errors:
            for error in report.errors:
                log.error("box %s erasing %r: %s", box, tomb.name, error)
            report.unfinished = True
        else:
            gallery.erasures.ack(tomb, box)
            log.info("box %s: erased its copies of %r: %s", box, tomb.name,
                     report.summary().replace("\n", "; "))
        reports.append(report)
    return reports
