"""Erasing a person: the one service that `gallery remove`, the web's delete page and
`DELETE /api/identities/{id}` call.

`erase(gallery, outputs, name=... | identity_id=...)`:
1. the gallery deletes the identity, its templates, crops and the events that name it by any
   name only it carried, clears those names as candidates, and writes a tombstone, in one
   transaction (`Gallery.erasures.begin`);
2. the lines of those events (by their ids, or naming it) go from the events JSONL files and
   their rotated backups, its names are cleared as candidates there, the snapshots of its
   events are deleted, and its retained MQTT state is cleared (where a broker is configured);
3. the tombstone is deleted and the file compacted.
A failure in 2 (disk full, a broker away) leaves the tombstone: the erasure is reported as
unfinished, `gallery check` lists it, and running the same removal again finishes it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.config import AppConfig, MqttConfig
from app.fsutil import atomic_write
from app.gallery import Gallery
from app.gallery.erasures import Tombstone

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
                 report: ErasureReport) -> None:
    ids, snaps = set(tomb.event_uids), set(tomb.snapshots)
    for base in dict.fromkeys(Path(p).expanduser() for p in outputs.jsonl_paths):
        for path in _jsonl_files(base):
            try:
                for item in _rewrite(path, names, set(tomb.event_uids), report):
                    (snaps if item.endswith(".jpg") else ids).add(item)
            except OSError as exc:
                report.errors.append(f"{path}: {exc.strerror or exc}")
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
