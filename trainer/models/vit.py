"""FaceMoE-Edge: a small ViT with a convolutional stem and MoE MLPs, sized for CPUs.

112x112 aligned face -> conv stem (stride 16) -> 7x7 tokens -> transformer blocks whose
MLPs are top-k mixtures of experts -> flatten -> BN -> dropout -> 512 -> BN (the paper's
head). With the default config: ~0.5 GFLOP and ~8.5M parameters per face.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.layers import DropPath, facemoe_head, init_linear
from trainer.models.moe import MoEMLP
from trainer.models.registry import register_model


def _conv_bn(cin: int, cout: int, stride: int, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ConvStem(nn.Module):
    """Four stride-2 3x3 convs (two with a stride-1 conv after): 112 -> 7, 3 -> dim channels.

    A conv stem gives a ViT the local inductive bias it otherwise needs far more data to learn.
    """

    def __init__(self, dim: int, width: int = 24) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _conv_bn(3, w, 2),
            _conv_bn(w, 2 * w, 2),
            _conv_bn(2 * w, 2 * w, 1),
            _conv_bn(2 * w, 4 * w, 2),
            _conv_bn(4 * w, 4 * w, 1),
            _conv_bn(4 * w, dim, 2, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)  # B, T, dim


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, drop: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.drop if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, moe: dict, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MoEMLP(dim, int(dim * mlp_ratio), **moe)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FaceMoEViT(nn.Module):
    """Conv-stem ViT with MoE MLPs; output [B, 512] (normalise it to get the embedding)."""

    def __init__(
        self,
        img_size: int = 112,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
        stem_width: int = 24,
        num_experts: int = 3,
        top_k: int = 2,
        gate: str = "softmax_topk",
        dispatch: str = "dense",
        embed_dim: int = 512,
        drop_rate: float = 0.1,
        drop_path_rate: float = 0.05,
    ) -> None:
        super().__init__()
        self.input_size, self.embed_dim = img_size, embed_dim
        self.stem = ConvStem(dim, stem_width)
        tokens = (img_size // 16) ** 2
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        moe = {"num_experts": num_experts, "top_k": top_k, "gate": gate, "dispatch": dispatch}
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, moe, r) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.head = facemoe_head(tokens, dim, embed_dim, drop_rate)
        self.apply(init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.stem(x) + self.pos))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_EDGE = dict(
    img_size=112,
    dim=192,
    depth=6,
    heads=3,
    mlp_ratio=2.0,
    stem_width=24,
    num_experts=3,
    top_k=2,
    gate="softmax_topk",
    dispatch="dense",
    embed_dim=512,
    drop_rate=0.1,
    drop_path_rate=0.05,
)
register_model("facemoe-edge", FaceMoEViT, **_EDGE)
# The ablation baseline: the same network with one dense expert (an ordinary ViT MLP).
register_model("facemoe-edge-dense", FaceMoEViT, **{**_EDGE, "num_experts": 1, "top_k": 1})
