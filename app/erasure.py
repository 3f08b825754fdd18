"""Erasure of a person from every copy of their events the product wrote outside the gallery.

`gallery remove NAME` deletes the identity and the events stored in the gallery; the daemon
and `process` also wrote those events to JSONL files (with rotated backups) and the daemon
kept a snapshot JPEG per event (named by the event id). `erase_outputs` removes the lines
that name the person, clears them as a `candidate` of other events, and deletes the
snapshots of their events.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.fsutil import atomic_write

log = logging.getLogger(__name__)


@dataclass
class ErasureReport:
    jsonl_lines_removed: int = 0
    jsonl_candidates_cleared: int = 0
    jsonl_files_rewritten: list[str] = field(default_factory=list)
    snapshots_deleted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)


def _jsonl_files(path: Path) -> list[Path]:
    """`path` and its rotated backups (path.1, path.2, ...)."""
    backup = re.compile(re.escape(path.name) + r"\.\d+")
    found = [path] if path.is_file() else []
    if path.parent.is_dir():
        found += sorted(p for p in path.parent.iterdir() if backup.fullmatch(p.name))
    return found


def _rewrite(path: Path, name: str, report: ErasureReport) -> set[str]:
    """Drop the lines of `path` whose identity is `name`; clear `name` as a candidate.
    Returns the event ids (and snapshot paths) of the dropped lines."""
    kept: list[str] = []
    dropped: set[str] = set()
    removed = cleared = 0
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        if not isinstance(record, dict):
            kept.append(line)
            continue
        if record.get("identity") == name:
            removed += 1
            dropped.update(str(record[k]) for k in ("id", "snapshot") if record.get(k))
            continue
        if record.get("candidate") == name:
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


def erase_outputs(name: str, *, event_ids: set[str], snapshot_paths: set[str],
                  jsonl_paths: list[str | Path], snapshot_dir: str | Path | None
                  ) -> ErasureReport:
    """Remove `name`'s events from the JSONL files (and backups) and delete the snapshots of
    `event_ids` (from the gallery) and of the removed lines."""
    report = ErasureReport()
    ids, snaps = set(event_ids), set(snapshot_paths)
    for base in dict.fromkeys(Path(p).expanduser() for p in jsonl_paths):
        for path in _jsonl_files(base):
            try:
                for item in _rewrite(path, name, report):
                    (snaps if item.endswith(".jpg") else ids).add(item)
            except OSError as exc:
                report.errors.append(f"{path}: {exc.strerror or exc}")
    candidates = {Path(s) for s in snaps}
    if snapshot_dir and Path(snapshot_dir).is_dir():
        root = Path(snapshot_dir)
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
    for error in report.errors:
        log.error("erasing %r: %s", name, error)
    return report
