"""Site fine-tune sweep: one frozen-prefix cache, several recipe variants, what each keeps.

For each variant (`--set`-style overrides of a site recipe) on a site pool (`facemoe data
prepare --from-gallery`, or the pool `facemoe finetune --from-gallery` leaves in its run
folder): the step the validation tracks chose, their margin, the held-out identification
after, and how far the variant moved general faces: the mean cosine of its embeddings of 300
teacher-pool faces (training-side identities only) to the start model's, at native resolution
and downscaled to 16 px. That last figure is how the recipes' rates were set (the largest
keeping >= 0.99 at 16 px), without the LFW check.

Usage (from the repository root):
  nice .venv/bin/python benchmarks/site_sweep.py configs/finetune-site-dense.yaml \
      runs/site24/dense/site-pool.npz --variant lr3e-5 optim.lr=0.00003 \
      --variant lr1e-4 optim.lr=0.0001 --variant lr3e-4 optim.lr=0.0003
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.cli.train import parse_overrides  # noqa: E402
from trainer.augment import downscale  # noqa: E402
from trainer.site import (  # noqa: E402
    TRAIN,
    cache_prefix,
    embed_cached,
    identification,
    load_site_config,
    onnx_prefix,
    prepare,
    train,
)

GENERAL_FACES, GENERAL_SEED = 300, 99


def general_faces(pool_path: str) -> np.ndarray:
    """300 teacher-pool faces at native resolution, then the same downscaled to 16 px."""
    d = np.load(pool_path)
    idx = np.sort(np.random.default_rng(GENERAL_SEED).choice(len(d["crops"]), GENERAL_FACES,
                                                             replace=False))
    faces = d["crops"][idx]
    return np.concatenate([faces, np.stack([downscale(c, 16) for c in faces])])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="a site recipe (configs/finetune-site*.yaml)")
    ap.add_argument("pool", help="a site pool .npz")
    ap.add_argument("--variant", nargs="+", action="append", required=True,
                    metavar=("NAME", "KEY=VALUE"), help="a name and its overrides")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for every variant")
    args = ap.parse_args()
    common = {"data.site_pool": args.pool, **parse_overrides(args.set)}
    cfg = load_site_config(args.recipe, common)
    k_max = max(load_site_config(args.recipe, {**common, **parse_overrides(v[1:])})
                .data.site_lowres for v in args.variant)
    prep = prepare(load_site_config(args.recipe, {**common, "data.site_lowres": k_max}))
    final = prep.check_split
    before = identification(prep.emb0, prep.labels, final, prep.track)
    print(json.dumps({"before": before, "cache_s": round(prep.cache_s, 1)}), flush=True)
    general = cache_prefix(prep.split, general_faces(cfg.data.anchor_pool), cfg.run.batch,
                           onnx_prefix(prep.split))
    start_general = embed_cached(prep.split, general)
    start_state = copy.deepcopy(prep.model.state_dict())
    aug, aug_of, n_train = prep.aug_feats, prep.aug_of, int((prep.part == TRAIN).sum())
    for name, *overrides in args.variant:
        c = load_site_config(args.recipe, {**common, **parse_overrides(overrides)})
        prep.model.load_state_dict(start_state)
        k = c.data.site_lowres
        prep.aug_feats, prep.aug_of = aug[:k * n_train], aug_of[:k * n_train]
        torch.manual_seed(c.run.seed)
        t0 = time.time()
        run = train(c, prep)
        after = identification(embed_cached(prep.split, prep.site_feats), prep.labels, final,
                               prep.track)
        cos = (embed_cached(prep.split, general) * start_general).sum(1)
        print(json.dumps({
            "variant": name, "overrides": overrides, "chosen_step": run["chosen_step"],
            "validation": run["val"], "heldout_after": after,
            "general_cosine_native": round(float(cos[:GENERAL_FACES].mean()), 4),
            "general_cosine_16px": round(float(cos[GENERAL_FACES:].mean()), 4),
            "train_s": round(time.time() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
