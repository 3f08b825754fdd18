"""Per-face quality from the detection and its aligned crop (size, blur, pose, detector score)."""

from __future__ import annotations

import cv2
import numpy as np

from app.align import ARCFACE_112, recut
from app.records import Detection, Quality

# Exposure: the face's inner region (eyes to mouth on the ArcFace crop) must be bright and
# varied enough to carry identity; a near-black or flat patch (a face in the dark, a blob the
# detector took for a face) scores 0. Grey means below DARK and contrast (std) below FLAT
# give 0, and both saturate FULL_* above them.
DARK, FULL_BRIGHT = 12.0, 40.0
FLAT, FULL_CONTRAST = 4.0, 16.0
IOD_SATURATION = 40.0  # px of inter-ocular distance at which size stops adding quality
BLUR_SCALE = 50.0  # Laplacian variance scale; sharp 112 px crops score ~100-300, blurred < 20
# Nose height between the eye line and the mouth line on the ArcFace template (ARCFACE_112):
# (71.7366 - 51.60) / (92.30 - 51.60).
_NOSE_RATIO = 0.495


def pose_frontalness(landmarks: np.ndarray) -> float:
    """Frontalness in [0, 1] from 5 landmarks (1 = frontal).

    yaw   = |offset of the nose from the eye midpoint along the eye line| / (IOD / 2)
            (0 frontal, 1 when the nose is in front of an eye, i.e. near profile);
    pitch = |r - 0.495| / 0.495 with r = nose height / mouth height below the eye line
            (0.495 on the frontal template);
    pose  = clip(1 - yaw, 0, 1) * clip(1 - pitch, 0, 1). In-plane roll does not count:
    alignment removes it.
    """
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    right_eye, left_eye, nose = pts[0], pts[1], pts[2]
    eye_mid = (right_eye + left_eye) / 2
    eye_vec = left_eye - right_eye
    iod = float(np.linalg.norm(eye_vec))
    if iod < 1e-6:
        return 0.0
    along = eye_vec / iod
    down = np.array([-along[1], along[0]])  # perpendicular, pointing from eyes to mouth
    mouth_mid = (pts[3] + pts[4]) / 2
    mouth_h = float((mouth_mid - eye_mid) @ down)
    if mouth_h <= 1e-6:
        return 0.0
    yaw = abs(float((nose - eye_mid) @ along)) / (iod / 2)
    pitch = abs(float((nose - eye_mid) @ down) / mouth_h - _NOSE_RATIO) / _NOSE_RATIO
    return float(np.clip(1.0 - yaw, 0.0, 1.0) * np.clip(1.0 - pitch, 0.0, 1.0))


def exposure(grey: np.ndarray) -> float:
    """Exposure in [0, 1] of a grey ArcFace-112 crop, from its inner face region."""
    inner = grey[40:100, 30:82].astype(np.float32)  # eyes, nose, mouth on the template
    bright = (float(inner.mean()) - DARK) / (FULL_BRIGHT - DARK)
    contrast = (float(inner.std()) - FLAT) / (FULL_CONTRAST - FLAT)
    return float(np.clip(bright, 0.0, 1.0) * np.clip(contrast, 0.0, 1.0))


def score_quality(det: Detection, crop: np.ndarray) -> Quality:
    """Quality of one face: `det` in source pixels, `crop` its aligned BGR crop (kept
    192x192 `STORE` geometry, or the 112x112 ArcFace crop).

    size  = inter-ocular distance (IOD) in source pixels;
    blur  = variance of the Laplacian of the grey crop (higher = sharper);
    pose  = `pose_frontalness(det.landmarks)`;
    exposure = `exposure(grey crop)`;
    score = min(1, size / 40) * (1 - exp(-blur / 50)) * pose * det.score * exposure, in [0, 1].
    Each factor saturates or is bounded by 1, so the product ranks crops of one track.
    """
    landmarks = np.asarray(det.landmarks, dtype=np.float64).reshape(5, 2)
    size = float(np.linalg.norm(landmarks[1] - landmarks[0]))
    crop = recut(crop, ARCFACE_112)  # blur is measured at the ArcFace crop's scale
    grey = crop if crop.ndim == 2 else cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    blur = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    pose = pose_frontalness(landmarks)
    det_score = float(np.clip(det.score, 0.0, 1.0))
    lit = exposure(grey)
    score = (min(1.0, size / IOD_SATURATION) * (1.0 - np.exp(-blur / BLUR_SCALE)) * pose
             * det_score * lit)
    return Quality(score=float(score), size=size, blur=blur, pose=pose, det_score=det_score,
                   exposure=lit)
