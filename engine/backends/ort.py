"""ONNX Runtime backend (CPU default) over the standard-ops export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.backends import BackendError, check_output
from engine.manifest import read_manifest


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, model_dir: Path, threads: int = 0, providers: list[str] | None = None
    ) -> None:
        self.manifest = read_manifest(model_dir)
        self.input_size = int(self.manifest["input_size"])
        self.dim = int(self.manifest["embedding_dim"])
        path = model_dir / "model.onnx"
        if not path.is_file() or not self._fresh(path):
            try:
                from engine.export import ensure_onnx
            except ImportError as e:
                raise BackendError(
                    f"{path} is missing and torch is not installed to export it"
                ) from e
            path = ensure_onnx(model_dir, "standard")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(path), opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"cannot load {path}: {str(e).splitlines()[0]}") from e
        self.device = self.session.get_providers()[0]

    def _fresh(self, path: Path) -> bool:
        meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
        stored = json.loads(meta.custom_metadata_map.get("facemoe_manifest", "{}"))
        return stored.get("weights_sha256") == self.manifest["weights_sha256"]

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (out,) = self.session.run(None, {"input": batch})
        return check_output(out, len(batch), self.dim)


def create(model_dir: Path, **options: Any) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(model_dir, **options)
