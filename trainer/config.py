"""The trainer's one config object, validated once (pydantic, unknown keys refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AugmentConfig(_Strict):
    """Low-resolution degradations for training (`trainer.augment` applies them)."""

    p_flip: float = 0.5
    p_lowres: float = 0.5
    lowres_min: int = 8
    lowres_max: int = 64
    p_blur: float = 0.15
    blur_sigma: tuple[float, float] = (0.5, 2.0)
    p_motion: float = 0.1
    motion_len: tuple[int, int] = (3, 9)
    p_noise: float = 0.15
    noise_sigma: tuple[float, float] = (2.0, 10.0)
    p_jpeg: float = 0.25
    jpeg_quality: tuple[int, int] = (20, 80)


class ModelSection(_Strict):
    name: str = "facemoe-edge"
    overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None  # a model artifact directory or checkpoint to start from


class DataSection(_Strict):
    pool: str | None = None  # teacher-pool .npz (facemoe data prepare --teacher)
    folders: list[str] = Field(default_factory=list)  # aligned crops, one sub-folder per identity
    lists: list[str] = Field(default_factory=list)  # `path label` list files
    teacher_onnx: str | None = (
        None  # an exported teacher ONNX: targets from its clean-crop embeddings
    )
    holdout_folders: list[str] = Field(
        default_factory=list
    )  # high-res set for the forgetting report
    val_identities: int = 40  # labelled identities held out for the per-epoch check
    min_images_per_class: int = 1


class LossSection(_Strict):
    margin: Literal["cosface", "arcface"] = "cosface"
    s: float = 64.0
    m: float = 0.35
    w_id: float = 1.0  # margin loss on labelled faces
    w_kd: float = 1.0  # cosine distillation to the (centred) teacher targets
    w_rkd: float = 1.0  # relational distillation (batch similarity matrix)
    # True: distil through a learned projection to the re-centred teacher targets (a student
    # trained from scratch); False: the embedding itself to the raw teacher descriptor (a
    # student that starts as the teacher, e.g. upcycled from it: nothing to re-learn at step 0)
    kd_projection: bool = True
    rkd_memory: int = 0  # also relate each face to this many faces of recent batches (0: off)
    lambda_z: float = 10.0  # router z-loss weight
    lambda_balance: float = 10.0  # load-balancing loss weight
    z_scale: float = 1e-3  # the z-loss term inside lambda_z (see trainer.losses)
    balance_scale: float = 1e-2


class OptimSection(_Strict):
    lr: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 20
    batch_size: int = 128
    warmup_steps: int = 200
    power: float = 1.0  # polynomial decay exponent (1 = linear to 0)
    clip_grad: float = 5.0
    freeze_backbone: bool = False  # train only the heads for the whole run
    probe_epochs: int = 0  # fine-tuning stage 1: epochs with the backbone frozen (linear probe)
    probe_lr: float = 1e-3  # stage 1 learning rate; stage 2 (full fine-tune) uses `lr`


class RunSection(_Strict):
    out_dir: str = "runs/facemoe-edge"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    threads: int = 0  # 0: torch default
    log_every: int = 20
    max_minutes: float = 0  # stop (and checkpoint) after this long; 0 = no limit
    name: str = "facemoe-edge"
    version: str = "0.1.0"


class TrainConfig(_Strict):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossSection = Field(default_factory=LossSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    run: RunSection = Field(default_factory=RunSection)


M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the YAML path."""


def read_yaml_config(path: str | Path, cls: type[M], overrides: dict[str, Any] | None = None) -> M:
    """Read a YAML file into the pydantic model `cls`; `overrides` set dotted keys (a.b=c) first.

    Every problem is a ConfigError whose one-line message names the file and the YAML path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {err['msg']}") from e


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    return read_yaml_config(path, TrainConfig, overrides)
