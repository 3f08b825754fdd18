"""Low-resolution degradations for training (on aligned uint8 BGR crops).

Each degradation fires with its own probability; the low-resolution one mimics the
evaluation protocol (INTER_AREA down to s x s, back up with a bicubic or bilinear resize).
"""

from __future__ import annotations

import cv2
import numpy as np

from trainer.config import AugmentConfig  # the section of the trainer config


def downscale(img: np.ndarray, size: int, up: int = cv2.INTER_CUBIC) -> np.ndarray:
    """Down to size x size with INTER_AREA and back to the original size."""
    h, w = img.shape[:2]
    small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=up)


def motion_blur(img: np.ndarray, length: int, angle: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), angle, 1.0)
    k = cv2.warpAffine(k, rot, (length, length))
    return cv2.filter2D(img, -1, k / max(k.sum(), 1e-6))


def degrade(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Apply the configured random degradations to one crop (uint8 HxWx3 in, same out)."""
    out = img
    if rng.random() < cfg.p_flip:
        out = out[:, ::-1]
    if rng.random() < cfg.p_blur:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(*cfg.blur_sigma))
    if rng.random() < cfg.p_motion:
        length = int(rng.integers(cfg.motion_len[0], cfg.motion_len[1] + 1))
        out = motion_blur(out, length, rng.uniform(0, 180))
    if rng.random() < cfg.p_lowres:
        # log-uniform: very low resolutions are as frequent as moderate ones
        size = int(round(np.exp(rng.uniform(np.log(cfg.lowres_min), np.log(cfg.lowres_max)))))
        up = cv2.INTER_CUBIC if rng.random() < 0.7 else cv2.INTER_LINEAR
        out = downscale(out, size, up)
    if rng.random() < cfg.p_noise:
        noise = rng.normal(0, rng.uniform(*cfg.noise_sigma), out.shape)
        out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if rng.random() < cfg.p_jpeg:
        q = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(out), [cv2.IMWRITE_JPEG_QUALITY, q])
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else out
    return np.ascontiguousarray(out)
