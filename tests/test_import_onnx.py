"""`facemoe import onnx`: an ONNX face embedder wrapped as an artifact the app runs as it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.embed import Embedder
from engine.export import ensure_onnx
from tests.conftest import facemoe
from trainer.models.resnet import DLIB_150

pytestmark = pytest.mark.contract


@pytest.mark.slow
def test_wrapped_onnx_embeds_like_the_native_artifact(
    dlib_model_dir: Path, dlib_parity: dict, tmp_path: Path
) -> None:
    src = tmp_path / "dlib.onnx"
    src.write_bytes(ensure_onnx(dlib_model_dir).read_bytes())  # any ONNX embedder would do
    m = json.loads((dlib_model_dir / "manifest.json").read_text())
    r = facemoe("import", "onnx", str(src), "--template", "dlib150", "--dim", "128",
             "--mean", *map(str, m["mean"]), "--std", *map(str, m["std"]),
             "--licence", "public domain", "--out", str(tmp_path / "wrapped"), "--json")
    assert r.returncode == 0, r.stderr
    out = Path(json.loads(r.stdout)["model"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["crop_template"] == DLIB_150.to_manifest()
    assert manifest["architecture"] == "onnx" and manifest["embedding_dim"] == 128
    wrapped = Embedder.from_config(str(out), "onnxruntime")
    native = Embedder.from_config(str(dlib_model_dir), "onnxruntime")
    assert wrapped.template == native.template == DLIB_150
    chips = dlib_parity["chips"][:8, :, :, ::-1]  # BGR, as the app's crops are
    a, b = wrapped.embed(chips), native.embed(chips)
    assert np.abs(a - b).max() < 1e-5
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    # the same network told the wrong colour order gives other embeddings
    r = facemoe("import", "onnx", str(src), "--template", "dlib150", "--dim", "128",
             "--mean", *map(str, m["mean"]), "--std", *map(str, m["std"]), "--colour", "BGR",
             "--out", str(tmp_path / "bgr"))
    assert r.returncode == 0, r.stderr
    bgr = Embedder.from_config(str(tmp_path / "bgr"), "onnxruntime").embed(chips)
    assert np.abs(bgr - b).max() > 1e-2


def test_bad_onnx_files_get_one_line_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx at all")
    r = facemoe("import", "onnx", str(junk), "--dim", "128", "--out", str(tmp_path / "a"))
    assert r.returncode == 1 and "is not a valid ONNX model" in r.stderr.strip().splitlines()[-1]
    two = tmp_path / "two.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 112])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 112, 112])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 112, 112])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "g", [x, y], [z])
    onnx.save(helper.make_model(graph), str(two))
    r = facemoe("import", "onnx", str(two), "--dim", "128", "--out", str(tmp_path / "b"))
    assert r.returncode == 1 and "one image input" in r.stderr.strip().splitlines()[-1]
    r = facemoe("import", "onnx", str(two), "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and "--dim" in r.stderr.strip().splitlines()[-1]
    assert not any((tmp_path / d).exists() for d in "abc")
