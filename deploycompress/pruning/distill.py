"""Recovering accuracy without labels: the pruned student learns the dense teacher's outputs.

Knowledge distillation on outputs (Hinton et al., 2015, "Distilling the Knowledge in a Neural
Network"; for sentence embedders, Reimers & Gurevych, 2020, "Making Monolingual Sentence Embeddings
Multilingual using Knowledge Distillation": MSE or cosine between student and teacher embeddings) on
unlabelled real inputs. Typical flow: prune heads/FFN channels -> ``speedup`` (a physically smaller
model; no masks left to re-grow) -> :func:`distill` -> quantize.

For :class:`~deploycompress.pruning.MovementPruner` (which trains through a ``TorchEvaluator``),
:func:`distillation_evaluator` builds the evaluator whose training step is the distillation loss.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .evaluator import TorchEvaluator, _call  # one way to call a model with a batch

log = logging.getLogger(__name__)

LOSSES = ("cosine", "mse")

__all__ = ["DistillResult", "distill", "distillation_evaluator", "distillation_loss"]


@dataclass
class DistillResult:
    """Losses per step (the first and the mean of the last tenth make the summary)."""

    steps: int
    losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def _tensor(out: Any, where: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):  # a Hugging Face ModelOutput
        return out.last_hidden_state
    raise TypeError(f"{where} returned {type(out).__name__}; distillation needs a tensor (wrap it, e.g. deploycompress.hf.Encoder)")


def distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, loss: str = "cosine") -> torch.Tensor:
    """``"cosine"``: mean of 1 - cos over the rows of the last axis; ``"mse"``: mean squared error.
    Shapes must match (batch, ..., features)."""
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student output {tuple(student_out.shape)} and teacher output {tuple(teacher_out.shape)} differ in shape")
    if loss == "cosine":
        return (1 - F.cosine_similarity(student_out, teacher_out.detach(), dim=-1)).mean()
    if loss == "mse":
        return F.mse_loss(student_out, teacher_out.detach())
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def distillation_step(teacher: nn.Module, loss: str = "cosine") -> Callable[[Any, nn.Module], torch.Tensor]:
    """``training_step(batch, student) -> loss`` against ``teacher`` (run in eval mode, without grads)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    def step(batch: Any, student: nn.Module) -> torch.Tensor:
        was = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                target = _tensor(_call(teacher, batch), "the teacher")
        finally:
            teacher.train(was)
        return distillation_loss(_tensor(_call(student, batch), "the student"), target, loss)

    return step


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any] | Iterable[Any],
    *,
    steps: int = 300,
    lr: float = 5e-5,
    loss: str = "cosine",
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    progress: bool = True,
    train_mode: bool = True,
) -> DistillResult:
    """Fine-tune ``student`` in place to match ``teacher``'s outputs on ``batches`` (cycled for ``steps``).

    ``batches``: input batches as the models take them (a tensor, a tuple of positional inputs, or a
    dict of keyword inputs); both models return a tensor (or a Hugging Face output, whose
    ``last_hidden_state`` is used) of the same shape. AdamW with ``lr`` and ``weight_decay``, gradient
    norm clipped to ``grad_clip``. The teacher is not changed (eval mode, no grads); the student is
    left in eval mode. Raises ``ValueError`` on bad arguments before training.

    ``train_mode=False`` keeps the student in eval mode while its weights learn: BatchNorm uses (and
    keeps) its running statistics, dropout and stochastic depth stay off. Use it for small batches or
    batches of correlated inputs (e.g. crops of one photo), whose batch statistics would otherwise
    normalise each step and overwrite the running statistics the deployed model uses.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if student is teacher:
        raise ValueError("student and teacher are the same module: distil a copy (e.g. the sped-up model)")
    batches = list(batches) if not isinstance(batches, Sequence) else batches
    if not batches:
        raise ValueError("batches is empty: give at least one batch of real inputs")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    step_fn = distillation_step(teacher, loss)
    result = DistillResult(steps)
    student.train(train_mode)
    try:
        for _, batch in zip(tqdm(range(steps), desc="distill", disable=not progress), itertools.cycle(batches)):
            value = step_fn(batch, student)
            opt.zero_grad(set_to_none=True)
            value.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            result.losses.append(float(value.detach()))
    finally:
        student.eval()
    log.info("distill: %d steps, loss %.4g -> %.4g", steps, result.first_loss, result.last_loss)
    return result


def distillation_evaluator(
    teacher: nn.Module, batches: Sequence[Any], *, lr: float = 5e-5, loss: str = "cosine", dummy_input: Any = None
) -> TorchEvaluator:
    """A ``TorchEvaluator`` (e.g. for ``MovementPruner``) whose training step is the distillation loss
    against ``teacher`` on ``batches``, with AdamW(``lr``) over the student's parameters."""
    step = distillation_step(teacher, loss)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):  # noqa: ANN001, ANN202
        opt = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        total = max_steps if max_steps is not None else len(batches) * (max_epochs or 1)
        model.train()
        for _, batch in zip(range(total), itertools.cycle(batches)):
            value = training_step(batch, model)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        model.eval()

    return TorchEvaluator(training_func, lambda params: torch.optim.AdamW(params, lr=lr), step, dummy_input=dummy_input)
