"""`facemoe calibrate`: measure a model's open-set FAR curves on training-side identities.

The photos are the shared training pool's labelled identities (../shared/data/teacher lists them
with YuNet's landmarks): the CelebA subset (299 people) and LFW's training identities (1,468),
never an LFW evaluation identity. Every photo is enrolled sharp; a seeded subset is also probed
with its face at each resolution (`app.align.degrade_to`), and `trainer.calibrate` turns the
impostor scores into FAR curves stored in the manifest ("calibration"), with the pair threshold
at FAR 1e-3 as "recommended_threshold" (the fixed threshold of `matching.threshold: auto`
without an open-set rate). Use it for models that did not train on this pool (imported ones);
a model trained here is calibrated on its held-out identities (benchmarks/release_model.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from app.align import STORE, align_face, degrade_to, recut
from app.embed import Embedder
from trainer.calibrate import fit_far_curves, threshold_for

log = logging.getLogger(__name__)

RESOLUTIONS = (None, 40, 32, 24, 20, 16)
PROBES = 3000


def training_side_faces(data_root: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Photos, landmarks float32[N,5,2] and identity labels of the labelled training-side
    identities in the teacher file (CelebA subset and LFW training identities)."""
    t = np.load(data_root / "teacher" / "dlib_resnet_v1.npz")
    celeb = dict(line.split() for line in
                 (data_root / "celeba299" / "identities.txt").read_text().splitlines())
    evaluation = set((data_root / "lfw" / "eval_identities.txt").read_text().split())
    paths, marks, labels = [], [], []
    for p, m in zip(t["paths"], t["landmarks"], strict=True):
        p = str(p)
        if p.startswith("celeba299/"):
            label = "celeba:" + celeb[Path(p).name]
        elif p.startswith("lfw/"):
            name = Path(p).parent.name
            if name in evaluation:  # the teacher file holds none; refuse if it ever did
                raise ValueError(f"{p}: an LFW evaluation identity is not calibration data")
            label = "lfw:" + name
        else:
            continue  # utkface: no identity labels
        paths.append(data_root / p)
        marks.append(np.asarray(m, np.float32).reshape(5, 2))
        labels.append(label)
    _, ids = np.unique(np.array(labels), return_inverse=True)
    return paths, np.stack(marks), ids


def calibrate(model_dir: str, data_root: Path, backend: str = "onnxruntime",
              probes: int = PROBES, seed: int = 0, progress: bool = True) -> dict:
    """FAR curves of `model_dir` (not written; see `write`)."""
    embedder = Embedder.from_config(model_dir, backend)
    paths, marks, ids = training_side_faces(data_root)
    chosen = set(np.random.default_rng(seed).choice(len(paths), min(probes, len(paths)),
                                                    replace=False).tolist())
    native, kept = [], []
    for i, (p, m) in enumerate(tqdm(list(zip(paths, marks, strict=True)), desc="align",
                                    unit="img", disable=not progress)):
        image = cv2.imread(str(p))
        if image is None:
            raise ValueError(f"cannot read {p}")
        native.append(align_face(image, m, embedder.template))
        if i in chosen:
            kept.append(align_face(image, m, STORE))
    order = sorted(chosen)
    gallery = embedder.embed(np.stack(native))
    by_res = {}
    for res in tqdm(RESOLUTIONS, desc="embed probes", unit="res", disable=not progress):
        by_res[res] = gallery[order] if res is None else embedder.embed(
            np.stack([recut(degrade_to(c, res), embedder.template) for c in kept]))
    cal = fit_far_curves(gallery, ids, by_res, ids[order])
    cal["data"] = ("shared/data teacher list: CelebA subset and LFW training identities "
                   "(no LFW evaluation identity)")
    return {"model": embedder.model, "calibration": cal,
            "recommended_threshold": round(threshold_for(cal, 1e-3, 1), 4)}


def write(model_dir: str, result: dict) -> None:
    """Store the calibration and the FAR 1e-3 pair threshold in the model's manifest."""
    from trainer.manifest import read_manifest, write_manifest

    manifest = read_manifest(model_dir)
    manifest["calibration"] = result["calibration"]
    metrics = manifest.setdefault("metrics", {})
    metrics["recommended_threshold"] = result["recommended_threshold"]
    metrics["threshold_far"] = 1e-3
    metrics["threshold_pairs"] = result["calibration"]["curves"][0]["pairs"]
    metrics["threshold_identities"] = result["calibration"]["identities"]
    write_manifest(model_dir, manifest)
