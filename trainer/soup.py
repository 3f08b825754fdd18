"""Uniform weight averaging ("model soup") of fine-tuned artifacts that share an architecture.

Runs fine-tuned from one starting point stay in one loss basin, so the mean of their weights is
a model of its own, usually better than each ingredient, at no inference cost (Wortsman et al.,
"Model soups", ICML 2022). BatchNorm running statistics are averaged like the weights; integer
buffers (batch counters) are taken from the first ingredient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from trainer.artifact import load_model, save_artifact


def soup(ingredients: list[str | Path], out_dir: str | Path, *, name: str, version: str) -> Path:
    """Average the weights of `ingredients` (artifact dirs) into a new artifact at `out_dir`."""
    if len(ingredients) < 2:
        raise ValueError("a soup needs at least two model artifacts")
    archs = [yaml.safe_load((Path(d) / "model.yaml").read_text()) for d in ingredients]
    for d, arch in zip(ingredients[1:], archs[1:], strict=True):
        if arch != archs[0]:
            raise ValueError(f"{d}: architecture differs from {ingredients[0]} (model.yaml)")
    models, manifests = zip(*(load_model(d) for d in ingredients), strict=True)
    states = [m.state_dict() for m in models]
    mean: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            mean[key] = torch.stack([s[key].float() for s in states]).mean(0).to(first.dtype)
        else:
            mean[key] = first
    model = models[0]
    model.load_state_dict(mean)
    recipe: dict[str, Any] = {
        "soup": [
            {"dir": str(d), "version": m.get("version"), "weights_sha256": m["weights_sha256"]}
            for d, m in zip(ingredients, manifests, strict=True)
        ],
        "ingredients_training": [m.get("training", {}) for m in manifests],
    }
    return save_artifact(
        model,
        archs[0],
        out_dir,
        name=name,
        version=version,
        recipe=recipe,
        data=manifests[0].get("data", {}),
    )
