"""Movement pruning (Sanh et al., "Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS
2020), as NNI 2.x's ``MovementPruner`` with ``movement_mode='hard'``.

While the user's training runs, each weight's score accumulates ``-W * dL/dW`` (weights moving
away from zero score high). Between ``warm_up_step`` and ``cool_down_beginning_step`` the sparsity
rises on AGP's cubic schedule to the target and the masks (the lowest-scored units) are refreshed
every step, so the network trains around them; afterwards they stay at the target.
``sparse_granularity='finegrained'`` scores single weights; ``(rows, cols)`` scores blocks of a
Linear weight (e.g. one attention head's rows: ``(head_dim, in_features)``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import ModuleConfig
from .allocate import lowest, prune_count
from .base import Pruner, _Mask
from .evaluator import TorchEvaluator
from .io import _bias, _weight, weight_attrs
from .task_generator import agp_sparsity

__all__ = ["MovementPruner"]

log = logging.getLogger(__name__)


class MovementPruner(Pruner):
    """``MovementPruner(model, config_list, evaluator, warm_up_step, cool_down_beginning_step,
    training_epochs=None, training_steps=None, regular_scale=None, movement_mode='hard',
    sparse_granularity='finegrained')``. ``compress()`` runs the training (it changes the model's
    weights, by design) and returns the model with the final masks. Per-layer ``sparsity`` only."""

    default_op_types = ("Linear",)
    supported_op_types = ("Linear", "Conv2d", "Conv1d")

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[dict[str, Any]],
        evaluator: TorchEvaluator,
        warm_up_step: int,
        cool_down_beginning_step: int,
        training_epochs: int | None = None,
        training_steps: int | None = None,
        regular_scale: float | None = None,
        movement_mode: str = "hard",
        sparse_granularity: str | tuple[int, int] = "finegrained",
    ) -> None:
        if not isinstance(evaluator, TorchEvaluator):
            raise TypeError(f"MovementPruner: evaluator must be a TorchEvaluator, got {type(evaluator).__name__}")
        if movement_mode != "hard":
            raise ValueError(f"MovementPruner: only movement_mode='hard' is implemented, got {movement_mode!r}")
        if regular_scale is not None:
            raise ValueError("MovementPruner: regular_scale belongs to the 'soft' mode, which is not implemented; leave it None")
        if not 0 <= warm_up_step < cool_down_beginning_step:
            raise ValueError(f"need 0 <= warm_up_step < cool_down_beginning_step, got {warm_up_step}, {cool_down_beginning_step}")
        if training_epochs is None and training_steps is None:
            raise ValueError("MovementPruner: give training_epochs or training_steps")
        super().__init__(model, config_list)
        for name, cfg in self.module_configs.items():
            if cfg.sparsity is None:
                raise ValueError(f"MovementPruner: config_list[{cfg.config_index}] needs a per-layer 'sparsity' for {name!r}")
        self.block: tuple[int, int] | None = None
        if sparse_granularity != "finegrained":
            if not (isinstance(sparse_granularity, (tuple, list)) and len(sparse_granularity) == 2):
                raise ValueError(f"sparse_granularity must be 'finegrained' or (rows, cols), got {sparse_granularity!r}")
            self.block = (int(sparse_granularity[0]), int(sparse_granularity[1]))
            for name, m in self._modules.items():
                w = _weight(m)
                assert w is not None
                if w.dim() != 2 or w.shape[0] % self.block[0] or w.shape[1] % self.block[1]:
                    raise ValueError(f"MovementPruner: {name!r} weight {tuple(w.shape)} does not split into {self.block} blocks")
        self.evaluator = evaluator
        self.warm_up_step, self.cool_down_beginning_step = warm_up_step, cool_down_beginning_step
        self.training_epochs, self.training_steps = training_epochs, training_steps
        self.scores: dict[str, torch.Tensor] = {}
        self.steps_run = 0

    def sparsity_at(self, step: int, target: float) -> float:
        """0 until ``warm_up_step``, the cubic schedule up to ``cool_down_beginning_step``, then the target."""
        if step <= self.warm_up_step:
            return 0.0
        span = self.cool_down_beginning_step - self.warm_up_step
        return agp_sparsity(min(step - self.warm_up_step, span), span, target)

    def _unit_scores(self, name: str) -> torch.Tensor:
        s = self.scores[name]
        if self.block is None:
            return s
        r, c = self.block
        return s.reshape(s.shape[0] // r, r, s.shape[1] // c, c).sum((1, 3))

    def _keep(self, name: str, sparsity: float) -> torch.Tensor:
        units = self._unit_scores(name)
        keep = ~lowest(units, prune_count(sparsity, units.numel(), self.module_configs[name].sparse_rounding))
        if self.block is not None:
            keep = keep.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        return keep

    def _prepare(self) -> None:
        weights = {n: _weight(m) for n, m in self._modules.items()}
        self.scores = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}  # type: ignore[arg-type]
        masks = {n: _Mask(torch.ones_like(w, dtype=torch.bool)) for n, w in weights.items()}  # type: ignore[arg-type]
        handles = []
        for n, m in self._modules.items():
            w = weights[n]
            assert w is not None
            handles.append(w.register_hook(lambda g, n=n, w=w: self.scores[n].sub_((w.detach() * g.detach()).float())))
            parametrize.register_parametrization(m, weight_attrs(m)[0], masks[n], unsafe=True)
        self.steps_run = 0

        def refresh(model: nn.Module) -> torch.Tensor:
            self.steps_run += 1
            if self.steps_run > self.warm_up_step:
                for n in self._modules:  # a new tensor: this step's forward pass still holds the old one
                    masks[n].mask = self._keep(n, self.sparsity_at(self.steps_run, self.module_configs[n].sparsity or 0.0))
            return torch.zeros(())

        try:
            self.evaluator.train(self.model, max_steps=self.training_steps, max_epochs=self.training_epochs, loss_patch=refresh)
        finally:
            for h in handles:
                h.remove()
            for m in self._modules.values():
                parametrize.remove_parametrizations(m, weight_attrs(m)[0], leave_parametrized=False)
        if self.steps_run < self.cool_down_beginning_step:
            log.warning(
                "MovementPruner: training ran %d steps, fewer than cool_down_beginning_step=%d: the final masks jump "
                "to the target sparsity", self.steps_run, self.cool_down_beginning_step,
            )  # fmt: skip

    def _score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        return self._unit_scores(name)

    def _expand(self, name: str, module: nn.Module, pruned: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = ~pruned
        if self.block is not None:
            keep = keep.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        w_attr, b_attr = weight_attrs(module)
        masks = {w_attr: keep}
        bias = _bias(module)
        if bias is not None:
            masks[b_attr] = torch.ones_like(bias, dtype=torch.bool)
        return masks

