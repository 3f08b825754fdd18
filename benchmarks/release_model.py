"""Turn a finished training run into the shipped model directory, with measured metrics.

    .venv/bin/python benchmarks/release_model.py runs/facemoe-edge models/facemoe-edge

1. copies the artifact (weights, model.yaml, manifest.json) from RUN/model;
2. calibrates the open-set threshold at FAR 1e-3 on the run's held-out CelebA identities
   (the same seeded split the trainer validated on; never LFW);
3. measures expert routing shares per probe resolution on 1,000 LFW faces (evaluation only;
   landmarks from the `facemoe eval lfw` cache, aligned to the model's template) and stores
   both in manifest.json. LFW accuracy is added by `facemoe eval lfw ... --write-manifest`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from app.align import align_face
from trainer.artifact import load_model, update_metrics
from trainer.config import TrainConfig
from trainer.explain import routing_report
from trainer.models.moe import moe_layers
from trainer.preprocess import CropTemplate
from trainer.train import calibrate_threshold, load_training_data, split_validation


def main(run_dir: str, out_dir: str) -> None:
    run, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("weights.safetensors", "model.yaml", "manifest.json"):
        shutil.copy2(run / "model" / name, out / name)
    cfg = TrainConfig.model_validate(
        json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    )
    _, val = split_validation(load_training_data(cfg), cfg.data.val_identities, cfg.run.seed)
    model, _ = load_model(out)
    metrics = calibrate_threshold(model, val, torch.device("cpu"))
    cache = sorted((Path.home() / ".cache" / "facemoe").glob("lfw-landmarks-*.npz"))
    lfw = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw" / "lfw-deepfunneled"
    if cache and lfw.is_dir() and moe_layers(model):
        d = np.load(cache[-1])
        template = CropTemplate.from_manifest(json.loads((out / "manifest.json").read_text()))
        crops = np.stack([
            align_face(cv2.imread(str(lfw / name)), marks, template)
            for name, marks in zip(d["names"][:1000], d["landmarks"][:1000], strict=True)
        ])
        report = routing_report(out, crops, resolutions=(None, 32, 24, 16))
        metrics["routing"] = {k: report[k] for k in ("resolutions", "tv_distance", "crops")}
    update_metrics(out, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "routing"}, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
