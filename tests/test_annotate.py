"""Annotation on real frames: boxes, track ids and names drawn where the faces are, in the
colour of their match, nothing else changed (unit); `process --annotate` on a real clip (e2e)."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from app.annotate import KNOWN, PENDING, UNKNOWN, draw
from app.config import AppConfig
from app.enroll import enroll
from app.process import process_video
from app.records import Detection, Match, TrackedFace
from app.runtime import make_embedder, open_gallery, threshold
from app.source import VideoWriter, open_source

LIN = "Lin-Manuel Miranda"
CLOSE_UP = range(90, 120)  # one second of his close-up in the Hamilton clip
FONT, SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.45


@pytest.fixture(scope="module")
def close_up(data_dir: Path) -> list[np.ndarray]:
    with open_source(str(data_dir / "videos" / "short_hamilton_clip.mp4")) as src:
        return [f.image for f in src if f.index in CLOSE_UP]


@pytest.fixture(scope="module")
def face(close_up, detector) -> tuple[np.ndarray, TrackedFace]:
    """A close-up frame and his face in it, as the tracker hands it on."""
    image = close_up[10]
    (det,) = detector.detect_frame(image)
    return image, TrackedFace(7, 100, 3.3, det)


def text_size(text: str) -> tuple[int, int]:
    return cv2.getTextSize(text, FONT, SCALE, 1)[0]


def box(f: TrackedFace) -> tuple[int, int, int, int]:
    x, y, w, h = (int(round(v)) for v in f.detection.bbox)
    return x, y, w, h


def label_row(out: np.ndarray, f: TrackedFace, text: str) -> tuple[int, np.ndarray]:
    """The top row of the label above `f` and which of its pixels are not the source's."""
    _, y, _, _ = box(f)
    tw, th = text_size(text)
    row = max(y - 4, th + 4) - th - 4
    return row, out[row]


@pytest.mark.unit
def test_a_known_face_gets_a_green_box_and_its_name_and_nothing_else_changes(face):
    image, f = face
    before = image.copy()
    text = f"#7 {LIN} 0.83"
    out = draw(image, [f], {7: Match(LIN, 0.83, LIN)})
    assert np.array_equal(image, before)  # drawn on a copy
    x, y, w, h = box(f)
    tw, th = text_size(text)
    for py, px in ((y + h // 2, x), (y + h // 2, x + w), (y, x + w // 2), (y + h, x + w // 2)):
        assert tuple(out[py, px]) == KNOWN, (py, px)
    # the face inside the box is untouched
    assert np.array_equal(out[y + 2 : y + h - 1, x + 2 : x + w - 1],
                          image[y + 2 : y + h - 1, x + 2 : x + w - 1])
    # the label: a green bar as wide as the text, above the box, with dark text in it
    row, top = label_row(out, f, text)
    assert row < y
    green = np.all(top == KNOWN, axis=1)
    assert green[x : x + tw + 5].all() and not green[x + tw + 5 :].any() and not green[:x].any()
    bar = out[row : y - 1, x : x + tw + 5]
    assert (bar.max(axis=2) < 60).sum() > 5 * len(text)  # the letters
    # everything else is the source frame
    changed = np.any(out != image, axis=2)
    changed[y - 1 : y + h + 2, x - 1 : x + w + 2] = False
    changed[row : y, x : x + tw + 5] = False
    assert not changed.any()


@pytest.mark.unit
@pytest.mark.parametrize(
    "match, colour, text",
    [(None, PENDING, "#7"), (Match(None, 0.31, LIN), UNKNOWN, "#7 unknown 0.31")],
    ids=["pending", "unknown"],
)
def test_pending_and_unknown_faces_get_their_colour_and_label(face, match, colour, text):
    image, f = face
    out = draw(image, [f], {} if match is None else {7: match})
    x, y, w, h = box(f)
    assert tuple(out[y + h // 2, x]) == colour
    _, top = label_row(out, f, text)
    coloured = np.all(top == colour, axis=1)
    assert coloured.sum() == text_size(text)[0] + 5


@pytest.mark.unit
def test_a_predicted_box_is_thinner_than_a_detected_one(face):
    image, f = face
    predicted = TrackedFace(7, 101, 3.33, Detection(f.detection.bbox, f.detection.landmarks, 0.0))
    x, y, w, h = box(f)
    across = slice(x - 4, x + 5)  # a scan across the left side at mid-height

    def width(out):
        return int(np.any(out[y + h // 2, across] != image[y + h // 2, across], axis=1).sum())

    assert width(draw(image, [f], {})) > width(draw(image, [], {}, [predicted])) == 1
    assert np.array_equal(draw(image, [], {}), image)


@pytest.mark.unit
@pytest.mark.parametrize("where", ["top", "right", "left"])
def test_the_label_stays_inside_the_frame(face, where):
    """A face at the top, right or left edge keeps its whole name readable."""
    image, f = face
    height, width = image.shape[:2]
    x, y, w, h = f.detection.bbox
    bbox = {
        "top": (x, 0.0, w, h),
        "right": (width - w - 2, y, w, h),
        "left": (-w / 3, y, w, h),
    }[where]
    moved = TrackedFace(7, 100, 3.3, Detection(np.float32(bbox), f.detection.landmarks, 0.9))
    text = f"#7 {LIN} 0.83"
    out = draw(image, [moved], {7: Match(LIN, 0.83, LIN)})
    tw, th = text_size(text)
    bars = [r for r in range(height) if np.all(out[r] == KNOWN, axis=1).sum() >= tw + 5]
    assert bars and min(bars) >= 0 and max(bars) < int(round(bbox[1])) + h


@pytest.fixture(scope="module")
def annotated(close_up, detector, tmp_path_factory, data_dir, no_key):
    """`process --annotate` of one second of the close-up, with him enrolled from his still:
    (source frames as decoded from the clip, annotated frames, summary)."""
    tmp = tmp_path_factory.mktemp("annotate")
    clip = tmp / "close-up.mp4"
    with VideoWriter(clip, 29.97, (640, 360)) as writer:
        for image in close_up:
            writer.write(image)
    cfg = AppConfig()
    embedder = make_embedder(cfg)
    with open_gallery(tmp / "gallery.db", embedder) as gallery:
        enroll(LIN, [str(data_dir / "videos" / "lin-manuel-miranda.png")], detector, embedder,
               gallery)
        summary = process_video(str(clip), cfg, detector, embedder, gallery,
                                threshold(cfg, embedder), annotate=str(tmp / "out.mp4"),
                                progress=False)
    assert not list(tmp.glob("*.part"))
    with open_source(str(clip)) as src:
        source = [f.image for f in src]
    with open_source(str(tmp / "out.mp4")) as src:
        out = [f.image for f in src]
        size = src.size
    return source, out, size, summary


@pytest.fixture(scope="module")
def no_key():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FACEMOE_GALLERY_KEY", raising=False)
        mp.delenv("FACEMOE_GALLERY_KEY_FILE", raising=False)
        yield


@pytest.mark.e2e
def test_the_annotated_video_has_every_frame_at_the_source_size(annotated):
    source, out, size, summary = annotated
    assert len(out) == len(source) == len(CLOSE_UP) == summary.frames
    assert size == (640, 360)
    assert summary.annotated.endswith("out.mp4")
    assert summary.as_json()["identified"] == [LIN]


@pytest.mark.e2e
def test_his_box_and_name_are_drawn_where_his_face_is(annotated, detector):
    """Frame by frame: the pixels that differ from the source lie on his face's box (the
    detector run afresh on the source frame) and the green name bar above it; the face
    inside the box is unchanged. The drawn box is the pipeline's (tracked, or predicted on
    frames it skips, extrapolated from his motion), so it may be off the fresh detection by
    `m` pixels, a fifth of his face."""
    source, out, _, summary = annotated
    (event,) = [e for e in summary.events if e.type == "end"]
    tw, th = text_size(f"#{event.track_id} {LIN} {event.score:.2f}")
    labels = []
    for src, ann in zip(source, out, strict=True):
        (det,) = detector.detect_frame(src)
        x, y, w, h = (int(round(v)) for v in det.bbox)
        m = h // 5
        changed = np.abs(ann.astype(np.int16) - src).max(axis=2) > 40
        if not changed.any():
            continue  # before the track is confirmed
        near_box = np.zeros_like(changed)
        near_box[max(0, y - m) : y + h + m + 1, max(0, x - m) : x + w + m + 1] = True
        near_box[y + m : y + h - m + 1, x + m : x + w - m + 1] = False
        bar = np.zeros_like(changed)
        bar[max(0, y - th - 8 - m) : y + m, max(0, x - m) : x + tw + 5 + m] = True
        assert not (changed & ~near_box & ~bar).any()  # nothing drawn elsewhere
        inside = np.abs(ann.astype(np.int16) - src)[y + m : y + h - m + 1, x + m : x + w - m + 1]
        assert inside.mean() < 6  # nor over his face (H.264 noise: about 3)
        rows, cols = np.nonzero(changed & near_box)
        assert abs(cols.min() - x) <= m and abs(cols.max() - (x + w)) <= m
        assert abs(rows.max() - (y + h)) <= m
        # the name bar reaches far right of the box ("#1" alone, before the match, does not)
        beyond = changed & bar
        beyond[:, : x + w + m + 1] = False
        if beyond.sum() > 50:
            assert np.all(np.abs(np.median(ann[beyond], axis=0) - KNOWN) < 40)
            assert abs(np.nonzero(beyond.any(axis=0))[0].max() - (x + tw + 4)) <= m
            labels.append("name")
        else:
            labels.append("id")
    assert len(labels) >= len(CLOSE_UP) - 4  # from the confirmation of his track on
    assert labels.count("name") >= len(CLOSE_UP) // 2
    assert labels == sorted(labels)  # "id" until his first match, then his name
