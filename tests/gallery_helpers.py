"""Shared test data for the gallery tests (SQLite and PostgreSQL) and the event record, and
the tests' one event builder (`event`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from app.records import Event

MODEL = ("facemoe-edge", "0.1.0")
# the keys of a JSON event record (docs/events.md: the nine original keys), no more and no fewer
ORIGINAL_KEYS = set("camera track_id identity score start end frames best_bbox model".split())
# ... and the extensions of docs/events.md
EVENT_KEYS = ORIGINAL_KEYS | set("id type time snapshot candidate candidate_score zones".split())
D = 16


def unit(rng: np.random.Generator, m: int, d: int = D) -> np.ndarray:
    v = rng.normal(size=(m, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def crops(rng: np.random.Generator, m: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8) for _ in range(m)]


def event(track_id: int, identity: str | None = "alice", **fields: object) -> Event:
    """The tests' one event builder: a finished track's event of camera cam0, with `fields`
    (any other Event field) over its defaults."""
    base = Event(
        camera="cam0",
        track_id=track_id,
        identity=identity,
        score=0.61,
        start=1.0 * track_id,
        end=1.0 * track_id + 2.5,
        frames=30,
        best_bbox=(10.0, 20.0, 48.0, 56.0),
        model="facemoe-edge@0.1.0",
        id=f"00000000-0000-4000-8000-{track_id:012d}",  # the same event for equal track ids
    )
    return replace(base, **fields) if fields else base
