"""The crop-to-tensor contract (DESIGN.md): BGR uint8 aligned crops -> RGB float32 NCHW."""

from __future__ import annotations

import cv2
import numpy as np

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def to_input(crops: np.ndarray, input_size: int = 112, mean=MEAN, std=STD) -> np.ndarray:
    """uint8[N, H, W, 3] BGR -> float32[N, 3, S, S] RGB, (x / 255 - mean) / std.

    Crops are resized (bicubic) when the model's input size differs from theirs.
    """
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.shape[1] != input_size or crops.shape[2] != input_size:
        crops = np.stack(
            [cv2.resize(c, (input_size, input_size), interpolation=cv2.INTER_CUBIC) for c in crops]
        )
    x = crops[..., ::-1].astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
