"""A realistic gallery (100 LFW people plus the two Hamilton musicians) against every shared
video: no stranger is named, Lin-Manuel Miranda and Alex Lacamoire are
(benchmarks/field_gallery.py, run as a user runs the product)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.field_gallery import run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_no_stranger_is_named_and_the_musicians_are(data_dir: Path, tmp_path: Path) -> None:
    report = run(None, 100, 0, tmp_path)
    assert report["people"] == 102
    assert report["strangers_named"] == [], report["strangers_named"]
    assert report["lin_named"], report["videos"]["short_hamilton_clip.mp4"]
    assert report["alex_named"], report["videos"]["short_hamilton_clip.mp4"]
    # the intel clips' people are all strangers: they made events, none named
    intel = [v for k, v in report["videos"].items() if k.startswith("intel_")]
    assert sum(v["tracks"] for v in intel) >= 10 and not any(v["named"] for v in intel)
