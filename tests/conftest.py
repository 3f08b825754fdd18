"""Shared fixtures: locate the real test data in <repo>/../shared (env FACEMOE_SHARED overrides).

Tests that use these fixtures skip with a clear reason when the shared folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
YUNET_FILE = "face_detection_yunet_2026may.onnx"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set FACEMOE_SHARED to the shared folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder: $FACEMOE_SHARED, else <repo>/../shared."""
    return _need(Path(os.environ.get("FACEMOE_SHARED") or REPO_ROOT.parent / "shared"),
                 "shared data folder")


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    """<shared>/data (videos/, lfw/, celeba299/, ...)."""
    return _need(shared_dir / "data", "shared data")


@pytest.fixture(scope="session")
def models_dir(shared_dir: Path) -> Path:
    """<shared>/models."""
    return _need(shared_dir / "models", "shared models")


@pytest.fixture(scope="session")
def yunet_path(models_dir: Path) -> Path:
    """The YuNet face detector ONNX file."""
    return _need(models_dir / YUNET_FILE, "YuNet detector")
