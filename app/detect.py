"""Face detection with YuNet through `cv2.FaceDetectorYN` (boxes, 5 landmarks, score)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from app.records import Detection

log = logging.getLogger(__name__)

DETECTOR_FILE = "face_detection_yunet_2026may.onnx"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def find_detector_model(explicit: str | Path | None = None) -> Path:
    """Locate the YuNet ONNX file.

    Order: `explicit`, env FACEMOE_DETECTOR, <repo>/models/detector/<file>, then
    <shared>/models/<file> where <shared> is env FACEMOE_SHARED or <repo>/../shared.
    Raises FileNotFoundError (one line, listing the places tried) when none exists.
    """
    if explicit is not None:
        candidates = [Path(explicit).expanduser()]
    elif os.environ.get("FACEMOE_DETECTOR"):
        candidates = [Path(os.environ["FACEMOE_DETECTOR"]).expanduser()]
    else:
        shared = Path(os.environ.get("FACEMOE_SHARED") or _REPO_ROOT.parent / "shared")
        candidates = [
            _REPO_ROOT / "models" / "detector" / DETECTOR_FILE,
            shared / "models" / DETECTOR_FILE,
        ]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"face detector model not found (looked in: {tried})")


class FaceDetector:
    """YuNet face detector returning `Detection`s in original image pixels."""

    def __init__(self, model_path: str | Path, score_threshold: float = 0.6,
                 nms_threshold: float = 0.3, top_k: int = 5000, upscale: float = 1.0) -> None:
        """`upscale` > 1 enlarges the image before detection so that faces below YuNet's
        ~10 px minimum are found (cost grows with upscale^2); coordinates are mapped back.
        """
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"face detector model not found: {path}")
        if upscale < 1.0:
            raise ValueError(f"upscale must be >= 1, got {upscale}")
        self.model_path = path
        self.score_threshold = score_threshold
        self.upscale = float(upscale)
        # OpenCV's graph engine warns that it ignores the (default CPU) target YuNet sets:
        # nothing a user can act on, so OpenCV logs only errors while the net is built.
        opencv_level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), score_threshold, nms_threshold, top_k
            )
        except cv2.error as exc:
            raise ValueError(f"cannot load face detector {path}: {exc.msg.strip()}") from None
        finally:
            cv2.utils.logging.setLogLevel(opencv_level)
        self._input_size = (320, 320)
        log.debug("loaded %s (score>=%.2f, nms %.2f, upscale %.2f)", path, score_threshold,
                  nms_threshold, upscale)

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        """Faces in a uint8[H, W, 3] BGR image, highest score first."""
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
        _, faces = self._net.detect(image)
        if faces is None:
            return []
        # Actual scale per axis (resize rounds the output size).
        scale = np.array([image_bgr.shape[1] / width, image_bgr.shape[0] / height], np.float32)
        detections = []
        for row in faces[np.argsort(-faces[:, 14])]:
            bbox = (row[:4].reshape(2, 2) * scale).reshape(4).astype(np.float32)
            landmarks = (row[4:14].reshape(5, 2) * scale).astype(np.float32)
            detections.append(Detection(bbox=bbox, landmarks=landmarks, score=float(row[14])))
        return detections
