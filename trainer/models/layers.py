"""Pieces shared by the FaceMoE backbones (FaceMoEBlock: the block upcycled networks gain)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.moe import MoEMLP


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


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class FaceMoEBlock(nn.Module):
    """Pre-norm transformer block over a feature map's positions, with a MoE MLP.

    Its two residual branches end in zero-initialised projections (the attention output and
    every expert's second layer), so a fresh block is the identity.
    """

    def __init__(self, dim: int, tokens: int, heads: int, mlp_ratio: float, moe: dict) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MoEMLP(dim, int(dim * mlp_ratio), **moe)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)
        nn.init.zeros_(self.mlp.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        a = self.attn(self.norm1(t + self.pos))
        t = t + a
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)
