"""ADMM pruning (Zhang et al., "A Systematic DNN Weight Pruning Framework using Alternating
Direction Methods of Multipliers", ECCV 2018), as NNI 2.x's ``ADMMPruner``.

Each of ``iterations`` rounds trains ``training_epochs`` with ``rho/2 * ||W - Z + U||^2`` added
to the loss, then projects ``Z = prune(W + U)`` onto the sparsity target and updates the dual
``U += W - Z``. The final masks keep the units of ``W + U`` that the projection keeps.
``granularity='fine-grained'`` prunes weights, ``'coarse-grained'`` whole output channels (L2 norm).
The training changes the model's weights, by design (as SlimPruner's does).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from ..config import ModuleConfig
from .allocate import lowest, prune_count
from .base import Pruner
from .channel import channel_dim, channel_masks, channel_rows
from .evaluator import TorchEvaluator
from .io import _weight, weight_attrs
from .level import element_masks

__all__ = ["ADMMPruner"]

log = logging.getLogger(__name__)


class ADMMPruner(Pruner):
    """``ADMMPruner(model, config_list, evaluator, iterations, training_epochs, granularity)``;
    a config may carry ``rho`` (default 1e-4), NNI's penalty weight."""

    default_op_types = ("Conv2d", "Linear")

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[dict[str, Any]],
        evaluator: TorchEvaluator,
        iterations: int,
        training_epochs: int | None = None,
        granularity: str = "fine-grained",
        *,
        training_steps: int | None = None,
        rho: float = 1e-4,
    ) -> None:
        if not isinstance(evaluator, TorchEvaluator):
            raise TypeError(f"ADMMPruner: evaluator must be a TorchEvaluator, got {type(evaluator).__name__}")
        if granularity not in ("fine-grained", "coarse-grained"):
            raise ValueError(f"ADMMPruner: granularity must be 'fine-grained' or 'coarse-grained', got {granularity!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"ADMMPruner: iterations must be a positive integer, got {iterations!r}")
        if training_epochs is None and training_steps is None:
            raise ValueError("ADMMPruner: give training_epochs (or training_steps) for each ADMM iteration")
        config_list = [dict(c) for c in config_list]  # the caller's list keeps its 'rho' keys
        rhos = {i: float(c.pop("rho")) for i, c in enumerate(config_list) if "rho" in c}
        super().__init__(model, config_list)
        self.evaluator, self.iterations = evaluator, iterations
        self.training_epochs, self.training_steps = training_epochs, training_steps
        self.granularity = granularity
        self.rho = {n: rhos.get(c.config_index, rho) for n, c in self.module_configs.items()}
        self._z: dict[str, torch.Tensor] = {}
        self._u: dict[str, torch.Tensor] = {}

    def _units(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """One score per unit of ``w`` (the ADMM variable ``W + U``)."""
        if self.granularity == "fine-grained":
            return w.abs()
        return channel_rows(w, channel_dim(self._modules[name])).float().norm(dim=1)

    def _project(self, name: str, w: torch.Tensor) -> torch.Tensor:
        cfg = self.module_configs[name]
        ratio = cfg.sparsity if cfg.sparsity is not None else cfg.total_sparsity  # a group budget is projected per layer
        assert ratio is not None
        score = self._units(name, w)
        pruned = lowest(score, prune_count(ratio, score.numel(), cfg.sparse_rounding))
        if self.granularity == "fine-grained":
            return w.masked_fill(pruned, 0.0)
        keep = channel_masks(self._modules[name], ~pruned)[weight_attrs(self._modules[name])[0]]
        return w * keep

    def _prepare(self) -> None:
        params = {n: _weight(m) for n, m in self._modules.items()}
        with torch.no_grad():
            self._z = {n: self._project(n, p.detach().clone()) for n, p in params.items()}  # type: ignore[union-attr]
            self._u = {n: torch.zeros_like(p) for n, p in params.items()}  # type: ignore[arg-type]

        def penalty(model: nn.Module) -> torch.Tensor:
            return sum(self.rho[n] / 2 * (p - self._z[n] + self._u[n]).pow(2).sum() for n, p in params.items())  # type: ignore[return-value,operator]

        for it in range(self.iterations):
            self.evaluator.train(self.model, max_steps=self.training_steps, max_epochs=self.training_epochs, loss_patch=penalty)
            with torch.no_grad():
                for n, p in params.items():
                    self._z[n] = self._project(n, p.detach() + self._u[n])  # type: ignore[union-attr]
                    self._u[n] = self._u[n] + p.detach() - self._z[n]  # type: ignore[union-attr]
            gap = sum(float((p.detach() - self._z[n]).norm()) for n, p in params.items())  # type: ignore[union-attr]
            log.info("ADMM iteration %d/%d: ||W - Z|| = %.4g", it + 1, self.iterations, gap)

    def _score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        w = _weight(module)
        assert w is not None
        target = w.detach() + self._u[name] if name in self._u else w.detach()
        return self._units(name, target)

    def _expand(self, name: str, module: nn.Module, pruned: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.granularity == "coarse-grained":
            return channel_masks(module, ~pruned)
        return element_masks(module, ~pruned)
