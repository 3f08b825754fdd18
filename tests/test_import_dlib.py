"""`facemoe import dlib`: dlib's face ResNet v1 read without dlib, against dlib's own outputs,
and FaceMoE upcycled from it (equal to it at step 0)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.align import similarity_transform
from trainer.artifact import load_model
from trainer.importers.dlib import import_dlib
from trainer.importers.dlib_format import DlibFormatError, read_dlib_network
from trainer.models import create_model
from trainer.models.moe import moe_layers
from trainer.models.resnet import DLIB_150, FaceMoEBlock
from trainer.preprocess import CropTemplate, to_input

pytestmark = pytest.mark.contract


def _embed(model, manifest, chips_rgb: np.ndarray) -> np.ndarray:
    x = to_input(chips_rgb[..., ::-1], 150, manifest["mean"], manifest["std"])
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.slow
def test_port_reproduces_dlib_descriptors(dlib_model_dir: Path, dlib_parity: dict) -> None:
    model, manifest = load_model(dlib_model_dir)
    out = _embed(model, manifest, dlib_parity["chips"])
    ref = dlib_parity["descriptors"]
    assert np.abs(out - ref).max() <= 1e-5
    cos = np.sum(out * ref, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99999


def test_manifest_declares_the_chip_and_the_source(dlib_model_dir: Path, dlib_dat: Path) -> None:
    m = json.loads((dlib_model_dir / "manifest.json").read_text())
    assert m["input_size"] == 150 and m["embedding_dim"] == 128 and m["colour"] == "RGB"
    assert CropTemplate.from_manifest(m) == DLIB_150
    # (x/255 - mean)/std is dlib's (x - 122.782...)/256
    assert np.allclose(np.array(m["mean"]) * 255, (122.782, 117.001, 104.298), atol=1e-3)
    assert np.allclose(np.array(m["std"]) * 255, 256.0)
    src = m["data"]["source"]
    assert src["known_release"] and src["sha256"].startswith("55533b28")
    assert "public domain" in src["licence"]


@pytest.mark.slow
def test_chip_template_is_what_dlib_used(data_dir: Path) -> None:
    """Re-derive DLIB_150 from the teacher pool: dlib's chip transform applied to YuNet's points."""
    t = np.load(data_dir / "teacher" / "dlib_resnet_v1.npz")
    p = np.array([(0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677),
                  (0.1205750620789, 0.2137274526848), (0.3340850613712, 0.2290642403242),
                  (0.4901123135679, 0.6277975316475)])
    dlib_chip = CropTemplate(150, tuple(map(tuple, (0.25 + p) / 1.5 * 150)))
    ok = np.flatnonzero(t["eye_disagreement"] < 0.2)[::10]
    pts = []
    for i in ok:
        m = similarity_transform(t["dlib_shape5"][i], dlib_chip)
        pts.append(t["landmarks"][i].reshape(5, 2) @ m[:, :2].T + m[:, 2])
    assert np.abs(np.mean(pts, 0) - DLIB_150.array).max() < 0.5


def test_damaged_files_are_refused(dlib_dat: Path, tmp_path: Path) -> None:
    data = dlib_dat.read_bytes()
    with pytest.raises(DlibFormatError, match="ends early"):
        read_dlib_network(data[: len(data) // 2])
    with pytest.raises(DlibFormatError):
        read_dlib_network(b"\x01\x01\x01\x0dnot_a_network" + data[17:])
    bad = tmp_path / "bad.dat"
    bad.write_bytes(data[:1000])
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "import", "dlib", "--dat", str(bad),
         "--out", str(tmp_path / "m")],
        capture_output=True, text=True,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("facemoe: error: file ends early")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_upcycled_model_equals_the_imported_one_at_step_0(
    dlib_dat: Path, dlib_model_dir: Path, dlib_parity: dict, tmp_path: Path
) -> None:
    up_dir = import_dlib(tmp_path / "r29", dlib_dat, architecture="facemoe-r29")
    up, manifest = load_model(up_dir)
    base, _ = load_model(dlib_model_dir)
    assert len(moe_layers(up)) == 2 and not moe_layers(base)
    chips = dlib_parity["chips"][:8]
    a, b = _embed(up, manifest, chips), _embed(base, manifest, chips)
    assert np.array_equal(a, b)
    # the blocks are real: once their zero-initialised outputs move, the model changes
    with torch.no_grad():
        for blk in (m for m in up.modules() if isinstance(m, FaceMoEBlock)):
            blk.mlp.w2.normal_(std=0.05)
    assert np.abs(_embed(up, manifest, chips) - b).max() > 1e-3


def test_stage_sizes_follow_dlibs_unpadded_strides() -> None:
    model = create_model("facemoe-r29")
    assert model.stage_sizes == [35, 17, 8, 4, 2]
    tokens = [m.pos.shape[1] for m in model.modules() if isinstance(m, FaceMoEBlock)]
    assert tokens == [17 * 17, 8 * 8]


@pytest.mark.slow
def test_upcycled_model_exports_in_both_forms(dlib_dat: Path, dlib_parity: dict,
                                              tmp_path: Path) -> None:
    """facemoe-r29 (its FaceMoE blocks perturbed so that they matter) runs in ONNX Runtime like
    in torch, and its plugin export holds one TopKMoE node per block."""
    import onnx
    from safetensors.torch import save_file

    from app.embed import Embedder
    from engine.export import ensure_onnx
    from trainer.artifact import sha256_file

    art = import_dlib(tmp_path / "r29", dlib_dat, architecture="facemoe-r29")
    model, manifest = load_model(art)
    with torch.no_grad():
        for blk in (m for m in model.modules() if isinstance(m, FaceMoEBlock)):
            blk.mlp.w2.normal_(std=0.05)
            blk.attn.proj.weight.normal_(std=0.05)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(art / "weights.safetensors"))
    manifest["weights_sha256"] = sha256_file(art / "weights.safetensors")
    (art / "manifest.json").write_text(json.dumps(manifest))
    chips = dlib_parity["chips"][:6]
    ref = _embed(model, manifest, chips)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ort = Embedder.from_config(str(art), "onnxruntime").embed(chips[..., ::-1])
    assert np.abs(ort - ref).max() < 1e-4
    plugin = onnx.load(str(ensure_onnx(art, "plugin")))
    assert [n.op_type for n in plugin.graph.node].count("TopKMoE") == 2
