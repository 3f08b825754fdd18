"""Reading model manifests and the manifests of derived artifacts (ONNX files, engines)."""

from __future__ import annotations

import json
import os
import tempfile
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
    """Write `path` through a private temporary (mkstemp: O_EXCL, random name) and rename it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2) + "\n")
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fh.fileno(), 0o666 & ~umask)  # a manifest is not private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
