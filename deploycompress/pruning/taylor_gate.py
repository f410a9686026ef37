"""Data-aware channel scores from gradients at a gate: first-order Taylor estimate of the loss change when
a channel is removed where it reaches the rest of the network.

Molchanov, Mallya, Tyree, Frosio and Kautz, "Importance Estimation for Neural Network Pruning", CVPR 2019:
put a gate ``z_c = 1`` on every channel; the importance of channel c is the squared first-order Taylor term
of the loss in its gate, ``(dL/dz_c)^2``, with ``dL/dz_c = sum over the minibatch and positions of a_c * dL/da_c``
(``a`` the gated activation), averaged over minibatches. The paper gates after BatchNorm; removing a channel
means that it no longer reaches its *consumer*, so here the gate sits at the input of a named consumer module
(``gates``): for an inverted-residual block (MobileNetV2, EfficientNet) the expansion conv's channels pass a
depthwise conv, BatchNorm and activation and are gated at the projection conv's input, which is exactly what
speedup removes. Without a ``gates`` entry the gate is the module's own output.

The loss comes from the evaluator's training step (labels, or pseudo-labels from a dense model: a
distillation loss against the unpruned model itself has zero gradient). Scores are in loss units and
comparable across layers, so a ``total_sparsity`` budget ranks channels globally (per-layer ratios chosen
by the data).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .channel import channel_dim
from .evaluator import TorchEvaluator
from .io import _weight
from .statistics import StatisticsPruner

__all__ = ["TaylorGatePruner"]


class TaylorGatePruner(StatisticsPruner):
    """Score of an output channel = mean over training steps of ``(sum_{batch, positions} a_c * dL/da_c)^2``,
    ``a`` the channel where it enters ``gates[name]`` (a module name; default: the module's own output).

    ``(model, config_list, evaluator, training_steps=None, *, gates=None, dependency_aware=False, dummy_input=None)``;
    ``evaluator``: a :class:`TorchEvaluator` whose training step returns the loss (optimizer steps are disabled
    while scoring; the model is unchanged). A gate module reads the channels on dim 1 of its first input
    (dim -1 for ``nn.Linear``) and must read exactly as many as the module has output channels, else
    ``ValueError`` at construction.
    """

    needs_loss = True

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[dict[str, Any]],
        evaluator: TorchEvaluator,
        training_steps: int | None = None,
        *,
        gates: Mapping[str, str] | None = None,
        dependency_aware: bool = False,
        dummy_input: Any = None,
    ) -> None:
        super().__init__(model, config_list, evaluator, training_steps, dependency_aware=dependency_aware, dummy_input=dummy_input)
        self.gates = dict(gates or {})
        modules = dict(model.named_modules())
        for name, gate in self.gates.items():
            if name not in self._modules:
                raise ValueError(f"{type(self).__name__}: gates names {name!r}, which config_list does not select")
            if gate not in modules:
                raise ValueError(f"{type(self).__name__}: gate {gate!r} of {name!r} is no submodule of the model")
            width = _input_width(modules[gate])
            weight = _weight(self._modules[name])
            assert weight is not None
            channels = weight.shape[channel_dim(self._modules[name])]
            if width is not None and width != channels:
                raise ValueError(
                    f"{type(self).__name__}: gate {gate!r} reads {width} channels but {name!r} has {channels}: "
                    "name the module that reads this layer's channels"
                )
        self._gate_modules = {n: modules[g] for n, g in self.gates.items()}

    def _install_hooks(self) -> list[RemovableHandle]:
        def gate_hook(name: str, dim: int) -> Callable[[torch.Tensor], None]:
            def on_tensor(a: torch.Tensor) -> None:
                if not a.requires_grad:
                    return
                value = a.detach()

                def on_grad(grad: torch.Tensor) -> None:
                    per_channel = (value * grad.detach()).float().movedim(dim, 0).reshape(value.shape[dim], -1).sum(1)
                    self._accumulate(name, per_channel.pow(2), 1)

                a.register_hook(on_grad)

            return on_tensor

        handles = []
        for name, module in self._modules.items():
            if name in self._gate_modules:
                gate = self._gate_modules[name]
                on_tensor = gate_hook(name, -1 if isinstance(gate, nn.Linear) else 1)
                handles.append(gate.register_forward_pre_hook(lambda _m, inputs, f=on_tensor: f(inputs[0])))
            else:
                on_tensor = gate_hook(name, -1 if isinstance(module, nn.Linear) else 1)  # outputs: (N, C, ...) or (..., C)
                handles.append(module.register_forward_hook(lambda _m, _i, out, f=on_tensor: f(out)))
        return handles


def _input_width(module: nn.Module) -> int | None:
    """Channels a Conv/Linear/norm module reads (None: unknown, checked when data runs)."""
    for attr in ("in_channels", "in_features", "num_features"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return None
