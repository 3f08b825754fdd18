"""Sparse top-k mixture-of-experts MLP (the FaceMoE routing op).

For tokens x (T x d): logits z = x Wr (T x N); per token take the top-k experts;
gate `softmax_topk` (the paper): w = softmax over the k selected logits;
gate `raw_logits` (the authors' released code): w = the k selected logits themselves.
y = sum_j w_j * expert_j(x) with GELU MLP experts.

Ties: the lower expert index wins. That is what `torch.topk` does for N <= 3 (the shipped
configs) and what ONNX TopK specifies; for larger N torch.topk's CPU tie order is
implementation-defined, so selection uses a stable descending sort instead, which gives
the same rule in torch, the NumPy reference, ONNX Runtime and the TensorRT plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("softmax_topk", "raw_logits")
FUSED_DISPATCHES = ("triton",)  # implemented outside the trainer and registered (see below)
DISPATCHES = ("dense", "sparse", *FUSED_DISPATCHES)


@dataclass
class RouterOutput:
    """What a MoE layer remembers of its last forward, for the auxiliary losses and stats."""

    logits: torch.Tensor  # float[T, N]
    top_idx: torch.Tensor  # int64[T, k]


def route(logits: torch.Tensor, top_k: int, gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection and gate weights: (weights float[T, k], indices int64[T, k])."""
    if torch.onnx.is_in_onnx_export():
        top_val, top_idx = logits.topk(top_k, dim=-1)  # ONNX TopK: lower index first on ties
    else:
        top_val, top_idx = logits.sort(dim=-1, descending=True, stable=True)
        top_val, top_idx = top_val[..., :top_k], top_idx[..., :top_k]
    if gate == "softmax_topk":
        weights = top_val.float().softmax(dim=-1).to(top_val.dtype)
    elif gate == "raw_logits":
        weights = top_val
    else:
        raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
    return weights, top_idx


def _mix_dense(tokens, weights, top_idx, w1, b1, w2, b2, drop=None) -> torch.Tensor:
    """Every expert on every token, mixed by gate weights that are zero outside the top-k."""
    mix = torch.zeros(tokens.shape[0], w1.shape[0], dtype=weights.dtype, device=tokens.device)
    mix = mix.scatter(1, top_idx, weights)
    h = F.gelu(torch.einsum("td,edh->eth", tokens, w1) + b1[:, None])
    if drop is not None:
        h = drop(h)
    y = torch.einsum("eth,ehd->etd", h, w2) + b2[:, None]
    return torch.einsum("etd,te->td", y, mix.to(y.dtype))


def moe_dense(x, router, w1, b1, w2, b2, top_k: int, gate: str) -> torch.Tensor:
    """The routing op as a function of its weights (inference; x [..., d], router [N, d])."""
    tokens = x.reshape(-1, x.shape[-1])
    weights, top_idx = route(tokens @ router.T, top_k, gate)
    return _mix_dense(tokens, weights, top_idx, w1, b1, w2, b2).reshape(x.shape)


@dataclass(frozen=True)
class FusedDispatch:
    """An inference-only implementation of the routing op for `MoEMLP(dispatch=name)`.

    `route(logits [T, N], top_k, gate)` gives (gate weights [T, k], expert indices [T, k]);
    `experts(tokens [T, d], weights, indices, w1, b1, w2, b2)` the mixed output [T, d].
    """

    route: Callable[[torch.Tensor, int, str], tuple[torch.Tensor, torch.Tensor]]
    experts: Callable[..., torch.Tensor]


# The trainer owns the model and the names of its dispatches; a fused kernel is the engine's
# (`engine.ops.triton_moe` registers "triton" when it is imported), so the trainer never
# imports the engine.
_FUSED: dict[str, FusedDispatch] = {}
_PROVIDERS = {"triton": "engine.ops.triton_moe"}


def register_dispatch(name: str, route: Callable, experts: Callable) -> None:
    """Install the implementation of the fused dispatch `name` (the last registration wins)."""
    if name not in FUSED_DISPATCHES:
        raise ValueError(f"unknown fused dispatch {name!r}; expected one of {FUSED_DISPATCHES}")
    _FUSED[name] = FusedDispatch(route, experts)


def fused_dispatch(name: str) -> FusedDispatch:
    """The registered implementation of `name`; RuntimeError (one line) when there is none."""
    try:
        return _FUSED[name]
    except KeyError:
        raise RuntimeError(
            f"MoEMLP dispatch={name!r} has no implementation registered: import "
            f"{_PROVIDERS[name]} first (needs {name}, the 'gpu' extra) or use dispatch 'sparse'"
        ) from None


class MoEMLP(nn.Module):
    """N GELU expert MLPs behind a linear top-k router; a drop-in for a transformer MLP.

    `dispatch="dense"` computes every expert for every token and mixes them with a
    weight matrix that is zero outside the top-k: vectorised with no host sync, and the
    form exported to ONNX standard ops. `dispatch="sparse"` permutes tokens by expert and
    runs each expert only on the tokens that chose it (k/N of the expert FLOPs); it reads
    the N group sizes back once per layer to split the batch. `dispatch="triton"` is the
    GPU inference path: the fused Triton op of `engine.ops.triton_moe` (gating kernel, then
    grouped GEMMs over the tokens routed to each expert; k/N of the expert FLOPs, no host
    sync), registered by that module when it is imported (`register_dispatch`). It needs
    triton and CUDA tensors (or the Triton interpreter) and records no gradients. All three
    give the same output.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 3,
        top_k: int = 2,
        gate: str = "softmax_topk",
        dispatch: str = "dense",
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
        if dispatch not in DISPATCHES:
            raise ValueError(f"unknown dispatch {dispatch!r}; expected one of {DISPATCHES}")
        self.num_experts, self.top_k, self.gate, self.dispatch = num_experts, top_k, gate, dispatch
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.drop = nn.Dropout(drop)
        self.last: RouterOutput | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)
        nn.init.trunc_normal_(self.router.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        if self.dispatch in FUSED_DISPATCHES and self.num_experts > 1:
            return self._fused(tokens, logits).reshape(shape)
        weights, top_idx = route(logits, self.top_k, self.gate)
        self.last = RouterOutput(logits=logits, top_idx=top_idx)
        if self.num_experts == 1:
            out = self._expert(tokens, 0) * weights
        elif self.dispatch == "sparse":
            out = self._sparse(tokens, weights, top_idx)
        else:
            out = self._dense(tokens, weights, top_idx)
        return out.reshape(shape)

    def _fused(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (tokens.requires_grad or self.w1.requires_grad):
            raise RuntimeError(
                f"MoEMLP dispatch={self.dispatch!r} is inference only (no gradients): run it "
                "under torch.no_grad()/torch.inference_mode(), or use dispatch 'dense' or 'sparse'"
            )
        op = fused_dispatch(self.dispatch)
        weights, top_idx = op.route(logits, self.top_k, self.gate)
        self.last = RouterOutput(logits=logits, top_idx=top_idx.long())
        return op.experts(tokens, weights, top_idx, self.w1, self.b1, self.w2, self.b2)

    def _expert(self, tokens: torch.Tensor, e: int) -> torch.Tensor:
        h = self.drop(F.gelu(tokens @ self.w1[e] + self.b1[e]))
        return h @ self.w2[e] + self.b2[e]

    def _dense(
        self, tokens: torch.Tensor, weights: torch.Tensor, top_idx: torch.Tensor
    ) -> torch.Tensor:
        return _mix_dense(tokens, weights, top_idx, self.w1, self.b1, self.w2, self.b2, self.drop)

    def _sparse(
        self, tokens: torch.Tensor, weights: torch.Tensor, top_idx: torch.Tensor
    ) -> torch.Tensor:
        t, k = top_idx.shape
        flat_expert = top_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()  # one host sync
        gathered = tokens[token_of]
        outs = [
            self._expert(chunk, e)
            for e, chunk in enumerate(gathered.split(counts))
            if chunk.numel()
        ]
        y = torch.cat(outs) * weights.reshape(-1)[order, None].to(gathered.dtype)
        return torch.zeros_like(tokens, dtype=y.dtype).index_add_(0, token_of, y).to(tokens.dtype)


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]
