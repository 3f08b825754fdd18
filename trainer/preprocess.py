"""The crop-to-tensor contract: BGR uint8 aligned crops -> RGB float32 NCHW."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

CROP_SIZE = 112
# The ArcFace 112x112 template (the default for artifacts that declare none).
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


@dataclass(frozen=True)
class CropTemplate:
    """Where the 5 landmarks land in a `size` x `size` aligned crop."""

    size: int
    points: tuple[tuple[float, float], ...]

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float64)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> CropTemplate:
        spec = manifest.get("crop_template")
        if spec is None:
            return ARCFACE_112
        try:
            size, points = int(spec["size"]), tuple(
                (float(x), float(y)) for x, y in spec["points"]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"manifest crop_template is malformed: {spec!r}") from e
        if len(points) != 5 or not 16 <= size <= 1024:
            raise ValueError(f"manifest crop_template needs 5 points and a size, got {spec!r}")
        return cls(size, points)

    def to_manifest(self) -> dict[str, Any]:
        return {"size": self.size, "points": [list(p) for p in self.points]}


def template_points(a: np.ndarray) -> tuple[tuple[float, float], ...]:
    return tuple((round(float(x), 4), round(float(y), 4)) for x, y in np.asarray(a).reshape(5, 2))


ARCFACE_112 = CropTemplate(CROP_SIZE, template_points(TEMPLATE))


def to_input(
    crops: np.ndarray, input_size: int = 112, mean=MEAN, std=STD, rgb: bool = True
) -> np.ndarray:
    """uint8[N, H, W, 3] BGR -> float32[N, 3, S, S] RGB (BGR if not `rgb`), (x / 255 - mean) / std.

    Crops are resized (bicubic) when the model's input size differs from theirs.
    """
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.shape[1] != input_size or crops.shape[2] != input_size:
        crops = np.stack(
            [cv2.resize(c, (input_size, input_size), interpolation=cv2.INTER_CUBIC) for c in crops]
        )
    x = (crops[..., ::-1] if rgb else crops).astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
