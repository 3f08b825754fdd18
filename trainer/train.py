"""The training loop: distillation + margin loss + router auxiliaries, top to bottom.

Used for training from scratch (`facemoe train`) and, with `model.init_from`, for
fine-tuning (`facemoe finetune`). Runs on CPU (bf16 autocast) or CUDA (AMP), single
process or under torchrun (DDP).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from trainer.artifact import load_model, save_artifact
from trainer.augment import degrade, downscale
from trainer.config import TrainConfig
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
        raise ValueError("config has no training data: set data.pool, data.folders or data.lists")
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


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train per `cfg`; returns the run directory (which holds the exported model/)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
    want = cfg.run.device
    device = torch.device(
        "cuda"
        if want == "auto" and torch.cuda.is_available()
        else ("cpu" if want == "auto" else want)
    )
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed + rank)
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    )

    data = load_training_data(cfg)
    train_set, val_set = split_validation(data, cfg.data.val_identities, cfg.run.seed)
    teacher = mean = None
    if train_set.teacher is not None:
        has_t = ~np.isnan(train_set.teacher).any(1)
        teacher = np.zeros_like(train_set.teacher)
        if cfg.loss.kd_projection:
            teacher[has_t], mean = centred_targets(train_set.teacher[has_t])
        else:
            t = train_set.teacher[has_t]
            teacher[has_t] = t / np.linalg.norm(t, axis=1, keepdims=True)
    labelled = train_set.labels >= 0
    log.info(
        "training on %d faces (%d labelled, %d with teacher targets), %d held out",
        len(train_set),
        labelled.sum(),
        0 if teacher is None else len(teacher),
        0 if val_set is None else len(val_set),
    )

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
    model.to(device)
    holdout = [load_image_folder(f) for f in cfg.data.holdout_folders]
    if val_set is not None:
        holdout.append(val_set)
    before = holdout_report(model, holdout, device) if cfg.model.init_from and rank == 0 else {}
    num_classes = len(train_set.label_names)
    margin = MarginHead(
        model.embed_dim, max(num_classes, 1), cfg.loss.margin, cfg.loss.s, cfg.loss.m
    ).to(device)
    if teacher is not None and not cfg.loss.kd_projection and teacher.shape[1] != model.embed_dim:
        raise ValueError(
            f"loss.kd_projection false needs a {teacher.shape[1]}-d student like its teacher; "
            f"{cfg.model.name} embeds in {model.embed_dim}"
        )
    if teacher is not None and not cfg.loss.kd_projection:
        # The student starts in the teacher's space: start each class centre at the class's mean
        # teacher descriptor, so the margin loss has nothing random to pull the embedding towards.
        with torch.no_grad():
            for c in np.unique(train_set.labels[train_set.labels >= 0]):
                rows = (train_set.labels == c) & (np.abs(teacher).sum(1) > 0)
                if rows.any():
                    margin.weight[int(c)] = torch.from_numpy(teacher[rows].mean(0)).to(device)
    proj = (
        nn.Linear(model.embed_dim, teacher.shape[1]).to(device)
        if teacher is not None and cfg.loss.kd_projection
        else None
    )
    heads: list[nn.Module] = [margin] + ([proj] if proj is not None else [])
    memory = (
        RelationMemory(cfg.loss.rkd_memory, model.embed_dim, teacher.shape[1], device)
        if teacher is not None and cfg.loss.rkd_memory > 0 and cfg.loss.w_rkd
        else None
    )

    # what stage 1 trains: the model's new parts (an upcycled model's FaceMoE blocks), else heads
    in_probe = getattr(model, "probe_trainable", lambda name: name.startswith("head."))

    def set_backbone_trainable(trainable: bool) -> None:
        for name, p in model.named_parameters():
            p.requires_grad = trainable or in_probe(name)

    set_backbone_trainable(not (cfg.optim.freeze_backbone or cfg.optim.probe_epochs > 0))
    optim = torch.optim.AdamW(
        _param_groups([model, *heads], cfg.optim.weight_decay), lr=cfg.optim.lr
    )

    world = dist.get_world_size() if distributed else 1
    steps_per_epoch = len(train_set) // (cfg.optim.batch_size * world)
    total = steps_per_epoch * cfg.optim.epochs
    step, start_epoch = 0, 0
    ckpt_path = run_dir / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        margin.load_state_dict(ck["margin"])
        if proj is not None:
            proj.load_state_dict(ck["proj"])
        optim.load_state_dict(ck["optim"])
        step, start_epoch = ck["step"], ck["epoch"]
        log.info("resumed from %s at epoch %d step %d", ckpt_path, start_epoch, step)
    # DDP registers the parameters that need gradients when it is built: rebuilt for stage 2.
    # It broadcasts rank 0's backbone; the loss heads (seeded per rank) are broadcast here.
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    if distributed:
        for p in (p for h in heads for p in h.parameters()):
            dist.broadcast(p.data, 0)
    layers = moe_layers(model)
    rng = np.random.default_rng(cfg.run.seed * 1000 + rank)
    t_teacher = torch.from_numpy(teacher).to(device) if teacher is not None else None
    labels_all = torch.from_numpy(train_set.labels).to(device)
    metrics_file = open(run_dir / "metrics.jsonl", "a")
    started = time.time()
    stopped_early = False
    history: list[dict[str, Any]] = []

    fp16 = cfg.run.amp == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    probe_steps = steps_per_epoch * cfg.optim.probe_epochs
    for epoch in range(start_epoch, cfg.optim.epochs):
        if (
            cfg.optim.probe_epochs
            and epoch == cfg.optim.probe_epochs
            and not cfg.optim.freeze_backbone
        ):
            set_backbone_trainable(True)  # stage 2: full fine-tune
            if distributed:
                net = nn.parallel.DistributedDataParallel(model)
        model.train()
        perm = np.random.default_rng(cfg.run.seed + epoch).permutation(len(train_set))
        perm = perm[rank::world]
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
            disable=rank != 0,
            unit="step",
        )
        for i in bar:
            idx = np.sort(perm[i * cfg.optim.batch_size : (i + 1) * cfg.optim.batch_size])
            crops = np.stack([degrade(c, cfg.augment, rng) for c in train_set.crops[idx]])
            x = torch.from_numpy(model_input(model, crops)).to(device, non_blocking=True)
            tidx = torch.from_numpy(idx).to(device)
            y = labels_all[tidx]
            for g in optim.param_groups:
                if step < probe_steps:  # stage 1 (linear probe): its own schedule
                    g["lr"] = cfg.optim.probe_lr * lr_factor(
                        step, cfg.optim.warmup_steps, probe_steps, cfg.optim.power
                    )
                else:
                    g["lr"] = cfg.optim.lr * lr_factor(
                        step - probe_steps,
                        cfg.optim.warmup_steps,
                        total - probe_steps,
                        cfg.optim.power,
                    )

            with _autocast(device, cfg.run.amp):
                emb = net(x)
            emb = emb.float()
            parts: dict[str, torch.Tensor] = {}
            lab = y >= 0
            if cfg.loss.w_id and lab.any():
                parts["id"] = cfg.loss.w_id * margin(emb[lab], y[lab])
            if t_teacher is not None:
                tt = t_teacher[tidx]
                has = tt.abs().sum(1) > 0
                if has.sum() > 1:
                    if cfg.loss.w_kd:
                        student = emb[has] if proj is None else proj(emb[has])
                        parts["kd"] = cfg.loss.w_kd * cosine_distill_loss(student, tt[has])
                    if cfg.loss.w_rkd:
                        parts["rkd"] = cfg.loss.w_rkd * relational_distill_loss(
                            emb[has], tt[has], memory
                        )
                        if memory is not None:
                            memory.push(emb[has], tt[has])
            z, bal = router_losses(layers)
            parts["z"] = cfg.loss.lambda_z * cfg.loss.z_scale * z.to(device)
            parts["balance"] = cfg.loss.lambda_balance * cfg.loss.balance_scale * bal.to(device)
            loss = sum(parts.values())

            optim.zero_grad(set_to_none=True)
            # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (scaler off)
            scaler.scale(loss).backward()
            if distributed:
                sync_head_grads(heads, world)
            scaler.unscale_(optim)
            grad_norm = nn.utils.clip_grad_norm_(
                [p for g in optim.param_groups for p in g["params"] if p.grad is not None],
                cfg.optim.clip_grad,
            )
            scaler.step(optim)
            scaler.update()
            step += 1

            if rank == 0 and step % cfg.run.log_every == 0:
                # .item() is a device sync: only on logging steps.
                row = {
                    "step": step,
                    "epoch": epoch,
                    "lr": optim.param_groups[0]["lr"],
                    "loss": loss.item(),
                    "grad_norm": float(grad_norm),
                    **{k: v.item() for k, v in parts.items()},
                }
                if layers and layers[0].num_experts > 1:
                    row["expert_usage"] = expert_usage(layers).mean(0).round(decimals=3).tolist()
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: f"{row[k]:.3f}" for k in parts})
            if cfg.run.max_minutes and time.time() - started > cfg.run.max_minutes * 60:
                stopped_early = True
                break

        if rank == 0:
            summary = {"epoch": epoch + 1, "step": step, "minutes": (time.time() - started) / 60}
            if val_set is not None:
                summary.update(validate(model, val_set, device))
            history.append(summary)
            metrics_file.write(json.dumps(summary) + "\n")
            metrics_file.flush()
            log.info("epoch %d: %s", epoch + 1, summary)
            state = {
                "model": model.state_dict(),
                "margin": margin.state_dict(),
                "proj": proj.state_dict() if proj is not None else None,
                "optim": optim.state_dict(),
                "step": step,
                "epoch": epoch + 1 if not stopped_early else epoch,
                "arch": arch,
                "config": cfg.model_dump(mode="json"),
                "teacher_mean": mean,
            }
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(ckpt_path)
        if stopped_early:
            log.warning("stopped after %.1f minutes (run.max_minutes)", cfg.run.max_minutes)
            break

    metrics_file.close()
    if distributed:
        check_ranks_agree([model, *heads], world)
    if rank == 0:
        recipe = {
            "config": cfg.model_dump(mode="json"),
            "steps": step,
            "minutes": round((time.time() - started) / 60, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "history": history,
        }
        data_info = {
            "pool": cfg.data.pool,
            "folders": cfg.data.folders,
            "lists": cfg.data.lists,
            "faces": len(train_set),
        }
        if before:
            after = holdout_report(model, holdout, device)
            report = {
                "before": before,
                "after": after,
                "change": {k: round(after[k] - before[k], 4) for k in before},
            }
            (run_dir / "forgetting_report.json").write_text(json.dumps(report, indent=2) + "\n")
            recipe["forgetting_report"] = report
            log.info("held-out high-resolution check before/after fine-tuning: %s", report)
        metrics = calibrate_threshold(model, val_set, device) if val_set is not None else {}
        save_artifact(
            model.cpu(),
            arch,
            run_dir / "model",
            name=cfg.run.name,
            version=cfg.run.version,
            recipe=recipe,
            data=data_info,
            metrics=metrics,
        )
    if distributed:
        dist.destroy_process_group()
    if not math.isfinite(loss.item()):
        raise FloatingPointError("training diverged (non-finite loss)")
    return run_dir
