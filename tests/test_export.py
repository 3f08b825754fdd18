"""ONNX export (standard and plugin forms) and the backend contract."""

import numpy as np
import onnx
import pytest
import torch

from engine.backends import BackendError, load_backend
from engine.export import ONNX_NAMES, ensure_onnx, export_model, onnx_manifest
from trainer.artifact import load_model
from trainer.manifest import read_manifest
from trainer.models.moe import moe_layers
from trainer.preprocess import to_input

pytestmark = pytest.mark.contract


def _torch_embed(model_dir, x):
    model, _ = load_model(model_dir)
    with torch.no_grad():
        return torch.nn.functional.normalize(model(torch.from_numpy(x))).numpy()


def test_standard_export_matches_torch_on_random_and_real_crops(tiny_model_dir, real_faces):
    path = ensure_onnx(tiny_model_dir, "standard")
    assert onnx_manifest(path)["weights_sha256"] == read_manifest(tiny_model_dir)["weights_sha256"]
    ort = load_backend(tiny_model_dir, "onnxruntime")
    rng = np.random.default_rng(0)
    for x in (
        rng.standard_normal((5, 3, 112, 112)).astype(np.float32),
        to_input(real_faces["crops"][:16]),
    ):
        got, want = ort.embed(x), _torch_embed(tiny_model_dir, x)
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
        assert (np.sum(got * want, axis=1) >= 0.9999).all()


def test_standard_export_uses_standard_ops_only(tiny_model_dir):
    proto = onnx.load(str(ensure_onnx(tiny_model_dir, "standard")))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert "TopK" in {n.op_type for n in proto.graph.node}


def test_plugin_export_has_one_node_per_moe_layer(tiny_model_dir):
    path = ensure_onnx(tiny_model_dir, "plugin")
    assert path.name == ONNX_NAMES["plugin"]
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.op_type == "TopKMoE"]
    model, manifest = load_model(tiny_model_dir)
    assert len(nodes) == len(moe_layers(model)) >= 1
    for n in nodes:
        assert n.domain == "facemoe"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert (
            attrs["num_experts"] == manifest["num_experts"] and attrs["top_k"] == manifest["top_k"]
        )
        assert attrs["gate"] == manifest["gate"].encode() and attrs["plugin_version"] == b"1"
        assert len(n.input) == 6
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("facemoe", 1)}
    assert onnx_manifest(path)["build"]["form"] == "plugin"


def test_stale_onnx_is_exported_again(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    path = ensure_onnx(copy)
    model, manifest = load_model(copy)
    export_model(model, {**manifest, "weights_sha256": "0" * 64}, path)  # pretend other weights
    mtime = path.stat().st_mtime_ns
    ensure_onnx(copy)
    assert path.stat().st_mtime_ns != mtime
    assert onnx_manifest(path)["weights_sha256"] == manifest["weights_sha256"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backend_contract(backend, tiny_model_dir, real_faces):
    b = load_backend(tiny_model_dir, backend)
    x = to_input(real_faces["crops"][:7])
    out = b.embed(x)
    assert out.shape == (7, 512) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert (np.sum(out * _torch_embed(tiny_model_dir, x), axis=1) >= 0.9999).all()
    assert b.embed(x[:1]).shape == (1, 512)


def test_unknown_backend_and_missing_model_are_clear(tiny_model_dir, tmp_path):
    with pytest.raises(BackendError, match="unknown backend"):
        load_backend(tiny_model_dir, "nope")
    with pytest.raises(BackendError, match="not a model directory"):
        load_backend(tmp_path, "onnxruntime")


def test_auto_picks_onnxruntime_without_an_engine(tiny_model_dir, caplog):
    caplog.set_level("DEBUG")  # the missing engine is a debug line: CPU users are not sent to it
    assert load_backend(tiny_model_dir, "auto").name == "onnxruntime"
    assert "no TensorRT engine" in caplog.text and "chose onnxruntime" in caplog.text
