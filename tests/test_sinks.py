"""Event sinks: JSONL lines with exactly the DESIGN.md keys; gallery events table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.gallery import Gallery
from app.records import Event
from app.sinks import GallerySink, JsonlSink, SinkError
from tests.gallery_helpers import EVENT_KEYS


def event(track_id: int, identity: str | None) -> Event:
    return Event(
        camera="door",
        track_id=track_id,
        identity=identity,
        score=0.4321987654,
        start=12.0,
        end=13.5,
        frames=38,
        best_bbox=(1.234, 5.0, 64.0, 72.5),
        model="facemoe-edge@0.1.0",
    )


def test_jsonl_lines_have_exactly_the_design_keys(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    sink.write([event(1, "Zoë"), event(2, None)])
    lines = path.read_text(encoding="utf-8").splitlines()  # flushed before close
    sink.close()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == EVENT_KEYS and set(second) == EVENT_KEYS
    assert first == {
        "camera": "door",
        "track_id": 1,
        "identity": "Zoë",
        "score": 0.432199,
        "start": 12.0,
        "end": 13.5,
        "frames": 38,
        "best_bbox": [1.23, 5.0, 64.0, 72.5],
        "model": "facemoe-edge@0.1.0",
    }
    assert second["identity"] is None


def test_jsonl_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    for track_id in (1, 2):
        sink = JsonlSink(path)
        sink.write([event(track_id, None)])
        sink.close()
    assert [json.loads(x)["track_id"] for x in path.read_text().splitlines()] == [1, 2]


def test_jsonl_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "events.jsonl"
    with pytest.raises(SinkError) as err:
        JsonlSink(missing)
    assert str(err.value) == f"cannot open events file {missing}: No such file or directory"
    sink = JsonlSink(tmp_path / "e.jsonl")
    sink.close()
    sink.close()
    with pytest.raises(SinkError, match="is closed"):
        sink.write([event(1, None)])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_jsonl_disk_full() -> None:
    sink = JsonlSink("/dev/full")
    with pytest.raises(SinkError) as err:
        sink.write([event(1, None)])
    assert str(err.value) == "cannot write events file /dev/full: No space left on device"


def test_gallery_sink(tmp_path: Path) -> None:
    events = [event(1, "alice"), event(2, None), event(3, "bob")]
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as gallery:
        sink = GallerySink(gallery.event_store)
        sink.write(events[:2])
        sink.write(events[2:])
        sink.close()
        assert gallery.events() == events
        with pytest.raises(SinkError, match="closed"):
            sink.write(events)
        assert len(gallery.events()) == 3  # borrowed gallery still usable after close


def test_gallery_sink_error_is_sink_error(tmp_path: Path) -> None:
    bad = Event("door", 1, None, 0.1, 0.0, 1.0, 3, (0.0, 0.0, 1.0, 1.0), None)  # type: ignore[arg-type]
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as gallery:
        with pytest.raises(SinkError) as err:
            GallerySink(gallery.event_store).write([event(1, None), bad])
        assert "\n" not in str(err.value)
        assert gallery.events() == []
