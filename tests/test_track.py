"""Tracker: behaviour tables on synthetic boxes, real clips through YuNet, then small moving
faces on synthetic clips (real faces, rendered) through the pipeline with its defaults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.config import AppConfig
from app.embed import Embedder
from app.match import Matcher
from app.pipeline import FacePipeline
from app.records import Detection, Frame
from app.runtime import make_detector
from app.source import open_source
from app.track import KalmanBoxFilter, Tracker, TrackerConfig, gated_iou, iou_matrix
from app.yunet import FaceDetector
from benchmarks.synthetic_faces import Walk, load_sprites, render, visible

pytestmark = pytest.mark.unit


def box(x: float, y: float, w: float = 40, h: float = 50, score: float = 0.9) -> Detection:
    """A detection with plausible landmarks inside the box."""
    rel = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])
    landmarks = (np.array([x, y]) + rel * np.array([w, h])).astype(np.float32)
    return Detection(np.array([x, y, w, h], np.float32), landmarks, score)


ONE_HIT = TrackerConfig(min_hits=1)  # every detection is reported, from a track's first frame


def run(tracker: Tracker, frames: dict[int, list[Detection]]) -> tuple[dict[int, list[int]],
                                                                        dict[int, list[int]]]:
    """Feed {frame_index: detections}; return ids seen per frame and ids finished per frame."""
    seen, ended = {}, {}
    for index in sorted(frames):
        faces, finished = tracker.update(index, index / 25, frames[index])
        seen[index] = [f.track_id for f in faces]
        ended[index] = finished
    return seen, ended


@pytest.mark.parametrize("vx, vy, grow", [(0, 0, 0), (3, 0, 0), (0, -4, 0), (8, 5, 0),
                                          (2, 1, 1.5), (-6, 0, -0.5)])
def test_steady_motion_keeps_id(vx: float, vy: float, grow: float) -> None:
    frames = {i: [box(300 + vx * i, 200 + vy * i, 40 + grow * i, 50 + grow * i)]
              for i in range(40)}
    seen, ended = run(Tracker(ONE_HIT), frames)
    assert all(ids == [1] for ids in seen.values())
    assert not any(ended.values())


@pytest.mark.parametrize("gap", [1, 5, 10, 15])
def test_short_miss_keeps_id(gap: int) -> None:
    """Up to max_missed (15) frames without a detection; the face reappears where it moved to."""
    frames: dict[int, list[Detection]] = {i: [box(100 + 2 * i, 100)] for i in range(10)}
    frames.update({i: [] for i in range(10, 10 + gap)})
    frames.update({i: [box(100 + 2 * i, 100)] for i in range(10 + gap, 20 + gap)})
    seen, ended = run(Tracker(TrackerConfig(max_missed=15)), frames)
    assert {tid for ids in seen.values() for tid in ids} == {1}
    assert not any(ended.values())


@pytest.mark.parametrize("start, after, config", [
    ((50, 50), (500, 300), {}),  # across the frame
    ((50, 50), (80, 50), {}),  # shifted by 3/4 of its width: IoU 0.14 < match_iou
    ((50, 50), (58, 50), {"max_center_shift": 0.1}),  # IoU 0.67 but centre moved 0.16 box
    ((50, 50), (56, 55), {"match_iou": 0.9}),  # IoU below a strict match_iou
])
def test_jump_starts_new_track(start: tuple[float, float], after: tuple[float, float],
                               config: dict) -> None:
    cfg = TrackerConfig(**{"min_hits": 1, **config})
    frames = {i: [box(*start)] for i in range(10)}
    frames.update({i: [box(*after)] for i in range(10, 15)})
    seen, _ = run(Tracker(cfg), frames)
    assert seen[9] == [1] and seen[10] == [2] and seen[14] == [2]


@pytest.mark.parametrize("size", [16, 20, 24, 32])
@pytest.mark.parametrize("vx, vy", [(8, 0), (-7, 2), (5, -5), (0, 6)])
def test_small_fast_face_detected_every_2nd_frame_keeps_one_track(size: float, vx: float,
                                                                    vy: float) -> None:
    """15 detections/s on 30 fps video: a face moving 5-8 px per frame moves 10-16 px between
    detections, about its own width at 16-24 px (plain IoU 0-0.3). Default config: one track
    from the 2nd detection (min_hits 2) to the end, with up to 2 px of box jitter."""
    rng = np.random.default_rng(size)
    frames = {i: [box(200 + vx * i + rng.uniform(-2, 2), 150 + vy * i + rng.uniform(-2, 2),
                      size, size * 1.2)] for i in range(0, 40, 2)}
    seen, ended = run(Tracker(), frames)
    assert seen[0] == [] and all(seen[i] == [1] for i in range(2, 40, 2))
    assert not any(ended.values())
    if size <= 20 and abs(vx) >= 7:  # plain IoU (the tracker before) never confirms a track
        seen, _ = run(Tracker(TrackerConfig(min_match_size=0)), frames)
        assert not any(seen.values())


@pytest.mark.parametrize("start, after", [((50, 50), (500, 300)), ((50, 50), (100, 50)),
                                          ((300, 200), (300, 250))])
def test_small_face_jump_still_starts_new_track(start: tuple[float, float],
                                                after: tuple[float, float]) -> None:
    """The enlarged gate follows a 16 px face for ~20 px between detections, not further."""
    frames = {i: [box(*start, 16, 20)] for i in range(0, 20, 2)}
    frames.update({i: [box(*after, 16, 20)] for i in range(20, 30, 2)})
    seen, _ = run(Tracker(ONE_HIT), frames)
    assert seen[18] == [1] and seen[20] == [2] and seen[28] == [2]


@pytest.mark.parametrize("track, detection, iou, near", [
    ((100, 100, 16, 16), (116, 100, 16, 16), 24 / 56, True),  # enlarged to 40: 24x40 overlap
    ((100, 100, 16, 16), (100, 100, 40, 40), 0.16, True),  # size jump x2.5: 40 vs 100 wide
    ((100, 100, 16, 16), (160, 100, 16, 16), 0.0, False),  # 60 px > 1 enlarged width
    ((100, 100, 80, 80), (120, 100, 80, 80), 60 / 100, True),  # wide boxes: plain IoU
])
def test_gated_iou_table(track: tuple, detection: tuple, iou: float, near: bool) -> None:
    got, gate = gated_iou(np.array([track]), np.array([detection]), 40.0, 1.0)
    assert got[0, 0] == pytest.approx(iou) and gate[0, 0] == near


@pytest.mark.parametrize("max_missed", [1, 5, 15])
def test_track_ends_after_max_missed(max_missed: int) -> None:
    frames: dict[int, list[Detection]] = {i: [box(100, 100)] for i in range(5)}
    frames.update({i: [] for i in range(5, 5 + max_missed + 3)})
    tracker = Tracker(TrackerConfig(max_missed=max_missed))
    _, ended = run(tracker, frames)
    last_seen = 4
    assert ended[last_seen + max_missed + 1] == [1]
    assert sum(len(ids) for ids in ended.values()) == 1
    assert tracker.finish_all() == []


def test_gaps_between_detector_runs() -> None:
    """Running the detector every 3rd frame: gaps are predicted through and count as misses."""
    frames = {i: [box(100 + 4 * i, 100), box(400 - 4 * i, 300)] for i in range(0, 60, 3)}
    seen, ended = run(Tracker(TrackerConfig(max_missed=5, min_hits=1)), frames)
    assert all(sorted(ids) == [1, 2] for ids in seen.values())
    assert not any(ended.values())
    # Frames 4-8 unseen (5 = max_missed): same track; frames 10-15 unseen (6): a new one.
    frames = {0: [box(100, 100)], 3: [box(100, 100)], 9: [box(100, 100)], 16: [box(100, 100)]}
    seen, ended = run(Tracker(TrackerConfig(max_missed=5, min_hits=1)), frames)
    assert seen[9] == [1] and ended[9] == []
    assert ended[16] == [1] and seen[16] == [2]


def test_two_stage_low_scores() -> None:
    cfg = TrackerConfig(high_thresh=0.6, low_thresh=0.3, min_hits=1)
    frames = {0: [box(100, 100, score=0.9)], 1: [box(102, 100, score=0.4)],
              2: [box(104, 100, score=0.35)], 3: [box(106, 100, score=0.8)],
              4: [box(400, 300, score=0.5)],  # low score, no track nearby: never a track
              5: [box(400, 300, score=0.2)]}  # below low_thresh: ignored
    seen, _ = run(Tracker(cfg), frames)
    assert [seen[i] for i in range(6)] == [[1], [1], [1], [1], [], []]


def test_min_hits_and_consecutive_ids() -> None:
    cfg = TrackerConfig(min_hits=3)
    frames = {0: [box(100, 100), box(400, 100)], 1: [box(101, 100), box(400, 300)],
              2: [box(102, 100)], 3: [box(103, 100), box(250, 250)], 4: [box(104, 100),
                                                                          box(251, 250)],
              5: [box(105, 100), box(252, 250)]}
    seen, _ = run(Tracker(cfg), frames)
    assert [seen[i] for i in range(6)] == [[], [], [1], [1], [1], [1, 2]]


def test_finish_all_and_order_checks() -> None:
    tracker = Tracker(ONE_HIT)
    faces, _ = tracker.update(0, 0.0, [box(100, 100), box(300, 100)])
    assert [f.track_id for f in faces] == [1, 2] and tracker.active_ids == [1, 2]
    with pytest.raises(ValueError):
        tracker.update(0, 0.0, [])
    assert tracker.finish_all() == [1, 2] and tracker.active_ids == []
    faces, _ = tracker.update(0, 0.0, [box(100, 100)])  # a new stream; ids stay unique
    assert [f.track_id for f in faces] == [3]


def test_iou_and_kalman() -> None:
    iou = iou_matrix(np.array([[0, 0, 10, 10], [20, 20, 10, 10]]), np.array([[5, 0, 10, 10]]))
    assert iou[:, 0] == pytest.approx([50 / 150, 0.0])
    kf = KalmanBoxFilter(np.array([0, 0, 20, 20]))
    for i in range(1, 10):
        kf.predict()
        kf.update(np.array([5 * i, 0, 20, 20]))
    kf.predict()
    assert kf.bbox[0] == pytest.approx(50, abs=2)  # learned 5 px/frame


def test_kalman_learns_a_small_fast_face_from_one_update() -> None:
    """A 16 px face moving 8 px/frame, measured every 2nd frame: after the track's second
    detection the prediction is within 3 px (ByteTrack's prior lagged 9.6 px, then 5 px)."""
    kf = KalmanBoxFilter(np.array([0, 0, 16, 16]))
    kf.predict(), kf.predict()
    kf.update(np.array([16, 0, 16, 16]))
    assert kf.bbox_ahead(2)[0] == pytest.approx(32, abs=3)


def test_expected_boxes_look_ahead_without_changing_tracks() -> None:
    tracker = Tracker()
    assert tracker.expected(0) == []
    for i in range(0, 8, 2):
        tracker.update(i, i / 25, [box(100 + 6 * i, 100, 16, 20)])
    ahead = tracker.expected(10)
    assert len(ahead) == 1 and ahead[0][0] == pytest.approx(160, abs=3)
    assert tracker.expected(10)[0] == pytest.approx(ahead[0])
    assert tracker.expected(6) == []  # not ahead of the last update


def test_low_score_detection_resumes_a_track_that_missed() -> None:
    """Weak detections (a second look where the track expects its face) extend a confirmed
    track even after it missed an update; they never start one."""
    frames = {0: [box(100, 100, score=0.9)], 2: [box(104, 100, score=0.9)], 4: [],
              6: [box(112, 100, score=0.4)], 8: [box(116, 100, score=0.45)],
              10: [box(400, 300, score=0.5)]}
    seen, _ = run(Tracker(), frames)
    assert [seen[i] for i in range(0, 12, 2)] == [[], [1], [], [1], [1], []]


def _track_clip(detector: FaceDetector, path: Path, limit: int | None = None
                ) -> tuple[int, dict[int, list[int]]]:
    tracker = Tracker(ONE_HIT)
    detections, frames_of = 0, {}
    with open_source(str(path)) as source:
        for frame in source:
            if limit is not None and frame.index >= limit:
                break
            found = detector.detect(frame.image)
            detections += len(found)
            for face in tracker.update(frame.index, frame.pts, found)[0]:
                frames_of.setdefault(face.track_id, []).append(frame.index)
    return detections, frames_of


def test_walking_clip_ids_are_stable(detector: FaceDetector, data_dir: Path) -> None:
    """Two people walk through 35 frames with ~17 px faces: two tracks, each the whole clip."""
    detections, frames_of = _track_clip(
        detector, data_dir / "videos" / "intel_face-demographics-walking.mp4")
    assert detections >= 60
    assert len(frames_of) <= 3
    assert sorted(len(v) for v in frames_of.values())[-2:] == [35, 35]


def test_shot_cut_ends_tracks(detector: FaceDetector, data_dir: Path) -> None:
    """short_hamilton_clip.mp4 cuts between frames 19 and 20: no id continues across it."""
    _, frames_of = _track_clip(detector, data_dir / "videos" / "short_hamilton_clip.mp4",
                               limit=40)
    before = {tid for tid, idx in frames_of.items() if 19 in idx}
    after = {tid for tid, idx in frames_of.items() if 20 in idx}
    assert before and after
    assert all(max(frames_of[tid]) <= 19 for tid in before)
    assert all(min(frames_of[tid]) >= 20 for tid in after)


def test_enroll_video_uses_the_tracker_config(detector: FaceDetector, data_dir: Path) -> None:
    """`facemoe enroll` on a video tracks with the user's tracker section, not the defaults:
    a min_hits longer than the clip (35 frames) confirms no track."""
    from app.enroll import EnrollError, faces_from_video

    clip = data_dir / "videos" / "intel_face-demographics-walking.mp4"
    assert len(faces_from_video(clip, detector, 8, face=0, tracking=TrackerConfig())) == 8
    with pytest.raises(EnrollError, match="no face found"):
        faces_from_video(clip, detector, 8, face=0, tracking=TrackerConfig(min_hits=36))


# --- small moving faces on synthetic clips, through the app's pipeline with its defaults ---

FPS = 25.0  # detector.max_fps 15 then detects on every 2nd frame


@pytest.fixture(scope="module")
def sprites(data_dir: Path) -> list:
    return load_sprites(data_dir, 16, seed=1)


@pytest.fixture(scope="module")
def pipeline_parts(yunet_path: Path, tiny_model_dir: Path) -> tuple:
    cfg = AppConfig()
    detector = make_detector(cfg.model_copy(
        update={"detector": cfg.detector.model_copy(update={"model": str(yunet_path)})}))
    embedder = Embedder.from_config(str(tiny_model_dir), "onnxruntime", batch_size=8)
    return cfg, detector, embedder


def _ids_per_walk(parts: tuple, walks: list[Walk], frames: int, cut_at: int | None = None,
                  seed: int = 0) -> list[dict[int, int | None]]:
    """Push a rendered clip through FacePipeline; per walk {detection frame: id or None}."""
    cfg, detector, embedder = parts
    empty = Matcher([], np.zeros((0, embedder.dim), np.float32), 0.5)
    pipeline = FacePipeline("synthetic", cfg, detector, embedder, lambda: empty)
    seen: list[dict[int, int | None]] = [{} for _ in walks]
    for index, image in enumerate(render(walks, frames, seed=seed, cut_at=cut_at)):
        faces = pipeline.push(Frame("synthetic", index, index / FPS, image)).faces
        if index % 2:
            assert faces == []
            continue
        for k, walk in enumerate(walks):
            if visible(walk, index):
                ids = [f.track_id for f in faces
                       if iou_matrix(walk.box(index), f.detection.bbox)[0, 0] >= 0.3]
                seen[k][index] = ids[0] if ids else None
    pipeline.flush()
    return seen


@pytest.mark.parametrize("size", [16, 20, 24, 32])
def test_small_moving_face_gets_one_track(pipeline_parts: tuple, sprites: list,
                                          size: float) -> None:
    """Faces of 16-32 px crossing a blurred, noisy, JPEG-compressed 640x360 frame at 5-8 px
    per frame, detected on every 2nd frame: one track each, reported from one of its first
    4 detection frames (min_hits 2) and in at least 85% of those where it is visible."""
    walks = [Walk(sprites[0], size, (30, 60), (7.0, 1.5)),
             Walk(sprites[1], size, (600 - size, 250), (-5.5, -1.0))]
    for seen in _ids_per_walk(pipeline_parts, walks, 70, seed=int(size)):
        ids = [v for v in seen.values() if v is not None]
        assert len(set(ids)) == 1, seen
        assert len(ids) >= 0.85 * len(seen), seen
        assert any(v is not None for v in list(seen.values())[:4]), seen


def test_crossing_small_faces_keep_their_ids(pipeline_parts: tuple, sprites: list) -> None:
    """Two 24 px faces pass each other 30 px apart (vertically) at 6 px per frame each."""
    walks = [Walk(sprites[2], 24, (100, 150), (6.0, 0.0)),
             Walk(sprites[3], 24, (516, 180), (-6.0, 0.0))]
    first, second = _ids_per_walk(pipeline_parts, walks, 70, seed=3)
    ids_a = {v for v in first.values() if v is not None}
    ids_b = {v for v in second.values() if v is not None}
    assert len(ids_a) == 1 and len(ids_b) == 1 and ids_a != ids_b, (first, second)


def test_hard_cut_ends_every_small_face_track(pipeline_parts: tuple, sprites: list) -> None:
    """At a cut (new backdrop, the faces elsewhere) no id continues, even for small faces."""
    before = [Walk(sprites[4], 24, (100, 100), (6.0, 0.0), last=29),
              Walk(sprites[5], 20, (400, 250), (-6.0, 0.0), last=29)]
    after = [Walk(sprites[4], 24, (300, 60), (5.0, 1.0), first=30),
             Walk(sprites[5], 20, (150, 280), (6.0, 0.0), first=30)]
    seen = _ids_per_walk(pipeline_parts, before + after, 60, cut_at=30, seed=5)
    ids_before = {v for s in seen[:2] for v in s.values() if v is not None}
    ids_after = {v for s in seen[2:] for v in s.values() if v is not None}
    assert len(ids_before) == 2 and len(ids_after) == 2 and not ids_before & ids_after
