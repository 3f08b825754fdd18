"""Margin losses against hand-computed values; distillation losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import MarginHead, cosine_distill_loss, relational_distill_loss


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
