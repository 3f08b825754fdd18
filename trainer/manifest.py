"""Reading a model artifact's manifest.json (plain JSON; importable without torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a model artifact (no manifest.json): {model_dir}")
    return json.loads(path.read_text())
