"""Runtime backends behind one protocol:
`embed(float32[N,3,H,W]) -> float32[N,512]` (L2-normalised).

Backends register by name; `load_backend(model_dir, "auto")` picks TensorRT when an engine and
a supported GPU are present, otherwise ONNX Runtime, and logs which it chose.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


class BackendError(Exception):
    """A backend that cannot run here; the message says why in one line."""


class Backend(Protocol):
    name: str
    manifest: dict[str, Any]
    input_size: int

    def embed(self, batch: np.ndarray) -> np.ndarray: ...


_MODULES = {
    "onnxruntime": "engine.backends.ort",
    "torch": "engine.backends.torch_backend",
    "tensorrt": "engine.backends.tensorrt",
}
BACKENDS = ("auto", *_MODULES)  # the names a config, the CLI and `load_backend` accept
_THREADED = ("auto", "onnxruntime", "torch")  # the backends that run on CPU threads


def thread_options(name: str, threads: int) -> dict[str, Any]:
    """The options that set backend `name`'s CPU threads (0 = all cores): none for a GPU one."""
    return {"threads": threads} if name in _THREADED else {}


def _load(name: str, model_dir: Path, **options: Any) -> Backend:
    if name not in _MODULES:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(_MODULES[name])
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
