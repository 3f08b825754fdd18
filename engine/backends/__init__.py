"""Runtime backends behind one protocol:
`embed(float32[N,3,H,W]) -> float32[N,D]` (L2-normalised; D is the manifest's embedding_dim).

Backends register by name; `load_backend(model_dir, "auto")` picks TensorRT when an engine and
a supported GPU are present, otherwise ONNX Runtime, and logs which it chose.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.registry import BACKEND_MODULES, BACKENDS, thread_options

__all__ = ["BACKENDS", "Backend", "BackendError", "check_output", "load_backend",
           "thread_options"]

log = logging.getLogger(__name__)

class BackendError(Exception):
    """A backend that cannot run here; the message says why in one line."""

class Backend(Protocol):
    name: str
    manifest: dict[str, Any]
    input_size: int

    def embed(self, batch: np.ndarray) -> np.ndarray: ...

def _load(name: str, model_dir: Path, **options: Any) -> Backend:
    if name not in BACKEND_MODULES:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ImportError as e:
        raise BackendError(f"backend {name} is not installed ({e.name or e})") from e
    return module.create(model_dir, **options)

def load_backend(model_dir: str | Path, name: str = "auto", **options: Any) -> Backend:
    model_dir = Path(model_dir)
    if not (model_dir / "manifest.json").is_file():
        raise BackendError(f"not a model directory (no manifest.json): {model_dir}")
    if name != "auto":
        return _load(name, model_dir, **options)
    # Look for an engine before importing TensorRT: its libraries are large and only useful then.
    engine = model_dir / "engine" / "engine.plan"
    backend = None
    if engine.is_file():
        try:
            backend = _load("tensorrt", model_dir)
        except BackendError as e:
            log.info("backend auto: not TensorRT (%s)", e)
    else:
        log.debug("backend auto: no TensorRT engine at %s", engine)
    if backend is None:
        backend = _load("onnxruntime", model_dir, **options)
    log.info("backend auto: chose %s", backend.name)
    return backend

def check_output(out: np.ndarray, n: int, dim: int) -> np.ndarray:
    if out.shape != (n, dim):
        raise BackendError(f"backend returned shape {out.shape}, expected {(n, dim)}")
    return np.ascontiguousarray(out, dtype=np.float32)
