"""Reading model manifests and the manifests of derived artifacts (ONNX files, engines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.manifest import read_manifest  # the one definition of the artifact layout

__all__ = ["read_manifest", "model_id", "derived_manifest", "write_json_atomic"]


def model_id(manifest: dict[str, Any]) -> tuple[str, str]:
    """(name, version) that galleries record: version carries the weights hash prefix."""
    return manifest["name"], f"{manifest['version']}+{manifest['weights_sha256'][:12]}"


def derived_manifest(manifest: dict[str, Any], **build: Any) -> dict[str, Any]:
    """The model manifest plus the build info of a derived artifact."""
    return {**manifest, "build": build}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
