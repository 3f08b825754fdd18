"""ONNX export of any registered FaceMoE model, in two forms.

- `standard`: standard ONNX ops only (TopK, Softmax, ScatterElements, Einsum...), for ONNX
  Runtime. Each MoE layer is exported in its masked-dense form, which equals the sparse op.
- `plugin`: each MoE layer is one `facemoe::TopKMoE` (version 1) node whose inputs are the
  tokens and the layer's weights, for TensorRT with the routing plugin.

Both graphs end in L2 normalisation, so every backend returns normalised embeddings, and
carry the model manifest plus export info in their metadata (`facemoe_manifest`,
`trainer.manifest`).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from engine.ops.reference import OP_DOMAIN, OP_NAME, OP_VERSION
from trainer.artifact import load_model
from trainer.fsutil import PUBLIC, atomic_path
from trainer.manifest import (
    ONNX_METADATA_KEY,
    derived_manifest,
    manifest_from_metadata,
    read_manifest,
)
from trainer.models.moe import MoEMLP, moe_dense

log = logging.getLogger(__name__)
FORMS = ("standard", "plugin")
ONNX_NAMES = {"standard": "model.onnx", "plugin": "model.plugin.onnx"}
OPSET = 17


class _TopKMoEOp(torch.autograd.Function):
    """Forward = the routing op in its masked-dense form; exported as one custom node."""

    @staticmethod
    def forward(ctx, x, router, w1, b1, w2, b2, num_experts: int, top_k: int, gate: str):  # noqa: ARG004
        return moe_dense(x, router, w1, b1, w2, b2, top_k, gate)

    @staticmethod
    def symbolic(g, x, router, w1, b1, w2, b2, num_experts, top_k, gate):
        return g.op(
            f"{OP_DOMAIN}::{OP_NAME}",
            x,
            router,
            w1,
            b1,
            w2,
            b2,
            num_experts_i=num_experts,
            top_k_i=top_k,
            gate_s=gate,
            plugin_version_s=OP_VERSION,
        ).setType(x.type())


class _PluginMoE(nn.Module):
    def __init__(self, layer: MoEMLP) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        return _TopKMoEOp.apply(
            x, m.router.weight, m.w1, m.b1, m.w2, m.b2, m.num_experts, m.top_k, m.gate
        )


class Embedder(nn.Module):
    """The exported graph: backbone + L2 normalisation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(x), dim=-1)


def _swap_moe(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, MoEMLP):
            setattr(module, name, _PluginMoE(child))
        else:
            _swap_moe(child)


def export_model(
    model: nn.Module,
    manifest: dict[str, Any],
    out: str | Path,
    form: str = "standard",
    opset: int = OPSET,
) -> Path:
    """Export `model` (eval mode) to `out`; returns the path."""
    if form not in FORMS:
        raise ValueError(f"unknown export form {form!r}; expected one of {FORMS}")
    out = Path(out)
    model = model.eval()
    for m in model.modules():
        if isinstance(m, MoEMLP):
            m.dispatch = "dense"
    net = Embedder(model)
    if form == "plugin":
        _swap_moe(net)
    size = int(manifest["input_size"])
    dummy = torch.zeros(2, 3, size, size)
    info = derived_manifest(
        manifest,
        kind="onnx",
        form=form,
        opset=opset,
        torch=torch.__version__,
        exported=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    with atomic_path(out, PUBLIC, suffix=".onnx") as tmp:
        with torch.no_grad():
            torch.onnx.export(
                net,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["embedding"],
                dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                custom_opsets={OP_DOMAIN: int(OP_VERSION)} if form == "plugin" else None,
            )
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(info)})
        onnx.save(proto, str(tmp))
    log.info("exported %s (%s form) to %s", manifest["name"], form, out)
    return out


def onnx_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest stored in an exported ONNX file."""
    proto = onnx.load(str(path), load_external_data=False)
    return manifest_from_metadata({p.key: p.value for p in proto.metadata_props}, path)


def ensure_onnx(model_dir: str | Path, form: str = "standard") -> Path:
    """The model's ONNX file, exported again when missing or made from other weights."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    path = model_dir / ONNX_NAMES[form]
    if path.is_file():
        try:
            if onnx_manifest(path)["weights_sha256"] == manifest["weights_sha256"]:
                return path
        except (ValueError, KeyError, onnx.onnx_cpp2py_export.checker.ValidationError):
            pass
        log.info("%s is stale; exporting again", path)
    model, manifest = load_model(model_dir)
    return export_model(model, manifest, path, form)


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.export MODEL_DIR [standard|plugin]`: export (used from a clean process)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    print(ensure_onnx(args[0], args[1] if len(args) > 1 else "standard"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
