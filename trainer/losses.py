"""Training losses: margin softmax (CosFace, ArcFace), router auxiliaries, distillation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.moe import MoEMLP


class MarginHead(nn.Module):
    """Normalised class centres with an additive margin on the target logit.

    CosFace: s * (cos(theta_y) - m).  ArcFace: s * cos(theta_y + m).
    Other classes: s * cos(theta_j).
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        kind: str = "cosface",
        s: float = 64.0,
        m: float = 0.35,
    ) -> None:
        super().__init__()
        if kind not in ("cosface", "arcface"):
            raise ValueError(f"unknown margin loss {kind!r}")
        self.kind, self.s, self.m = kind, s, m
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, std=0.01)

    def logits(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float())).clamp(-1, 1)
        target = cos.gather(1, labels[:, None])
        if self.kind == "cosface":
            margined = target - self.m
        else:
            theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
            # Past pi - m the angle would wrap; fall back to CosFace-style there (as insightface).
            margined = torch.where(
                theta + self.m < math.pi,
                torch.cos(theta + self.m),
                target - self.m * math.sin(self.m),
            )
        return self.s * cos.scatter(1, labels[:, None], margined)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(emb, labels), labels)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of (log sum_j exp z_j)^2."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def load_balance_loss(
    logits: torch.Tensor, top_idx: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch-style balance: N * sum_i f_i * P_i.

    f_i: fraction of the T*k token-to-expert assignments that went to expert i (no gradient);
    P_i: mean router probability (softmax over all N logits) of expert i. Equals 1 when uniform.
    """
    probs = logits.float().softmax(-1).mean(0)
    counts = torch.zeros(num_experts, device=logits.device).scatter_add_(
        0, top_idx.reshape(-1), torch.ones(top_idx.numel(), device=logits.device)
    )
    frac = counts / top_idx.numel()
    return num_experts * (frac * probs).sum()


def router_losses(layers: list[MoEMLP]) -> tuple[torch.Tensor, torch.Tensor]:
    """(z-loss, balance loss) averaged over the MoE layers of the last forward."""
    layers = [m for m in layers if m.last is not None and m.num_experts > 1]
    if not layers:
        zero = torch.zeros(())
        return zero, zero
    z = torch.stack([router_z_loss(m.last.logits) for m in layers]).mean()
    b = torch.stack(
        [load_balance_loss(m.last.logits, m.last.top_idx, m.num_experts) for m in layers]
    ).mean()
    return z, b


def expert_usage(layers: list[MoEMLP]) -> torch.Tensor:
    """float[L, N]: fraction of each layer's token-to-expert assignments per expert."""
    rows = []
    for m in layers:
        idx = m.last.top_idx.reshape(-1)
        rows.append(torch.bincount(idx, minlength=m.num_experts).float() / idx.numel())
    return torch.stack(rows)


def cosine_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos(student, teacher), averaged; both [B, D]."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def relational_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    memory: RelationMemory | None = None,
) -> torch.Tensor:
    """Match the batch's pairwise cosine-similarity matrix to the teacher's (off-diagonal MSE).

    With a `memory`, each face is also related to the faces of recent batches (their student
    embeddings detached, as in cross-batch memory, Wang et al. CVPR 2020): B x (B + M) relations
    per step instead of B x B, at the cost of one matrix product.
    """
    s = F.normalize(student.float())
    t = F.normalize(teacher.float())
    off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    pred, want = (s @ s.T)[off], (t @ t.T)[off]
    if memory is not None and len(memory):
        ms, mt = memory.tensors()
        pred = torch.cat([pred, (s @ ms.T).reshape(-1)])
        want = torch.cat([want, (t @ mt.T).reshape(-1)])
    return F.mse_loss(pred, want)


class RelationMemory:
    """A FIFO of the last `size` (student, teacher) unit embeddings, student ones detached."""

    def __init__(self, size: int, student_dim: int, teacher_dim: int, device: torch.device):
        self.size = size
        self.student = torch.zeros(size, student_dim, device=device)
        self.teacher = torch.zeros(size, teacher_dim, device=device)
        self.filled = 0
        self.head = 0

    def __len__(self) -> int:
        return self.filled

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # copies: a later push must not change what a pending backward pass saved
        return self.student[: self.filled].clone(), self.teacher[: self.filled].clone()

    @torch.no_grad()
    def push(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        s = F.normalize(student.detach().float())[-self.size :]
        t = F.normalize(teacher.float())[-self.size :]
        idx = (self.head + torch.arange(len(s), device=s.device)) % self.size
        self.student[idx], self.teacher[idx] = s, t
        self.head = (self.head + len(s)) % self.size
        self.filled = min(self.size, self.filled + len(s))
