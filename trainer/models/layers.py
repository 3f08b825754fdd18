"""Pieces shared by the FaceMoE backbones."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


def facemoe_head(tokens: int, width: int, embed_dim: int, drop_rate: float) -> nn.Sequential:
    """The paper's head over flattened tokens: BatchNorm -> dropout -> linear -> BatchNorm."""
    return nn.Sequential(
        nn.BatchNorm1d(tokens * width),
        nn.Dropout(drop_rate),
        nn.Linear(tokens * width, embed_dim, bias=False),
        nn.BatchNorm1d(embed_dim),
    )


def init_linear(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for every nn.Linear (`model.apply`)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
