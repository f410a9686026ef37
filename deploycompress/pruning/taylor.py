"""Scoring rule that reads gradients: first-order Taylor estimate of each filter's importance."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .channel import channel_dim, channel_rows
from .io import _weight
from .statistics import StatisticsPruner

__all__ = ["TaylorFOWeightPruner"]


class TaylorFOWeightPruner(StatisticsPruner):
    """Score = mean over training steps of ``sum((w * dL/dw)^2)`` over each filter, as NNI computes
    it (Molchanov et al., "Importance Estimation for Neural Network Pruning"). Needs a
    :class:`TorchEvaluator` whose training step returns the loss."""

    needs_loss = True

    def _install_hooks(self) -> list[RemovableHandle]:
        def hook_for(name: str, module: nn.Module, weight: torch.Tensor) -> Callable[[torch.Tensor], None]:
            dim = channel_dim(module)

            def hook(grad: torch.Tensor) -> None:
                contribution = channel_rows(weight.detach() * grad.detach(), dim).float().pow(2).sum(1)
                self._accumulate(name, contribution, 1)

            return hook

        handles = []
        for name, module in self._modules.items():
            weight = _weight(module)
            assert weight is not None
            handles.append(weight.register_hook(hook_for(name, module, weight)))
        return handles
