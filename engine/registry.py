"""The names of the runtime backends and the module that implements each: the one list the
config, the CLI and `engine.backends.load_backend` read. Importing it loads no runtime (the
CLI's gallery commands read the config without ONNX Runtime, torch or TensorRT)."""

from __future__ import annotations

from typing import Any

BACKEND_MODULES = {
    "onnxruntime": "engine.backends.ort",
    "torch": "engine.backends.torch_backend",
    "tensorrt": "engine.backends.tensorrt",
}
BACKENDS = ("auto", *BACKEND_MODULES)  # "auto": TensorRT when an engine fits, else ONNX Runtime
_THREADED = ("auto", "onnxruntime", "torch")  # the backends that run on CPU threads


def thread_options(name: str, threads: int) -> dict[str, Any]:
    """The options that set backend `name`'s CPU threads (0 = all cores): none for a GPU one."""
    return {"threads": threads} if name in _THREADED else {}
