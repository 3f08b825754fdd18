"""NumPy reference of the FaceMoE routing op, registered by its ONNX op name.

`facemoe::TopKMoE` (version 1): for tokens x (T x d), logits z = x Wr^T (T x N); per
token the top-k experts (ties: lower expert index first, as torch.topk); weights =
softmax over the k selected logits (`softmax_topk`) or the raw selected logits
(`raw_logits`); y = sum_j w_j (GELU(x W1_e + b1_e) W2_e + b2_e). GELU is the exact (erf) one.
"""

from __future__ import annotations

from collections.abc import Callable
from math import sqrt

import numpy as np
from scipy.special import erf

OP_DOMAIN = "facemoe"
OP_NAME = "TopKMoE"
OP_VERSION = "1"


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / sqrt(2.0)))


def topk_select(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k values and indices per row, largest first; ties go to the lower index."""
    idx = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(logits, idx, -1), idx


def topk_moe_reference(
    x: np.ndarray,
    router: np.ndarray,  # [N, d] (torch nn.Linear weight layout)
    w1: np.ndarray,  # [N, d, h]
    b1: np.ndarray,  # [N, h]
    w2: np.ndarray,  # [N, h, d]
    b2: np.ndarray,  # [N, d]
    top_k: int,
    gate: str = "softmax_topk",
) -> np.ndarray:
    """y with x's shape, computed in float64, returned in x's dtype. Only the k chosen run."""
    shape, dtype = x.shape, x.dtype
    t = x.reshape(-1, shape[-1]).astype(np.float64)
    logits = t @ router.astype(np.float64).T
    val, idx = topk_select(logits, top_k)
    if gate == "softmax_topk":
        e = np.exp(val - val.max(-1, keepdims=True))
        weights = e / e.sum(-1, keepdims=True)
    elif gate == "raw_logits":
        weights = val
    else:
        raise ValueError(f"unknown gate {gate!r}")
    out = np.zeros_like(t)
    for expert in range(router.shape[0]):
        rows, slot = np.nonzero(idx == expert)
        if rows.size == 0:
            continue
        h = gelu(t[rows] @ w1[expert].astype(np.float64) + b1[expert])
        y = h @ w2[expert].astype(np.float64) + b2[expert]
        np.add.at(out, rows, weights[rows, slot][:, None] * y)
    return out.reshape(shape).astype(dtype)


REFERENCE_OPS: dict[str, Callable[..., np.ndarray]] = {
    f"{OP_DOMAIN}::{OP_NAME}": topk_moe_reference
}
