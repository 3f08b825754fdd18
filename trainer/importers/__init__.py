"""Importers of pretrained face networks (dlib's file format, SFace's ONNX in PyTorch, any ONNX
embedder): each reads the weights, checks what it got and saves a model artifact;
`save_imported` is how the PyTorch ones record where their weights came from."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing an importer of ONNX files loads no torch
    from torch import nn


def save_imported(model: nn.Module, architecture: str, out_dir: str | Path, *, name: str | None,
                  version: str, imported_from: str, source: dict[str, Any]) -> Path:
    """`model` saved as an artifact of `architecture` (its registry config), named `name` or
    the architecture, with `source` (the weights' file, package, sha256, whether it is the
    known release, licence) in the manifest's data."""
    from trainer.artifact import save_artifact
    from trainer.models import model_config

    return save_artifact(model, model_config(architecture), out_dir,
                         name=name or architecture, version=version,
                         recipe={"imported_from": imported_from, "architecture": architecture},
                         data={"source": source})
