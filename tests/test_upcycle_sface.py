"""`facemoe import sface`: OpenCV Zoo's SFace in PyTorch (`sface`) against ONNX Runtime on real
aligned faces, and FaceMoE upcycled from it (`facemoe-sface`): equal to it at step 0, every
expert reached, finite gradients, and its ONNX export equal to torch.

The reference is the product's own ONNX artifact of the same file (`import_sface`, what
install.sh makes of it). Skips when SFace is not installed (./install.sh puts it in
<venv>/share/facemoe/, or set FACEMOE_SFACE_ONNX).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.artifact import load_model
from trainer.importers.sface import (
    SHA256,
    SFaceGraphError,
    default_onnx,
    import_sface,
    import_sface_torch,
    load_sface_weights,
)
from trainer.models import create_model
from trainer.models.layers import FaceMoEBlock
from trainer.models.moe import moe_layers
from trainer.preprocess import ARCFACE_112, CropTemplate, to_input

pytestmark = pytest.mark.contract

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sface_onnx() -> Path:
    try:
        return default_onnx()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def sface_dir(tmp_path_factory, sface_onnx: Path) -> Path:
    return import_sface_torch(tmp_path_factory.mktemp("sface") / "sface", sface_onnx)


@pytest.fixture(scope="module")
def upcycled_dir(tmp_path_factory, sface_onnx: Path) -> Path:
    """facemoe-sface made through the CLI (`facemoe import sface --architecture ...`)."""
    out = tmp_path_factory.mktemp("up") / "facemoe-sface"
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "import", "sface", "--src", str(sface_onnx),
         "--architecture", "facemoe-sface", "--out", str(out), "--json"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"model": str(out)}
    return out


@pytest.fixture(scope="module")
def onnx_reference(tmp_path_factory, sface_onnx: Path):
    """The product's ONNX-only SFace artifact (install.sh's import) in ONNX Runtime."""
    import onnxruntime as ort

    art = import_sface(tmp_path_factory.mktemp("ref") / "sface", sface_onnx)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(art / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    return session, json.loads((art / "manifest.json").read_text())


def _inputs(manifest: dict, crops: np.ndarray) -> np.ndarray:
    return to_input(crops, manifest["input_size"], manifest["mean"], manifest["std"],
                    rgb=manifest["colour"] == "RGB")


def _embed(model: torch.nn.Module, manifest: dict, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return F.normalize(model.eval()(torch.from_numpy(_inputs(manifest, crops)))).numpy()


@pytest.mark.slow
def test_port_equals_onnx_runtime_on_real_faces(sface_dir, onnx_reference, real_faces):
    session, ref_manifest = onnx_reference
    model, manifest = load_model(sface_dir)
    crops = real_faces["crops"][::3]  # 32 CelebA faces, 8 people
    got = _embed(model, manifest, crops)
    (want,) = session.run(None, {"input": _inputs(ref_manifest, crops)})
    assert np.abs(got - want).max() < 1e-4
    assert (got * want).sum(1).min() > 0.99999
    # and it recognises: a person's photos are closer to each other than to other people's
    labels = real_faces["labels"][::3]
    sim, same = got @ got.T, labels[:, None] == labels[None]
    off = ~np.eye(len(got), dtype=bool)
    assert np.median(sim[same & off]) > np.median(sim[~same]) + 0.3


def test_manifest_declares_sfaces_input_and_terms(sface_dir, onnx_reference):
    m = json.loads((sface_dir / "manifest.json").read_text())
    ref = onnx_reference[1]
    assert m["architecture"] == "sface" and m["embedding_dim"] == 128
    for key in ("input_size", "crop_template", "colour"):  # the ONNX artifact's contract
        assert m[key] == ref[key], key
    assert m["mean"] == pytest.approx(ref["mean"]) and m["std"] == pytest.approx(ref["std"])
    assert CropTemplate.from_manifest(m) == ARCFACE_112 and m["colour"] == "RGB"
    assert np.allclose(np.array(m["std"]) * 255, 1.0) and m["mean"] == [0.0, 0.0, 0.0]
    src = m["data"]["source"]
    assert src["sha256"] == SHA256 and src["known_release"]
    assert "Apache-2.0" in src["licence"] and "not documented" in src["licence"]


@pytest.mark.slow
def test_upcycled_equals_sface_at_step_0(sface_dir, upcycled_dir, real_faces):
    up, manifest = load_model(upcycled_dir)
    base, _ = load_model(sface_dir)
    assert manifest["architecture"] == "facemoe-sface" and not moe_layers(base)
    blocks = [m for m in up.modules() if isinstance(m, FaceMoEBlock)]
    assert [b.pos.shape[1:] for b in blocks] == [(14 * 14, 512)]
    crops = real_faces["crops"][::6]
    b = _embed(base, manifest, crops)
    assert np.array_equal(_embed(up, manifest, crops), b)
    # the block is real: once its zero-initialised projections move, the model changes
    with torch.no_grad():
        for blk in blocks:
            blk.mlp.w2.normal_(std=0.05)
    assert np.abs(_embed(up, manifest, crops) - b).max() > 1e-3


@pytest.mark.slow
def test_a_training_step_reaches_every_expert_with_finite_gradients(upcycled_dir, real_faces):
    """One distillation step as the recipe takes it (degraded 16 px crops -> the clean crops'
    embeddings): at step 0 the routers of the imported trunk send tokens to every expert, every
    gradient is finite, the zero-initialised projections get one (that is how the block starts
    to learn), and after the step the model differs from SFace."""
    from trainer.augment import downscale
    from trainer.losses import cosine_distill_loss, router_losses
    from trainer.train import _set_trainable

    model, manifest = load_model(upcycled_dir)
    crops = real_faces["crops"][::6]
    teacher = torch.from_numpy(_embed(model, manifest, crops))  # = SFace's (step 0)
    low = np.stack([downscale(c, 16) for c in crops])
    x = torch.from_numpy(_inputs(manifest, low))
    _set_trainable(model, backbone=False)  # stage 1: the FaceMoE block and the head
    model.train()
    loss = cosine_distill_loss(model(x), teacher) + sum(router_losses(moe_layers(model)))
    (layer,) = moe_layers(model)
    assert torch.unique(layer.last.top_idx).tolist() == list(range(layer.num_experts))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert not any(n.startswith("stages.0.") for n in grads)  # the trunk is frozen in stage 1
    block = "stages.3.6."  # after conv_7..conv_12
    for name in ("attn.proj.weight", "mlp.w2", "mlp.router.weight"):
        assert grads[block + name].abs().sum() > 0, name
    assert grads["fc.weight"].abs().sum() > 0
    before = _embed(model, manifest, crops)
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4).step()
    after = _embed(model, manifest, crops)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-5


@pytest.mark.slow
def test_upcycled_export_runs_in_onnx_runtime_like_torch(upcycled_dir, real_faces, tmp_path):
    import onnxruntime as ort

    from engine.export import export_model

    model, manifest = load_model(upcycled_dir)
    with torch.no_grad():  # perturbed so that the block matters
        for blk in (m for m in model.modules() if isinstance(m, FaceMoEBlock)):
            blk.mlp.w2.normal_(std=0.05)
            blk.attn.proj.weight.normal_(std=0.05)
    crops = real_faces["crops"][::8]
    want = _embed(model, manifest, crops)
    path = export_model(model, manifest, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": _inputs(manifest, crops)})
    assert np.abs(got - want).max() < 1e-4


def test_a_graph_that_is_not_sfaces_is_refused(sface_onnx, tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    model = create_model("sface")
    proto = onnx.load(str(sface_onnx))
    (node,) = [n for n in proto.graph.node if n.output[0] == "conv_7_dw_conv2d"]
    for a in node.attribute:
        if a.name == "strides":
            a.CopyFrom(helper.make_attribute("strides", [1, 1]))
    with pytest.raises(SFaceGraphError, match="conv_7_dw_conv2d has strides"):
        load_sface_weights(model, proto)
    proto = onnx.load(str(sface_onnx))
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "extra"))
    with pytest.raises(SFaceGraphError, match="does not use.*extra"):
        load_sface_weights(model, proto)
    # the CLI: another file is refused in one line, before anything is written
    bad = tmp_path / "other.onnx"
    bad.write_bytes(sface_onnx.read_bytes()[:-1])
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "import", "sface", "--src", str(bad),
         "--out", str(tmp_path / "m")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert r.returncode == 1
    assert "is not SFace 2021dec" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "m").exists()
