"""The README's data-path diagram says what the default model's manifest says: the crop the
aligner makes (its crop template's size) and the embedding dimension."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainer.manifest import read_manifest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def test_the_data_path_diagram_matches_the_default_model(default_model_dir: Path):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    diagram = text.split("## What it does", 1)[1].split("\n- ", 1)[0]
    manifest = read_manifest(default_model_dir)
    size = manifest.get("crop_template", {}).get("size", 112)  # none declared: ArcFace 112
    name = manifest["name"]
    crops = re.findall(r"(\d+)x(\d+)", diagram)
    dims = [int(d) for d in re.findall(r"(\d+)-d\b", diagram)]
    assert crops == [(str(size), str(size))], crops
    assert dims == [int(manifest["embedding_dim"])], dims
    assert name.lower() in diagram.lower()
