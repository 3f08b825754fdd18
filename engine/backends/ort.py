"""ONNX Runtime backend (CPU default) over the standard-ops export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.backends import BackendError, check_output
from trainer.manifest import ONNX_METADATA_KEY, read_manifest


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, model_dir: Path, threads: int = 0, providers: list[str] | None = None
    ) -> None:
        self.manifest = read_manifest(model_dir)
        self.input_size = int(self.manifest["input_size"])
        self.dim = int(self.manifest["embedding_dim"])
        path = model_dir / "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = providers or ["CPUExecutionProvider"]
        session = self._load(path, opts, providers) if path.is_file() else None
        if session is None or not self._fresh(session):
            try:
                from engine.export import ensure_onnx
            except ImportError as e:
                raise BackendError(
                    f"{path} is missing or stale and torch is not installed to export it"
                ) from e
            session = self._load(ensure_onnx(model_dir, "standard"), opts, providers)
        self.session = session
        self.device = session.get_providers()[0]

    @staticmethod
    def _load(path: Path, opts: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"cannot load {path}: {str(e).splitlines()[0]}") from e

    def _fresh(self, session: ort.InferenceSession) -> bool:
        """Whether the session's ONNX file was exported from this artifact's weights."""
        meta = session.get_modelmeta().custom_metadata_map
        stored = json.loads(meta.get(ONNX_METADATA_KEY, "{}"))
        return stored.get("weights_sha256") == self.manifest["weights_sha256"]

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (out,) = self.session.run(None, {"input": batch})
        return check_output(out, len(batch), self.dim)


def create(model_dir: Path, **options: Any) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(model_dir, **options)
