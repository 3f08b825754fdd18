"""The self-describing model artifact: weights.safetensors + model.yaml + manifest.json."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.fsutil import PUBLIC, atomic_path, write_bytes
from trainer.manifest import read_manifest, update_metrics, validate_manifest, write_manifest
from trainer.models import create_model
from trainer.preprocess import MEAN, STD

WEIGHTS = "weights.safetensors"
__all__ = [
    "WEIGHTS", "artifact_manifest", "load_model", "save_artifact", "sha256_file", "update_metrics",
]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_manifest(
    model: nn.Module,
    arch: dict[str, Any],
    *,
    name: str,
    version: str,
    weights_sha256: str,
    recipe: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of `model` (built from the registry config `arch`), validated.

    The input contract (mean, std, crop template) is the model's own (`input_mean`, `input_std`,
    `crop_template` attributes: a network that starts from another keeps that one's); models
    without them take the ArcFace 112 crop and mean/std 0.5.
    """
    manifest = {
        "name": name,
        "version": version,
        "architecture": arch["name"],
        "input_size": int(getattr(model, "input_size", arch.get("img_size", 112))),
        "crop_size": int(getattr(model, "input_size", 112)),
        "mean": list(getattr(model, "input_mean", MEAN)),
        "std": list(getattr(model, "input_std", STD)),
        "colour": "RGB",
        "layout": "NCHW",
        "embedding_dim": int(getattr(model, "embed_dim", 512)),
        "normalised": True,
        "num_experts": arch.get("num_experts"),
        "top_k": arch.get("top_k"),
        "gate": arch.get("gate"),
        "training": recipe or {},
        "data": data or {},
        "metrics": metrics or {},
        "weights_sha256": weights_sha256,
    }
    template = getattr(model, "crop_template", None)
    if template is not None:
        manifest["crop_template"] = template.to_manifest()
    return validate_manifest(manifest, f"model {name}")


def save_artifact(
    model: nn.Module,
    arch: dict[str, Any],
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    recipe: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write the artifact directory; returns it. `arch` is the registry config (model.yaml);
    the manifest is `artifact_manifest`'s."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS, PUBLIC, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    write_bytes(out / "model.yaml", yaml.safe_dump(arch, sort_keys=False).encode("utf-8"), PUBLIC)
    manifest = artifact_manifest(
        model, arch, name=name, version=version, weights_sha256=sha256_file(out / WEIGHTS),
        recipe=recipe, data=data, metrics=metrics,
    )
    write_manifest(out, manifest)
    return out


def load_model(model_dir: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model from model.yaml, load its weights (checksum verified), eval mode."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    weights = model_dir / WEIGHTS
    if sha256_file(weights) != manifest["weights_sha256"]:
        raise ValueError(f"{weights}: checksum does not match manifest.json")
    arch = yaml.safe_load((model_dir / "model.yaml").read_text())
    name = arch.pop("name")
    model = create_model(name, **{**arch, **overrides})
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), manifest
