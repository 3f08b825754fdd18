"""PyTorch backend (CPU or CUDA); on CUDA the MoE layers use the sparse dispatch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.backends import BackendError, check_output
from trainer.artifact import load_model


class TorchBackend:
    name = "torch"

    def __init__(
        self, model_dir: Path, device: str = "auto", half: bool = False, threads: int = 0
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA requested but no CUDA GPU is available")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        dispatch = "sparse" if self.device.type == "cuda" else "dense"
        self.model, self.manifest = load_model(model_dir, dispatch=dispatch)
        self.model.to(self.device)
        self.dtype = torch.float16 if half and self.device.type == "cuda" else torch.float32
        self.model.to(self.dtype)
        self.input_size = int(self.manifest["input_size"])
        self.dim = int(self.manifest["embedding_dim"])

    @torch.inference_mode()
    def embed(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(
            self.device, self.dtype
        )
        out = F.normalize(self.model(x).float(), dim=-1).cpu().numpy()
        return check_output(out, len(batch), self.dim)


def create(model_dir: Path, **options: Any) -> TorchBackend:
    return TorchBackend(model_dir, **options)
