"""Batched embedding of aligned crops through an engine backend."""

from __future__ import annotations

import logging

import numpy as np

from app.align import recut
from engine.backends import Backend, load_backend, thread_options
from trainer.manifest import model_id
from trainer.preprocess import CropTemplate, to_input

log = logging.getLogger(__name__)


class Embedder:
    """Aligned uint8 BGR crops -> float32[N, D] L2-normalised embeddings, `batch_size` at a time."""

    def __init__(self, backend: Backend, batch_size: int = 32) -> None:
        self.backend = backend
        self.batch_size = batch_size
        m = backend.manifest
        self.input_size = int(m["input_size"])
        self.mean, self.std = tuple(m["mean"]), tuple(m["std"])
        if m.get("colour", "RGB") not in ("RGB", "BGR"):
            raise ValueError(f"model expects colour order {m['colour']}; RGB or BGR are supported")
        self.rgb = m.get("colour", "RGB") == "RGB"
        self.dim = int(m["embedding_dim"])
        self.template = CropTemplate.from_manifest(m)  # where the aligner puts the landmarks
        self.model_name, self.model_version = model_id(m)
        self.crops_embedded = 0

    @classmethod
    def from_config(
        cls, model_dir: str, backend: str = "auto", threads: int = 0, batch_size: int = 32
    ) -> Embedder:
        return cls(load_backend(model_dir, backend, **thread_options(backend, threads)),
                   batch_size)

    @property
    def model(self) -> str:
        return f"{self.model_name}@{self.model_version}"

    @property
    def recommended_threshold(self) -> float | None:
        t = self.backend.manifest.get("metrics", {}).get("recommended_threshold")
        return None if t is None else float(t)

    def embed_kept(self, crops: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Embed kept crops (`app.align.STORE`, or 112 ArcFace crops of older releases),
        re-cut onto this model's template first."""
        return self.embed([recut(c, self.template) for c in crops])

    def embed(self, crops: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Embed crops aligned to `self.template`."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for i in range(0, len(crops), self.batch_size):
            x = to_input(
                np.stack(crops[i : i + self.batch_size]), self.input_size, self.mean, self.std,
                rgb=self.rgb,
            )
            out.append(self.backend.embed(x))
        self.crops_embedded += len(crops)
        return np.concatenate(out)
