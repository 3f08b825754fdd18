"""Training that cannot work stops with one line, through the real CLI on real faces: too few
faces for one batch (before anything is written), a loss that turns non-finite (at its step,
before any model is written)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import metrics_rows

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def facemoe_train(config: Path, *sets: str) -> subprocess.CompletedProcess:
    overrides = [a for s in sets for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "train", "--config", str(config), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fewer_faces_than_a_batch_is_one_line_before_anything_is_written(tiny_config):
    # the tiny pool: 96 faces, 2 of its 8 identities (24 faces) held out for validation
    done = facemoe_train(tiny_config, "optim.batch_size=100")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "facemoe: error: optim.batch_size 100 needs at least 100 training faces for one step; "
        "the data has 72 (24 more held out by data.val_identities 2)"
    )
    assert not (tiny_config.parent / "run").exists()


def test_non_finite_loss_stops_at_its_step_and_writes_no_model(tiny_config):
    # an absurd learning rate: step 1 (the untouched model) is finite, its update is not
    done = facemoe_train(tiny_config, "optim.lr=1e30")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    run = tiny_config.parent / "run"
    assert done.stderr.splitlines()[-1] == (
        "facemoe: error: training diverged: the loss is nan at step 2 (epoch 1/1) after an "
        f"update at learning rate 1e+30: lower optim.lr; no model written ({run} keeps "
        "config.yaml, metrics.jsonl)"
    )
    assert not (run / "model").exists() and not (run / "checkpoint.pt").exists()
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert [r["step"] for r in metrics_rows(run)] == [1]  # the last finite step
