"""FaceMoE-Swin: a Swin Transformer whose every block MLP is a top-k mixture of experts.

The paper's backbone as the authors released it (`facemoe-swin-b`): 120x120 input, 6x6
patches (20x20 tokens), embed 384, depths [2, 18, 2], heads [8, 16, 16], window 5, MoE
with N=3, k=2 in every block. Patch merging halves the grid and doubles the width between
stages (20 -> 10 -> 5 tokens a side; 384 -> 768 -> 1536 channels). Head: final LayerNorm,
flatten the 5x5 tokens -> BN -> dropout -> 512 -> BN; the output is not normalised.

Window attention carries a learned relative position bias; odd blocks shift the windows by
half a window (cyclic roll) and mask attention between pieces that the roll made adjacent.
A stage whose grid is no larger than the window attends over the whole grid, unshifted
(the standard Swin rule: the last stage's 5x5 grid is one window). Everything is
reshape/permute/roll/matmul, so the legacy ONNX exporter (opset 17) handles it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainer.models.layers import DropPath, facemoe_head, init_linear
from trainer.models.moe import MoEMLP
from trainer.models.registry import register_model


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window * window, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: [B * nW, window * window, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """int64[window^2, window^2]: row of the (2w-1)^2 bias table for each query/key pair."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)  # 2, w*w
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """float[nW, window^2, window^2]: 0 within a region, -100 across regions of a rolled grid."""
    region = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            region[:, hs, ws, :] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)  # nW, w*w
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with relative position bias."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B * nW, N, C]; mask: [nW, N, N] or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # B*nW, heads, N, N
        bias = self.bias_table[self.bias_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(-1, nw, self.heads, n, n) + mask[None, :, None]
            attn = attn.reshape(-1, self.heads, n, n)
        y = attn.softmax(dim=-1) @ v  # B*nW, heads, N, hd
        return self.proj(y.transpose(1, 2).reshape(bw, n, c))


class SwinMoEBlock(nn.Module):
    """(S)W-MSA then a MoE MLP, each pre-norm with a residual (and stochastic depth)."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        moe: dict,
        drop_path: float,
    ) -> None:
        super().__init__()
        if resolution <= window:  # the grid fits in one window: attend globally, no shift
            window, shift = resolution, 0
        if resolution % window:
            raise ValueError(f"a {resolution}-token grid does not tile into {window}-windows")
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MoEMLP(dim, int(dim * mlp_ratio), **moe)
        self.drop_path = DropPath(drop_path)
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        r, s = self.resolution, self.shift
        x = x.reshape(-1, r, r, x.shape[-1])
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window), self.attn_mask)
        x = window_reverse(windows, self.window, r, r)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x.reshape(-1, r * r, x.shape[-1])


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C) -> LayerNorm -> Linear to 2C: halves the grid."""

    def __init__(self, dim: int, resolution: int) -> None:
        super().__init__()
        if resolution % 2:
            raise ValueError(f"cannot merge an odd {resolution}x{resolution} grid")
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, c = self.resolution // 2, x.shape[-1]
        # Channel order (row offset, col offset) = (0,0), (1,0), (0,1), (1,1), as in Swin.
        x = x.reshape(-1, r, 2, r, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(-1, r * r, 4 * c)
        return self.reduction(self.norm(x))


class FaceMoESwin(nn.Module):
    """Swin with MoE MLPs: [B, 3, S, S] normalised RGB -> [B, embed_dim], not L2-normalised."""

    def __init__(
        self,
        img_size: int = 120,
        patch_size: int = 6,
        dim: int = 384,
        depths: Sequence[int] = (2, 18, 2),
        heads: Sequence[int] = (8, 16, 16),
        window: int = 5,
        mlp_ratio: float = 4.0,
        num_experts: int = 3,
        top_k: int = 2,
        gate: str = "softmax_topk",
        dispatch: str = "dense",
        embed_dim: int = 512,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(depths) != len(heads):
            raise ValueError(f"depths {list(depths)} and heads {list(heads)} differ in length")
        if img_size % patch_size:
            raise ValueError(f"input {img_size} is not a multiple of the patch size {patch_size}")
        self.input_size, self.embed_dim = img_size, embed_dim
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.patch_norm = nn.LayerNorm(dim)
        moe = {"num_experts": num_experts, "top_k": top_k, "gate": gate, "dispatch": dispatch}
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        resolution, width, layers = img_size // patch_size, dim, []
        block_rates = iter(rates)
        for stage, (depth, nh) in enumerate(zip(depths, heads, strict=True)):
            for i in range(depth):
                shift = window // 2 if i % 2 else 0  # odd blocks use shifted windows
                layers.append(
                    SwinMoEBlock(
                        width, resolution, nh, window, shift, mlp_ratio, moe, next(block_rates)
                    )
                )
            if stage < len(depths) - 1:
                layers.append(PatchMerging(width, resolution))
                resolution, width = resolution // 2, width * 2
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(width)
        tokens = resolution * resolution
        self.head = facemoe_head(tokens, width, embed_dim, drop_rate)
        self.apply(init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> final tokens [B, (S / patch / 2^(stages-1))^2, width]."""
        x = self.patch_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        return self.norm(self.layers(x))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


register_model(
    "facemoe-swin-b",
    FaceMoESwin,
    img_size=120,
    patch_size=6,
    dim=384,
    depths=[2, 18, 2],
    heads=[8, 16, 16],
    window=5,
    mlp_ratio=4.0,
    num_experts=3,
    top_k=2,
    gate="softmax_topk",
    dispatch="dense",
    embed_dim=512,
    drop_rate=0.0,
    drop_path_rate=0.1,
)
