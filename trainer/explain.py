"""Which expert does each token go to? Routing maps and expert shares of a FaceMoE model.

Pure functions over a torch model and aligned crops (uint8[B, 112, 112, 3] BGR, the app's
crop contract); no I/O except `plot_routing` (writes a PNG) and `routing_report` (reads a
model artifact). Every MoE layer remembers its last routing (`MoEMLP.last.top_idx`, [T, k]
over B * tokens); tokens are reshaped to the spatial grid of their stage: 7x7 for
facemoe-edge, 20/10/5 for facemoe-swin-b (grid = sqrt(T / B)).

Shares: the fraction of token-to-expert assignments that go to each expert in a layer. With
top-k routing every token makes k assignments, so `shares` (all k) and `top1_shares` (only
the highest-scoring expert) each sum to 1 per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.augment import downscale
from trainer.models.moe import moe_layers
from trainer.preprocess import MEAN, STD, to_input


@dataclass(frozen=True)
class RoutingMaps:
    """Token -> expert assignments of every MoE layer for a batch of crops."""

    topk: list[np.ndarray]  # per layer int64[B, g, g, k]: expert ids, best first (g: stage grid)
    num_experts: int
    top_k: int

    @property
    def top1(self) -> list[np.ndarray]:
        """Per layer: int64[B, g, g], the highest-scoring expert of each token."""
        return [t[..., 0] for t in self.topk]

    @property
    def grids(self) -> list[int]:
        return [int(t.shape[1]) for t in self.topk]

    @property
    def shares(self) -> np.ndarray:
        """float64[L, N]: fraction of all top-k token-to-expert assignments per expert."""
        return expert_shares(self.topk, self.num_experts)

    @property
    def top1_shares(self) -> np.ndarray:
        """float64[L, N]: fraction of tokens whose top-1 expert is each expert."""
        return expert_shares(self.top1, self.num_experts)

    def histograms(self, k_only_top1: bool = False) -> np.ndarray:
        """int64[L, N]: number of assignments per expert per layer."""
        maps = self.top1 if k_only_top1 else self.topk
        return np.stack([np.bincount(m.reshape(-1), minlength=self.num_experts) for m in maps])


def expert_shares(maps: Sequence[np.ndarray], num_experts: int) -> np.ndarray:
    """float64[L, N] from per-layer arrays of expert ids (any shape)."""
    counts = np.stack([np.bincount(np.asarray(m).reshape(-1), minlength=num_experts) for m in maps])
    return counts / np.maximum(counts.sum(1, keepdims=True), 1)


def _input_size(model: nn.Module) -> int:
    return int(getattr(model, "input_size", 112))


def _moe_or_fail(model: nn.Module):
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers to explain")
    return layers


@torch.no_grad()
def routing_maps(model: nn.Module, crops: np.ndarray, mean=MEAN, std=STD) -> RoutingMaps:
    """Run `model` (eval mode for the call) on aligned uint8 BGR crops [B, H, W, 3] and
    collect every MoE layer's top-k experts per token, reshaped to the layer's token grid."""
    layers = _moe_or_fail(model)
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    b = crops.shape[0]
    param = next(model.parameters())
    x = torch.from_numpy(to_input(crops, _input_size(model), mean, std)).to(param.device)
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
    topk = []
    for i, layer in enumerate(layers):
        if layer.last is None:
            raise RuntimeError(f"MoE layer {i} did not run in the forward pass")
        idx = layer.last.top_idx.detach().cpu().numpy().astype(np.int64)  # [B * T, k]
        t = idx.shape[0] // b
        g = math.isqrt(t)
        if g * g != t or t * b != idx.shape[0]:
            raise ValueError(
                f"MoE layer {i}: {idx.shape[0]} tokens for {b} crops is not a square grid"
            )
        topk.append(idx.reshape(b, g, g, idx.shape[1]))
    return RoutingMaps(topk=topk, num_experts=layers[0].num_experts, top_k=layers[0].top_k)


def routing_shares(
    model: nn.Module, crops: np.ndarray, batch_size: int = 64, top1: bool = False
) -> np.ndarray:
    """float64[L, N]: fraction of token-to-expert assignments per expert per layer over `crops`
    (all top-k assignments; only the top-1 expert with `top1=True`). Rows sum to 1."""
    crops = np.asarray(crops)
    if len(crops) == 0:
        raise ValueError("routing_shares needs at least one crop")
    counts = None
    for i in range(0, len(crops), batch_size):
        maps = routing_maps(model, crops[i : i + batch_size])
        c = maps.histograms(k_only_top1=top1)
        counts = c if counts is None else counts + c
    return counts / counts.sum(1, keepdims=True)


def _label(res: int | None) -> str:
    return "native" if res is None else f"{res}px"


def degrade_crops(crops: np.ndarray, res: int | None) -> np.ndarray:
    """The crops downsampled to res x res (INTER_AREA) and back (INTER_CUBIC); None: unchanged."""
    crops = np.asarray(crops)
    return crops if res is None else np.stack([downscale(c, res) for c in crops])


def routing_report(
    model_dir: str | Path,
    crops: np.ndarray,
    resolutions: Sequence[int | None] = (None, 32, 24, 16),
    batch_size: int = 64,
) -> dict[str, Any]:
    """Resolution-aware routing of a model artifact over aligned crops (uint8[B, 112, 112, 3] BGR).

    Returns a JSON-able dict: per resolution ("native", "32px", ...) the [L][N] `shares` (all
    top-k assignments) and `top1_shares`; and per degraded resolution its `difference` from
    native ([L][N], res - native) and `tv_distance` per layer (0.5 * sum |difference|, 0 = the
    same expert usage, 1 = disjoint) of the top-k shares.
    """
    from trainer.artifact import load_model

    model, manifest = load_model(model_dir)
    layers = _moe_or_fail(model)
    crops = np.asarray(crops)
    results: dict[str, dict] = {}
    raw: dict[str, np.ndarray] = {}
    for res in resolutions:
        x = degrade_crops(crops, res)
        shares = routing_shares(model, x, batch_size)
        top1 = routing_shares(model, x, batch_size, top1=True)
        raw[_label(res)] = shares
        results[_label(res)] = {"shares": _round(shares), "top1_shares": _round(top1)}
    base = raw.get("native")
    difference, tv = {}, {}
    if base is not None:
        for label, shares in raw.items():
            if label != "native":
                difference[label] = _round(shares - base)
                tv[label] = _round(0.5 * np.abs(shares - base).sum(1))
    return {
        "model": f"{manifest.get('name')}@{manifest.get('version')}",
        "architecture": manifest.get("architecture"),
        "crops": int(len(crops)),
        "layers": len(layers),
        "num_experts": layers[0].num_experts,
        "top_k": layers[0].top_k,
        "resolutions": results,
        "difference": difference,
        "tv_distance": tv,
    }


def _round(a: np.ndarray, digits: int = 4) -> list:
    return np.round(np.asarray(a, np.float64), digits).tolist()


def expert_colours(n: int) -> np.ndarray:
    """float[n, 4] RGBA, distinct colours per expert (tab10, then tab20)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N) for i in range(n)])


def plot_routing(
    rows: Sequence[tuple[str, np.ndarray, RoutingMaps]],
    out: str | Path,
    alpha: float = 0.45,
    title: str | None = None,
) -> Path:
    """One row per resolution: the aligned face, then per MoE layer its top-1 expert per token
    (colour per expert, semi-transparent over the face; for grids up to 8x8 the cell also names
    the token's top-k experts), then a bar chart of the top-k token shares per expert per layer.

    rows: (label, crop uint8[H, W, 3] BGR as the model saw it, RoutingMaps of that one crop).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("plot_routing needs at least one row")
    n_exp = rows[0][2].num_experts
    n_layers = len(rows[0][2].topk)
    colours = expert_colours(n_exp)
    cmap = ListedColormap(colours[:, :3])
    cols = 1 + n_layers + 1
    cell = min(1.9, 36.0 / (cols + 1.2))  # inches per map; many layers (Swin): smaller maps
    fig_w, fig_h = cell * (cols + 1.2) + 0.6, cell * len(rows) + 1.3
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    grid = fig.add_gridspec(
        len(rows),
        cols,
        width_ratios=[1] * (cols - 1) + [2.2],
        wspace=0.08,
        hspace=0.25,
        left=0.5 / fig_w,
        right=1 - 0.5 / fig_w,
        top=1 - 0.65 / fig_h,
        bottom=0.75 / fig_h,
    )
    for r, (label, crop, maps) in enumerate(rows):
        face = np.ascontiguousarray(np.asarray(crop)[..., ::-1])  # BGR -> RGB
        h, w = face.shape[:2]
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(face)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, fontsize=11)
        if r == 0:
            ax.set_title("aligned face", fontsize=9)
        for li in range(n_layers):
            ax = fig.add_subplot(grid[r, 1 + li])
            ax.imshow(face, extent=(0, w, h, 0))
            top1 = maps.topk[li][0, ..., 0]
            ax.imshow(
                top1,
                cmap=cmap,
                vmin=-0.5,
                vmax=n_exp - 0.5,
                alpha=alpha,
                interpolation="nearest",
                extent=(0, w, h, 0),
            )
            g = top1.shape[0]
            if g <= 8:
                for (i, j), _ in np.ndenumerate(top1):
                    ids = (
                        "".join(str(int(e)) for e in maps.topk[li][0, i, j])
                        if n_exp <= 10
                        else ",".join(str(int(e)) for e in maps.topk[li][0, i, j])
                    )
                    ax.text(
                        (j + 0.5) * w / g,
                        (i + 0.5) * h / g,
                        ids,
                        ha="center",
                        va="center",
                        fontsize=5.5,
                        color="white",
                        alpha=0.9,
                    )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"layer {li} ({g}x{g})", fontsize=9)
        ax = fig.add_subplot(grid[r, -1])
        shares = maps.shares
        width = 0.8 / n_exp
        xs = np.arange(n_layers)
        for e in range(n_exp):
            ax.bar(xs + (e - (n_exp - 1) / 2) * width, shares[:, e] * 100, width, color=colours[e])
        ax.set_ylim(0, 100)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(i) for i in xs], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.yaxis.tick_right()
        ax.grid(True, axis="y", alpha=0.3)
        if r == 0:
            ax.set_title(f"token share per expert (top-{maps.top_k}, %)", fontsize=9)
        if r == len(rows) - 1:
            ax.set_xlabel("layer", fontsize=8)
    handles = [Patch(color=colours[e], label=f"expert {e}") for e in range(n_exp)]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(n_exp, 10),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 0.02 / fig_h),
    )
    fig.suptitle(
        title or "FaceMoE routing: top-1 expert per token (digits: top-k)",
        fontsize=10,
        y=1 - 0.15 / fig_h,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
