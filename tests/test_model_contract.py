"""The model contract over the whole registry: every `trainer.models.list_models()` entry, built
from its registered config, on real faces aligned the way the product aligns them.

For each model: its manifest (`trainer.artifact.artifact_manifest`) is valid and declares the
crop template, input size, mean/std and embedding dimension; on 4 real CelebA photos (training
pool, never LFW evaluation identities) aligned by `app.align.align_face` onto that template and
converted by `trainer.preprocess.to_input`, the forward pass gives finite, input-dependent
embeddings of the manifest's dimension; a training-mode backward of a loss over every output
(the router losses of training left out, so the routers must be reached through the gates)
reaches every parameter with a finite, non-zero gradient, every expert of every MoE layer
getting tokens; the standard ONNX export
(`engine.export.export_model`) run by ONNX Runtime equals the L2-normalised PyTorch output.

Sizes: facemoe-swin-b's registered config has 464 M parameters (20 s just to build on a CPU), so
it is checked at `SMALL_CONFIGS` (same patching, windows, shifted windows, merging and MoE in
every block; smaller width and depth); every other model runs at its registered config.
Zero-initialised parameters (the last projections of the r29 FaceMoE blocks, so that a fresh
block is the identity, and zero biases) are given small random values first: at exactly zero
they would stop the gradient of the layers before them, which would hide whether those layers
are connected at all. An untrained router can leave an expert without a token (the random
facemoe-r29 sends the tokens of its first MoE layer to 3 of its 4 experts), so for the gradient
check the routers are pointed at their own input tokens first (`route_to_every_expert`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.artifact import artifact_manifest
from trainer.manifest import validate_manifest
from trainer.models import create_model, list_models, model_config
from trainer.models.moe import moe_layers

pytestmark = pytest.mark.contract

SMALL_CONFIGS = {"facemoe-swin-b": {"dim": 32, "depths": [2, 2, 2], "heads": [2, 2, 2]}}
N_FACES = 4
# A 1-expert MoE layer (facemoe-edge-dense, the dense baseline) has a router whose gate is the
# constant 1 (softmax over one logit) and that the router losses skip: it keeps the structure of
# the MoE models and never gets a gradient (asserted). Every other parameter must get one.
UNUSED_IN_TRAINING = "router of a 1-expert layer"


@pytest.fixture(scope="module")
def photos(data_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(BGR image, 5 YuNet landmarks) of 4 CelebA photos of 4 people (the training pool)."""
    import cv2

    t = np.load(data_dir / "teacher" / "dlib_resnet_v1.npz")
    ids = dict(
        line.split()
        for line in (data_dir / "celeba299" / "identities.txt").read_text().splitlines()
    )
    out, seen = [], set()
    for path, marks in zip(t["paths"], t["landmarks"], strict=True):
        path = str(path)
        if path.startswith("celeba299/") and ids[Path(path).name] not in seen:
            seen.add(ids[Path(path).name])
            out.append((cv2.imread(str(data_dir / path)), marks.reshape(5, 2)))
        if len(out) == N_FACES:
            return out
    pytest.fail("fewer than 4 CelebA identities in the teacher pool")


class Case:
    """One registry entry: the model, its manifest, its input batch (built once per module)."""

    def __init__(self, name: str, photos) -> None:
        from app.align import align_face
        from trainer.preprocess import CropTemplate, to_input

        torch.manual_seed(0)
        self.name = name
        self.config = model_config(name, **SMALL_CONFIGS.get(name, {}))
        self.model = create_model(name, **SMALL_CONFIGS.get(name, {}))
        with torch.no_grad():
            for p in self.model.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
        self.manifest = artifact_manifest(
            self.model, self.config, name=name, version="contract", weights_sha256="0" * 64
        )
        m = self.manifest
        template = CropTemplate.from_manifest(m)
        crops = np.stack([align_face(img, marks, template) for img, marks in photos])
        self.x = torch.from_numpy(
            to_input(crops, m["input_size"], m["mean"], m["std"], rgb=m["colour"] == "RGB")
        )


@pytest.fixture(scope="module", params=list_models())
def case(request, photos) -> Case:
    return Case(request.param, photos)


def test_the_registry_is_what_this_file_covers():
    assert set(SMALL_CONFIGS) <= set(list_models())
    assert len(list_models()) >= 5  # dlib-resnet-v1, facemoe-edge(-dense), -r29, -swin-b


def test_manifest_declares_the_input_contract(case: Case):
    m = validate_manifest(case.manifest)
    assert m["architecture"] == case.name and m["normalised"] is True
    assert case.x.shape == (N_FACES, 3, m["input_size"], m["input_size"])
    assert m["num_experts"] == case.config["num_experts"]


def test_forward_gives_finite_embeddings_of_the_manifest_dimension(case: Case):
    with torch.no_grad():
        out = case.model.eval()(case.x)
    assert out.shape == (N_FACES, case.manifest["embedding_dim"])
    assert torch.isfinite(out).all()
    # four different people: the embedding depends on the face (an untrained network maps
    # them close together, not onto one point)
    assert torch.cdist(F.normalize(out, dim=-1), F.normalize(out, dim=-1)).max() > 1e-3


def route_to_every_expert(model: torch.nn.Module, x: torch.Tensor, seed: int) -> None:
    """Point the rows of each MoE router at N of that layer's own input tokens (unit vectors,
    spread out by farthest-point sampling), layer by layer on the forward pass seeded with `seed`
    (the same dropout draws as the caller's): token e's largest logit is then expert e's
    (Cauchy-Schwarz), so every expert is the first choice of at least one token."""
    for layer in moe_layers(model):
        if layer.num_experts == 1:
            continue
        seen: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        torch.manual_seed(seed)
        with torch.no_grad():
            model(x)
        hook.remove()
        unit = F.normalize(seen[0].reshape(-1, seen[0].shape[-1]), dim=-1)
        picked = [0]
        while len(picked) < layer.num_experts:
            picked.append(int((unit @ unit[picked].T).max(dim=1).values.argmin()))
        with torch.no_grad():
            layer.router.weight.copy_(unit[picked])


def test_every_parameter_gets_a_gradient_and_every_expert_tokens(case: Case):
    model = copy.deepcopy(case.model).train()
    route_to_every_expert(model, case.x, seed=1)
    torch.manual_seed(1)
    out = model(case.x)
    (out * torch.randn_like(out)).sum().backward()  # a loss over every output element

    for i, layer in enumerate(moe_layers(model)):
        used = torch.unique(layer.last.top_idx).tolist()
        assert used == list(range(layer.num_experts)), f"MoE layer {i}: experts used {used}"
    unused = {
        f"{name}.router.weight"
        for name, m in model.named_modules()
        if m in moe_layers(model) and m.num_experts == 1
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        if name in unused:
            assert not p.grad.any(), f"{name}: the {UNUSED_IN_TRAINING} got a gradient"
        else:
            assert p.grad.any(), f"{name}: zero gradient"


def test_onnx_export_matches_pytorch(case: Case, tmp_path: Path):
    import onnxruntime as ort

    from engine.export import export_model, onnx_manifest

    model = case.model.eval()
    with torch.no_grad():
        want = F.normalize(model(case.x), dim=-1).numpy()
    path = export_model(model, case.manifest, tmp_path / "model.onnx")
    assert {k: v for k, v in onnx_manifest(path).items() if k != "build"} == case.manifest
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": case.x.numpy()})
    assert got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=2e-5)


# --- the manifest module (trainer.manifest) ---------------------------------------------------


MODELS = Path(__file__).resolve().parent.parent / "models"
SHIPPED = sorted(p.parent for p in MODELS.glob("*/manifest.json"))


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_shipped_manifests_are_valid(shipped: Path):
    from trainer.manifest import read_manifest

    assert len(SHIPPED) >= 3  # sface (the default), dlib-resnet-v1 and facemoe-edge
    manifest = read_manifest(shipped)
    if manifest.get("format") == "onnx":  # an imported ONNX graph: no PyTorch architecture
        assert manifest["architecture"] == "onnx" and manifest["training"]["imported_from"]
    else:
        assert manifest["architecture"] in list_models()


def test_manifest_round_trip_and_one_line_errors(tmp_path: Path):
    import json

    from trainer.manifest import (
        ONNX_METADATA_KEY,
        manifest_from_metadata,
        read_manifest,
        update_metrics,
        write_manifest,
    )

    model = create_model("facemoe-edge", depth=1, dim=48, heads=2, stem_width=8)
    good = artifact_manifest(model, model_config("facemoe-edge"), name="m", version="1",
                             weights_sha256="ab" * 32)
    path = write_manifest(tmp_path, good)
    assert read_manifest(tmp_path) == good == json.loads(path.read_text())
    update_metrics(tmp_path, {"recommended_threshold": 0.4})
    assert read_manifest(tmp_path)["metrics"] == {"recommended_threshold": 0.4}
    assert manifest_from_metadata({ONNX_METADATA_KEY: json.dumps(good)}, "x.onnx") == good

    for broken, field in [
        ({**good, "input_size": "112"}, "'input_size'"),
        ({k: v for k, v in good.items() if k != "weights_sha256"}, "'weights_sha256'"),
        ({**good, "mean": [0.5, 0.5]}, "'mean'"),
        ({**good, "std": [0.5, 0.0, 0.5]}, "'std'"),
        ({**good, "colour": "YUV"}, "'colour'"),
        ([good], "JSON object"),
    ]:
        with pytest.raises(ValueError, match=field) as e:
            write_manifest(tmp_path, broken)
        assert "\n" not in str(e.value)
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=field):
            read_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="not a FaceMoE export"):
        manifest_from_metadata({}, "x.onnx")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(tmp_path / "absent")
