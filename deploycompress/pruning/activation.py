"""Scoring rules that read the layer's output activations."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .channel import ChannelPruner
from .statistics import StatisticsPruner

__all__ = ["ActivationPruner", "ActivationAPoZRankPruner", "ActivationMeanRankPruner"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "relu6": lambda t: torch.clamp(t, 0.0, 6.0),
    "identity": lambda t: t,
}


class ActivationPruner(StatisticsPruner):
    """Score = mean over data of ``activation_term(activation(output))`` per output channel;
    subclasses override ``activation_term``. ``activation`` is applied to the layer output first,
    as the layer's nonlinearity would (NNI's default: relu)."""

    # an attention module's output is mixed across heads: it has no per-row activation to rank
    supported_op_types = tuple(t for t in ChannelPruner.supported_op_types or () if t != "MultiheadAttention")

    def __init__(self, *args: Any, activation: str = "relu", **kwargs: Any) -> None:
        """``(model, config_list, evaluator, training_steps=None, *, activation='relu',
        dependency_aware=False, dummy_input=None)``: the arguments of :class:`StatisticsPruner`
        plus the ``activation`` (``relu``, ``relu6`` or ``identity``)."""
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
        super().__init__(*args, **kwargs)
        self.activation = activation

    def activation_term(self, act: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _install_hooks(self) -> list[RemovableHandle]:
        act_fn = _ACTIVATIONS[self.activation]

        def hook_for(name: str, module: nn.Module) -> Callable[..., None]:
            # output channels: dim 1 of a conv output, the last dim of a Linear output
            out_dim = -1 if isinstance(module, nn.Linear) else 1

            def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
                with torch.no_grad():
                    term = self.activation_term(act_fn(out.detach().float()))
                    rows = term.movedim(out_dim, -1).reshape(-1, term.shape[out_dim])
                    self._accumulate(name, rows.sum(0), rows.shape[0])

            return hook

        return [m.register_forward_hook(hook_for(n, m)) for n, m in self._modules.items()]


class ActivationAPoZRankPruner(ActivationPruner):
    """Prune channels with the highest Average Percentage of Zeros after the activation
    (Hu et al., "Network Trimming"): score = share of nonzero activations."""

    def activation_term(self, act: torch.Tensor) -> torch.Tensor:
        return (act != 0).float()


class ActivationMeanRankPruner(ActivationPruner):
    """Prune channels with the smallest mean activation (Molchanov et al., 2017)."""

    def activation_term(self, act: torch.Tensor) -> torch.Tensor:
        return act
