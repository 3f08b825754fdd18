"""Event sinks: where finished-track events go (JSONL file, gallery events table)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from app.gallery import EventStore, GalleryError
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
    """Stores events in the gallery's event store (`Gallery.event_store`), one transaction
    per `write`.

    The store is borrowed: `close()` stops this sink but leaves the gallery open.
    """

    def __init__(self, store: EventStore, crops: int = 0) -> None:
        self._store: EventStore | None = store
        self.crops = crops  # best aligned crops kept per event (for enrollment from a track)

    def write(self, events: list[Event]) -> None:
        """Store `events` as one batch."""
        if self._store is None:
            raise SinkError("gallery sink is closed")
        try:
            self._store.add(events, crops=self.crops)
        except GalleryError as exc:
            raise SinkError(str(exc)) from exc

    def close(self) -> None:
        """Stop accepting events."""
        self._store = None


class RotatingJsonlSink:
    """JSON lines like `JsonlSink`, rotated by size: path -> path.1 -> ... -> path.N (dropped)."""

    def __init__(self, path: str | Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = Path(path), max(1, int(max_bytes)), backups
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create {self.path.parent}: {_reason(exc)}") from exc
        self._sink = JsonlSink(self.path)

    def write(self, events: list[Event]) -> None:
        for ev in events:
            self._sink.write([ev])
            if self._sink._file.tell() >= self.max_bytes:
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
    """POSTs each event as a JSON object to an http(s) URL with a short timeout."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise SinkError(f"webhook URL must be http(s): {url}")
        self.url, self.timeout = url, timeout

    def write(self, events: list[Event]) -> None:
        import urllib.error
        import urllib.request

        for ev in events:
            req = urllib.request.Request(self.url, data=json.dumps(ev.to_json()).encode(),
                                         headers={"Content-Type": "application/json"},
                                         method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                    resp.read()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise SinkError(f"webhook {self.url}: {str(exc).splitlines()[0]}") from exc

    def close(self) -> None:
        pass


class MqttSink:
    """Publishes each event as JSON to an MQTT topic (needs paho-mqtt: pip install '.[mqtt]')."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise SinkError("MQTT output needs paho-mqtt "
                            "(pip install 'facemoe-edge[mqtt]')") from exc
        args = (mqtt.CallbackAPIVersion.VERSION2,) if hasattr(mqtt, "CallbackAPIVersion") else ()
        self.topic = topic
        self._client = mqtt.Client(*args)
        try:
            self._client.connect_async(host, port)
        except (OSError, ValueError) as exc:
            raise SinkError(f"MQTT {host}:{port}: {exc}") from exc
        self._client.loop_start()  # paho reconnects by itself; publish queues while offline

    def write(self, events: list[Event]) -> None:
        for ev in events:
            self._client.publish(self.topic, json.dumps(ev.to_json()), qos=1)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
