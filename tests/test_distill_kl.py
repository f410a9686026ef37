"""Logit distillation by Hinton et al.'s softened KL, and lazily drawn batches (fresh random inputs per step)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from deploycompress.pruning.distill import distill, distillation_loss


def test_kl_loss_is_the_softened_kl_times_t_squared() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for temp in (1.0, 3.0):
        p = torch.softmax(t / temp, -1)  # teacher distribution, written out
        expected = float((p * (p.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean()) * temp**2
        assert float(distillation_loss(s, t, "kl", temp)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(t, t, "kl", 2.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distill(nn.Linear(3, 2), nn.Linear(3, 2), [torch.randn(2, 3)], steps=1, loss="kl", temperature=0.0)


class Fresh(Sequence):
    """Batch i drawn when asked for; remembers which were asked."""

    def __init__(self, n: int) -> None:
        self.n, self.asked = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.asked.append(i)
        return torch.randn(8, 4, generator=torch.Generator().manual_seed(i))


def test_kl_distillation_on_lazily_drawn_batches_pulls_the_student_to_the_teacher() -> None:
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6)), nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6))
    held_out = torch.randn(64, 4, generator=torch.Generator().manual_seed(999))
    with torch.no_grad():
        before = float(distillation_loss(student(held_out), teacher(held_out), "kl"))
    batches = Fresh(150)
    result = distill(student, teacher, batches, steps=300, lr=1e-2, loss="kl", progress=False)
    with torch.no_grad():
        after = float(distillation_loss(student(held_out), teacher(held_out), "kl"))
    assert batches.asked == list(range(150)) * 2  # batch i % len at step i, each drawn when used
    assert result.last_loss < 0.3 * result.first_loss and after < 0.3 * before
