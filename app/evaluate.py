"""`facemoe eval lfw`: the official 10-fold protocol on faces found and aligned by the app.

Cross-resolution probes (`--probe-res N`): the second image's aligned crop is downsampled to
NxN with INTER_AREA and upsampled back with INTER_CUBIC (the STACK.md baseline protocol).
Aligned crops are cached next to the pairs file's name in the user cache (by content hash).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from app.align import align_face
from app.config import AppConfig
from app.detect import FaceDetector
from app.embed import Embedder
from app.runtime import make_detector
from trainer.augment import downscale
from trainer.evaluate import Pair, plot_roc, read_lfw_pairs, roc, verification_report

log = logging.getLogger(__name__)


def _central_face(image: np.ndarray, detector: FaceDetector):
    dets = detector.detect(image)
    if not dets:
        return None
    h, w = image.shape[:2]
    return min(dets, key=lambda d: (d.bbox[0] + d.bbox[2] / 2 - w / 2) ** 2 + (d.bbox[1] + d.bbox[3] / 2 - h / 2) ** 2)


def align_pairs(root: Path, pairs: list[Pair], detector: FaceDetector) -> tuple[dict[str, np.ndarray], list[str]]:
    """Aligned crop per image (the most central face, as LFW is centred); images with no face listed."""
    names = sorted({p.left for p in pairs} | {p.right for p in pairs})
    key = hashlib.sha256(("\n".join(names) + str(root.resolve())).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("FACEMOE_CACHE", Path.home() / ".cache" / "facemoe")) / f"lfw-{key}.npz"
    if cache.is_file():
        d = np.load(cache)
        crops = dict(zip(d["names"].tolist(), d["crops"]))
        return crops, d["missing"].tolist()
    crops, missing = {}, []
    for name in tqdm(names, desc="detect+align", unit="img"):
        image = cv2.imread(str(root / name), cv2.IMREAD_COLOR)
        det = None if image is None else _central_face(image, detector)
        if det is None:
            missing.append(name)
            # centre crop stands in so the pair still counts (the protocol scores all 6,000 pairs)
            image = image if image is not None else np.zeros((250, 250, 3), np.uint8)
            h, w = image.shape[:2]
            crops[name] = cv2.resize(image[h // 4:3 * h // 4, w // 4:3 * w // 4], (112, 112))
        else:
            crops[name] = align_face(image, det.landmarks)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache.with_suffix(".tmp.npz"), names=np.array(list(crops)), crops=np.stack(list(crops.values())),
             missing=np.array(missing, dtype=str))
    cache.with_suffix(".tmp.npz").replace(cache)
    return crops, missing


def evaluate_pairs(embedder: Embedder, crops: dict[str, np.ndarray], pairs: list[Pair],
                   probe_res: list[int]) -> tuple[dict[str, dict], dict[str, tuple]]:
    names = list(crops)
    index = {n: i for i, n in enumerate(names)}
    clean = embedder.embed(np.stack([crops[n] for n in names]))
    left = np.array([index[p.left] for p in pairs])
    right_names = [p.right for p in pairs]
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    results, curves = {}, {}
    for res in [None, *probe_res]:
        if res is None:
            right = clean[[index[n] for n in right_names]]
        else:
            right = embedder.embed(np.stack([downscale(crops[n], res) for n in right_names]))
        scores = np.sum(clean[left] * right, axis=1)
        label = "native" if res is None else f"{res}px"
        results[label] = verification_report(scores, same, folds)
        far, tar, _ = roc(scores, same)
        curves[label] = (far, tar)
    return results, curves


def eval_lfw(cfg: AppConfig, root: Path, pairs_file: Path, probe_res: list[int] | None,
             model_dir: str | None = None, roc_png: str | None = None,
             write_manifest: bool = False) -> dict:
    if not root.is_dir():
        raise FileNotFoundError(f"no such LFW image folder: {root}")
    pairs = read_lfw_pairs(pairs_file)
    model_cfg = cfg.model if model_dir is None else cfg.model.model_copy(update={"dir": model_dir})
    embedder = Embedder.from_config(model_cfg.dir, model_cfg.backend, model_cfg.threads, model_cfg.batch_size)
    crops, missing = align_pairs(root, pairs, make_detector(cfg))
    results, curves = evaluate_pairs(embedder, crops, pairs, probe_res or [])
    report = {"benchmark": "lfw", "model": embedder.model, "backend": embedder.backend.name,
              "images": len(crops), "no_face": len(missing), "results": results}
    if roc_png:
        report["roc_png"] = str(plot_roc(curves, roc_png))
    if write_manifest:
        from trainer.artifact import update_metrics

        update_metrics(model_cfg.dir, {"lfw": results})
    return report
