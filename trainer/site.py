"""Site fine-tuning: adapt the shipped model to a site's named faces without forgetting.

The recipe (`configs/finetune-site.yaml`), for any model of the SFace family, dense or FaceMoE
upcycled from it (the mechanism does not depend on which):
1. The model's own stage-1 split (`probe_trainable`: an upcycled model's FaceMoE blocks and the
   head; a dense one's head) decides what trains. Everything before the first trainable block
   is frozen and deterministic, so its output is computed once per face and cached: a step
   then costs only the trainable tail (about 15x cheaper on a CPU than the whole network).
2. Anchor faces (general faces of the shared teacher pool, never a site face and never an LFW
   evaluation identity: the pool refuses them) at native resolution and again downscaled to a
   random face size: their targets are the starting model's own embeddings of the same
   inputs, so cosine distillation keeps the model's outputs on general faces (the forgetting
   guard, at high and low resolution).
3. The site's training tracks: CosFace on the site's identities, class centres starting at
   each identity's mean embedding by the starting model.
4. The check: identification of the held-out tracks (a track's mean embedding against each
   identity's mean training embedding, as the gallery matches) before and after, and how much
   each expert (or, for a dense model, the head) changed and which experts the site's faces
   use.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import Field
from torch import nn

from trainer.artifact import load_model, save_artifact, sha256_file
from trainer.augment import downscale
from trainer.config import ConfigError, _Strict, read_yaml_config
from trainer.losses import MarginHead, cosine_distill_loss, router_losses
from trainer.models.moe import moe_layers
from trainer.preprocess import to_input

log = logging.getLogger(__name__)

TRAIN, HELDOUT, UNLABELLED = 0, 1, 2  # app.sitepool's split values


class SiteModel(_Strict):
    init_from: str  # the shipped model's trainer artifact (facemoe import sface [--architecture])


class SiteData(_Strict):
    site_pool: str | None = None  # facemoe data prepare --from-gallery (or finetune's)
    anchor_pool: str  # the shared teacher pool (facemoe data prepare --teacher)
    anchor_sources: list[str] = Field(default_factory=lambda: ["celeba299", "lfw", "utkface"])
    anchor_faces: int = Field(400, ge=2)
    anchor_lowres: tuple[int, int] = (12, 32)  # face sizes (px) of the downscaled copies


class SiteLoss(_Strict):
    s: float = 32.0
    m: float = 0.2
    w_id: float = 1.0  # CosFace on the site's labelled training faces
    w_kd: float = 10.0  # distillation to the starting model's outputs on anchor faces
    lambda_z: float = 10.0
    lambda_balance: float = 10.0
    z_scale: float = 1e-3
    balance_scale: float = 1e-2


class SiteOptim(_Strict):
    lr: float = 3e-4
    steps: int = Field(200, ge=1)
    site_batch: int = Field(32, ge=2)
    anchor_batch: int = Field(32, ge=2)
    weight_decay: float = 0.0
    clip_grad: float = 5.0


class SiteRun(_Strict):
    out_dir: str = "runs/site"
    name: str = "site-sface"
    version: str = "1.0.0"
    seed: int = 0
    threads: int = 0
    batch: int = 32  # frozen-prefix batch


class SiteConfig(_Strict):
    model: SiteModel
    data: SiteData
    loss: SiteLoss = Field(default_factory=SiteLoss)
    optim: SiteOptim = Field(default_factory=SiteOptim)
    run: SiteRun = Field(default_factory=SiteRun)


def load_site_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SiteConfig:
    return read_yaml_config(path, SiteConfig, overrides)


class FrozenSplit(nn.Module):
    """The model cut before its first stage-1-trainable block: `prefix` (frozen, run once per
    face) and `suffix` (the trainable tail and the head)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not all(hasattr(model, a) for a in ("stages", "forward_head", "probe_trainable")):
            raise ConfigError(f"{type(model).__name__} has no stages to cut: the site recipe "
                              f"fine-tunes models of the SFace family (sface, facemoe-sface)")
        blocks = [(f"stages.{i}.{j}", b) for i, s in enumerate(model.stages)
                  for j, b in enumerate(s)]
        first = next((k for k, (name, b) in enumerate(blocks)
                      if any(model.probe_trainable(f"{name}.{p}") for p, _ in
                             b.named_parameters())), len(blocks))
        self.model = model
        self.head_blocks = nn.Sequential(*[b for _, b in blocks[first:]])
        self._prefix = [b for _, b in blocks[:first]]
        self.cut = blocks[first][0] if first < len(blocks) else "head"

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.model.input_shift) * self.model.input_scale
        for b in self._prefix:
            h = b(h)
        return h

    def suffix(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.head_blocks(h))


def _inputs(model: nn.Module, crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(to_input(crops, model.input_size, model.input_mean, model.input_std))


def cache_prefix(split: FrozenSplit, crops: np.ndarray, batch: int) -> torch.Tensor:
    """The frozen prefix's output for every crop (float16: half the memory, ample precision
    for a fine-tune's inputs)."""
    split.model.eval()
    out = [split.prefix(_inputs(split.model, crops[i:i + batch])).half()
           for i in range(0, len(crops), batch)]
    return torch.cat(out)


@torch.no_grad()
def embed_cached(split: FrozenSplit, feats: torch.Tensor, batch: int = 64) -> np.ndarray:
    split.model.eval()
    out = [F.normalize(split.suffix(feats[i:i + batch].float())).numpy()
           for i in range(0, len(feats), batch)]
    return np.concatenate(out)


def identification(emb: np.ndarray, labels: np.ndarray, split: np.ndarray,
                   track: np.ndarray) -> dict[str, Any]:
    """Top-1 identification of the held-out tracks: each track's mean embedding against each
    identity's mean training embedding (every identity of the pool is a candidate)."""
    lab = labels >= 0
    ids = np.unique(labels[lab & (split == TRAIN)])
    centres = np.stack([emb[lab & (split == TRAIN) & (labels == i)].mean(0) for i in ids])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    right = total = 0
    for t in np.unique(track[split == HELDOUT]):
        rows = (split == HELDOUT) & (track == t)
        probe = emb[rows].mean(0)
        guess = ids[int(np.argmax(centres @ (probe / np.linalg.norm(probe))))]
        right += int(guess == labels[rows][0])
        total += 1
    return {"accuracy": round(right / max(total, 1), 4), "correct": right, "tracks": total}


def load_site_pool(path: str | Path) -> dict[str, Any]:
    d = np.load(path)
    return {k: d[k] for k in d.files}


def anchor_faces(cfg: SiteData, rng: np.random.Generator) -> np.ndarray:
    """`anchor_faces` general faces of the teacher pool's `anchor_sources`, each at native
    resolution and downscaled to a random face size in `anchor_lowres`."""
    d = np.load(cfg.anchor_pool)
    paths = [str(p) for p in d["paths"]]
    pick = [i for i, p in enumerate(paths) if Path(p).parts[0] in cfg.anchor_sources]
    if len(pick) < cfg.anchor_faces:
        raise ConfigError(f"data.anchor_pool {cfg.anchor_pool} has {len(pick)} faces from "
                          f"{cfg.anchor_sources}; data.anchor_faces asks for {cfg.anchor_faces}")
    idx = np.sort(rng.choice(pick, cfg.anchor_faces, replace=False))
    crops = d["crops"][idx]
    low = [downscale(c, int(rng.integers(cfg.anchor_lowres[0], cfg.anchor_lowres[1] + 1)))
           for c in crops]
    return np.concatenate([crops, np.stack(low)])


@torch.no_grad()
def expert_report(start: nn.Module, model: nn.Module, usage: np.ndarray | None
                  ) -> dict[str, Any]:
    """How far each expert's weights moved (L2 of the change; the FaceMoE blocks start at zero
    output, so a change is what the site added), with the share of the site's tokens each
    expert takes; a dense model reports its head's change."""
    before = dict(start.named_parameters())
    layers = []
    for k, (name, mod) in enumerate((n, m) for n, m in model.named_modules()
                                    if m in moe_layers(model)):
        rows = []
        for e in range(mod.num_experts):
            delta = sum(float((getattr(mod, w)[e] - before[f"{name}.{w}"][e]).norm() ** 2)
                        for w in ("w1", "b1", "w2", "b2")) ** 0.5
            norm = sum(float(before[f"{name}.{w}"][e].norm() ** 2)
                       for w in ("w1", "b1", "w2", "b2")) ** 0.5
            rows.append({"expert": e, "change_l2": round(delta, 4),
                         "relative_change": round(delta / max(norm, 1e-12), 4),
                         "site_token_share": None if usage is None else
                         round(float(usage[k][e]), 4)})
        layers.append({"layer": name, "experts": rows})
    changed = {n: round(float((p - before[n]).norm()), 4)
               for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    top = sorted(changed.items(), key=lambda kv: -kv[1])[:8]
    return {"moe_layers": layers, "most_changed_tensors": dict(top)}


def _expert_usage(model: nn.Module, split: FrozenSplit, site_feats: torch.Tensor,
                  layers: list) -> np.ndarray | None:
    """Each MoE layer's share of routed tokens per expert on (up to) 256 site faces, with the
    trained model in eval mode; None for a model without MoE layers."""
    if not layers:
        return None
    with torch.no_grad():
        model.eval()
        split.suffix(site_feats[:256].float())
        return np.stack([torch.bincount(m.last.top_idx.reshape(-1),
                                        minlength=m.num_experts).float().numpy()
                         / m.last.top_idx.numel() for m in layers])


def site_finetune(cfg: SiteConfig) -> Path:
    """Run the recipe; returns the run directory (model/, site_report.json)."""
    if not cfg.data.site_pool:
        raise ConfigError("data.site_pool is not set: give --from-gallery DB or a pool from "
                          "facemoe data prepare --from-gallery")
    t0 = time.time()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed)
    pool = load_site_pool(cfg.data.site_pool)
    model, manifest = load_model(cfg.model.init_from)
    arch = yaml.safe_load((Path(cfg.model.init_from) / "model.yaml").read_text())
    start = copy.deepcopy(model)
    split = FrozenSplit(model)
    labels, part, track = pool["labels"], pool["split"], pool["track"]
    labelled = np.flatnonzero(labels >= 0)
    anchors = anchor_faces(cfg.data, rng)
    log.info("caching the frozen prefix (up to %s) of %d site and %d anchor faces",
             split.cut, len(labelled), len(anchors))
    t_cache = time.time()
    site_feats = cache_prefix(split, pool["crops"][labelled], cfg.run.batch)
    anchor_feats = cache_prefix(split, anchors, cfg.run.batch)
    cache_s = time.time() - t_cache
    lab, sp, tr = labels[labelled], part[labelled], track[labelled]
    teacher = torch.from_numpy(embed_cached(split, anchor_feats))  # the starting model's own
    emb0 = embed_cached(split, site_feats)
    before = identification(emb0, lab, sp, tr)

    train_rows = np.flatnonzero(sp == TRAIN)
    margin = MarginHead(model.embed_dim, len(pool["label_names"]), "cosface", cfg.loss.s,
                        cfg.loss.m)
    with torch.no_grad():
        for c in np.unique(lab[train_rows]):
            margin.weight[int(c)] = torch.from_numpy(emb0[train_rows][lab[train_rows] == c]
                                                     .mean(0))
    for name, p in model.named_parameters():
        p.requires_grad = model.probe_trainable(name)
    params = [p for p in model.parameters() if p.requires_grad] + list(margin.parameters())
    optim = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    layers = moe_layers(model)
    site_y = torch.from_numpy(lab)
    history = []
    t_train = time.time()
    model.train()
    for step in range(cfg.optim.steps):
        lr = float(cfg.optim.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.optim.steps)))  # cosine
        for g in optim.param_groups:
            g["lr"] = lr
        s_idx = rng.choice(train_rows, min(cfg.optim.site_batch, len(train_rows)), replace=False)
        a_idx = rng.choice(len(anchor_feats), cfg.optim.anchor_batch, replace=False)
        x = torch.cat([site_feats[s_idx], anchor_feats[a_idx]]).float()
        emb = split.suffix(x)
        ns = len(s_idx)
        parts = {"id": cfg.loss.w_id * margin(emb[:ns], site_y[s_idx]),
                 "kd": cfg.loss.w_kd * cosine_distill_loss(emb[ns:], teacher[a_idx])}
        if layers:
            z, bal = router_losses(layers)
            parts["z"] = cfg.loss.lambda_z * cfg.loss.z_scale * z
            parts["balance"] = cfg.loss.lambda_balance * cfg.loss.balance_scale * bal
        loss = sum(parts.values())
        if not torch.isfinite(loss):
            raise ConfigError(f"site fine-tune diverged at step {step + 1} (loss {loss.item()}, "
                              f"lr {lr:g}): lower optim.lr")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        optim.step()
        if step % 20 == 0 or step == cfg.optim.steps - 1:
            row = {"step": step + 1, "lr": round(lr, 7), "loss": round(loss.item(), 4),
                   **{k: round(v.item(), 4) for k, v in parts.items()}}
            history.append(row)
            log.info("site fine-tune %s", row)
    train_s = time.time() - t_train
    emb1 = embed_cached(split, site_feats)
    after = identification(emb1, lab, sp, tr)
    usage = _expert_usage(model, split, site_feats, layers)
    anchor_after = embed_cached(split, anchor_feats)
    kept = float((anchor_after * teacher.numpy()).sum(1).mean())
    experts = expert_report(start, model, usage)
    out = Path(cfg.run.out_dir)
    summary = json.loads(str(pool["summary"]))
    gallery = str(pool["gallery"])
    report = {
        "gallery": gallery,
        "start_model": {"dir": cfg.model.init_from, "name": manifest.get("name"),
                        "version": manifest.get("version"),
                        "architecture": arch.get("name")},
        "pool": summary,
        "site_heldout_identification": {"before": before, "after": after},
        "anchor_cosine_to_start": round(kept, 4),
        "experts": experts,
        "steps": cfg.optim.steps,
        "seconds": {"prefix_cache": round(cache_s, 1), "train": round(train_s, 1),
                    "total": round(time.time() - t0, 1)},
        "history": history,
    }
    model_dir = save_artifact(
        model.eval().cpu(), arch, out / "model", name=cfg.run.name, version=cfg.run.version,
        recipe={"kind": "site-finetune", "config": cfg.model_dump(mode="json"),
                "start_model": report["start_model"], "steps": cfg.optim.steps,
                "minutes": round((time.time() - t0) / 60, 1), "history": history},
        data={"site_gallery": gallery, "site_identities": len(pool["label_names"]),
              "site_identity_ids": [int(i) for i in pool["identity_ids"]],
              "site_train_faces": summary["train_faces"],
              "site_train_tracks": summary["train_tracks"],
              "anchor_pool": cfg.data.anchor_pool, "anchor_sources": cfg.data.anchor_sources,
              "anchor_faces": cfg.data.anchor_faces},
        metrics={"site_heldout_identification": report["site_heldout_identification"],
                 **{k: manifest[k] for k in ("recommended_threshold",) if k in manifest}},
    )
    report["model_dir"] = str(model_dir)
    report["model_sha256"] = sha256_file(model_dir / "weights.safetensors")
    (out / "site_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("site held-out identification %s -> %s", before["accuracy"], after["accuracy"])
    return out
