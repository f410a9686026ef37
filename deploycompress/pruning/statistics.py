"""Channel pruners whose scores are averaged over data: hooks listen while the data runs."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import ModuleConfig
from .channel import ChannelPruner
from .evaluator import TorchEvaluator, run_for_statistics

__all__ = ["StatisticsPruner"]


class StatisticsPruner(ChannelPruner):
    """Scores are ``sum / count`` of per-channel terms that hooks add while data runs through the
    model; subclasses install the hooks (``_install_hooks``) and call ``_accumulate``.

    ``evaluator`` is a :class:`TorchEvaluator` (its training code runs with optimizer steps
    disabled and the model state restored afterwards) or a plain iterable of input batches
    (forward passes in eval mode). ``training_steps`` limits how many batches run.
    """

    needs_loss = False

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[dict[str, Any]],
        evaluator: TorchEvaluator | Iterable[Any],
        training_steps: int | None = None,
        *,
        dependency_aware: bool = False,
        dummy_input: Any = None,
        mode: str | None = None,
    ) -> None:
        name = type(self).__name__
        if self.needs_loss and not isinstance(evaluator, TorchEvaluator):
            raise TypeError(
                f"{name} needs gradients: pass a TorchEvaluator with a training_step that returns the loss, "
                f"got {type(evaluator).__name__}"
            )
        if not isinstance(evaluator, TorchEvaluator) and not isinstance(evaluator, Iterable):
            raise TypeError(f"{name}: evaluator must be a TorchEvaluator or an iterable of input batches, got {evaluator!r}")
        if training_steps is not None and (isinstance(training_steps, bool) or not isinstance(training_steps, int) or training_steps < 1):
            raise ValueError(f"{name}: training_steps must be a positive integer, got {training_steps!r}")
        if dummy_input is None and isinstance(evaluator, TorchEvaluator):
            dummy_input = evaluator.dummy_input
        super().__init__(model, config_list, dependency_aware=dependency_aware, dummy_input=dummy_input, mode=mode)
        self.evaluator = evaluator
        self.training_steps = training_steps
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def _install_hooks(self) -> list[RemovableHandle]:
        raise NotImplementedError

    def _accumulate(self, name: str, per_channel_sum: torch.Tensor, count: int) -> None:
        per_channel_sum = per_channel_sum.detach().float()
        if name in self._sums:
            self._sums[name] += per_channel_sum
        else:
            self._sums[name] = per_channel_sum.clone()
        self._counts[name] = self._counts.get(name, 0) + count

    def _prepare(self) -> None:
        self._sums, self._counts = {}, {}
        handles = self._install_hooks()
        try:
            run_for_statistics(self.model, self.evaluator, self.training_steps)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self._modules if n not in self._sums]
        if missing:
            raise RuntimeError(f"{type(self).__name__}: no statistics reached modules {missing} (are they used in forward?)")

    def channel_score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        return self._sums[name] / max(self._counts[name], 1)
