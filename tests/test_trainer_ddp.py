"""Multi-process training through torchrun (DDP over gloo on CPU): two ranks, one model."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import metrics_rows
from trainer.artifact import load_model, read_manifest

pytestmark = pytest.mark.e2e


def _torchrun(config: Path) -> subprocess.CompletedProcess:
    facemoe = Path(sys.executable).parent / "facemoe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, str(facemoe), "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_torchrun_two_ranks_train_one_model(tmp_path, tiny_config):
    config = tiny_config  # the tiny e2e config, changed below for two ranks
    cfg = yaml.safe_load(config.read_text())
    # 72 training faces / (16 per rank x 2 ranks) = 2 steps per epoch; each rank's batch holds
    # labelled faces (their loss heads are averaged over ranks); cross-batch memory is per rank
    cfg["optim"].update({"epochs": 2, "batch_size": 16})
    cfg["loss"]["rkd_memory"] = 32
    cfg["run"]["threads"] = 1
    config.write_text(yaml.safe_dump(cfg))
    proc = _torchrun(config)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # check_ranks_agree ran: the two ranks' backbones and loss heads ended identical
    assert "parameters identical on all 2 ranks" in proc.stderr
    run = tmp_path / "run"
    rows = metrics_rows(run)
    # only rank 0 logs
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert read_manifest(run / "model")["training"]["steps"] == 4

    # two-stage fine-tune under DDP: stage 2 unfreezes the backbone, whose gradients must then
    # be reduced too (DDP is rebuilt), or the ranks drift apart and the check above fails
    cfg["model"]["init_from"] = str(run / "model")
    cfg["optim"].update({"probe_epochs": 1, "lr": 1e-3})
    cfg["run"]["out_dir"] = str(tmp_path / "ft")
    config.write_text(yaml.safe_dump(cfg))
    proc = _torchrun(config)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "parameters identical on all 2 ranks" in proc.stderr
    base, _ = load_model(run / "model")
    tuned, _ = load_model(tmp_path / "ft" / "model")
    assert not torch.equal(base.stem.net[0][0].weight, tuned.stem.net[0][0].weight)
