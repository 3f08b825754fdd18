"""A name -> config registry in the style of timm's `@register_model`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_CONFIGS: dict[str, dict[str, Any]] = {}
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module], **config: Any) -> None:
    """Register `builder(**config)` under `name`; `config` is what model.yaml stores."""
    if name in _CONFIGS:
        raise ValueError(f"model {name!r} is already registered")
    _CONFIGS[name] = {"name": name, **config}
    _BUILDERS[name] = builder


def list_models() -> list[str]:
    return sorted(_CONFIGS)


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full architecture config of a registered model with `overrides` applied."""
    if name not in _CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    unknown = set(overrides) - set(_CONFIGS[name])
    if unknown:
        raise KeyError(f"model {name!r} has no options {sorted(unknown)}")
    return {**_CONFIGS[name], **overrides}


def create_model(name: str, **overrides: Any) -> nn.Module:
    cfg = model_config(name, **overrides)
    return _BUILDERS[name](**{k: v for k, v in cfg.items() if k != "name"})
