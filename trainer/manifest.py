"""The model manifest: the one reader, writer and validator of a model artifact's manifest.json.

A model artifact directory holds `manifest.json` (this module), `weights.safetensors` and
`model.yaml` (`trainer.artifact`), or `model.onnx` for an imported network. The manifest is
the input contract every runtime reads: `input_size`, `mean`, `std`, `colour`, `layout`,
`crop_template` (optional: the ArcFace 112 crop otherwise, see `trainer.preprocess`),
`embedding_dim` and `normalised`, plus identity (`name`, `version`, `weights_sha256`) and what
it was made from (`architecture`, `training`, `data`, `metrics`). Derived artifacts (ONNX
exports, TensorRT engines) carry the manifest plus their own `build` section
(`derived_manifest`); an ONNX file carries it in its metadata under `ONNX_METADATA_KEY`.

Plain JSON, importable without torch, NumPy or OpenCV.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer.fsutil import PUBLIC, write_bytes

__all__ = [
    "MANIFEST",
    "ONNX_METADATA_KEY",
    "derived_manifest",
    "manifest_from_metadata",
    "model_id",
    "read_manifest",
    "update_metrics",
    "validate_manifest",
    "write_json_atomic",
    "write_manifest",
]

MANIFEST = "manifest.json"
ONNX_METADATA_KEY = "facemoe_manifest"
COLOURS = ("RGB", "BGR")


def validate_manifest(manifest: Any, where: str | Path = "manifest") -> dict[str, Any]:
    """`manifest` itself when it holds what every runtime reads; else ValueError (one line
    naming `where` and the field)."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: a manifest is a JSON object, got {type(manifest).__name__}")
    for key in ("name", "version", "weights_sha256"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise ValueError(f"{where}: manifest {key!r} must be a non-empty string")
    for key in ("input_size", "embedding_dim"):
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: manifest {key!r} must be a positive integer, got {value!r}")
    for key in ("mean", "std"):
        value = manifest.get(key)
        if (
            not isinstance(value, list)
            or len(value) != 3
            or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value)
        ):
            raise ValueError(f"{where}: manifest {key!r} must be 3 numbers, got {value!r}")
    if any(v <= 0 for v in manifest["std"]):
        raise ValueError(f"{where}: manifest 'std' must be positive, got {manifest['std']!r}")
    if manifest.get("colour", "RGB") not in COLOURS:
        raise ValueError(
            f"{where}: manifest 'colour' must be one of {', '.join(COLOURS)}, "
            f"got {manifest['colour']!r}"
        )
    return manifest


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The validated manifest of the artifact in `model_dir`.

    FileNotFoundError when there is none; ValueError (one line) when it is not a manifest.
    """
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"not a model artifact (no {MANIFEST}): {model_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return validate_manifest(manifest, path)


def write_manifest(model_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Validate `manifest` and write it atomically as `model_dir`/manifest.json; the path."""
    path = Path(model_dir) / MANIFEST
    write_json_atomic(path, validate_manifest(manifest, path))
    return path


def update_metrics(model_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Merge measured metrics into manifest.json (the weights and their hash are unchanged)."""
    manifest = read_manifest(model_dir)
    manifest.setdefault("metrics", {}).update(metrics)
    write_manifest(model_dir, manifest)


def model_id(manifest: dict[str, Any]) -> tuple[str, str]:
    """(name, version) that galleries record: version carries the weights hash prefix."""
    return manifest["name"], f"{manifest['version']}+{manifest['weights_sha256'][:12]}"


def derived_manifest(manifest: dict[str, Any], **build: Any) -> dict[str, Any]:
    """The model manifest plus the build info of a derived artifact."""
    return {**manifest, "build": build}


def manifest_from_metadata(metadata: Mapping[str, str], where: str | Path) -> dict[str, Any]:
    """The manifest an ONNX file carries in its metadata (`{key: value}` of its properties);
    ValueError (one line) when it carries none or a malformed one."""
    if ONNX_METADATA_KEY not in metadata:
        raise ValueError(f"{where} is not a FaceMoE export (no {ONNX_METADATA_KEY} metadata)")
    try:
        manifest = json.loads(metadata[ONNX_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: {ONNX_METADATA_KEY} metadata is not valid JSON ({e})") from None
    return validate_manifest(manifest, where)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """`data` as indented JSON in `path`, written atomically (`trainer.fsutil`); a manifest
    is not private."""
    write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), PUBLIC)
