"""Task generators whose sparsity follows a formula of the round: linear, AGP, lottery ticket.

Each round's config_list is the user's, with every ``sparsity`` / ``total_sparsity`` replaced by the
*cumulative* value of that round (relative to the original model); the scheduler pins what earlier
rounds pruned, so the per-layer count of round ``t`` is exactly ``floor(s_t * units)``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from .scheduler import Task, TaskGenerator, TaskResult

__all__ = [
    "FunctionBasedTaskGenerator",
    "LinearTaskGenerator",
    "AGPTaskGenerator",
    "LotteryTicketTaskGenerator",
    "agp_sparsity",
    "scale_config_list",
]

log = logging.getLogger(__name__)

_KEYS = ("sparsity", "total_sparsity")


def agp_sparsity(t: int, n: int, final: float, initial: float = 0.0) -> float:
    """AGP's cubic schedule (Zhu & Gupta, "To prune, or not to prune", eq. 1):
    ``s_t = s_f + (s_i - s_f) * (1 - t/n)^3`` for ``t = 0..n``."""
    return final + (initial - final) * (1.0 - t / n) ** 3


def scale_config_list(config_list: list[dict[str, Any]], fn: Any) -> list[dict[str, Any]]:
    """A copy of ``config_list`` with each sparsity ``s`` (per-layer or total) replaced by ``fn(s)``."""
    out = copy.deepcopy(config_list)
    for cfg in out:
        for key in _KEYS:
            if key in cfg:
                cfg[key] = float(fn(cfg[key]))
        if "max_sparsity_per_layer" in cfg and "total_sparsity" in cfg:
            cfg["max_sparsity_per_layer"] = max(cfg["max_sparsity_per_layer"], cfg["total_sparsity"])
    return out


class FunctionBasedTaskGenerator(TaskGenerator):
    """Rounds ``t = 1..total_iteration`` (``0..`` with ``skip_first_iteration=False`` in NNI's
    sense is a dense warm-up round, not run here); subclasses give ``sparsity_at(t, target)``."""

    best_result_mode = "latest"

    def __init__(self, total_iteration: int) -> None:
        if isinstance(total_iteration, bool) or not isinstance(total_iteration, int) or total_iteration < 1:
            raise ValueError(f"total_iteration must be a positive integer, got {total_iteration!r}")
        self.total_iteration = total_iteration

    def reset(self, model: nn.Module, config_list: list[dict[str, Any]]) -> None:
        super().reset(model, config_list)
        self.current_iteration = 1

    def sparsity_at(self, t: int, target: float) -> float:
        raise NotImplementedError

    def next_task(self) -> Task | None:
        t = self.current_iteration
        if t > self.total_iteration:
            return None
        self.current_iteration += 1
        config_list = scale_config_list(self.origin_config_list, lambda s: self.sparsity_at(t, s))
        log.info("%s round %d/%d: %s", type(self).__name__, t, self.total_iteration, _sparsities(config_list))
        return Task(self._new_id(), config_list, state={"iteration": t})

    def total_tasks(self) -> int:
        return self.total_iteration


def _sparsities(config_list: list[dict[str, Any]]) -> list[float]:
    return [round(c[k], 4) for c in config_list for k in _KEYS if k in c]


class LinearTaskGenerator(FunctionBasedTaskGenerator):
    """``s_t = t / n * s_f``."""

    def sparsity_at(self, t: int, target: float) -> float:
        return t / self.total_iteration * target


class AGPTaskGenerator(FunctionBasedTaskGenerator):
    """AGP's cubic schedule :func:`agp_sparsity` from ``initial_sparsity`` (default 0) to the target."""

    def __init__(self, total_iteration: int, initial_sparsity: float = 0.0) -> None:
        super().__init__(total_iteration)
        if not 0.0 <= initial_sparsity < 1.0:
            raise ValueError(f"initial_sparsity must lie in [0, 1), got {initial_sparsity!r}")
        self.initial_sparsity = initial_sparsity

    def sparsity_at(self, t: int, target: float) -> float:
        return agp_sparsity(t, self.total_iteration, target, min(self.initial_sparsity, target))


class LotteryTicketTaskGenerator(FunctionBasedTaskGenerator):
    """Iterative magnitude pruning: each round keeps the same fraction of what is left,
    ``s_t = 1 - (1 - s_f)^(t/n)`` (Frankle & Carbin; the formula NNI uses)."""

    def sparsity_at(self, t: int, target: float) -> float:
        return 1.0 - (1.0 - target) ** (t / self.total_iteration)

    def receive(self, result: TaskResult, model: nn.Module) -> None:
        pass
