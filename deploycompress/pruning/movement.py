"""Movement pruning (Sanh et al., "Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS
2020), as NNI's ``MovementPruner`` with ``movement_mode='hard'`` or ``'soft'``.

Hard mode: while the user's training runs, each weight's score accumulates ``-W * dL/dW``
(weights moving away from zero score high). Between ``warm_up_step`` and
``cool_down_beginning_step`` the sparsity rises on AGP's cubic schedule to the target and the masks
(the lowest-scored units) are refreshed every step, so the network trains around them; afterwards
they stay at the target.

Soft mode (the paper's soft movement pruning, section 3): no sparsity is given. Each unit has a
learned score ``S`` (starting at 0); a unit is kept while ``sigmoid(S) > sparse_threshold``; the
masked weight is ``W * M`` with the straight-through gradient ``dL/dS = dL/dW' * W``, so ``S``
accumulates the movement ``-lr * W * dL/dW'`` (Adam, ``score_lr``), and the loss gains
``regular_scale_t * mean(sigmoid(S))`` per layer (averaged over layers), ``regular_scale_t`` rising
linearly from 0 at ``warm_up_step`` to ``regular_scale`` at ``cool_down_beginning_step``. The
sparsity is whatever the regularisation pushes below the threshold; masks are frozen from
``cool_down_beginning_step`` on.

``sparse_granularity='finegrained'`` scores single weights; ``(rows, cols)`` scores blocks of a
Linear weight (e.g. one attention head's rows: ``(head_dim, in_features)``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import ModuleConfig
from .allocate import lowest, prune_count
from .base import Pruner, _Mask
from .evaluator import TorchEvaluator
from .io import _weight, weight_attrs
from .level import element_masks
from .task_generator import agp_sparsity

__all__ = ["MovementPruner"]

log = logging.getLogger(__name__)


class _SoftMask(nn.Module):
    """Parametrization ``W * M`` with ``M = 1[sigmoid(S) > threshold]`` (units expanded to blocks)
    and the straight-through gradient to ``S``; ``keep_all`` keeps every unit (warm-up, the
    gradient still reaching ``S``); ``frozen`` fixes ``M``."""

    def __init__(self, score: torch.Tensor, threshold: float, block: tuple[int, int] | None) -> None:
        super().__init__()
        self.score, self.threshold, self.block = score, threshold, block
        self.frozen: torch.Tensor | None = None
        self.keep_all = False

    def keep(self) -> torch.Tensor:
        return torch.sigmoid(self.score.detach()) > self.threshold

    def _expand(self, m: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return m
        return m.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            return w * self.frozen
        s = self.score
        m = torch.ones_like(s, dtype=w.dtype) if self.keep_all else self.keep().to(w.dtype)
        return w * self._expand(m + s - s.detach())


class MovementPruner(Pruner):
    """``MovementPruner(model, config_list, evaluator, warm_up_step, cool_down_beginning_step,
    training_epochs=None, training_steps=None, regular_scale=None, movement_mode='hard',
    sparse_granularity='finegrained')``. ``compress()`` runs the training (it changes the model's
    weights, by design) and returns the model with the final masks.

    ``movement_mode='hard'``: per-layer ``sparsity`` in the config_list, reached exactly.
    ``movement_mode='soft'``: no sparsity in the config_list (it selects layers); ``regular_scale``
    (default 1.0, NNI's), ``sparse_threshold`` (on ``sigmoid(S)``, default 0.1, the paper's code)
    and ``score_lr`` (default 1e-2) set how much is pruned; ``scores`` holds the learned ``S``.
    """

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
        *,
        sparse_threshold: float = 0.1,
        score_lr: float = 1e-2,
    ) -> None:
        if not isinstance(evaluator, TorchEvaluator):
            raise TypeError(f"MovementPruner: evaluator must be a TorchEvaluator, got {type(evaluator).__name__}")
        if movement_mode not in ("hard", "soft"):
            raise ValueError(f"MovementPruner: movement_mode must be 'hard' or 'soft', got {movement_mode!r}")
        if movement_mode == "hard" and regular_scale is not None:
            raise ValueError("MovementPruner: regular_scale belongs to movement_mode='soft'; leave it None in hard mode")
        if not 0.0 < sparse_threshold < 1.0 or score_lr <= 0:
            raise ValueError(f"MovementPruner: need 0 < sparse_threshold < 1 and score_lr > 0, got {sparse_threshold}, {score_lr}")
        if not 0 <= warm_up_step < cool_down_beginning_step:
            raise ValueError(f"need 0 <= warm_up_step < cool_down_beginning_step, got {warm_up_step}, {cool_down_beginning_step}")
        if training_epochs is None and training_steps is None:
            raise ValueError("MovementPruner: give training_epochs or training_steps")
        self.movement_mode = movement_mode
        self.regular_scale = 1.0 if regular_scale is None else float(regular_scale)
        self.sparse_threshold, self.score_lr = float(sparse_threshold), float(score_lr)
        if movement_mode == "soft":  # the config_list only selects: the sparsity emerges
            if any(k in c for c in config_list for k in ("sparsity", "total_sparsity", "sparse_ratio", "sparsity_per_layer")):
                raise ValueError("MovementPruner: movement_mode='soft' takes no sparsity in the config_list (it emerges from regular_scale)")
            config_list = [dict(c) if c.get("exclude") else dict(c, sparsity=0.0) for c in config_list]
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
        if self.movement_mode == "soft":
            self._prepare_soft()
            return
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

    def _prepare_soft(self) -> None:
        """Train with learned scores (straight-through masks) and the sigmoid regulariser."""
        units: dict[str, torch.Tensor] = {}
        wrappers: dict[str, _SoftMask] = {}
        for n, m in self._modules.items():
            w = _weight(m)
            assert w is not None
            shape = w.shape if self.block is None else (w.shape[0] // self.block[0], w.shape[1] // self.block[1])
            units[n] = torch.zeros(shape, device=w.device, requires_grad=True)
            wrappers[n] = _SoftMask(units[n], self.sparse_threshold, self.block)
            parametrize.register_parametrization(m, weight_attrs(m)[0], wrappers[n], unsafe=True)
        opt = torch.optim.Adam(list(units.values()), lr=self.score_lr)
        self.steps_run = 0
        span = self.cool_down_beginning_step - self.warm_up_step

        def scale_at(step: int) -> float:
            return self.regular_scale * min(max(step - self.warm_up_step, 0), span) / span

        def apply_grads() -> None:
            if any(u.grad is not None for u in units.values()):
                opt.step()  # the previous step's straight-through and regulariser gradients
                opt.zero_grad(set_to_none=True)

        def regularise(model: nn.Module) -> torch.Tensor:
            apply_grads()
            self.steps_run += 1
            t = self.steps_run
            for n, w in wrappers.items():
                w.keep_all = t <= self.warm_up_step  # no pruning yet: the scores learn, the masks keep all
                if t > self.cool_down_beginning_step and w.frozen is None:  # cool-down: masks and scores stay
                    w.frozen = w._expand(w.keep())
                    u = units[n]
                    u.requires_grad_(False)
            if t > self.cool_down_beginning_step:
                return torch.zeros(())
            reg = sum(torch.sigmoid(u).mean() for u in units.values()) / len(units)
            return scale_at(t) * reg  # type: ignore[return-value]

        try:
            self.evaluator.train(self.model, max_steps=self.training_steps, max_epochs=self.training_epochs, loss_patch=regularise)
            if self.steps_run <= self.cool_down_beginning_step:
                apply_grads()
        finally:
            for m in self._modules.values():
                parametrize.remove_parametrizations(m, weight_attrs(m)[0], leave_parametrized=False)
        self.scores = {n: u.detach().clone() for n, u in units.items()}
        emptied = [n for n, w in wrappers.items() if not bool(w.keep().any())]
        if emptied:
            from .channel import PruningWarning

            warnings.warn(f"MovementPruner (soft): every unit of {emptied} fell under sparse_threshold={self.sparse_threshold}; "
                          f"those layers now output only their bias: lower regular_scale (now {self.regular_scale})", PruningWarning, stacklevel=3)  # fmt: skip
        log.info("MovementPruner (soft): %d steps, sparsity %s", self.steps_run,
                 {n: round(1 - float(w.keep().float().mean()), 4) for n, w in wrappers.items()})  # fmt: skip

    def _score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        if self.movement_mode == "soft":
            return self.scores[name]
        return self._unit_scores(name)

    def _prune_counts(self, scores: dict[str, torch.Tensor]) -> dict[str, int]:
        if self.movement_mode == "soft":  # the threshold decides, unit by unit
            return {n: int((torch.sigmoid(s) <= self.sparse_threshold).sum()) for n, s in scores.items()}
        return super()._prune_counts(scores)

    def _select(self, scores: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
        if self.movement_mode == "soft":
            return {n: torch.sigmoid(s) <= self.sparse_threshold for n, s in scores.items()}
        return super()._select(scores, counts)

    def _expand(self, name: str, module: nn.Module, pruned: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = ~pruned
        if self.block is not None:
            keep = keep.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        return element_masks(module, keep)

