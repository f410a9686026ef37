"""Network slimming: BatchNorm scaling factors as channel scores, after L1-regularised training."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..config import ModuleConfig
from .channel import ChannelPruner
from .evaluator import TorchEvaluator
from .io import _param

__all__ = ["SlimPruner"]


class SlimPruner(ChannelPruner):
    """Prune the BatchNorm channels of smallest ``|gamma|`` (Liu et al., "Learning Efficient
    Convolutional Networks through Network Slimming"); masks go on the BatchNorm ``weight`` and
    ``bias``, as in NNI. With ``dummy_input`` (or an evaluator's) the filters feeding the pruned
    norm channels, and everything else speedup removes with them, are masked too, so the masks say
    what the deployed model loses.

    With an ``evaluator``, the user's training function first runs for ``training_steps`` steps
    (or ``training_epochs`` epochs) with ``regular_scale * sum(|gamma|)`` added to every loss, which
    drives unimportant factors towards zero. That training changes the model, by design.
    """

    default_op_types = ("BatchNorm2d",)
    supported_op_types = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[dict[str, Any]],
        evaluator: TorchEvaluator | None = None,
        training_steps: int | None = None,
        training_epochs: int | None = None,
        regular_scale: float = 1e-4,
        dummy_input: Any = None,
    ) -> None:
        if evaluator is not None and not isinstance(evaluator, TorchEvaluator):
            raise TypeError(f"SlimPruner: evaluator must be a TorchEvaluator or None, got {type(evaluator).__name__}")
        if evaluator is not None and training_steps is None and training_epochs is None:
            raise ValueError("SlimPruner: give training_steps or training_epochs for the sparsity-regularised training")
        if not regular_scale >= 0:
            raise ValueError(f"SlimPruner: regular_scale must be >= 0, got {regular_scale!r}")
        if dummy_input is None and evaluator is not None:
            dummy_input = evaluator.dummy_input
        super().__init__(model, config_list, dummy_input=dummy_input)
        self.evaluator = evaluator
        self.training_steps = training_steps
        self.training_epochs = training_epochs
        self.regular_scale = regular_scale

    def _l1_of_factors(self, model: nn.Module) -> torch.Tensor:
        gammas = [_param(m, "weight") for m in self._modules.values()]
        return self.regular_scale * sum(g.abs().sum() for g in gammas if g is not None)  # type: ignore[return-value]

    def _prepare(self) -> None:
        if self.evaluator is not None:
            self.evaluator.train(
                self.model, max_steps=self.training_steps, max_epochs=self.training_epochs, loss_patch=self._l1_of_factors
            )

    def channel_score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        gamma = _param(module, "weight")
        assert gamma is not None
        return gamma.detach().abs()
