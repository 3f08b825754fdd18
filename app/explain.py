"""`facemoe explain IMAGE`: which MoE expert each token of a photo's largest face is routed to
(the maps and plots themselves are `trainer.explain`'s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.config import AppConfig
from app.faces import aligned_face, read_image
from app.runtime import make_detector
from trainer.preprocess import CropTemplate


def explain_image(
    cfg: AppConfig,
    image_path: Path,
    model_dir: str | None = None,
    probe_res: list[int] | None = None,
    out_png: Path | None = None,
) -> dict:
    """Detect the largest face in an image, align it, and show the MoE routing of the native
    crop and of each `probe_res` NxN degraded copy (maps per layer + expert shares; PNG)."""
    from trainer.artifact import load_model
    from trainer.explain import degrade_crops, plot_routing, routing_maps

    if not image_path.is_file():
        raise FileNotFoundError(f"no such file: {image_path}")
    image = read_image(image_path)
    model, manifest = load_model(model_dir or cfg.model.dir)
    face = aligned_face(image, make_detector(cfg), "largest",
                        CropTemplate.from_manifest(manifest), source=str(image_path))
    det, crop = face.detection, face.crop
    rows, resolutions = [], {}
    for res in [None, *(probe_res or [])]:
        x = degrade_crops(crop[None], res)
        maps = routing_maps(
            model,
            x,
            tuple(manifest.get("mean", (0.5,) * 3)),
            tuple(manifest.get("std", (0.5,) * 3)),
        )
        label = "native" if res is None else f"{res}px"
        rows.append((label, x[0], maps))
        resolutions[label] = {
            "shares": np.round(maps.shares, 4).tolist(),
            "top1_shares": np.round(maps.top1_shares, 4).tolist(),
            "top1": [m[0].tolist() for m in maps.top1],
        }
    maps = rows[0][2]
    model_name = f"{manifest.get('name')}@{manifest.get('version')}"
    report = {
        "image": str(image_path),
        "model": model_name,
        "face": {
            "bbox": [round(float(v), 1) for v in det.bbox],
            "score": round(float(det.score), 3),
        },
        "layers": len(maps.topk),
        "num_experts": maps.num_experts,
        "top_k": maps.top_k,
        "grids": maps.grids,
        "resolutions": resolutions,
    }
    if out_png is not None:
        title = (
            f"{model_name}: routing of {image_path.name} "
            "(colour: top-1 expert per token; digits: top-k)"
        )
        report["png"] = str(plot_routing(rows, out_png, title=title))
    return report
