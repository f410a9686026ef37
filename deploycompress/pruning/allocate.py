"""Turning scores into how many units (weights or channels) each layer loses, and which.

Shared by every pruner: a pruner only scores its units; these functions decide the counts for a
per-layer ``sparsity`` or a global ``total_sparsity`` budget and pick the lowest-scored units.
Units with the lowest score are pruned; ties go to the lower index, so results are reproducible.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

__all__ = ["prune_count", "global_prune_counts", "lowest"]

_EPS = 1e-6


def prune_count(sparsity: float, n: int) -> int:
    """``floor(sparsity * n)`` (tolerant of float noise such as 0.29 * 100), always keeping one unit."""
    return max(0, min(n - 1, math.floor(sparsity * n + _EPS)))


def global_prune_counts(
    scores: Mapping[str, torch.Tensor],
    unit_costs: Mapping[str, int],
    total_sparsity: float,
    max_sparsity_per_layer: float | Mapping[str, float | None] | None = None,
) -> dict[str, int]:
    """One budget for all layers: prune the globally lowest-scored units until ``total_sparsity``
    of all weight elements is gone.

    ``unit_costs[name]`` is how many weight elements one unit of that layer holds (1 for
    fine-grained pruning, the elements of a filter for channel pruning): the budget counts weights,
    as NNI's global allocator does. Each layer offers at most its ``max_sparsity_per_layer`` share
    (one value for all layers, or one per layer name).
    """
    names = list(scores)
    total = sum(scores[n].numel() * unit_costs[n] for n in names)
    budget = math.floor(total_sparsity * total + _EPS)
    cand_scores, cand_costs, cand_layer = [], [], []
    for i, name in enumerate(names):
        flat = scores[name].detach().reshape(-1).float().cpu()
        cap_ratio = max_sparsity_per_layer.get(name) if isinstance(max_sparsity_per_layer, Mapping) else max_sparsity_per_layer
        cap = prune_count(cap_ratio if cap_ratio is not None else 1.0, flat.numel())
        lowest_scores = torch.sort(flat, stable=True).values[:cap]
        cand_scores.append(lowest_scores)
        cand_costs.append(torch.full((cap,), float(unit_costs[name]), dtype=torch.float64))
        cand_layer.append(torch.full((cap,), i, dtype=torch.long))
    s = torch.cat(cand_scores)
    order = torch.sort(s, stable=True).indices
    spent = torch.cumsum(torch.cat(cand_costs)[order], 0)
    taken = torch.cat(cand_layer)[order][spent <= budget + _EPS]
    counts = torch.bincount(taken, minlength=len(names))
    return {name: int(counts[i]) for i, name in enumerate(names)}


def lowest(scores: torch.Tensor, k: int, groups: int = 1, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` lowest-scored units (True = prune), skipping ``exclude``.

    With ``groups > 1`` the units form ``groups`` equal contiguous chunks (the filter groups of a
    grouped conv that consumes them) and each chunk loses ``k // groups`` units, so the consumer
    stays evenly grouped.
    """
    flat = scores.detach().reshape(-1).float().clone()
    n = flat.numel()
    if n % groups:
        raise ValueError(f"{n} channels do not split into {groups} equal groups")
    if exclude is not None:
        flat[exclude.reshape(-1)] = math.inf
    rows = flat.reshape(groups, n // groups)
    per_row = k // groups if groups > 1 else k
    per_row = max(0, min(per_row, rows.shape[1]))
    order = torch.sort(rows, dim=1, stable=True).indices[:, :per_row]
    pruned = torch.zeros_like(rows, dtype=torch.bool)
    pruned.scatter_(1, order, True)
    return pruned.reshape(scores.shape)
