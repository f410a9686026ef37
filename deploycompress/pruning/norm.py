"""Scoring rules that read only the weights: filter norms and the geometric median."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..config import ModuleConfig
from .channel import ChannelPruner, channel_dim, channel_rows
from .io import _weight

__all__ = ["NormPruner", "L1NormPruner", "L2NormPruner", "FPGMPruner"]


class NormPruner(ChannelPruner):
    """Prune the filters of smallest Lp norm; subclasses set ``p``."""

    p: ClassVar[float]

    def channel_score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        weight = _weight(module)
        assert weight is not None
        return channel_rows(weight, channel_dim(module)).float().norm(p=self.p, dim=1)


class L1NormPruner(NormPruner):
    """Filters of smallest L1 norm (Li et al., "Pruning Filters for Efficient ConvNets")."""

    p = 1.0


class L2NormPruner(NormPruner):
    """Filters of smallest L2 norm."""

    p = 2.0


class FPGMPruner(ChannelPruner):
    """Filters nearest the geometric median of their layer: the ones the others can replace
    (He et al., "Filter Pruning via Geometric Median"). Score = summed distance to all other filters."""

    def channel_score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        weight = _weight(module)
        assert weight is not None
        rows = channel_rows(weight, channel_dim(module)).float()
        return torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist").sum(1)
