"""The routing op: sparse == masked dense, torch == NumPy reference (ties too), router losses."""

import numpy as np
import pytest
import torch

from engine.ops import REFERENCE_OPS, topk_moe_reference
from trainer.losses import load_balance_loss, router_losses, router_z_loss
from trainer.models.moe import MoEMLP, route

pytestmark = pytest.mark.contract


def _layer(n=3, k=2, gate="softmax_topk", dispatch="dense", d=16, h=24, seed=0):
    torch.manual_seed(seed)
    m = MoEMLP(d, h, n, k, gate, dispatch)
    with torch.no_grad():
        for p in (m.b1, m.b2):
            p.normal_(0, 0.1)
    return m.eval()


def _numpy_weights(m: MoEMLP):
    return [t.detach().numpy() for t in (m.router.weight, m.w1, m.b1, m.w2, m.b2)]


@pytest.mark.parametrize("n,k", [(3, 2), (4, 1), (4, 3), (8, 2), (1, 1)])
@pytest.mark.parametrize("gate", ["softmax_topk", "raw_logits"])
def test_sparse_equals_masked_dense(n, k, gate):
    dense = _layer(n, k, gate, "dense")
    sparse = _layer(n, k, gate, "sparse")
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 37, 16)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k", [(3, 2), (4, 1), (8, 2)])
@pytest.mark.parametrize("gate", ["softmax_topk", "raw_logits"])
def test_torch_matches_numpy_reference(n, k, gate):
    m = _layer(n, k, gate)
    x = torch.randn(3, 11, 16)
    ref = topk_moe_reference(x.numpy(), *_numpy_weights(m), top_k=k, gate=gate)
    np.testing.assert_allclose(m(x).detach().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_reference_is_registered_by_op_name():
    assert REFERENCE_OPS["facemoe::TopKMoE"] is topk_moe_reference


def test_ties_go_to_the_lower_expert_index():
    # A zero router makes every logit equal: torch and the reference both pick experts 0..k-1.
    m = _layer(4, 2)
    with torch.no_grad():
        m.router.weight.zero_()
    x = torch.randn(1, 5, 16)
    _, idx = route(m.router(x.reshape(-1, 16)), 2, "softmax_topk")
    assert idx.tolist() == [[0, 1]] * 5
    ref = topk_moe_reference(x.numpy(), *_numpy_weights(m), top_k=2)
    np.testing.assert_allclose(m(x).detach().numpy(), ref, rtol=1e-4, atol=1e-5)
    # Two tied logits above a third: the lower index wins the second slot.
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert route(logits, 2, "softmax_topk")[1].tolist() == [[1, 2]]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tie_rule_equals_torch_topk_for_three_experts(k):
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [2.0, 0.0, 2.0]])
    assert route(logits, k, "softmax_topk")[1].tolist() == logits.topk(k).indices.tolist()


@pytest.mark.parametrize(
    "logits,top,expected",
    [
        # softmax over the selected logits (paper) ...
        (
            [[2.0, 1.0, 0.0]],
            "softmax_topk",
            [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))]],
        ),
        ([[0.0, 5.0, 5.0]], "softmax_topk", [[0.5, 0.5]]),
        # ... or the raw selected logits (the authors' code)
        ([[2.0, 1.0, 0.0]], "raw_logits", [[2.0, 1.0]]),
        ([[-1.0, -3.0, 0.5]], "raw_logits", [[0.5, -1.0]]),
    ],
)
def test_gate_weights(logits, top, expected):
    w, _ = route(torch.tensor(logits), 2, top)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "logits,expected",
    [
        ([[0.0, 0.0, 0.0]], np.log(3) ** 2),
        ([[np.log(2.0), np.log(1.0), np.log(1.0)]], np.log(4) ** 2),
        (
            [[0.0, 0.0, 0.0], [np.log(2.0), np.log(1.0), np.log(1.0)]],
            (np.log(3) ** 2 + np.log(4) ** 2) / 2,
        ),
    ],
)
def test_router_z_loss_table(logits, expected):
    assert router_z_loss(torch.tensor(logits)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "logits,top_idx,expected",
    [
        # uniform probabilities and uniform assignments: N * sum(1/N * 1/N) = 1
        ([[0.0, 0.0, 0.0]] * 3, [[0, 1], [1, 2], [2, 0]], 1.0),
        # all assignments to experts 0,1 with uniform probs: 3 * (0.5/3 + 0.5/3) = 1
        ([[0.0, 0.0, 0.0]] * 2, [[0, 1], [0, 1]], 1.0),
        # probs (1,0,0) and everything to expert 0 and 1: 3 * (0.5*1 + 0.5*0) = 1.5
        ([[100.0, -100.0, -100.0]] * 2, [[0, 1], [0, 1]], 1.5),
    ],
)
def test_load_balance_loss_table(logits, top_idx, expected):
    got = load_balance_loss(torch.tensor(logits), torch.tensor(top_idx), 3).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_router_losses_average_layers_and_have_gradients():
    layers = [_layer(seed=s).train() for s in range(2)]
    x = torch.randn(4, 9, 16)
    for m in layers:
        m(x)
    z, b = router_losses(layers)
    (z + b).backward()
    assert all(
        m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in layers
    )
