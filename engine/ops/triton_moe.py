"""Fused sparse top-k MoE routing op in Triton, for torch inference on a GPU.

`topk_moe_triton(x, router, w1, b1, w2, b2, top_k, gate)` computes the `facemoe::TopKMoE` op
(see `engine.ops.reference`) with the signature and semantics of
`trainer.models.moe.moe_dense`, but runs only the k selected experts of each token:

1. Gating (`route_triton`, one Triton kernel over the logits): top-k per token with ties to
   the lower expert index, then the gate weights in fp32: softmax over the k selected
   logits (`softmax_topk`) or the selected logits themselves (`raw_logits`).
2. Permutation (torch ops, no host sync): the T*k token-slot pairs are sorted by expert
   (stable sort), and the expert row offsets come from `searchsorted` on the sorted ids.
3. Layer 1 (grouped GEMM kernel): for each expert, rows = the tokens routed to it, gathered
   from x inside the kernel; `GELU(x W1_e + b1_e)` with bias and exact (erf) GELU in the
   epilogue, written in x's dtype to a [T*k, h] buffer in expert order.
4. Layer 2 (grouped GEMM kernel): `(h W2_e + b2_e) * gate` in the epilogue, each row written
   to its own token-slot row (k = 1: straight into the output). For k > 1 the k slot rows
   of a token are summed in a fixed order (fp32, then cast): no atomics, so the output is
   deterministic run to run.

No host sync: both GEMMs launch a grid sized by an upper bound of row tiles,
`cdiv(T*k, BLOCK_M) + N`, and each program finds its expert and row range from the
device-side offsets array; programs past the last tile return at once. (The autotuner
times its configs once per new shape key, on first use; that first call syncs.)

Matmuls accumulate in fp32 for fp32, fp16 and bf16 inputs. fp32 inputs use full-precision
("ieee") dot products unless `torch.backends.cuda.matmul.allow_tf32` is set, as torch does.
Inference only: nothing here records gradients. Importing this module registers the op as
`MoEMLP`'s "triton" dispatch (`trainer.models.moe.register_dispatch`).

Run on CPU tensors only under the Triton interpreter (`TRITON_INTERPRET=1` set before this
module is imported), which executes the kernels with NumPy; that is how the tests check it
without a GPU. The interpreter uses small fixed block sizes; on a GPU the blocks are
autotuned.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from trainer.models.moe import register_dispatch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
GATES = ("softmax_topk", "raw_logits")

_ROUTE_BLOCK_T = 16 if INTERPRET else 128
_INTERPRET_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


# --- kernels -------------------------------------------------------------------------------


@triton.jit
def _route_kernel(
    logits_ptr,
    w_ptr,
    idx_ptr,
    T,
    N: tl.constexpr,
    K: tl.constexpr,
    N_PAD: tl.constexpr,
    SOFTMAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Top-k of each logits row (ties: lower index), gate weights in fp32 and int32 indices."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, N_PAD)
    rmask = rows < T
    z = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
        mask=rmask[:, None] & (cols[None, :] < N),
        other=0.0,
    ).to(tl.float32)
    pad = tl.broadcast_to(cols[None, :] >= N, (BLOCK_T, N_PAD))
    m0 = tl.max(tl.where(pad, float("-inf"), z), axis=1)  # the top-1 logit
    # Pass 1: the softmax denominator over the k selected logits. Selection marks the lowest
    # untaken index among the maxima as taken, so ties go to the lower expert index.
    denom = tl.zeros([BLOCK_T], dtype=tl.float32)
    taken = pad
    for _j in tl.static_range(K):
        cand = tl.where(taken, float("-inf"), z)
        m = tl.max(cand, axis=1)
        i = tl.min(tl.where((~taken) & (cand == m[:, None]), cols[None, :], N_PAD), axis=1)
        taken = taken | (cols[None, :] == i[:, None])
        denom += tl.exp(m - m0)
    # Pass 2: the same selection again, now writing indices and weights.
    taken = pad
    for j in tl.static_range(K):
        cand = tl.where(taken, float("-inf"), z)
        m = tl.max(cand, axis=1)
        i = tl.min(tl.where((~taken) & (cand == m[:, None]), cols[None, :], N_PAD), axis=1)
        taken = taken | (cols[None, :] == i[:, None])
        if SOFTMAX:
            w = tl.exp(m - m0) / denom
        else:
            w = m
        tl.store(w_ptr + rows * K + j, w, mask=rmask)
        tl.store(idx_ptr + rows * K + j, i, mask=rmask)


@triton.jit
def _expert_tile(pid_m, offsets_ptr, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Which expert row tile program `pid_m` owns: (expert, first row, end of expert's rows).

    Expert e owns rows offsets[e]:offsets[e+1] of the expert-sorted slots, cut into
    cdiv(count, BLOCK_M) tiles; tiles are numbered expert after expert. A program whose
    pid_m is past the last tile gets expert N (nothing to do).
    """
    e_ids = tl.arange(0, N_PAD)
    emask = e_ids < N
    starts = tl.load(offsets_ptr + e_ids, mask=emask, other=0)
    ends = tl.load(offsets_ptr + e_ids + 1, mask=emask, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    e = tl.sum((emask & (tile_end <= pid_m)).to(tl.int32), axis=0)
    sel = e_ids == e
    first_tile = tl.sum(tl.where(sel, tile_end - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(sel, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(sel, ends, 0), axis=0)
    return e, row0, row_end


@triton.jit
def _tile_matmul(a_rows, b_ptr, rmask, cols, cmask, K, N_B, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of A @ B for one expert: `a_rows` points at the start of
    each of the tile's A rows (K contiguous values each), `b_ptr` at the expert's row-major
    [K, N_B] weight; `rmask` / `cmask` mask the tile's rows and columns."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows[:, None] + ks[None, :]
    b_ptrs = b_ptr + ks[:, None] * N_B + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * N_B
    return acc


@triton.jit
def _gemm1_kernel(
    x_ptr,  # [T, D] tokens
    w1_ptr,  # [N, D, H]
    b1_ptr,  # [N, H]
    h_ptr,  # [T*K, H] out, expert-sorted rows
    token_of_ptr,  # int32[T*K]: token of each sorted row
    offsets_ptr,  # int32[N+1]: expert row offsets
    D,
    H,
    M_BUCKET,  # autotune key only
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e, row0, row_end = _expert_tile(tl.program_id(0), offsets_ptr, N, N_PAD, BLOCK_M)
    if e >= N:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    tok = tl.load(token_of_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < H
    acc = _tile_matmul(x_ptr + tok * D, w1_ptr + e.to(tl.int64) * D * H, rmask, cols, cmask,
                       D, H, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    acc += tl.load(b1_ptr + e * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))  # exact GELU
    out = h_ptr + rows[:, None].to(tl.int64) * H + cols[None, :]
    tl.store(out, acc.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _gemm2_kernel(
    h_ptr,  # [T*K, H] expert-sorted rows from layer 1
    w2_ptr,  # [N, H, D]
    b2_ptr,  # [N, D]
    out_ptr,  # [T*K, D]: one row per token slot (t*K + j)
    slot_ptr,  # int32[T*K]: token slot of each sorted row
    gate_ptr,  # float32[T*K]: gate weight of each token slot
    offsets_ptr,
    H,
    D,
    M_BUCKET,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e, row0, row_end = _expert_tile(tl.program_id(0), offsets_ptr, N, N_PAD, BLOCK_M)
    if e >= N:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    slot = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
    gate = tl.load(gate_ptr + slot, mask=rmask, other=0.0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    acc = _tile_matmul(h_ptr + rows.to(tl.int64) * H, w2_ptr + e.to(tl.int64) * H * D, rmask,
                       cols, cmask, H, D, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    acc += tl.load(b2_ptr + e * D + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = acc * gate[:, None]
    out = out_ptr + slot[:, None] * D + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _gpu_configs() -> list[triton.Config]:
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 256, 32, 8, 4),
        (64, 64, 32, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


if INTERPRET:
    _gemm1, _gemm2 = _gemm1_kernel, _gemm2_kernel
else:
    _gemm1 = triton.autotune(_gpu_configs(), key=["D", "H", "M_BUCKET"])(_gemm1_kernel)
    _gemm2 = triton.autotune(_gpu_configs(), key=["D", "H", "M_BUCKET"])(_gemm2_kernel)


# --- launchers -----------------------------------------------------------------------------


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton MoE op needs CUDA tensors (got {t.device}); on CPU it runs only under "
            "the Triton interpreter (TRITON_INTERPRET=1 set before import)"
        )


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def route_triton(logits: torch.Tensor, top_k: int, gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate weights float32[T, k] and expert indices int32[T, k] of logits [T, N]."""
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
    _check_device(logits)
    logits = logits.contiguous()
    t, n = logits.shape
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k must be in 1..{n}, got {top_k}")
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    if t:
        _route_kernel[(triton.cdiv(t, _ROUTE_BLOCK_T),)](
            logits,
            weights,
            idx,
            t,
            N=n,
            K=top_k,
            N_PAD=triton.next_power_of_2(n),
            SOFTMAX=gate == "softmax_topk",
            BLOCK_T=_ROUTE_BLOCK_T,
        )
    return weights, idx


def experts_triton(
    tokens: torch.Tensor,
    weights: torch.Tensor,
    top_idx: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """y [T, d] = sum_j weights[:, j] * expert_{top_idx[:, j]}(tokens), k of N experts per token."""
    _check_device(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [T, d], got {tuple(tokens.shape)}")
    dtype = tokens.dtype
    for name, p in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if p.dtype != dtype:
            raise ValueError(f"{name} is {p.dtype} but the tokens are {dtype}")
    t, d = tokens.shape
    n, _, h = w1.shape
    k = top_idx.shape[1]
    tokens, w1, b1, w2, b2 = (a.contiguous() for a in (tokens, w1, b1, w2, b2))
    if t == 0:
        return torch.zeros_like(tokens)
    dev = tokens.device
    # Token-slot pairs sorted by expert; expert e owns sorted rows offsets[e]:offsets[e+1].
    sorted_expert, order = torch.sort(top_idx.reshape(-1).to(torch.int32), stable=True)
    bounds = torch.arange(n + 1, device=dev, dtype=torch.int32)
    offsets = torch.searchsorted(sorted_expert, bounds).to(torch.int32)
    slot_of = order.to(torch.int32)
    token_of = torch.div(order, k, rounding_mode="floor").to(torch.int32)
    gate = weights.reshape(-1).to(torch.float32).contiguous()
    rows = t * k
    bucket = triton.next_power_of_2(rows)
    common = dict(N=n, N_PAD=triton.next_power_of_2(n), PREC=_precision(dtype))
    if INTERPRET:
        common.update(_INTERPRET_GEMM)

    hidden = torch.empty(rows, h, dtype=dtype, device=dev)

    def grid(cols: int):
        # An upper bound of the row tiles (sum_e cdiv(count_e, BLOCK_M) <= cdiv(rows, BLOCK_M)
        # + n - 1): no host sync for the real count; spare programs return at once.
        return lambda meta: (
            triton.cdiv(rows, meta["BLOCK_M"]) + n,
            triton.cdiv(cols, meta["BLOCK_N"]),
        )

    _gemm1[grid(h)](tokens, w1, b1, hidden, token_of, offsets, d, h, bucket, **common)

    # k = 1: slot t is token t, so layer 2 writes the output directly; else per-slot fp32 rows.
    out = (
        torch.empty(t, d, dtype=dtype, device=dev)
        if k == 1
        else torch.empty(rows, d, dtype=torch.float32, device=dev)
    )
    _gemm2[grid(d)](hidden, w2, b2, out, slot_of, gate, offsets, h, d, bucket, **common)
    if k == 1:
        return out
    return out.view(t, k, d).sum(dim=1).to(dtype)


def topk_moe_triton(x, router, w1, b1, w2, b2, top_k: int, gate: str) -> torch.Tensor:
    """The routing op (x [..., d], router [N, d]); only the k selected experts run per token."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in (x, router, w1, b1, w2, b2)):
        raise RuntimeError("the Triton MoE op is inference only: run it under torch.no_grad()")
    tokens = x.reshape(-1, x.shape[-1])
    weights, idx = route_triton(tokens @ router.T, top_k, gate)
    return experts_triton(tokens, weights, idx, w1, b1, w2, b2).reshape(x.shape)


register_dispatch("triton", route_triton, experts_triton)
