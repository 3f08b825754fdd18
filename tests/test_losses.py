"""Margin losses against hand-computed values; distillation losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    MarginHead,
    RelationMemory,
    cosine_distill_loss,
    relational_distill_loss,
)

pytestmark = pytest.mark.unit


def _head(kind, s, m):
    head = MarginHead(2, 2, kind, s, m)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    return head


ANGLE = math.pi / 3  # embedding at 60 degrees from class 0, 30 from class 1


@pytest.mark.parametrize(
    "kind,s,m,label,expected_logits",
    [
        ("cosface", 64.0, 0.35, 0, [64 * (math.cos(ANGLE) - 0.35), 64 * math.sin(ANGLE)]),
        ("cosface", 30.0, 0.4, 1, [30 * math.cos(ANGLE), 30 * (math.sin(ANGLE) - 0.4)]),
        ("arcface", 64.0, 0.5, 0, [64 * math.cos(ANGLE + 0.5), 64 * math.sin(ANGLE)]),
        ("arcface", 10.0, 0.2, 1, [10 * math.cos(ANGLE), 10 * math.cos(math.pi / 6 + 0.2)]),
    ],
)
def test_margin_logits_table(kind, s, m, label, expected_logits):
    emb = torch.tensor([[math.cos(ANGLE), math.sin(ANGLE)]]) * 3.0  # norm does not matter
    y = torch.tensor([label])
    logits = _head(kind, s, m).logits(emb, y)
    torch.testing.assert_close(logits, torch.tensor([expected_logits]), rtol=1e-5, atol=1e-4)
    loss = _head(kind, s, m)(emb, y)
    assert loss.item() == pytest.approx(
        F.cross_entropy(torch.tensor([expected_logits]), y).item(), rel=1e-5
    )


def test_arcface_past_pi_minus_m_stays_monotonic():
    head = _head("arcface", 1.0, 0.5)
    emb = torch.tensor([[-1.0, 0.0]])  # 180 degrees from class 0
    logit = head.logits(emb, torch.tensor([0]))[0, 0].item()
    assert logit == pytest.approx(-1.0 - 0.5 * math.sin(0.5), rel=1e-5)


def test_distillation_losses():
    a = F.normalize(torch.randn(8, 5))
    assert cosine_distill_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distill_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert relational_distill_loss(a, a).item() == pytest.approx(0.0, abs=1e-10)
    # relational loss ignores a rotation of the whole space
    q, _ = torch.linalg.qr(torch.randn(5, 5))
    assert relational_distill_loss(a @ q, a).item() == pytest.approx(0.0, abs=1e-10)
    assert relational_distill_loss(torch.randn(8, 5), a).item() > 0.01


def test_relational_loss_with_memory_against_hand_computed_table():
    # unit vectors in 2-D: batch (s, t) and one remembered face (ms, mt)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    memory = RelationMemory(4, 2, 2, torch.device("cpu"))
    assert relational_distill_loss(s, t, memory).item() == pytest.approx(
        relational_distill_loss(s, t).item()
    )
    memory.push(torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 1.0]]))
    # batch relations: s0.s1 = 0 vs t0.t1 = 0.6 (twice, off-diagonal both ways)
    # memory relations: s0.ms = 0.6 vs t0.mt = 0; s1.ms = 0.8 vs t1.mt = 0.8
    want = (0.6**2 + 0.6**2 + 0.6**2 + 0.0**2) / 4
    assert relational_distill_loss(s, t, memory).item() == pytest.approx(want)


def test_relation_memory_is_a_fifo_of_detached_unit_vectors():
    memory = RelationMemory(3, 2, 1, torch.device("cpu"))
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0]], requires_grad=True)
    memory.push(x, torch.tensor([[1.0], [2.0]]))
    memory.push(torch.tensor([[0.0, -1.0], [-5.0, 0.0]]), torch.tensor([[3.0], [4.0]]))
    ms, mt = memory.tensors()
    assert len(memory) == 3 and not ms.requires_grad
    # the oldest row was overwritten by the fourth face
    assert ms.tolist() == [[-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
    assert mt.tolist() == [[1.0], [1.0], [1.0]]  # unit-normalised 1-D targets
