"""Routing explanations: token -> expert maps per layer, expert shares, PNG, `facemoe explain`.

Everything that draws with matplotlib runs in a subprocess (the real CLI): a process that has
loaded GStreamer (app.source) and then hits a C++ exception must fail that one test, not
abort the whole pytest session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from trainer.artifact import load_model
from trainer.explain import (
    degrade_crops,
    expert_shares,
    routing_maps,
    routing_report,
    routing_shares,
)
from trainer.models import create_model
from trainer.models.moe import moe_layers

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, manifest = load_model(tiny_model_dir)
    return model, manifest


def test_maps_shapes_and_shares(tiny, real_faces):
    model, _ = tiny
    crops = real_faces["crops"][:6]
    maps = routing_maps(model, crops)
    layers = moe_layers(model)
    n, k = layers[0].num_experts, layers[0].top_k
    assert (maps.num_experts, maps.top_k) == (n, k)
    assert len(maps.topk) == len(layers)
    assert maps.grids == [7] * len(layers)  # 112 / 16 = 7x7 tokens
    for topk, top1 in zip(maps.topk, maps.top1, strict=True):
        assert topk.shape == (6, 7, 7, k) and top1.shape == (6, 7, 7)
        assert topk.min() >= 0 and topk.max() < n
        assert (topk[..., 0] != topk[..., 1]).all()  # k distinct experts per token
    assert maps.shares.shape == maps.top1_shares.shape == (len(layers), n)
    np.testing.assert_allclose(maps.shares.sum(1), 1.0)
    np.testing.assert_allclose(maps.top1_shares.sum(1), 1.0)
    assert (maps.histograms().sum(1) == 6 * 49 * k).all()
    assert (maps.histograms(k_only_top1=True).sum(1) == 6 * 49).all()
    assert not model.training


def test_maps_match_the_router(tiny, real_faces):
    """The maps are the router's own top-k, token t of crop b at grid cell (t // 7, t % 7)."""
    model, _ = tiny
    crops = real_faces["crops"][:2]
    maps = routing_maps(model, crops)
    idx = moe_layers(model)[0].last.top_idx.numpy().reshape(2, 49, -1)
    assert maps.topk[0][1, 3, 5].tolist() == idx[1, 3 * 7 + 5].tolist()


def test_routing_shares_batching(tiny, real_faces):
    model, _ = tiny
    crops = real_faces["crops"][:20]
    whole = routing_maps(model, crops)
    np.testing.assert_allclose(routing_shares(model, crops, batch_size=7), whole.shares)
    top1 = routing_shares(model, crops, batch_size=7, top1=True)
    np.testing.assert_allclose(top1, whole.top1_shares)
    with pytest.raises(ValueError):
        routing_shares(model, crops[:0])


def test_expert_shares_table():
    shares = expert_shares([np.array([0, 0, 1, 2]), np.array([[2, 2], [2, 2]])], 3)
    np.testing.assert_allclose(shares, [[0.5, 0.25, 0.25], [0, 0, 1]])


def test_swin_grids_follow_the_stage():
    torch.manual_seed(0)
    model = create_model("facemoe-swin-b", img_size=60, patch_size=6, dim=24, depths=[2, 2],
                         heads=[2, 2], window=5, drop_path_rate=0.0).eval()
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    maps = routing_maps(model, crops)
    assert maps.grids == [10, 10, 5, 5]
    assert maps.topk[0].shape == (3, 10, 10, 2)
    np.testing.assert_allclose(maps.shares.sum(1), 1.0)


def test_routing_report(tiny_model_dir, real_faces):
    crops = real_faces["crops"][:12]
    report = routing_report(tiny_model_dir, crops, resolutions=(None, 16))
    assert report["crops"] == 12 and report["layers"] == 1 and report["num_experts"] == 3
    assert set(report["resolutions"]) == {"native", "16px"}
    native = np.array(report["resolutions"]["native"]["shares"])
    low = np.array(report["resolutions"]["16px"]["shares"])
    np.testing.assert_allclose(native.sum(1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.array(report["difference"]["16px"]), low - native, atol=2e-4)
    assert 0.0 <= report["tv_distance"]["16px"][0] <= 1.0
    json.dumps(report)  # the lead stores it in the model card
    model, _ = load_model(tiny_model_dir)
    np.testing.assert_allclose(low, routing_shares(model, degrade_crops(crops, 16)), atol=1e-4)


def _crash_hint(rc: int) -> str:
    if rc in (-6, -11, 134, 139):
        return ("the process crashed (C++ exception unwound by libunwind, loaded with GStreamer; "
                "see test_matplotlib_after_gstreamer)\n")
    return ""


def test_matplotlib_after_gstreamer():
    """Importing app.source (GStreamer, which drags libunwind into the global symbol scope) must
    not break C++ exceptions afterwards: matplotlib's import throws and catches one, so with the
    wrong unwinder every plot (explain, eval lfw --roc) aborts the process."""
    code = ("import app.source, matplotlib; matplotlib.use('Agg'); "
            "import matplotlib.pyplot as plt; plt.figure().text(0.5, 0.5, 'ok'); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    hint = _crash_hint(proc.returncode) + proc.stderr[-1000:]
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", hint


def _write_config(tmp_path: Path, model_dir: Path) -> Path:
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"model: {{dir: {model_dir}, backend: torch, threads: 1}}\n")
    return cfg


@pytest.mark.slow
def test_cli_explain_writes_png_and_json(tiny_model_dir, data_dir, tmp_path):
    cfg = _write_config(tmp_path, tiny_model_dir)
    png = tmp_path / "routing.png"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "explain", str(data_dir / "videos" / "obama.jpg"),
         "--config", str(cfg), "--out", str(png), "--probe-res", "16", "--probe-res", "8",
         "--json"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, _crash_hint(proc.returncode) + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report["resolutions"]) == {"native", "16px", "8px"}
    assert report["layers"] == 1 and report["grids"] == [7] and report["num_experts"] == 3
    for res in report["resolutions"].values():
        np.testing.assert_allclose(np.array(res["shares"]).sum(1), 1.0, atol=1e-3)
        assert np.array(res["top1"]).shape == (1, 7, 7)
    assert report["face"]["bbox"][2] > 50
    assert report["png"] == str(png) and png.stat().st_size > 10_000
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 600


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    from app.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_explain_missing_file(tiny_model_dir, tmp_path, capsys):
    cfg = _write_config(tmp_path, tiny_model_dir)
    rc, out, err = _main(["explain", str(tmp_path / "nope.jpg"), "--config", str(cfg)], capsys)
    assert rc == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("facemoe:")]
    assert lines == [f"facemoe: error: no such file: {tmp_path / 'nope.jpg'}"]
    assert "Traceback" not in err


def test_cli_explain_no_face(tiny_model_dir, tmp_path, capsys):
    cfg = _write_config(tmp_path, tiny_model_dir)
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 160, 3), 128, np.uint8))
    argv = ["explain", str(blank), "--config", str(cfg), "--out", str(tmp_path / "x.png")]
    rc, _, err = _main(argv, capsys)
    assert rc == 1 and "facemoe: error: no face found in" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
