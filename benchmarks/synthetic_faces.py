"""Synthetic low-resolution clips: real faces (../shared/data/celeba299) drifting across a frame.

Used by the small-face tests (tests/test_track.py) and benchmarks/small_faces.py. Each face is
a CelebA photo cut around its YuNet box, scaled so that the box is `size` px wide, and pasted
with a soft elliptical edge onto a textured background at a sub-pixel position; the frame is
then blurred, given sensor noise and JPEG-compressed (a low-bitrate camera). The ground truth
is the face's box in every frame where the face is fully inside the frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CONTEXT = 1.8  # sprite side in face-box widths: the face plus some hair and background


@dataclass(frozen=True)
class Sprite:
    """A face photo cut around its face box: image uint8[S, S, 3] BGR, box float32[4] xywh."""

    image: np.ndarray
    box: np.ndarray


@dataclass(frozen=True)
class Walk:
    """One face moving in a straight line: box width `size` px, top-left `start`, px/frame."""

    sprite: Sprite
    size: float
    start: tuple[float, float]
    velocity: tuple[float, float]
    first: int = 0  # first frame the face is drawn
    last: int | None = None  # last frame it is drawn (None: to the end)

    def box(self, frame: int) -> np.ndarray:
        """Face box (xywh) in frame `frame`."""
        t = frame - self.first
        scale = self.size / float(self.sprite.box[2])
        x = self.start[0] + self.velocity[0] * t
        y = self.start[1] + self.velocity[1] * t
        return np.array([x, y, self.size, self.sprite.box[3] * scale])

    def drawn(self, frame: int) -> bool:
        return self.first <= frame and (self.last is None or frame <= self.last)


@dataclass(frozen=True)
class Degrade:
    """What the camera does to the picture: blur sigma (px), noise std (grey levels), JPEG q."""

    blur: float = 1.2
    noise: float = 8.0
    jpeg_quality: int = 20
    shutter: float = 1.0  # exposure in frame times: a face moving v px/frame smears v*shutter px


def load_sprites(data_dir: Path, count: int, seed: int = 0) -> list[Sprite]:
    """`count` single-face CelebA photos (face box >= 60 px, YuNet score >= 0.9), cut square."""
    teacher = np.load(data_dir / "teacher" / "dlib_resnet_v1.npz")
    paths, boxes = teacher["paths"], teacher["boxes"]
    good = [
        i for i, p in enumerate(paths)
        if str(p).startswith("celeba299/") and teacher["n_faces"][i] == 1
        and boxes[i][2] >= 60 and teacher["det_scores"][i] >= 0.9
    ]
    rng = np.random.default_rng(seed)
    sprites = []
    for i in rng.permutation(good)[:count]:
        image = cv2.imread(str(data_dir / str(paths[i])), cv2.IMREAD_COLOR)
        x, y, w, h = (float(v) for v in boxes[i])
        side = int(round(CONTEXT * max(w, h)))
        cx, cy = x + w / 2, y + h / 2
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        pad = side
        padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        crop = padded[y0 + pad: y0 + pad + side, x0 + pad: x0 + pad + side].copy()
        sprites.append(Sprite(crop, np.array([x - x0, y - y0, w, h], np.float32)))
    return sprites


def background(size: tuple[int, int], seed: int) -> np.ndarray:
    """A textured, face-free backdrop: smooth colour blobs plus fine grain, uint8[H, W, 3]."""
    width, height = size
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 200, (height // 40 + 2, width // 40 + 2, 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image += cv2.GaussianBlur(rng.normal(0, 12, (height, width, 3)).astype(np.float32), (0, 0), 2)
    return np.clip(image, 0, 255).astype(np.uint8)


def _paste(frame: np.ndarray, sprite: Sprite, box: np.ndarray, smear: np.ndarray) -> None:
    """Draw `sprite` so that its face box lands on `box` (sub-pixel), with a soft oval edge,
    smeared along the motion `smear` (px, x and y) as by a camera shutter."""
    scale = box[2] / sprite.box[2]
    tx, ty = box[0] - sprite.box[0] * scale, box[1] - sprite.box[1] * scale
    side = sprite.image.shape[0]
    x0, y0 = max(int(np.floor(tx)), 0), max(int(np.floor(ty)), 0)
    x1 = min(int(np.ceil(tx + side * scale)) + 1, frame.shape[1])
    y1 = min(int(np.ceil(ty + side * scale)) + 1, frame.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    m = np.array([[scale, 0, tx - x0], [0, scale, ty - y0]], np.float32)
    mask = np.zeros((side, side), np.float32)
    cv2.ellipse(mask, (side // 2, side // 2), (int(side * 0.42), int(side * 0.48)), 0, 0, 360,
                1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), side * 0.04)
    face = cv2.warpAffine(sprite.image, m, (x1 - x0, y1 - y0), flags=cv2.INTER_AREA)
    alpha = cv2.warpAffine(mask, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)
    length = float(np.hypot(*smear))
    if length >= 1.0:
        kernel = np.zeros((int(np.ceil(length)) * 2 + 1,) * 2, np.float32)
        c = kernel.shape[0] // 2
        cv2.line(kernel, (int(round(c - smear[0] / 2)), int(round(c - smear[1] / 2))),
                 (int(round(c + smear[0] / 2)), int(round(c + smear[1] / 2))), 1.0, 1)
        kernel /= kernel.sum()
        face = cv2.filter2D(face, -1, kernel)
        alpha = cv2.filter2D(alpha, -1, kernel)
    alpha = alpha[..., None]
    region = frame[y0:y1, x0:x1].astype(np.float32)
    frame[y0:y1, x0:x1] = (region * (1 - alpha) + face * alpha).astype(np.uint8)


def render(walks: list[Walk], frames: int, size: tuple[int, int] = (640, 360), seed: int = 0,
           degrade: Degrade | None = None, cut_at: int | None = None) -> Iterator[np.ndarray]:
    """The clip's frames (uint8[H, W, 3] BGR). `cut_at`: the backdrop changes there (a cut)."""
    degrade = degrade or Degrade()
    rng = np.random.default_rng(seed + 1)
    backdrops = [background(size, seed), background(size, seed + 1000)]
    for index in range(frames):
        frame = backdrops[int(cut_at is not None and index >= cut_at)].copy()
        for walk in walks:
            if walk.drawn(index):
                _paste(frame, walk.sprite, walk.box(index),
                       np.array(walk.velocity) * degrade.shutter)
        if degrade.blur > 0:
            frame = cv2.GaussianBlur(frame, (0, 0), degrade.blur)
        if degrade.noise > 0:
            noisy = frame.astype(np.float32) + rng.normal(0, degrade.noise, frame.shape)
            frame = np.clip(noisy, 0, 255).astype(np.uint8)
        if degrade.jpeg_quality < 100:
            ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY,
                                                    degrade.jpeg_quality])
            frame = cv2.imdecode(data, cv2.IMREAD_COLOR)
        yield frame


def visible(walk: Walk, frame: int, size: tuple[int, int] = (640, 360)) -> bool:
    """Whether the face box is drawn and fully inside the frame."""
    x, y, w, h = walk.box(frame)
    return walk.drawn(frame) and x >= 0 and y >= 0 and x + w <= size[0] and y + h <= size[1]
