"""NNI 2.x's iterative pruners: Linear, AGP and Lottery Ticket, each a :class:`PruningScheduler`
over a basic pruner with its task generator, under NNI's names and arguments."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .io import Masks, save_masks
from .scheduler import CompressResult, PrunerSpec, PruningScheduler, TaskGenerator, TaskResult, _pin, make_basic_pruner, plain_copy
from .task_generator import AGPTaskGenerator, FunctionBasedTaskGenerator, LinearTaskGenerator, LotteryTicketTaskGenerator, scale_config_list

__all__ = ["IterativePruner", "LinearPruner", "AGPPruner", "LotteryTicketPruner", "load_state_into"]

log = logging.getLogger(__name__)


@torch.no_grad()
def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a plain state dict (``conv.weight`` keys) into ``model`` in place, also where a mask
    parametrization holds the tensor (the stored original is written; the mask still applies)."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        path, _, attr = key.rpartition(".")
        module = modules.get(path)
        if module is None:
            raise KeyError(f"{key!r}: the model has no module {path!r}")
        target = module.parametrizations[attr].original if parametrize.is_parametrized(module, attr) else getattr(module, attr)  # type: ignore[index,union-attr]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{key!r}: checkpoint shape {tuple(value.shape)} does not fit the model's {tuple(target.shape)}")
        target.copy_(value)


class IterativePruner(CompressResult):
    """What Linear, AGP and Lottery Ticket share: arguments, ``compress()``, results, intermediate files.

    Two ways to run the schedule (``s_t`` for ``t = 0..total_iteration``, cumulative):

    * ``compress()``: NNI 2.x's scheduled rounds on a copy (prune, ``finetuner``, ``evaluator``);
    * the user's own training loop, NNI 1.x's way: call ``update_epoch(epoch)`` (schedule point
      ``t = epoch``) or ``step()`` (``t`` advances by one) and the masks in ``model`` itself are
      refreshed to ``s_t`` at once (units pruned earlier stay pruned; ``t`` past ``total_iteration``
      keeps the final sparsity). The masks are put into the caller's model in place, as the
      user's optimizer trains its parameters (they stay the same objects). ``masks`` gives the
      current masks, ``unwrap_model()`` a plain copy. A pruner runs one way or the other.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        pruning_algorithm: PrunerSpec,
        task_generator: TaskGenerator,
        log_dir: str | os.PathLike[str] = ".",
        keep_intermediate_result: bool = False,
        finetuner: Any = None,
        speedup: bool = False,
        dummy_input: Any = None,
        evaluator: Any = None,
        pruning_params: Mapping[str, Any] | None = None,
        *,
        finetune_epochs: int | None = None,
        finetune_steps: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.config_list = config_list
        self.log_dir = Path(log_dir)
        self.keep_intermediate_result = keep_intermediate_result
        self.scheduler = PruningScheduler(
            pruning_algorithm, task_generator, finetuner, speedup, dummy_input, evaluator,
            pruning_params=pruning_params, finetune_epochs=finetune_epochs, finetune_steps=finetune_steps,
        )  # fmt: skip
        self._result: tuple[nn.Module, Masks] | None = None
        self._loop_point: int | None = None  # the training-loop mode's schedule point, once started
        self._loop_masks: Masks = {}

    def compress(self) -> tuple[nn.Module, Masks]:
        """Run every round; return the best model (a new one, masks in its forward pass) and its masks."""
        if self._loop_point is not None:
            raise RuntimeError(f"{type(self).__name__}: update_epoch()/step() drive this pruner in your training loop; do not call compress() too")
        model, masks = self.scheduler.compress(self.model, self.config_list)
        if self.keep_intermediate_result:
            self._write_history()
        self._result = (model, masks)
        return model, masks

    # ------------------------------------------------------------------ the user's training loop
    def update_epoch(self, epoch: int) -> None:
        """Schedule point ``t = epoch`` (0-based; ``0`` is ``initial_sparsity``): masks in ``model`` now
        prune ``s_t`` of each configured layer."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"update_epoch: epoch must be a non-negative integer, got {epoch!r}")
        self._refresh(epoch)

    def step(self) -> None:
        """After each optimizer step: the schedule point advances by one and the masks follow."""
        self._refresh(1 if self._loop_point is None else self._loop_point + 1)

    @property
    def schedule_point(self) -> int | None:
        """The training-loop mode's current ``t`` (clipped to ``total_iteration``); None before it starts."""
        return self._loop_point

    def _refresh(self, t: int) -> None:
        gen = self.scheduler.task_generator
        if not isinstance(gen, FunctionBasedTaskGenerator):
            raise TypeError(f"{type(self).__name__}: update_epoch()/step() need a schedule by formula, not {type(gen).__name__}")
        t = min(t, gen.total_iteration)
        if t == self._loop_point:
            return
        if self._loop_point is None:
            gen.reset(self.model, self.config_list)  # validates the config_list before the model is touched
        config_t = scale_config_list(gen.origin_config_list, lambda s: gen.sparsity_at(t, s))
        modules = dict(self.model.named_modules())
        for name, entry in self._loop_masks.items():  # the previous masks' values stay (pruned weights zero)
            for pname in entry:
                if parametrize.is_parametrized(modules[name], pname):
                    parametrize.remove_parametrizations(modules[name], pname, leave_parametrized=True)
        sc = self.scheduler
        pruner = make_basic_pruner(sc.pruner_spec, self.model, config_t, sc.pruning_params, sc.dummy_input)
        if self._loop_masks:
            _pin(pruner, self._loop_masks)
        wrapped, masks = pruner.compress()
        self._loop_masks = {n: {p: m.clone() for p, m in e.items()} for n, e in masks.items()}
        self._loop_point = t
        if sc.rewind is not None and t > 0:
            sc.rewind(wrapped, self._loop_masks)
        self._result = (wrapped, self._loop_masks)
        log.info("%s schedule point %d/%d: %s", type(self).__name__, t, gen.total_iteration,
                 [round(c.get("sparsity", c.get("total_sparsity", 0.0)), 4) for c in config_t])  # fmt: skip

    def _write_history(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for r in self.history:
            save_masks(r.masks, self.log_dir / f"{r.task_id}_masks.pth")
            (self.log_dir / f"{r.task_id}_config_list.json").write_text(json.dumps(r.config_list, indent=2))
        log.info("%d rounds' masks and config lists written to %s", len(self.history), self.log_dir)

    @property
    def history(self) -> list[TaskResult]:
        return self.scheduler.history

    def get_best_result(self) -> tuple[int, nn.Module, Masks, float | None, list[dict[str, Any]]]:
        """NNI's ``(task_id, model, masks, score, config_list)``; the model is plain (pruned weights zero)."""
        return self.scheduler.get_best_result()


class _FormulaPruner(IterativePruner):
    """Linear and AGP: NNI's arguments; ``_generator(total_iteration, initial_sparsity)`` is the schedule."""

    def __init__(
        self, model: nn.Module, config_list: list[dict[str, Any]], pruning_algorithm: PrunerSpec, total_iteration: int,
        log_dir: str | os.PathLike[str] = ".", keep_intermediate_result: bool = False, finetuner: Any = None,
        speedup: bool = False, dummy_input: Any = None, evaluator: Any = None, pruning_params: Mapping[str, Any] | None = None,
        *, initial_sparsity: float = 0.0, **kw: Any,
    ) -> None:  # fmt: skip
        super().__init__(
            model, config_list, pruning_algorithm, self._generator(total_iteration, initial_sparsity), log_dir,
            keep_intermediate_result, finetuner, speedup, dummy_input, evaluator, pruning_params, **kw,
        )  # fmt: skip

    @staticmethod
    def _generator(total_iteration: int, initial_sparsity: float) -> FunctionBasedTaskGenerator:
        raise NotImplementedError


class LinearPruner(_FormulaPruner):
    """Sparsity grows linearly over ``total_iteration`` rounds: ``s_t = t/n * s_f``."""

    @staticmethod
    def _generator(total_iteration: int, initial_sparsity: float) -> FunctionBasedTaskGenerator:
        if initial_sparsity:
            raise ValueError("LinearPruner has no initial_sparsity (s_t = t/n * s_f); use AGPPruner for a schedule from s_i")
        return LinearTaskGenerator(total_iteration)


class AGPPruner(_FormulaPruner):
    """Automated gradual pruning (Zhu & Gupta 2017): ``s_t = s_f + (s_i - s_f)(1 - t/n)^3`` over
    ``total_iteration`` rounds, fine-tuning between them; ``initial_sparsity`` is ``s_i`` (default 0)."""

    _generator = staticmethod(AGPTaskGenerator)  # type: ignore[assignment]


class LotteryTicketPruner(IterativePruner):
    """Iterative magnitude pruning with weight rewinding (Frankle & Carbin, "The Lottery Ticket
    Hypothesis"; Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis" for
    rewinding to an early checkpoint). Each round keeps ``(1 - s_f)^(1/n)`` of what is left; with
    ``reset_weight=True`` the surviving weights (and buffers) are set back to ``rewind_state``
    (a plain state dict, e.g. saved after a few training steps; default: the model's weights
    when the pruner was made) before the fine-tuner trains them again.
    """

    def __init__(
        self, model: nn.Module, config_list: list[dict[str, Any]], pruning_algorithm: PrunerSpec, total_iteration: int,
        log_dir: str | os.PathLike[str] = ".", keep_intermediate_result: bool = False, finetuner: Any = None,
        speedup: bool = False, dummy_input: Any = None, evaluator: Any = None, reset_weight: bool = True,
        pruning_params: Mapping[str, Any] | None = None, *, rewind_state: Mapping[str, torch.Tensor] | None = None, **kw: Any,
    ) -> None:  # fmt: skip
        if reset_weight and speedup:
            raise ValueError("LotteryTicketPruner: reset_weight=True rewinds to the original shapes; set speedup=False")
        super().__init__(
            model, config_list, pruning_algorithm, LotteryTicketTaskGenerator(total_iteration), log_dir,
            keep_intermediate_result, finetuner, speedup, dummy_input, evaluator, pruning_params, **kw,
        )  # fmt: skip
        self.reset_weight = reset_weight
        source = rewind_state if rewind_state is not None else plain_copy(model).state_dict()
        self.rewind_state = {k: v.detach().clone() for k, v in source.items()}
        if reset_weight:
            self.scheduler.rewind = self._rewind

    def _rewind(self, model: nn.Module, masks: Masks) -> None:
        load_state_into(model, self.rewind_state)
        log.info("lottery ticket: %d tensors rewound to the recorded state", len(self.rewind_state))
