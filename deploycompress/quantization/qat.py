"""Quantization-aware training: fake-quant with a straight-through gradient and EMA activation ranges."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from calibrators import MinMaxCalibrator, QuantError, QuantParams

from ..config import ConfigError
from .bn_fold import fold_batchnorm
from .fake_quant import fake_quantize_ste
from .quantizer import Quantizer, QuantizerError
from .wrapper import QuantWrapper

__all__ = ["QATQuantizer"]


class QATQuantizer(Quantizer):
    """Weights: min/max of the current weight every forward (per-channel by default), fake-quantized
    with the clipped STE. Activations: in training mode each batch's min/max moves an exponential
    moving average (``new = old + (1 - ema_decay) * (batch - old)``); eval mode uses the stored range.

    ``quant_start_step``: before that many :meth:`step` calls ranges are tracked but nothing is
    quantized. ``fold_bn=True`` folds BatchNorm into the preceding convolutions first (their
    statistics are frozen; see :func:`fold_batchnorm`), which is the graph the deployed engine runs.
    """

    algorithm = "QATQuantizer"
    default_granularity = "per_channel"
    takes_start_step = True

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        *,
        ema_decay: float = 0.99,
        quant_start_step: int | None = None,
        fold_bn: bool = False,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise QuantizerError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        self.folded = fold_batchnorm(model) if fold_bn else []
        super().__init__(model, config_list)
        self.ema_decay = ema_decay
        try:
            self.quant_start_step = self._start_step(quant_start_step)
        except ConfigError:
            self.unwrap_model()  # the caller's model is left as it was given
            raise
        self.steps = 0
        self.epoch = 0
        for wrapper in self.wrappers.values():
            for kind in wrapper.quant_types:
                if kind != "weight":
                    wrapper.calibrators[kind] = MinMaxCalibrator(
                        moving_average=True,
                        averaging_constant=1.0 - ema_decay,
                        bits=wrapper.bits(kind),
                        signed=wrapper.signed,
                        symmetric=wrapper.symmetric,
                        name=f"{wrapper.name}.{kind}",
                    )

    def _start_step(self, given: int | None) -> int:
        """The argument, or the config_list's ``quant_start_step`` (NNI 2.x QAT writes one per dict)."""
        from_config = {c.quant_start_step for c in self.module_configs.values() if c.quant_start_step is not None}
        if len(from_config) > 1:
            raise ConfigError(
                f"config_list gives quant_start_step {sorted(from_config)}: NNI 2.x started each layer at its own "
                "step, here one start step holds for the whole model; give one value"
            )
        if given is not None and from_config and from_config != {int(given)}:
            raise ConfigError(f"quant_start_step={given} disagrees with the config_list's {sorted(from_config)}")
        return int(given) if given is not None else (from_config.pop() if from_config else 0)

    @property
    def quantizing(self) -> bool:
        return self.steps >= self.quant_start_step

    def step(self) -> None:
        self.steps += 1

    def update_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _missing_hint(self) -> str:
        return "train (or run the model in training mode) on some batches first"

    def calibration(self, wrapper: QuantWrapper, kind: str) -> QuantParams:
        if kind == "weight":
            return self.weight_params(wrapper)
        return super().calibration(wrapper, kind)

    def quantize_weight(self, weight: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        if not self.quantizing:
            return weight
        return fake_quantize_ste(weight, self.weight_params(wrapper, weight))

    def _activation(self, x: torch.Tensor, wrapper: QuantWrapper, kind: str) -> torch.Tensor:
        if wrapper.training:
            lo, hi = torch.aminmax(x.detach().float())
            cal = wrapper.calibrators[kind]
            try:
                cal.observe(np.array([lo.item(), hi.item()], dtype=np.float32))
                wrapper.params[kind] = cal.compute()
            except QuantError as exc:
                raise QuantizerError(str(exc)) from None
        params = wrapper.params.get(kind)
        if params is None or not self.quantizing:
            return x
        return fake_quantize_ste(x, params)

    def quantize_input(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return self._activation(x, wrapper, "input")

    def quantize_output(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return self._activation(x, wrapper, "output")
