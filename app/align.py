"""5-point similarity alignment to the ArcFace 112x112 template (DESIGN.md crop contract)."""

from __future__ import annotations

import cv2
import numpy as np

CROP_SIZE = 112
# Right eye, left eye, nose tip, right mouth corner, left mouth corner (image-left eye first).
TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def similarity_transform(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) from landmarks to the template.

    Umeyama's closed form, so the result does not depend on a random sampler.
    Returns a float64[2, 3] affine matrix for `cv2.warpAffine`.
    """
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    dst = TEMPLATE.astype(np.float64) * (size / CROP_SIZE)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1, 1] = -1
    rot = u @ d @ vt
    var = (src_c**2).sum() / len(src)
    scale = (s * np.diag(d)).sum() / var if var > 0 else 1.0
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * rot @ src_mean
    return m


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Warp `image` (uint8[H, W, 3]) so the 5 landmarks land on the template; uint8[size, size, 3]
    out."""
    m = similarity_transform(landmarks, size)
    return cv2.warpAffine(
        image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
