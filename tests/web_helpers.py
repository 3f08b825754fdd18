"""A real gallery for the web tests: Alex Lacamoire enrolled from his photo, then the Hamilton
clip and an Intel clip processed by the CLI (events with their kept crops)."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from tests.conftest import facemoe as run_facemoe

LIN, ALEX = "Lin-Manuel Miranda", "Alex Lacamoire"
HAMILTON = "short_hamilton_clip.mp4"
INTEL = "intel_face-demographics-walking.mp4"


# the tests' one CLI runner, failing on a non-zero exit unless told `check=False`
facemoe = partial(run_facemoe, check=True, timeout=600)


def build_gallery(db: Path, videos: Path, env: dict[str, str] | None = None) -> Path:
    facemoe("enroll", ALEX, videos / "alex-lacamoire.png", "--gallery", db, env=env)
    for clip in (HAMILTON, INTEL):
        facemoe("process", videos / clip, "--gallery", db, "--no-progress", env=env)
    return db


def built_gallery(folder: Path, data_dir: Path) -> Path:
    """`build_gallery` in `folder`, plain (a gallery key in the environment is dropped): a test
    module's gallery, built once."""
    os.environ.pop("FACEMOE_GALLERY_KEY", None)
    os.environ.pop("FACEMOE_GALLERY_KEY_FILE", None)
    return build_gallery(folder / "gallery.db", data_dir / "videos")


def close_up(events: list[dict]) -> dict:
    """Lin-Manuel Miranda's close-up: the longest track between the cuts at 2.7 s and 7.0 s."""
    return max((e for e in events if e["camera"] == "short_hamilton_clip"
                and e["start"] > 2.5 and e["end"] < 7.1), key=lambda e: e["frames"])
