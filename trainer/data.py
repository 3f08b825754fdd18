"""Training data held in memory as aligned uint8 crops plus labels and optional teacher targets.

Sources: the teacher-pool .npz made by `facemoe data prepare --teacher`, a folder of aligned
crops (one sub-folder per identity), or a list file of `path label` lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from trainer.media import IMAGE_SUFFIXES


@dataclass
class FaceSet:
    """crops uint8[N,112,112,3] BGR; labels int64[N] (-1: unlabelled);
    teacher float32[N,Dt] or None."""

    crops: np.ndarray
    labels: np.ndarray
    teacher: np.ndarray | None
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.crops)

    def subset(self, idx: np.ndarray) -> FaceSet:
        t = None if self.teacher is None else self.teacher[idx]
        return FaceSet(self.crops[idx], self.labels[idx], t, self.label_names)


def centred_targets(
    teacher: np.ndarray, mean: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the training mean and renormalise.

    Raw dlib descriptors share one dominant direction; cosine distillation to them collapses
    the student onto it. Re-centring keeps only what tells faces apart.
    """
    mean = teacher.mean(0) if mean is None else mean
    c = teacher - mean
    return (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32), mean.astype(
        np.float32
    )


def load_pool(path: str | Path) -> FaceSet:
    d = np.load(path)
    return FaceSet(
        d["crops"],
        d["labels"].astype(np.int64),
        d["teacher"].astype(np.float32),
        [str(n) for n in d["label_names"]],
    )


def _read_crop(path: Path, size: int = 112) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {path}")
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


def _from_items(items: list[tuple[Path, str]]) -> FaceSet:
    if not items:
        raise FileNotFoundError("no images found for the dataset")
    names = sorted({n for _, n in items})
    index = {n: i for i, n in enumerate(names)}
    crops = np.stack([_read_crop(p) for p, _ in items])
    labels = np.array([index[n] for _, n in items], np.int64)
    return FaceSet(crops, labels, None, names)


def load_image_folder(root: str | Path) -> FaceSet:
    """root/<identity>/<image>: aligned 112x112 crops (other sizes are resized)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such dataset folder: {root}")
    items = [
        (p, p.parent.name) for p in sorted(root.glob("*/*")) if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return _from_items(items)


def load_list_file(path: str | Path) -> FaceSet:
    """Lines of `image_path label`; relative paths are relative to the list file."""
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'image_path label'")
        p = Path(parts[0])
        items.append((p if p.is_absolute() else path.parent / p, parts[1]))
    return _from_items(items)


def concat(sets: list[FaceSet]) -> FaceSet:
    """Join datasets; labels are offset so identities of different sets never merge."""
    crops, labels, teachers, names = [], [], [], []
    dim = next((s.teacher.shape[1] for s in sets if s.teacher is not None), None)
    for s in sets:
        offset = len(names)
        labels.append(np.where(s.labels >= 0, s.labels + offset, -1))
        names.extend(s.label_names)
        crops.append(s.crops)
        if dim is not None:
            t = s.teacher if s.teacher is not None else np.full((len(s), dim), np.nan, np.float32)
            teachers.append(t)
    return FaceSet(
        np.concatenate(crops),
        np.concatenate(labels),
        np.concatenate(teachers) if dim is not None else None,
        names,
    )


def teacher_targets_from_onnx(
    onnx_path: str | Path, crops: np.ndarray, batch: int = 64
) -> np.ndarray:
    """Embeddings of clean crops by a teacher ONNX export (its manifest: input size, mean, std)."""
    import onnxruntime as ort

    from trainer.manifest import manifest_from_metadata
    from trainer.preprocess import to_input

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    m = manifest_from_metadata(session.get_modelmeta().custom_metadata_map, onnx_path)
    name = session.get_inputs()[0].name
    out = [
        session.run(
            None, {name: to_input(crops[i : i + batch], m["input_size"], m["mean"], m["std"])}
        )[0]
        for i in range(0, len(crops), batch)
    ]
    return np.concatenate(out).astype(np.float32)
