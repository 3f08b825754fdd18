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
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
VAL = 3  # a training track kept out of training to choose the step (trainer.site only)


class SiteModel(_Strict):
    init_from: str  # the shipped model's trainer artifact (facemoe import sface [--architecture])


class SiteData(_Strict):
    site_pool: str | None = None  # facemoe data prepare --from-gallery (or finetune's)
    anchor_pool: str  # the shared teacher pool (facemoe data prepare --teacher)
    anchor_sources: list[str] = Field(default_factory=lambda: ["celeba299", "lfw", "utkface"])
    anchor_faces: int = Field(400, ge=2)
    anchor_lowres: tuple[int, int] = (12, 32)  # face sizes (px) of the downscaled copies
    # extra copies of each site training crop, downscaled to a random face size in
    # `site_lowres_px` (the cameras' own faces, a little worse: the tail learns the site's
    # people at the resolutions it will see them, not the few crops it was shown)
    site_lowres: int = Field(0, ge=0)
    site_lowres_px: tuple[int, int] = (12, 24)


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
    # what trains, within the model's own stage-1 part: "stage1" (all of it: FaceMoE blocks and
    # head), "moe" (the FaceMoE blocks only; a dense model has none and refuses), "head"
    train: Literal["stage1", "moe", "head"] = "stage1"
    # the step is chosen on validation tracks (one training track per person with 2+, never
    # trained on): their mean identification margin every `eval_every` steps, the widest kept
    # (step 0, the start model, included: a fine-tune that does not help is not kept)
    val_tracks: int = Field(1, ge=0)
    eval_every: int = Field(20, ge=1)


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

    def __init__(self, model: nn.Module, trains: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        if not all(hasattr(model, a) for a in ("stages", "forward_head", "probe_trainable")):
            raise ConfigError(f"{type(model).__name__} has no stages to cut: the site recipe "
                              f"fine-tunes models of the SFace family (sface, facemoe-sface)")
        trains = trains or model.probe_trainable
        blocks = [(f"stages.{i}.{j}", b) for i, s in enumerate(model.stages)
                  for j, b in enumerate(s)]
        first = next((k for k, (name, b) in enumerate(blocks)
                      if any(trains(f"{name}.{p}") for p, _ in
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


class _PrefixNet(nn.Module):
    """The frozen prefix as a module of its own (for the ONNX export)."""

    def __init__(self, split: FrozenSplit) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*split._prefix)
        self.register_buffer("shift", torch.as_tensor(split.model.input_shift).clone())
        self.register_buffer("scale", torch.as_tensor(split.model.input_scale).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks((x - self.shift) * self.scale)


def onnx_prefix(split: FrozenSplit) -> Callable[[np.ndarray], np.ndarray] | None:
    """The frozen prefix in ONNX Runtime (about 5x faster than torch on a CPU for SFace's
    depthwise layers), exported to a private temporary folder and checked against torch on one
    batch; None (torch then runs it) when there is no prefix, ONNX Runtime is missing, or the
    export fails or disagrees."""
    if not split._prefix:
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    net = _PrefixNet(split).eval()
    probe = torch.rand(2, 3, split.model.input_size, split.model.input_size) * 255
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prefix.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
                torch.onnx.export(net, (probe,), str(path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["features"],
                                  dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any export/load failure: torch runs it
            log.warning("the frozen prefix runs in torch (ONNX export failed: %s)",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"input": np.ascontiguousarray(x, np.float32)})[0]

    with torch.no_grad():
        want = net(probe).numpy()
    got = run(probe.numpy())
    if not np.allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max())):
        log.warning("the frozen prefix runs in torch (ONNX Runtime differs by %.3g)",
                    float(np.abs(got - want).max()))
        return None
    return run


def cache_prefix(split: FrozenSplit, crops: np.ndarray, batch: int,
                 runner: Callable[[np.ndarray], np.ndarray] | None = None) -> torch.Tensor:
    """The frozen prefix's output for every crop (float16: half the memory, ample precision
    for a fine-tune's inputs), through `runner` (`onnx_prefix`) when given."""
    split.model.eval()
    out = []
    for i in range(0, len(crops), batch):
        x = _inputs(split.model, crops[i:i + batch])
        out.append((torch.from_numpy(runner(x.numpy())) if runner else split.prefix(x)).half())
    return torch.cat(out)


@torch.no_grad()
def embed_cached(split: FrozenSplit, feats: torch.Tensor, batch: int = 64) -> np.ndarray:
    split.model.eval()
    out = [F.normalize(split.suffix(feats[i:i + batch].float())).numpy()
           for i in range(0, len(feats), batch)]
    return np.concatenate(out)


def identification(emb: np.ndarray, labels: np.ndarray, split: np.ndarray,
                   track: np.ndarray, probe: int = HELDOUT) -> dict[str, Any]:
    """Top-1 identification of the `probe` tracks: each track's mean embedding against each
    identity's mean training embedding (every identity of the pool is a candidate). `margin`:
    the mean over tracks of cos(own centre) - the best cos(another centre), which moves before
    the accuracy does."""
    lab = labels >= 0
    ids = np.unique(labels[lab & (split == TRAIN)])
    centres = np.stack([emb[lab & (split == TRAIN) & (labels == i)].mean(0) for i in ids])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    right = total = 0
    margins = []
    for t in np.unique(track[split == probe]):
        rows = (split == probe) & (track == t)
        probe_emb = emb[rows].mean(0)
        cos = centres @ (probe_emb / np.linalg.norm(probe_emb))
        own = ids == labels[rows][0]
        right += int(own[int(np.argmax(cos))])
        margins.append(float(cos[own].max() - cos[~own].max()) if own.any() and (~own).any()
                       else 0.0)
        total += 1
    return {"accuracy": round(right / max(total, 1), 4), "correct": right, "tracks": total,
            "margin": round(float(np.mean(margins)) if margins else 0.0, 4)}


def val_split(labels: np.ndarray, split: np.ndarray, track: np.ndarray, per_identity: int,
              rng: np.random.Generator) -> np.ndarray:
    """`split` with `per_identity` training event tracks of each person who has 2+ marked VAL
    (never trained on; at least one event track stays training; photos always train)."""
    out = split.copy()
    for c in np.unique(labels[split == TRAIN]):
        tracks = np.unique(track[(split == TRAIN) & (labels == c) & (track > 0)])
        take = min(per_identity, len(tracks) - 1)
        for t in rng.choice(tracks, take, replace=False) if take > 0 else []:
            out[(track == t) & (split == TRAIN)] = VAL
    return out


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


def site_lowres_copies(crops: np.ndarray, cfg: SiteData, rng: np.random.Generator
                       ) -> np.ndarray:
    """`cfg.site_lowres` copies of each crop, each downscaled to a random face size in
    `cfg.site_lowres_px` (copy k of every crop, then copy k + 1: rows k * len(crops) + i)."""
    lo, hi = cfg.site_lowres_px
    return np.stack([downscale(c, int(rng.integers(lo, hi + 1)))
                     for _ in range(cfg.site_lowres) for c in crops]) if cfg.site_lowres \
        else crops[:0]


def trains(model: nn.Module, what: str) -> Callable[[str], bool]:
    """Which parameters train: the model's own stage-1 part, all of it or its FaceMoE blocks
    (names under `stages.`) or its head (the rest)."""
    def pick(name: str) -> bool:
        return model.probe_trainable(name) and (
            what == "stage1" or (what == "moe") == name.startswith("stages."))
    if not any(pick(n) for n, _ in model.named_parameters()):
        raise ConfigError(f"optim.train {what}: {type(model).__name__} has nothing to train "
                          f"there (a dense model has no FaceMoE blocks: use head or stage1)")
    return pick


@dataclass
class Prepared:
    """The start model cut at what trains, and every face it will see, through the frozen
    prefix: the site's labelled faces (with `split`: TRAIN, VAL, HELDOUT), the extra
    low-resolution copies of the training faces (`aug_of`: the row each copies) and the anchor
    faces with the start model's own embeddings of them."""
    model: nn.Module
    start: nn.Module
    manifest: dict
    arch: dict
    split: FrozenSplit
    pool: dict[str, Any]
    labels: np.ndarray
    part: np.ndarray  # TRAIN / VAL / HELDOUT per labelled face
    track: np.ndarray
    site_feats: torch.Tensor
    aug_feats: torch.Tensor
    aug_of: np.ndarray
    anchor_feats: torch.Tensor
    teacher: torch.Tensor
    emb0: np.ndarray
    cache_s: float

    @property
    def check_split(self) -> np.ndarray:
        """`part` as the held-out check sees it: the validation tracks are training tracks
        again (the check's centres: every training track, as enrolled)."""
        return np.where(self.part == VAL, TRAIN, self.part)


def prepare(cfg: SiteConfig) -> Prepared:
    """Load the start model and pool, choose the validation tracks, cache the frozen prefix."""
    if not cfg.data.site_pool:
        raise ConfigError("data.site_pool is not set: give --from-gallery DB or a pool from "
                          "facemoe data prepare --from-gallery")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed)
    pool = load_site_pool(cfg.data.site_pool)
    model, manifest = load_model(cfg.model.init_from)
    arch = yaml.safe_load((Path(cfg.model.init_from) / "model.yaml").read_text())
    start = copy.deepcopy(model)
    split = FrozenSplit(model, trains(model, cfg.optim.train))
    labelled = np.flatnonzero(pool["labels"] >= 0)
    lab, tr = pool["labels"][labelled], pool["track"][labelled]
    part = val_split(lab, pool["split"][labelled], tr, cfg.optim.val_tracks, rng)
    anchors = anchor_faces(cfg.data, rng)
    train_rows = np.flatnonzero(part == TRAIN)
    aug = site_lowres_copies(pool["crops"][labelled][train_rows], cfg.data, rng)
    log.info("caching the frozen prefix (up to %s) of %d site faces, %d low-resolution copies "
             "and %d anchor faces", split.cut, len(labelled), len(aug), len(anchors))
    t0 = time.time()
    runner = onnx_prefix(split)
    site_feats = cache_prefix(split, pool["crops"][labelled], cfg.run.batch, runner)
    aug_feats = cache_prefix(split, aug, cfg.run.batch, runner) if len(aug) else site_feats[:0]
    anchor_feats = cache_prefix(split, anchors, cfg.run.batch, runner)
    cache_s = time.time() - t0
    return Prepared(model, start, manifest, arch, split, pool, lab, part, tr, site_feats,
                    aug_feats, np.tile(train_rows, cfg.data.site_lowres), anchor_feats,
                    torch.from_numpy(embed_cached(split, anchor_feats)),
                    embed_cached(split, site_feats), cache_s)


def _validate(prep: Prepared) -> dict[str, Any]:
    emb = embed_cached(prep.split, prep.site_feats[prep.part != HELDOUT])
    keep = prep.part != HELDOUT
    return identification(emb, prep.labels[keep], prep.part[keep], prep.track[keep], VAL)


def _better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Validation `a` beats `b`: a wider mean margin between each track's own person and the
    nearest other (smooth: two dozen tracks' right/wrong count moves by chance, it does not)."""
    return a["margin"] > b["margin"]


def train(cfg: SiteConfig, prep: Prepared) -> dict[str, Any]:
    """The recipe's steps on a prepared start model (trained in place, left at the step the
    validation tracks chose); returns what the report needs of the run."""
    rng = np.random.default_rng(cfg.run.seed + 1)
    model, split = prep.model, prep.split
    site_y = torch.from_numpy(prep.labels)
    train_rows = np.flatnonzero(prep.part == TRAIN)
    margin = MarginHead(model.embed_dim, len(prep.pool["label_names"]), "cosface", cfg.loss.s,
                        cfg.loss.m)
    with torch.no_grad():
        for c in np.unique(prep.labels[train_rows]):
            margin.weight[int(c)] = torch.from_numpy(
                prep.emb0[train_rows][prep.labels[train_rows] == c].mean(0))
    pick = trains(model, cfg.optim.train)
    for name, p in model.named_parameters():
        p.requires_grad = pick(name)
    params = [p for p in model.parameters() if p.requires_grad] + list(margin.parameters())
    optim = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    layers = moe_layers(model)
    feats = torch.cat([prep.site_feats[train_rows], prep.aug_feats])
    feat_y = torch.cat([site_y[train_rows], site_y[prep.aug_of]])
    history, t0 = [], time.time()
    best = {"step": 0, "val": _validate(prep), "state": _trainable_state(model)}
    has_val = best["val"]["tracks"] > 0
    for step in range(cfg.optim.steps):
        _train_mode(model)
        lr = float(cfg.optim.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.optim.steps)))  # cosine
        for g in optim.param_groups:
            g["lr"] = lr
        s_idx = rng.choice(len(feats), min(cfg.optim.site_batch, len(feats)), replace=False)
        a_idx = rng.choice(len(prep.anchor_feats), cfg.optim.anchor_batch, replace=False)
        emb = split.suffix(torch.cat([feats[s_idx], prep.anchor_feats[a_idx]]).float())
        ns = len(s_idx)
        parts = {"id": cfg.loss.w_id * margin(emb[:ns], feat_y[s_idx]),
                 "kd": cfg.loss.w_kd * cosine_distill_loss(emb[ns:], prep.teacher[a_idx])}
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
        done = step + 1
        if done % cfg.optim.eval_every and done != cfg.optim.steps:
            continue
        row = {"step": done, "lr": round(lr, 7), "loss": round(loss.item(), 4),
               **{k: round(v.item(), 4) for k, v in parts.items()}}
        if has_val:
            row["val"] = _validate(prep)
            if _better(row["val"], best["val"]):
                best = {"step": done, "val": row["val"], "state": _trainable_state(model)}
        history.append(row)
        log.info("site fine-tune %s", row)
    if has_val:
        model.load_state_dict(best["state"], strict=False)
    model.eval()
    return {"history": history, "train_s": time.time() - t0,
            "chosen_step": best["step"] if has_val else cfg.optim.steps,
            "val": best["val"] if has_val else None}


def _train_mode(model: nn.Module) -> None:
    """Dropout on, batch norm off: its running statistics are part of the start model (a
    few dozen site faces per step would move the frozen layers' normalisation too)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def site_finetune(cfg: SiteConfig) -> Path:
    """Run the recipe; returns the run directory (model/, site_report.json)."""
    t0 = time.time()
    prep = prepare(cfg)
    final = prep.check_split
    before = identification(prep.emb0, prep.labels, final, prep.track)
    run = train(cfg, prep)
    model, split = prep.model, prep.split
    after = identification(embed_cached(split, prep.site_feats), prep.labels, final, prep.track)
    usage = _expert_usage(model, split, prep.site_feats, moe_layers(model))
    anchor_after = embed_cached(split, prep.anchor_feats)
    kept = float((anchor_after * prep.teacher.numpy()).sum(1).mean())
    experts = expert_report(prep.start, model, usage)
    out = Path(cfg.run.out_dir)
    pool, manifest = prep.pool, prep.manifest
    summary = json.loads(str(pool["summary"]))
    summary["val_tracks"] = int(len(np.unique(prep.track[prep.part == VAL])))
    summary["site_lowres_copies"] = int(len(prep.aug_feats))
    gallery = str(pool["gallery"])
    history = run["history"]
    report = {
        "gallery": gallery,
        "start_model": {"dir": cfg.model.init_from, "name": manifest.get("name"),
                        "version": manifest.get("version"),
                        "architecture": prep.arch.get("name")},
        "pool": summary,
        "site_heldout_identification": {"before": before, "after": after},
        "validation": {"chosen_step": run["chosen_step"], "at_chosen_step": run["val"]},
        "anchor_cosine_to_start": round(kept, 4),
        "experts": experts,
        "steps": cfg.optim.steps,
        "trained": cfg.optim.train,
        "seconds": {"prefix_cache": round(prep.cache_s, 1), "train": round(run["train_s"], 1),
                    "total": round(time.time() - t0, 1)},
        "history": history,
    }
    model_dir = save_artifact(
        model.eval().cpu(), prep.arch, out / "model", name=cfg.run.name,
        version=cfg.run.version,
        recipe={"kind": "site-finetune", "config": cfg.model_dump(mode="json"),
                "start_model": report["start_model"], "steps": cfg.optim.steps,
                "chosen_step": run["chosen_step"],
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
    log.info("site held-out identification %s -> %s (step %d chosen on validation tracks)",
             before["accuracy"], after["accuracy"], run["chosen_step"])
    return out
