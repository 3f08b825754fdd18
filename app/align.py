"""5-point similarity alignment onto the crop template a model declares.

A `CropTemplate` is a crop size and the 5 target points (right eye, left eye, nose tip, right
mouth corner, left mouth corner: image-left eye first). The model's manifest declares its own
(`crop_template`); artifacts that declare none use the ArcFace 112x112 template.

Crops the product keeps for later re-embedding (enrollment templates, event crops) are cut once
in `STORE`, a wider canonical geometry (the ArcFace template scaled by 1.5 and shifted into a
192x192 crop) that contains every supported model's template, so any model can re-cut them
(`recut`) without running out of face: dlib's 150 chip reaches below the ArcFace crop's chin.
"""

from __future__ import annotations

import cv2
import numpy as np

from trainer.preprocess import ARCFACE_112, CROP_SIZE, TEMPLATE, CropTemplate, template_points

# The canonical stored geometry: ArcFace coordinates (x + 8, y) * 1.5 in a 192x192 crop, which
# holds the ArcFace crop (x 12-180, y 0-168) and dlib's 150 chip (x 19-175, y 31-188) at a finer
# sampling than either (1.5 px per ArcFace unit; dlib's chip has 1.44), so re-cutting loses little.
STORE = CropTemplate(192, template_points((TEMPLATE + np.float32([8.0, 0.0])) * 1.5))


def similarity_transform(landmarks: np.ndarray, template: CropTemplate = ARCFACE_112) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) from landmarks to the template.

    Umeyama's closed form, so the result does not depend on a random sampler.
    Returns a float64[2, 3] affine matrix for `cv2.warpAffine`.
    """
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    dst = template.array
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


def align_face(
    image: np.ndarray, landmarks: np.ndarray, template: CropTemplate = ARCFACE_112
) -> np.ndarray:
    """Warp `image` (uint8[H, W, 3]) so the 5 landmarks land on `template`;
    uint8[size, size, 3] out."""
    m = similarity_transform(landmarks, template)
    size = template.size
    return cv2.warpAffine(
        image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def stored_geometry(crop: np.ndarray) -> CropTemplate:
    """The geometry of a kept crop: `STORE`, or ArcFace 112 for crops kept by releases <= 0.2."""
    h, w = crop.shape[:2]
    if (h, w) == (STORE.size, STORE.size):
        return STORE
    if (h, w) == (CROP_SIZE, CROP_SIZE):
        return ARCFACE_112
    raise ValueError(f"a kept face crop must be {STORE.size}x{STORE.size} or 112x112, got {w}x{h}")


def recut(crop: np.ndarray, template: CropTemplate) -> np.ndarray:
    """Re-cut a kept crop (its landmarks are its geometry's template points) onto `template`."""
    source = stored_geometry(crop)
    if source == template:
        return crop
    return align_face(crop, source.array, template)


def degrade_to(crop: np.ndarray, face_px: int) -> np.ndarray:
    """A `STORE` crop whose face has the resolution of a `face_px` x `face_px` ArcFace crop:
    downsampled (INTER_AREA) and upsampled back (INTER_CUBIC) to its own size."""
    source = stored_geometry(crop)
    # the crop spans size / scale ArcFace units (scale: its pixels per ArcFace-112 pixel);
    # keep face_px / 112 pixels per unit
    scale = float(np.linalg.norm(similarity_transform(ARCFACE_112.array, source)[:, 0]))
    small = max(1, round(face_px * source.size / (CROP_SIZE * scale)))
    down = cv2.resize(crop, (small, small), interpolation=cv2.INTER_AREA)
    return cv2.resize(down, (source.size, source.size), interpolation=cv2.INTER_CUBIC)
