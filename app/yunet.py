"""YuNet, the first detector kind (`app.detect.Detector`, kind "yunet"): faces (boxes, 5
landmarks, score) through `cv2.FaceDetectorYN`, and where its model file is found.

Small faces (16-20 px) are often missed at the frame's own scale, and enlarging the whole
frame costs upscale^2 detector time. `FaceDetector.detect_frame` (video) therefore takes a
second, enlarged look only where a small face is expected: around the predicted boxes of small
tracks that the full-frame pass did not find, and around weak full-frame detections of
small faces (a face that is there scores higher once enlarged; a false one does not).
Each look runs YuNet on a LOOK_INPUT x LOOK_INPUT image: about 16% of the time of a 640x360
frame (4.2 vs 26 ms measured on a loaded 2-core CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from pydantic import ValidationError

from app import paths
from app.config import DetectorConfig
from app.records import Detection

log = logging.getLogger(__name__)

DETECTOR_FILE = "face_detection_yunet_2026may.onnx"
LOOK_INPUT = 160  # side (px) of the detector input of one second look
LOOK_FACE = 40.0  # a small face is enlarged to about this width (px) for its second look
TOP_K = 5000  # most candidate boxes YuNet keeps before non-maximum suppression


def find_detector_model(explicit: str | Path | None = None) -> Path:
    """Locate the YuNet ONNX file.

    Order: `explicit`, env FACEMOE_DETECTOR, models/detector/<file> (app.paths: the home,
    then the shipped copy), then <shared>/models/<file> where <shared> is env FACEMOE_SHARED
    or <repo>/../shared.
    Raises FileNotFoundError (one line, listing the places tried) when none exists.
    """
    if explicit is not None:
        candidates = [Path(explicit).expanduser()]
    elif os.environ.get("FACEMOE_DETECTOR"):
        candidates = [Path(os.environ["FACEMOE_DETECTOR"]).expanduser()]
    else:
        candidates = [
            *paths.candidates(Path("models", "detector", DETECTOR_FILE)),
            paths.shared() / "models" / DETECTOR_FILE,
        ]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"face detector model not found (looked in: {tried})")


def create(cfg: DetectorConfig) -> FaceDetector:
    """The YuNet detector that `cfg` (the app config's `detector` section) describes."""
    return FaceDetector(find_detector_model(cfg.model), cfg)


class FaceDetector:
    """YuNet face detector returning `Detection`s in original image pixels."""

    kind = "yunet"

    def __init__(self, model_path: str | Path, cfg: DetectorConfig | None = None,
                 **settings: object) -> None:
        """`cfg`, with `settings` (fields of `DetectorConfig`) over it, says how it detects;
        what neither gives is the config type's default. `upscale` > 1 enlarges the image
        before detection so that faces below YuNet's ~10 px minimum are found (cost grows
        with upscale^2); coordinates are mapped back. Second looks (see the module
        docstring) go to faces narrower than `small_face` px (0 = never), to weak detections
        scoring at least `weak_score` (1 = none) and to at most `max_looks` places per image.
        """
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"face detector model not found: {path}")
        try:
            cfg = DetectorConfig.model_validate({**(cfg.model_dump() if cfg else {}), **settings})
        except ValidationError as e:  # one line, like the config's own errors
            raise ValueError("; ".join(f"detector.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                       for err in e.errors())) from None
        score_threshold, nms_threshold = cfg.score_threshold, cfg.nms_threshold
        upscale, small_face, weak_score = cfg.upscale, cfg.small_face, cfg.weak_score
        self.model_path = path
        self.score_threshold = score_threshold
        self.upscale = float(upscale)
        self.small_face = float(small_face)
        self.weak_score = min(float(weak_score), score_threshold) if small_face > 0 else (
            score_threshold)
        self.max_looks = cfg.max_looks
        self.looks = 0  # second looks taken so far
        # OpenCV's graph engine warns that it ignores the (default CPU) target YuNet sets:
        # nothing a user can act on, so OpenCV logs only errors while the net is built.
        opencv_level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), self.weak_score, nms_threshold, TOP_K
            )
            self._look_net = cv2.FaceDetectorYN.create(
                str(path), "", (LOOK_INPUT, LOOK_INPUT), self.weak_score, nms_threshold, TOP_K
            ) if small_face > 0 else None
        except cv2.error as exc:
            raise ValueError(f"cannot load face detector {path}: {exc.msg.strip()}") from None
        finally:
            cv2.utils.logging.setLogLevel(opencv_level)
        self._input_size = (320, 320)
        log.debug("loaded %s (score>=%.2f, nms %.2f, upscale %.2f)", path, score_threshold,
                  nms_threshold, upscale)

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        """Faces in a uint8[H, W, 3] BGR image (a still) scoring at least `score_threshold`,
        highest score first."""
        return [d for d in self._frame_pass(image_bgr) if d.score >= self.score_threshold]

    def detect_frame(self, image_bgr: np.ndarray,
                     expected: Sequence[np.ndarray] = ()) -> list[Detection]:
        """Faces in a video frame: `detect`, plus what second looks find at small faces.

        `expected`: xywh boxes where the tracker expects a face. The small ones that the
        full-frame pass did not find get a second look, whose faces are returned from
        `weak_score` on (weaker ones can only extend a track, never start one); small weak
        detections of the full-frame pass get one too, kept from `score_threshold` on.
        """
        found = self._frame_pass(image_bgr)
        strong = [d for d in found if d.score >= self.score_threshold]
        if self._look_net is None:
            return strong
        weak = [d for d in found if d.score < self.score_threshold]
        return self._second_looks(image_bgr, strong, weak, expected)

    def _frame_pass(self, image_bgr: np.ndarray) -> list[Detection]:
        """YuNet on the whole image (enlarged by `upscale`), from `weak_score` on."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
            raise ValueError(f"expected uint8[H, W, 3] BGR image, got {image_bgr.dtype}"
                             f"{list(image_bgr.shape)}")
        image = image_bgr
        if self.upscale != 1.0:
            image = cv2.resize(image_bgr, None, fx=self.upscale, fy=self.upscale,
                               interpolation=cv2.INTER_LINEAR)
        height, width = image.shape[:2]
        if (width, height) != self._input_size:
            self._net.setInputSize((width, height))
            self._input_size = (width, height)
        # Actual scale per axis (resize rounds the output size).
        scale = np.array([image_bgr.shape[1] / width, image_bgr.shape[0] / height], np.float32)
        return _detections(self._net.detect(image)[1], scale, np.zeros(2, np.float32))

    def _second_looks(self, image: np.ndarray, strong: list[Detection], weak: list[Detection],
                      expected: Sequence[np.ndarray]) -> list[Detection]:
        """`strong` plus what enlarged looks find: first around small expected faces that no
        strong detection covers (kept from `weak_score`: the tracker may only extend a track
        with a weak one), then around small weak detections (kept from `score_threshold`)."""
        places = [(np.asarray(b, np.float64), self.weak_score) for b in expected]
        places += [(d.bbox.astype(np.float64), self.score_threshold) for d in weak]
        windows: list[tuple[tuple[float, float, float], float]] = []
        for box, min_score in places:
            if box[2] >= self.small_face or len(windows) == self.max_looks:
                continue
            window = _window(box, image.shape)
            if not any(_inside(d.bbox, window) for d in strong) and not any(
                _inside(box, w) for w, _ in windows
            ):
                windows.append((window, min_score))
        faces = list(strong)
        for (x0, y0, side), min_score in windows:
            crop = image[int(y0): int(y0) + int(side), int(x0): int(x0) + int(side)]
            look = cv2.resize(crop, (LOOK_INPUT, LOOK_INPUT), interpolation=cv2.INTER_LINEAR)
            scale = np.array([crop.shape[1] / LOOK_INPUT, crop.shape[0] / LOOK_INPUT], np.float32)
            offset = np.array([int(x0), int(y0)], np.float32)
            self.looks += 1
            for d in _detections(self._look_net.detect(look)[1], scale, offset):
                if d.score >= min_score and not any(_overlap(d.bbox, f.bbox) > 0.3 for f in faces):
                    faces.append(d)
        return sorted(faces, key=lambda d: -d.score)


def _detections(rows: np.ndarray | None, scale: np.ndarray,
                offset: np.ndarray) -> list[Detection]:
    """YuNet output rows (box, 5 landmarks, score) mapped to image pixels, best first."""
    if rows is None:
        return []
    detections = []
    for row in rows[np.argsort(-rows[:, 14])]:
        bbox = row[:4].reshape(2, 2) * scale
        bbox[0] += offset
        landmarks = row[4:14].reshape(5, 2) * scale + offset
        detections.append(Detection(bbox=bbox.reshape(4).astype(np.float32),
                                    landmarks=landmarks.astype(np.float32),
                                    score=float(row[14])))
    return detections


def _window(box: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float, float]:
    """Square (x0, y0, side) around `box`, sized so that the face becomes LOOK_FACE px wide
    in a LOOK_INPUT input (never shrunk), moved inside the image."""
    side = LOOK_INPUT / max(LOOK_FACE / max(float(box[2]), 1.0), 1.0)
    side = min(side, shape[0], shape[1])
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    x0 = min(max(cx - side / 2, 0.0), shape[1] - side)
    y0 = min(max(cy - side / 2, 0.0), shape[0] - side)
    return x0, y0, side


def _inside(box: np.ndarray, window: tuple[float, float, float]) -> bool:
    """Whether the centre of xywh `box` lies in the square `window`."""
    x0, y0, side = window
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return bool(x0 <= cx <= x0 + side and y0 <= cy <= y0 + side)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xywh boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0
