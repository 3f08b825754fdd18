"""`facemoe import onnx`: any ONNX face embedder (SFace, a user's ArcFace model) as an artifact.

The artifact is the graph itself (`model.onnx`, input renamed `input`, output `embedding`, an L2
normalisation appended so it keeps the backend contract) plus a manifest that declares its crop
template, mean/std, colour order and dimension. It runs on the ONNX Runtime backend; there are no
PyTorch weights to fine-tune or to build a TensorRT engine from with the routing plugin.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from trainer.fsutil import PUBLIC, atomic_path
from trainer.manifest import ONNX_METADATA_KEY, read_manifest, write_manifest
from trainer.preprocess import ARCFACE_112, CropTemplate

TEMPLATES: dict[str, CropTemplate] = {"arcface112": ARCFACE_112}


def named_template(name: str) -> CropTemplate:
    """A crop template by name (`arcface112`, `dlib150`)."""
    if name == "dlib150":
        from trainer.models.resnet import DLIB_150

        return DLIB_150
    if name not in TEMPLATES:
        raise ValueError(f"unknown crop template {name!r}; known: arcface112, dlib150")
    return TEMPLATES[name]


class OnnxImportError(ValueError):
    """The ONNX file cannot be wrapped as a face embedder; the message says why."""


def _static_dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value or None for d in value.type.tensor_type.shape.dim]


def import_onnx(
    src: str | Path,
    out_dir: str | Path,
    *,
    template: str = "arcface112",
    dim: int,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    colour: str = "RGB",
    name: str | None = None,
    version: str = "1.0.0",
    licence: str = "",
) -> Path:
    """Wrap `src` as a model artifact in `out_dir`; returns it."""
    src = Path(src)
    raw = src.read_bytes()
    try:
        proto = onnx.load_from_string(raw)
        onnx.checker.check_model(proto)
    except Exception as e:  # onnx raises several exception types
        raise OnnxImportError(f"{src} is not a valid ONNX model: {str(e).splitlines()[0]}") from e
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    # Some exporters (SFace's among them) also list every weight as a graph input, which tells
    # ONNX Runtime the weights may be fed at run time: it then cannot fold or fuse them
    # (68-72 faces/s instead of 106-109 for SFace). A weight is a constant here: keep only
    # the inputs that have no initializer.
    kept = [onnx.ValueInfoProto.FromString(i.SerializeToString())
            for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(kept)
    inputs = list(graph.input)
    if len(inputs) != 1 or len(graph.output) != 1:
        raise OnnxImportError(
            f"{src}: a face embedder has one image input and one output, found "
            f"{len(inputs)} inputs and {len(graph.output)} outputs"
        )
    shape = _static_dims(inputs[0])
    tpl = named_template(template)
    if len(shape) != 4 or shape[1] not in (3, None):
        raise OnnxImportError(f"{src}: input must be NCHW with 3 channels, got {shape}")
    size = shape[2] or tpl.size
    if shape[2] and shape[3] and shape[2] != shape[3]:
        raise OnnxImportError(f"{src}: only square inputs are supported, got {shape}")
    if colour not in ("RGB", "BGR"):
        raise OnnxImportError(f"colour must be RGB or BGR, got {colour!r}")
    out_dims = _static_dims(graph.output[0])
    if out_dims and out_dims[-1] not in (dim, None):
        raise OnnxImportError(f"{src}: output dimension is {out_dims[-1]}, not --dim {dim}")
    # rename the input/output to the backend's names and append the L2 normalisation
    old_in, old_out = inputs[0].name, graph.output[0].name
    for node in graph.node:
        node.input[:] = ["input" if n == old_in else n for n in node.input]
    inputs[0].name = "input"
    raw_out = old_out + "_raw"
    for node in graph.node:
        node.output[:] = [raw_out if n == old_out else n for n in node.output]
        node.input[:] = [raw_out if n == old_out else n for n in node.input]
    flat = "facemoe_flat"
    graph.node.extend([
        helper.make_node("Flatten", [raw_out], [flat], axis=1),
        helper.make_node("LpNormalization", [flat], ["embedding"], axis=-1, p=2),
    ])
    graph.output[0].CopyFrom(
        helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", dim])
    )
    inputs[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    digest = hashlib.sha256(raw).hexdigest()
    manifest: dict[str, Any] = {
        "name": name or src.stem,
        "version": version,
        "architecture": "onnx",
        "format": "onnx",
        "input_size": int(size),
        "crop_size": int(size),
        "crop_template": tpl.to_manifest() if tpl.size == size else CropTemplate(
            int(size), tuple((x * size / tpl.size, y * size / tpl.size) for x, y in tpl.points)
        ).to_manifest(),
        "mean": list(mean),
        "std": list(std),
        "colour": colour,
        "layout": "NCHW",
        "embedding_dim": int(dim),
        "normalised": True,
        "training": {"imported_from": "onnx", "file": src.name},
        "data": {"source": {"file": src.name, "sha256": digest, "licence": licence}},
        "metrics": {},
        "weights_sha256": digest,
    }
    out = Path(out_dir)
    _keep_measurements(out, manifest)
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(manifest)})
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise OnnxImportError(f"{src}: wrapping it failed: {str(e).splitlines()[0]}") from e
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.onnx", PUBLIC, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
    write_manifest(out, manifest)
    return out


def _keep_measurements(out: Path, manifest: dict[str, Any]) -> None:
    """Re-importing the same file (same sha256) keeps what was measured of it: the metrics,
    calibration and the descriptive fields a model card relies on (a shipped artifact's
    committed manifest.json survives install.sh's import). Another file starts afresh."""
    try:
        old = read_manifest(out)
    except (OSError, ValueError):
        return
    if old.get("weights_sha256") != manifest["weights_sha256"]:
        return
    for key in ("metrics", "calibration", "data", "training", "version"):
        if key in old:
            manifest[key] = old[key]
