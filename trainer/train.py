"""The training loop: distillation + margin loss + router auxiliaries, top to bottom.

Used for training from scratch (`facemoe train`) and, with `model.init_from`, for
fine-tuning (`facemoe finetune`). Runs on CPU (bf16 autocast) or CUDA (AMP), single
process or under torchrun (DDP).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from trainer.artifact import load_model, save_artifact
from trainer.augment import degrade, downscale
from trainer.config import ConfigError, TrainConfig
from trainer.data import (
    FaceSet,
    centred_targets,
    concat,
    load_image_folder,
    load_list_file,
    load_pool,
    teacher_targets_from_onnx,
)
from trainer.evaluate import threshold_at_far
from trainer.fsutil import PUBLIC, atomic_write, write_bytes
from trainer.losses import (
    MarginHead,
    RelationMemory,
    cosine_distill_loss,
    expert_usage,
    relational_distill_loss,
    router_losses,
)
from trainer.models import create_model, model_config
from trainer.models.moe import moe_layers
from trainer.preprocess import MEAN, STD, to_input

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_training_data(cfg: TrainConfig) -> FaceSet:
    sets = []
    if cfg.data.pool:
        sets.append(load_pool(cfg.data.pool))
    sets += [load_image_folder(f) for f in cfg.data.folders]
    sets += [load_list_file(f) for f in cfg.data.lists]
    if not sets:
        raise ConfigError("config has no training data: set data.pool, data.folders or data.lists")
    data = concat(sets)
    if cfg.data.teacher_onnx:
        # high-resolution teacher targets for every face: degraded student inputs learn from them
        data.teacher = teacher_targets_from_onnx(cfg.data.teacher_onnx, data.crops)
    return data


def holdout_report(model: nn.Module, sets: list[FaceSet], device: torch.device) -> dict[str, float]:
    """Verification accuracy on held-out high-resolution faces (native and 16 px probes)."""
    return validate(model, concat(sets), device) if sets else {}


def split_validation(data: FaceSet, n_ids: int, seed: int) -> tuple[FaceSet, FaceSet | None]:
    """Hold out every image of `n_ids` labelled identities that have at least 4 images."""
    labels, counts = np.unique(data.labels[data.labels >= 0], return_counts=True)
    eligible = labels[counts >= 4]
    if n_ids <= 0 or len(eligible) < 2:
        return data, None
    held = np.random.default_rng(seed).choice(eligible, min(n_ids, len(eligible)), replace=False)
    mask = np.isin(data.labels, held)
    return data.subset(np.flatnonzero(~mask)), data.subset(np.flatnonzero(mask))


@torch.no_grad()
def embed_crops(
    model: nn.Module, crops: np.ndarray, device: torch.device, batch: int = 128
) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(crops), batch):
        x = torch.from_numpy(model_input(model, crops[i : i + batch])).to(device)
        out.append(F.normalize(model(x).float()).cpu().numpy())
    return np.concatenate(out)


def model_input(model: nn.Module, crops: np.ndarray) -> np.ndarray:
    """Crops -> the model's input tensor, with the model's own mean/std (default 0.5)."""
    mean, std = getattr(model, "input_mean", MEAN), getattr(model, "input_std", STD)
    return to_input(crops, model.input_size, mean, std)


def verification_accuracy(emb: np.ndarray, labels: np.ndarray) -> float:
    """Best-threshold accuracy over all pairs, balanced between same and different pairs."""
    sim = emb @ emb.T
    iu = np.triu_indices(len(emb), 1)
    s, same = sim[iu], (labels[:, None] == labels[None])[iu]
    pos, neg = np.sort(s[same]), np.sort(s[~same])
    best = 0.0
    for t in np.quantile(s, np.linspace(0.01, 0.99, 197)):
        tpr = 1 - np.searchsorted(pos, t) / len(pos)
        tnr = np.searchsorted(neg, t) / len(neg)
        best = max(best, (tpr + tnr) / 2)
    return float(best)


def validate(model: nn.Module, val: FaceSet, device: torch.device) -> dict[str, float]:
    out = {}
    for res in (None, 16):
        crops = val.crops if res is None else np.stack([downscale(c, res) for c in val.crops])
        out[f"val_acc_{res or 'native'}"] = verification_accuracy(
            embed_crops(model, crops, device), val.labels
        )
    return out


def calibrate_threshold(
    model: nn.Module, val: FaceSet, device: torch.device, far: float = 1e-3
) -> dict:
    """Open-set threshold at `far` over all pairs of the held-out identities (never LFW)."""
    emb = embed_crops(model, val.crops, device)
    iu = np.triu_indices(len(emb), 1)
    scores, same = (emb @ emb.T)[iu], (val.labels[:, None] == val.labels[None])[iu]
    return {
        "recommended_threshold": round(threshold_at_far(scores, same, far), 4),
        "threshold_far": far,
        "threshold_pairs": int(len(scores)),
        "threshold_identities": int(len(np.unique(val.labels))),
    }


def _param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for m in modules:
        # every parameter, also frozen ones: a later stage may unfreeze them (no grad = no update)
        for name, p in m.named_parameters():
            (no_decay if p.ndim <= 1 or name.endswith("pos") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, warmup: int, total: int, power: float) -> float:
    """Linear warmup to 1, then polynomial decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** power


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return nullcontext()
    if amp == "auto":
        dtype = torch.bfloat16
    else:
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def sync_head_grads(heads: list[nn.Module], world: int) -> None:
    """Average the loss heads' gradients over the ranks (DDP wraps only the backbone).

    A head a rank did not use this step (no labelled face in its batch) gets zeros, so every
    rank reduces the same tensors and steps its optimiser the same way.
    """
    for p in (p for h in heads for p in h.parameters() if p.requires_grad):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def check_ranks_agree(modules: list[nn.Module], world: int) -> None:
    """Raise if the ranks' parameters differ after training (they must stay identical)."""
    sums = torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()])
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    differ = [r for r in range(1, world) if not torch.equal(gathered[r], gathered[0])]
    if differ:
        raise RuntimeError(f"DDP ranks {differ} hold different parameters from rank 0")
    log.info("parameters identical on all %d ranks", world)


class TrainingDiverged(ConfigError):
    """The loss turned non-finite: one line naming the step, the learning rate that made the
    update before it and what the run directory keeps; no model is written."""


@dataclass
class Run:
    """One training run as `setup` leaves it; `step` counts the optimiser steps taken so far."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int  # processes (torchrun ranks); 1 without torchrun
    train_set: FaceSet
    val_set: FaceSet | None  # held-out identities: per-epoch check and threshold
    holdout: list[FaceSet]  # high-resolution faces for the before/after report
    before: dict[str, float]  # that report on the starting model (fine-tuning only)
    model: nn.Module
    arch: dict[str, Any]  # model.yaml of the artifact
    net: nn.Module  # the model, wrapped by DDP under torchrun
    layers: list[nn.Module]  # its MoE layers (router losses, expert usage)
    margin: MarginHead
    proj: nn.Module | None  # student -> teacher space (loss.kd_projection)
    memory: RelationMemory | None
    teacher: torch.Tensor | None  # per-face targets on the device (zeros: the face has none)
    teacher_mean: np.ndarray | None  # subtracted from the teacher targets (kd_projection)
    labels: torch.Tensor
    optim: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    backbone_trainable: bool
    rng: np.random.Generator  # the augmentation's
    step: int = 0
    start_epoch: int = 0
    started: float = 0.0  # time.time() when the run directory was made

    @property
    def heads(self) -> list[nn.Module]:
        """The loss heads: trained beside the model, not part of the artifact."""
        return [self.margin] + ([self.proj] if self.proj is not None else [])


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train per `cfg`; returns the run directory (which holds the exported model/).

    Bad config or data fails in `setup`, before the run directory is made; a non-finite loss
    stops the run at its step (TrainingDiverged), before the epoch's checkpoint or any model.
    """
    run = setup(cfg, resume)
    history: list[dict[str, Any]] = []
    with run_directory(run) as metrics:
        for epoch in range(run.start_epoch, cfg.optim.epochs):
            summary, stopped_early = train_epoch(run, epoch, metrics)
            history.append(summary)
            if stopped_early:
                log.warning("stopped after %.1f minutes (run.max_minutes)", cfg.run.max_minutes)
                break
    finish(run, history)
    return run.out


# --- setup: everything that can fail on the config or the data; nothing is written ----------


def setup(cfg: TrainConfig, resume: bool = False) -> Run:
    """Process group, device, data, model, loss heads, optimiser and (`resume`) checkpoint."""
    rank, world = _init_distributed()
    device = _device(cfg.run.device, world)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed + rank)
    train_set, val_set = split_validation(
        load_training_data(cfg), cfg.data.val_identities, cfg.run.seed
    )
    steps_per_epoch = _steps_per_epoch(cfg, train_set, val_set, world)
    teacher, teacher_mean = training_targets(train_set, cfg.loss.kd_projection)
    log.info(
        "training on %d faces (%d labelled, %d with teacher targets), %d held out",
        len(train_set),
        (train_set.labels >= 0).sum(),
        0 if teacher is None else len(teacher),
        0 if val_set is None else len(val_set),
    )
    model, arch = build_model(cfg, device)
    if teacher is not None and not cfg.loss.kd_projection and teacher.shape[1] != model.embed_dim:
        raise ConfigError(
            f"loss.kd_projection false needs a {teacher.shape[1]}-d student like its teacher; "
            f"{arch['name']} embeds in {model.embed_dim}"
        )
    holdout = [load_image_folder(f) for f in cfg.data.holdout_folders]
    if val_set is not None:
        holdout.append(val_set)
    before = holdout_report(model, holdout, device) if cfg.model.init_from and rank == 0 else {}

    margin, proj, memory = loss_heads(cfg, model.embed_dim, train_set, teacher, device)
    heads = [margin] + ([proj] if proj is not None else [])
    optim = torch.optim.AdamW(
        _param_groups([model, *heads], cfg.optim.weight_decay), lr=cfg.optim.lr
    )
    run = Run(
        cfg=cfg,
        out=Path(cfg.run.out_dir),
        device=device,
        rank=rank,
        world=world,
        train_set=train_set,
        val_set=val_set,
        holdout=holdout,
        before=before,
        model=model,
        arch=arch,
        net=model,
        layers=moe_layers(model),
        margin=margin,
        proj=proj,
        memory=memory,
        teacher=torch.from_numpy(teacher).to(device) if teacher is not None else None,
        teacher_mean=teacher_mean,
        labels=torch.from_numpy(train_set.labels).to(device),
        optim=optim,
        scaler=torch.amp.GradScaler(
            device.type, enabled=cfg.run.amp == "fp16" and device.type == "cuda"
        ),
        steps_per_epoch=steps_per_epoch,
        backbone_trainable=False,  # set below, for the epoch the run starts at
        rng=np.random.default_rng(cfg.run.seed * 1000 + rank),
    )
    if resume:
        load_checkpoint(run)
    run.backbone_trainable = trains_backbone(cfg, run.start_epoch)
    _set_trainable(model, run.backbone_trainable)
    if world > 1:
        # DDP broadcasts rank 0's backbone when it is built; the loss heads (seeded per rank)
        # are broadcast here
        run.net = nn.parallel.DistributedDataParallel(model)
        for p in (p for h in run.heads for p in h.parameters()):
            dist.broadcast(p.data, 0)
    return run


def _init_distributed() -> tuple[int, int]:
    """(rank, world size): a process group under torchrun (WORLD_SIZE > 1), else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _device(want: str, world: int) -> torch.device:
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(want)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def _steps_per_epoch(
    cfg: TrainConfig, train_set: FaceSet, val_set: FaceSet | None, world: int
) -> int:
    """Full batches per epoch on every rank; ConfigError when the faces do not fill one."""
    need = cfg.optim.batch_size * world
    if len(train_set) < need:
        ranks = f" x {world} ranks" if world > 1 else ""
        held = (
            f" ({len(val_set)} more held out by data.val_identities {cfg.data.val_identities})"
            if val_set is not None
            else ""
        )
        raise ConfigError(
            f"optim.batch_size {cfg.optim.batch_size}{ranks} needs at least {need} training "
            f"faces for one step; the data has {len(train_set)}{held}"
        )
    return len(train_set) // need


def training_targets(
    train_set: FaceSet, kd_projection: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(teacher targets, their mean): re-centred (kd_projection) or unit teacher descriptors;
    zero rows for faces without one. (None, None) without a teacher."""
    if train_set.teacher is None:
        return None, None
    has_t = ~np.isnan(train_set.teacher).any(1)
    teacher, mean = np.zeros_like(train_set.teacher), None
    if kd_projection:
        teacher[has_t], mean = centred_targets(train_set.teacher[has_t])
    else:
        t = train_set.teacher[has_t]
        teacher[has_t] = t / np.linalg.norm(t, axis=1, keepdims=True)
    return teacher, mean


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """(model on `device`, its model.yaml): new per model.name, or model.init_from's."""
    if cfg.model.init_from:
        # fine-tuning keeps the starting artifact's architecture (model.yaml), not model.name
        model, _ = load_model(cfg.model.init_from, **cfg.model.overrides)
        arch = {
            **yaml.safe_load((Path(cfg.model.init_from) / "model.yaml").read_text()),
            **cfg.model.overrides,
        }
    else:
        arch = model_config(cfg.model.name, **cfg.model.overrides)
        model = create_model(cfg.model.name, **cfg.model.overrides)
    return model.to(device), arch


def loss_heads(
    cfg: TrainConfig,
    embed_dim: int,
    train_set: FaceSet,
    teacher: np.ndarray | None,
    device: torch.device,
) -> tuple[MarginHead, nn.Module | None, RelationMemory | None]:
    """(margin head, projection to the teacher's space, cross-batch relation memory)."""
    loss = cfg.loss
    margin = MarginHead(
        embed_dim, max(len(train_set.label_names), 1), loss.margin, loss.s, loss.m
    ).to(device)
    if teacher is None:
        return margin, None, None
    if not loss.kd_projection:
        _centres_from_teacher(margin, train_set.labels, teacher)
    proj = nn.Linear(embed_dim, teacher.shape[1]).to(device) if loss.kd_projection else None
    memory = (
        RelationMemory(loss.rkd_memory, embed_dim, teacher.shape[1], device)
        if loss.rkd_memory > 0 and loss.w_rkd
        else None
    )
    return margin, proj, memory


@torch.no_grad()
def _centres_from_teacher(margin: MarginHead, labels: np.ndarray, teacher: np.ndarray) -> None:
    """The student starts in the teacher's space: each class centre starts at the class's mean
    teacher descriptor, so the margin loss has nothing random to pull the embedding towards."""
    for c in np.unique(labels[labels >= 0]):
        rows = (labels == c) & (np.abs(teacher).sum(1) > 0)
        if rows.any():
            margin.weight[int(c)] = torch.from_numpy(teacher[rows].mean(0)).to(margin.weight)


def load_checkpoint(run: Run) -> None:
    """Continue from the run directory's checkpoint.pt, if there is one."""
    path = run.out / "checkpoint.pt"
    if not path.is_file():
        return
    ck = torch.load(path, map_location=run.device, weights_only=False)
    run.model.load_state_dict(ck["model"])
    run.margin.load_state_dict(ck["margin"])
    if run.proj is not None:
        run.proj.load_state_dict(ck["proj"])
    run.optim.load_state_dict(ck["optim"])
    run.step, run.start_epoch = ck["step"], ck["epoch"]
    log.info("resumed from %s at epoch %d step %d", path, run.start_epoch, run.step)


def set_stage(run: Run, epoch: int) -> None:
    """Stage 1 (epochs before optim.probe_epochs, or all with optim.freeze_backbone) trains the
    model's new parts (an upcycled model's FaceMoE blocks, else its head); stage 2 everything.

    Under DDP the model is wrapped again when the stage changes: DDP registers the parameters
    that need gradients when it is built.
    """
    trainable = trains_backbone(run.cfg, epoch)
    if trainable == run.backbone_trainable:
        return
    _set_trainable(run.model, trainable)
    run.backbone_trainable = trainable
    if run.world > 1:
        run.net = nn.parallel.DistributedDataParallel(run.model)


def trains_backbone(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch `epoch` is in stage 2 (the whole model trains)."""
    return not cfg.optim.freeze_backbone and epoch >= cfg.optim.probe_epochs


def _set_trainable(model: nn.Module, backbone: bool) -> None:
    in_probe = getattr(model, "probe_trainable", lambda name: name.startswith("head."))
    for name, p in model.named_parameters():
        p.requires_grad = backbone or in_probe(name)


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> tuple[str, float]:
    """(config key, learning rate) for optimiser step `step` (from 0): warmup and decay over
    the probe stage (optim.probe_lr), then over the rest (optim.lr)."""
    o = cfg.optim
    probe_steps, total = steps_per_epoch * o.probe_epochs, steps_per_epoch * o.epochs
    if step < probe_steps:
        return "optim.probe_lr", o.probe_lr * lr_factor(step, o.warmup_steps, probe_steps, o.power)
    rest = lr_factor(step - probe_steps, o.warmup_steps, total - probe_steps, o.power)
    return "optim.lr", o.lr * rest


# --- the run directory and one epoch ---------------------------------------------------------


@contextmanager
def run_directory(run: Run) -> Iterator[TextIO | None]:
    """Make the run directory (rank 0): config.yaml, and metrics.jsonl open for the epochs'
    rows (None on the other ranks). The clock for run.max_minutes starts here."""
    run.started = time.time()
    if run.rank != 0:
        yield None
        return
    run.out.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_dump(run.cfg.model_dump(mode="json"), sort_keys=False)
    write_bytes(run.out / "config.yaml", config.encode("utf-8"), PUBLIC)
    with open(run.out / "metrics.jsonl", "a") as metrics:
        yield metrics


def train_epoch(run: Run, epoch: int, metrics: TextIO | None) -> tuple[dict[str, Any], bool]:
    """One pass over this rank's share of the training faces, then (rank 0) validation and
    the checkpoint. Returns (the epoch's summary, whether run.max_minutes stopped it).

    Each step's loss is checked once the next batch is made (so the host does not wait for
    the device every step) and at the end; a non-finite one raises TrainingDiverged.
    """
    cfg, batch = run.cfg, run.cfg.optim.batch_size
    set_stage(run, epoch)
    run.model.train()
    perm = np.random.default_rng(cfg.run.seed + epoch).permutation(len(run.train_set))
    perm = perm[run.rank :: run.world]
    bar = tqdm(
        range(run.steps_per_epoch),
        desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
        disable=run.rank != 0,
        unit="step",
    )
    stopped_early, last = False, None
    for i in bar:
        idx = np.sort(perm[i * batch : (i + 1) * batch])
        crops = np.stack([degrade(c, cfg.augment, run.rng) for c in run.train_set.crops[idx]])
        x = torch.from_numpy(model_input(run.model, crops)).to(run.device, non_blocking=True)
        check_finite(run, last, epoch)
        loss, parts, grad_norm = train_step(run, x, idx)
        last = watch_loss(run, loss)
        if metrics is not None and run.step % cfg.run.log_every == 0:
            check_finite(run, last, epoch)
            row = _log_row(run, epoch, loss, parts, grad_norm)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: f"{row[k]:.3f}" for k in parts})
        if cfg.run.max_minutes and time.time() - run.started > cfg.run.max_minutes * 60:
            stopped_early = True
            break
    check_finite(run, last, epoch)
    summary = {"epoch": epoch + 1, "step": run.step, "minutes": (time.time() - run.started) / 60}
    if metrics is not None:
        if run.val_set is not None:
            summary.update(validate(run.model, run.val_set, run.device))
        metrics.write(json.dumps(summary) + "\n")
        metrics.flush()
        log.info("epoch %d: %s", epoch + 1, summary)
        save_checkpoint(run, epoch if stopped_early else epoch + 1)
    return summary, stopped_early


def train_step(
    run: Run, x: torch.Tensor, idx: np.ndarray
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One optimiser step on the inputs `x` of the faces `idx`: (loss, its parts, grad norm)."""
    cfg = run.cfg
    tidx = torch.from_numpy(idx).to(run.device)
    _, lr = learning_rate(cfg, run.step, run.steps_per_epoch)
    for g in run.optim.param_groups:
        g["lr"] = lr
    with _autocast(run.device, cfg.run.amp):
        emb = run.net(x)
    parts = loss_parts(run, emb.float(), tidx)
    loss = sum(parts.values())

    run.optim.zero_grad(set_to_none=True)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (scaler off)
    run.scaler.scale(loss).backward()
    if run.world > 1:
        sync_head_grads(run.heads, run.world)
    run.scaler.unscale_(run.optim)
    grad_norm = nn.utils.clip_grad_norm_(
        [p for g in run.optim.param_groups for p in g["params"] if p.grad is not None],
        cfg.optim.clip_grad,
    )
    run.scaler.step(run.optim)
    run.scaler.update()
    run.step += 1
    return loss, parts, grad_norm


def loss_parts(run: Run, emb: torch.Tensor, tidx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weighted loss terms for the embeddings `emb` of the faces `tidx`: margin (labelled
    faces), distillation (faces with teacher targets), router z-loss and load balance."""
    loss = run.cfg.loss
    parts: dict[str, torch.Tensor] = {}
    y = run.labels[tidx]
    lab = y >= 0
    if loss.w_id and lab.any():
        parts["id"] = loss.w_id * run.margin(emb[lab], y[lab])
    if run.teacher is not None:
        tt = run.teacher[tidx]
        has = tt.abs().sum(1) > 0
        if has.sum() > 1:
            if loss.w_kd:
                student = emb[has] if run.proj is None else run.proj(emb[has])
                parts["kd"] = loss.w_kd * cosine_distill_loss(student, tt[has])
            if loss.w_rkd:
                parts["rkd"] = loss.w_rkd * relational_distill_loss(emb[has], tt[has], run.memory)
                if run.memory is not None:
                    run.memory.push(emb[has], tt[has])
    z, bal = router_losses(run.layers)
    parts["z"] = loss.lambda_z * loss.z_scale * z.to(run.device)
    parts["balance"] = loss.lambda_balance * loss.balance_scale * bal.to(run.device)
    return parts


def watch_loss(run: Run, loss: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(this step, its loss summed over the ranks): every rank stops at the same step."""
    total = loss.detach().clone()
    if run.world > 1:
        dist.all_reduce(total)
    return run.step, total


def check_finite(run: Run, last: tuple[int, torch.Tensor] | None, epoch: int) -> None:
    """TrainingDiverged when the watched loss of step `last` is NaN or infinite."""
    if last is None or torch.isfinite(last[1]).item():
        return
    step, loss = last
    if step == 1:
        cause = "before any update: check the data and the starting model"
    else:
        key, lr = learning_rate(run.cfg, step - 2, run.steps_per_epoch)
        cause = f"after an update at learning rate {lr:g}: lower {key}"
    kept = sorted(p.name for p in run.out.iterdir()) if run.out.is_dir() else []
    raise TrainingDiverged(
        f"training diverged: the loss is {loss.item()} at step {step} "
        f"(epoch {epoch + 1}/{run.cfg.optim.epochs}) {cause}; no model written "
        f"({run.out} keeps {', '.join(kept) or 'nothing'})"
    )


def _log_row(
    run: Run, epoch: int, loss: torch.Tensor, parts: dict[str, torch.Tensor], grad_norm
) -> dict[str, Any]:
    # .item() is a device sync: only on logging steps.
    row = {
        "step": run.step,
        "epoch": epoch,
        "lr": run.optim.param_groups[0]["lr"],
        "loss": loss.item(),
        "grad_norm": float(grad_norm),
        **{k: v.item() for k, v in parts.items()},
    }
    if run.layers and run.layers[0].num_experts > 1:
        row["expert_usage"] = expert_usage(run.layers).mean(0).round(decimals=3).tolist()
    return row


def save_checkpoint(run: Run, epochs_done: int) -> None:
    """checkpoint.pt: what --resume continues from (written whole, then renamed over)."""
    state = {
        "model": run.model.state_dict(),
        "margin": run.margin.state_dict(),
        "proj": run.proj.state_dict() if run.proj is not None else None,
        "optim": run.optim.state_dict(),
        "step": run.step,
        "epoch": epochs_done,
        "arch": run.arch,
        "config": run.cfg.model_dump(mode="json"),
        "teacher_mean": run.teacher_mean,
    }
    path = run.out / "checkpoint.pt"
    with atomic_write(path, PUBLIC) as fh:
        torch.save(state, fh)


# --- finish: evaluation, threshold, artifact -------------------------------------------------


def finish(run: Run, history: list[dict[str, Any]]) -> None:
    """Check the ranks agree; on rank 0 the before/after report (fine-tuning), the open-set
    threshold on the held-out identities and the artifact in model/."""
    if run.world > 1:
        check_ranks_agree([run.model, *run.heads], run.world)
    if run.rank == 0:
        cfg, device = run.cfg, run.device
        recipe = {
            "config": cfg.model_dump(mode="json"),
            "steps": run.step,
            "minutes": round((time.time() - run.started) / 60, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "history": history,
        }
        if run.before:
            recipe["forgetting_report"] = forgetting_report(run)
        metrics = (
            calibrate_threshold(run.model, run.val_set, device) if run.val_set is not None else {}
        )
        save_artifact(
            run.model.cpu(),
            run.arch,
            run.out / "model",
            name=cfg.run.name,
            version=cfg.run.version,
            recipe=recipe,
            data={
                "pool": cfg.data.pool,
                "folders": cfg.data.folders,
                "lists": cfg.data.lists,
                "faces": len(run.train_set),
            },
            metrics=metrics,
        )
    if run.world > 1:
        dist.destroy_process_group()


def forgetting_report(run: Run) -> dict[str, Any]:
    """Held-out high-resolution accuracy before and after fine-tuning (forgetting_report.json)."""
    after = holdout_report(run.model, run.holdout, run.device)
    report = {
        "before": run.before,
        "after": after,
        "change": {k: round(after[k] - run.before[k], 4) for k in run.before},
    }
    write_bytes(run.out / "forgetting_report.json",
                (json.dumps(report, indent=2) + "\n").encode("utf-8"), PUBLIC)
    log.info("held-out high-resolution check before/after fine-tuning: %s", report)
    return report
