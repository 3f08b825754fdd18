"""Event sinks: where finished-track events go (JSONL file, gallery events table)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from app.gallery import Gallery, GalleryError
from app.records import Event

log = logging.getLogger(__name__)


class SinkError(Exception):
    """A sink could not store events; str() is a single line."""


class Sink(Protocol):
    """What the pipeline needs from a sink."""

    def write(self, events: list[Event]) -> None: ...

    def close(self) -> None: ...


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc).splitlines()[0]


class JsonlSink:
    """Appends one JSON object per event (DESIGN.md keys), flushed after each line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise SinkError(f"cannot open events file {self.path}: {_reason(exc)}") from exc
        log.debug("appending events to %s", self.path)

    def write(self, events: list[Event]) -> None:
        """Append `events`, one line each."""
        if self._file.closed:
            raise SinkError(f"events file {self.path} is closed")
        try:
            for ev in events:
                self._file.write(json.dumps(ev.to_json(), ensure_ascii=False) + "\n")
                self._file.flush()
        except OSError as exc:
            raise SinkError(f"cannot write events file {self.path}: {_reason(exc)}") from exc

    def close(self) -> None:
        """Close the file (idempotent)."""
        try:
            self._file.close()
        except OSError as exc:
            raise SinkError(f"cannot close events file {self.path}: {_reason(exc)}") from exc


class GallerySink:
    """Stores events in the gallery's `events` table, one transaction per `write`.

    The gallery is borrowed: `close()` stops this sink but leaves the gallery open.
    """

    def __init__(self, gallery: Gallery) -> None:
        self._gallery: Gallery | None = gallery

    def write(self, events: list[Event]) -> None:
        """Store `events` as one batch."""
        if self._gallery is None:
            raise SinkError("gallery sink is closed")
        try:
            self._gallery.add_events(events)
        except GalleryError as exc:
            raise SinkError(str(exc)) from exc

    def close(self) -> None:
        """Stop accepting events."""
        self._gallery = None
