"""PyTorch backend (CPU or CUDA).

MoE dispatch (`moe_dispatch`): `auto` picks `triton` (the fused Triton routing op, k of N
experts per token, no host sync) on CUDA when triton imports, else `sparse` on CUDA, and
`dense` on CPU; it logs which. `dense`, `sparse` or `triton` force one (a GPU benchmark
compares them this way).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.backends import BackendError, check_output
from trainer.artifact import load_model
from trainer.models.moe import DISPATCHES

log = logging.getLogger(__name__)
MOE_DISPATCHES = ("auto", *DISPATCHES)


def triton_available() -> str | None:
    """None if the Triton routing op imports here, else why not (one line)."""
    try:
        import engine.ops.triton_moe  # noqa: F401
    except Exception as e:  # ImportError, or a triton that fails to initialise
        return f"{type(e).__name__}: {e}"
    return None


def choose_dispatch(device: torch.device, requested: str = "auto") -> str:
    """The MoE dispatch for `device`; raises BackendError for one that cannot run there."""
    if requested not in MOE_DISPATCHES:
        raise BackendError(
            f"unknown MoE dispatch {requested!r}; expected one of {', '.join(MOE_DISPATCHES)}"
        )
    if requested == "triton":
        if device.type != "cuda":
            raise BackendError("torch backend: MoE dispatch triton needs a CUDA device")
        why = triton_available()
        if why:
            raise BackendError(f"torch backend: MoE dispatch triton unavailable ({why})")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        log.info("torch backend: MoE dispatch dense (CPU)")
        return "dense"
    why = triton_available()
    if why is None:
        log.info("torch backend: MoE dispatch triton (fused Triton routing op)")
        return "triton"
    log.info("torch backend: MoE dispatch sparse (triton unavailable: %s)", why)
    return "sparse"


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        half: bool = False,
        threads: int = 0,
        moe_dispatch: str = "auto",
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA requested but no CUDA GPU is available")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.moe_dispatch = choose_dispatch(self.device, moe_dispatch)
        self.model, self.manifest = load_model(model_dir, dispatch=self.moe_dispatch)
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
