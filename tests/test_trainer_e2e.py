"""Tiny end-to-end training on real faces: two steps, resume, export, ONNX parity with torch."""

import json

import numpy as np
import pytest
import torch

from engine.backends import load_backend
from engine.export import ensure_onnx
from tests.conftest import metrics_rows, tiny_artifact
from trainer.artifact import load_model, read_manifest
from trainer.config import ConfigError, load_train_config
from trainer.preprocess import to_input
from trainer.train import train

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_train_resume_export_parity(tiny_config, real_faces):
    # 72 training faces (2 identities held out) / batch 32 = 2 steps per epoch
    run = train(load_train_config(tiny_config))
    steps = [r for r in metrics_rows(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert np.isfinite(r["loss"]) and {"id", "kd", "rkd", "z", "balance"} <= set(r)
        assert len(r["expert_usage"]) == 3 and sum(r["expert_usage"]) == pytest.approx(1, abs=1e-2)
    assert (run / "config.yaml").is_file() and (run / "checkpoint.pt").is_file()
    epoch = [r for r in metrics_rows(run) if "val_acc_native" in r]
    assert epoch and 0 <= epoch[0]["val_acc_16"] <= 1

    # resume: one more epoch continues the step count from the checkpoint
    run = train(load_train_config(tiny_config, {"optim.epochs": 2}), resume=True)
    assert [r["step"] for r in metrics_rows(run) if "loss" in r][-1] == 4
    manifest = read_manifest(run / "model")
    assert manifest["training"]["steps"] == 4 and manifest["input_size"] == 112

    # the artifact and its ONNX export agree on real aligned crops
    x = to_input(real_faces["crops"][:12])
    model, _ = load_model(run / "model")
    with torch.no_grad():
        want = torch.nn.functional.normalize(model(torch.from_numpy(x))).numpy()
    ensure_onnx(run / "model")
    got = load_backend(run / "model", "onnxruntime").embed(x)
    assert (np.sum(got * want, axis=1) >= 0.9999).all()


def test_finetune_starts_from_an_artifact(tiny_config, tmp_path):
    base = train(load_train_config(tiny_config)) / "model"
    base_model, _ = load_model(base)
    cfg = load_train_config(
        tiny_config,
        {"model.init_from": str(base), "optim.lr": 0.0, "run.out_dir": str(tmp_path / "ft")},
    )
    ft = train(cfg) / "model"
    # lr 0: weights equal the starting point except BatchNorm running statistics
    tuned, _ = load_model(ft)
    for (name, a), b in zip(
        base_model.state_dict().items(), tuned.state_dict().values(), strict=True
    ):
        if "running" not in name and "num_batches" not in name:
            torch.testing.assert_close(a, b, msg=name)


def test_resume_into_stage_two_unfreezes_the_backbone(tiny_config, tmp_path):
    """A two-stage fine-tune resumed in stage 2 trains the whole model."""
    base = tiny_artifact(tmp_path / "base")
    sets = {"model.init_from": str(base), "optim.probe_epochs": 1, "optim.epochs": 2}
    run = train(load_train_config(tiny_config, sets))  # a probe epoch, a full one: checkpoint
    before = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    train(load_train_config(tiny_config, {**sets, "optim.epochs": 3}), resume=True)
    after = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert not torch.equal(after["stem.net.0.0.weight"], before["stem.net.0.0.weight"])


def test_config_errors_name_the_yaml_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="optim.epochs"):
        load_train_config(bad)
    bad.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="optim.epoch"):
        load_train_config(bad)


def test_two_stage_finetune_with_teacher_onnx_reports_forgetting(tiny_config, tmp_path, real_faces):
    """Site fine-tuning: a folder of labelled crops, targets from a teacher ONNX, linear probe
    then full fine-tune, and a before/after report on held-out high-resolution faces."""
    import cv2

    base = train(load_train_config(tiny_config)) / "model"
    site = tmp_path / "site"
    for i, (crop, label) in enumerate(
        zip(real_faces["crops"][:48], real_faces["labels"][:48], strict=True)
    ):
        (site / f"person{label}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(site / f"person{label}" / f"{i}.jpg"), crop)
    holdout = tmp_path / "holdout"
    for i, (crop, label) in enumerate(
        zip(real_faces["crops"][48:], real_faces["labels"][48:], strict=True)
    ):
        (holdout / f"person{label}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(holdout / f"person{label}" / f"{i}.jpg"), crop)
    teacher = ensure_onnx(base)
    cfg = load_train_config(
        tiny_config,
        {
            "model.init_from": str(base),
            "data.pool": None,
            "data.folders": [str(site)],
            "data.teacher_onnx": str(teacher),
            "data.holdout_folders": [str(holdout)],
            "data.val_identities": 0,
            "optim.batch_size": 16,
            "optim.epochs": 2,
            "optim.probe_epochs": 1,
            "optim.lr": 1e-4,
            "run.out_dir": str(tmp_path / "ft"),
        },
    )
    base_model, _ = load_model(base)
    run = train(cfg)
    report = json.loads((run / "forgetting_report.json").read_text())
    assert set(report["before"]) == set(report["after"]) == {"val_acc_native", "val_acc_16"}
    tuned, _ = load_model(run / "model")
    # stage 1 froze the backbone, stage 2 changed it
    changed = [
        n
        for (n, a), b in zip(
            base_model.state_dict().items(), tuned.state_dict().values(), strict=True
        )
        if "running" not in n and "num_batches" not in n and not torch.equal(a, b)
    ]
    assert any(not n.startswith("head.") for n in changed)
    rows = [r for r in metrics_rows(run) if "loss" in r]
    assert {"kd", "rkd", "id"} <= set(rows[0])  # teacher targets from the ONNX were used
