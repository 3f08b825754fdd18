"""Per-camera settings on Lin-Manuel Miranda's close-up in the Hamilton clip (the shipped
model): zones in the events, masks and the minimum face size drop faces, a camera's own
threshold decides instead of the global one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.config import AppConfig, CameraConfig, load_config
from app.pipeline import FacePipeline
from app.runtime import GalleryMatcher, make_detector, make_embedder, open_gallery, threshold
from app.source import open_source

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent
LIN = "Lin-Manuel Miranda"
W, H = 640, 360
LEFT = [[0, 0], [W / 2, 0], [W / 2, H], [0, H]]
RIGHT = [[W / 2, 0], [W, 0], [W, H], [W / 2, H]]
CORNER = [[0, 0], [5, 0], [5, 5]]
EVERYWHERE = [[-1, -1], [W + 1, -1], [W + 1, H + 1], [-1, H + 1]]


@pytest.fixture(scope="module")
def close_up(tmp_path_factory, data_dir):
    """A runner: the events of the close-up (frames 80-209) under some camera settings."""
    gallery_path = tmp_path_factory.mktemp("camera") / "g.db"
    subprocess.run([sys.executable, "-m", "app.cli", "enroll", LIN,
                    str(data_dir / "videos" / "lin-manuel-miranda.png"), "--gallery",
                    str(gallery_path)], cwd=REPO_ROOT, check=True, capture_output=True,
                   timeout=300)
    cfg = load_config()
    detector, embedder = make_detector(cfg), make_embedder(cfg)
    gallery = open_gallery(gallery_path, embedder, create=False)
    matcher = GalleryMatcher(gallery, threshold(cfg, embedder))
    with open_source(str(data_dir / "videos" / "short_hamilton_clip.mp4")) as src:
        frames = [f for f in src if 80 <= f.index < 210]

    def run(**settings):
        cam = CameraConfig(name="stage", uri="x.mp4", **settings)
        pipeline = FacePipeline("stage", cfg, detector, embedder, matcher, settings=cam)
        events = [e for f in frames for e in pipeline.push(f).events] + pipeline.flush()
        return [e for e in events if e.type == "end"]

    yield run
    gallery.close()


def test_zones_are_listed_in_the_events(close_up):
    events = close_up(zones={"left": LEFT, "right": RIGHT, "corner": CORNER})
    lin = max(events, key=lambda e: e.frames)
    assert lin.identity == LIN
    assert lin.zones and set(lin.zones) <= {"left", "right"}
    assert not [e for e in events if "corner" in e.zones]


def test_masks_and_min_face_drop_faces(close_up):
    assert close_up(masks=[EVERYWHERE]) == []
    assert close_up(min_face=400) == []
    assert close_up(masks=[CORNER])  # a mask elsewhere changes nothing


def test_a_camera_threshold_overrides_the_global_one(close_up):
    lin = max(close_up(threshold=0.99), key=lambda e: e.frames)
    assert lin.identity is None and lin.candidate == LIN and lin.candidate_score == lin.score


def test_camera_settings_are_validated():
    cam = {"name": "door", "uri": "rtsp://127.0.0.1/x"}
    with pytest.raises(ValueError, match="at least 3"):
        AppConfig.model_validate({"cameras": [{**cam, "masks": [[[0, 0], [1, 1]]]}]})
    with pytest.raises(ValueError, match="pattern"):
        AppConfig.model_validate({"cameras": [{**cam, "zones": {"front door": CORNER}}]})
    with pytest.raises(ValueError, match="less than"):
        AppConfig.model_validate({"cameras": [{**cam, "threshold": 1.5}]})
    with pytest.raises(ValueError, match="FACEMOE_NO_SUCH_VARIABLE is not set"):
        secret_uri = "rtsp://u:{FACEMOE_NO_SUCH_VARIABLE}@h/"
        AppConfig.model_validate({"cameras": [{**cam, "uri": secret_uri}]})
