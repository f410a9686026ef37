"""Norms narrowed by ``norm_spans="prune"``: exact where the masked model's removed channels are zero.

A LayerNorm/RMSNorm computes its statistics over every channel it spans, the zero ones included:
``mean = sum(x) / N``. Slicing it to the ``k`` kept channels changes ``N`` and so every output. Two
cases are exact instead, and speedup builds them (:func:`narrow_norms`):

- the removed channels are zero coming in (the trace's rule) *and* going out (their ``weight`` and
  ``bias`` entries are zero in the masked model, e.g. a Hugging Face encoder whose masks name every
  ``LayerNorm``'s weight and bias with the hidden channels): the norm becomes a :class:`ZeroPaddedNorm`
  that puts zeros back in the removed places, normalises over the original width and keeps the ``k``
  kept channels -- the masked model's own computation, so the result equals it;
- a norm whose output is a model output (``ChannelTrace.widened_norms``: BERT's last LayerNorm gives
  ``last_hidden_state``) reads the narrowed stream and returns the full width, the removed channels as
  the masked model has them (``beta - gamma * mean / std``; zero when weight and bias are masked).

Otherwise the narrowed norm normalises over the kept channels alone (``report.norms_changed``; outputs
differ from the masked model until fine-tuned), as documented in ``docs/speedup.md``.
Only exact ``nn.LayerNorm`` / ``nn.RMSNorm`` modules (norm over the last axis) are padded.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ChannelTrace
from .resolve import Removal

log = logging.getLogger(__name__)

PADDED_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)

__all__ = ["NormPlan", "ZeroPaddedNorm", "narrow_norms", "plan_norms"]


class ZeroPaddedNorm(nn.Module):
    """A last-axis norm over ``full_width`` channels fed only the ``kept`` ones (the others are zero).

    ``forward(x)``: ``x`` (..., k) with ``k = len(kept)``; it is scattered into (..., full_width) with
    zeros elsewhere, ``norm`` (the original full-width LayerNorm/RMSNorm, weights as masked) runs on it,
    and the output is (..., k) (the kept channels) or, with ``widen=True``, (..., full_width).
    ONNX: ``Pad`` + ``Gather`` + the norm (+ ``Gather``). ``normalized_shape`` is the input width ``(k,)``.
    """

    def __init__(self, norm: nn.Module, kept: torch.Tensor, widen: bool = False) -> None:
        super().__init__()
        full = int(norm.normalized_shape[-1])
        kept = torch.as_tensor(kept, dtype=torch.long).flatten()
        if kept.numel() == 0 or kept.numel() >= full or int(kept.max()) >= full:
            raise ValueError(f"ZeroPaddedNorm: kept must hold 1..{full - 1} indices below {full}, got {kept.numel()}")
        fill = torch.full((full,), kept.numel(), dtype=torch.long)  # removed places read the appended zero
        fill[kept] = torch.arange(kept.numel())
        self.norm, self.widen, self.full_width = norm, widen, full
        self.normalized_shape = (kept.numel(),)
        self.register_buffer("fill", fill)
        self.register_buffer("kept", kept.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (0, 1)).index_select(-1, self.fill)
        y = self.norm(padded)
        return y if self.widen else y.index_select(-1, self.kept)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]} of {self.full_width} channels, widen={self.widen}"


@dataclass
class NormPlan:
    """What :func:`narrow_norms` does with one norm: its full-width copy, kept channels, and whether it widens."""

    name: str
    full: nn.Module
    kept: torch.Tensor
    widen: bool


def _affine_zero(module: nn.Module, removed: torch.Tensor) -> bool:
    for attr in ("weight", "bias"):
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor) and bool((t.detach()[removed.to(t.device)] != 0).any()):
            return False
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def plan_norms(model: nn.Module, trace: ChannelTrace, removal: Removal) -> list[NormPlan]:
    """Before shrinking: the norms to pad (see the module docstring), each with a full-width copy."""
    modules = dict(model.named_modules())
    plans = []
    for name, ids in list(trace.norms.items()) + list(trace.widened_norms.items()):
        keep = removal.keep(ids)
        module = modules.get(name)
        if bool(keep.all()) or not bool(keep.any()) or type(module) not in PADDED_NORM_TYPES:
            continue
        widen = name in trace.widened_norms
        if widen or _affine_zero(module, ~keep):
            plans.append(NormPlan(name, copy.deepcopy(module), torch.nonzero(keep).flatten(), widen))
    return plans


def narrow_norms(model: nn.Module, plans: list[NormPlan]) -> list[str]:
    """After shrinking: replace each planned norm by a :class:`ZeroPaddedNorm`; returns their names."""
    for plan in plans:
        parent, _, child = plan.name.rpartition(".")
        old = model.get_submodule(plan.name)
        new = ZeroPaddedNorm(plan.full, plan.kept, widen=plan.widen).to(plan.kept.device)
        new.train(old.training)
        setattr(model.get_submodule(parent) if parent else model, child, new)
        log.info("%s: %d of %d channels, statistics over the full width (exact)%s", plan.name, plan.kept.numel(),
                 new.full_width, ", output widened back" if plan.widen else "")
    return [p.name for p in plans]
