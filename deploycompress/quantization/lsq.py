"""LSQ (Esser et al., 2020): the step size of every quantized tensor is a trained parameter."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from calibrators import QuantParams, params_from_scale, qrange

from .fake_quant import round_ste
from .quantizer import Quantizer
from .wrapper import QuantWrapper

__all__ = ["LSQQuantizer"]


class LSQQuantizer(Quantizer):
    """``x' = round(clamp(x / s, qmin, qmax)) * s`` with ``s`` learned (gradient scaled by
    ``1 / sqrt(numel * qmax)``); zero point 0, so signed grids are symmetric and unsigned ones
    start at 0 (post-ReLU). Step sizes start at ``2 * mean|x| / sqrt(qmax)``: weights at construction,
    activations on the first training batch. They are parameters of the wrappers, named
    ``<module>.weight_scale`` etc.: build the optimizer after the quantizer.

    The forward pass is ONNX's QuantizeLinear/DequantizeLinear with scale ``|s|``, so the exported
    calibration reproduces the trained model exactly.
    """

    algorithm = "LSQQuantizer"

    def __init__(self, model: nn.Module, config_list: list[dict[str, Any]]) -> None:
        super().__init__(model, config_list)
        for wrapper in self.wrappers.values():
            for kind in wrapper.quant_types:
                if kind == "weight":
                    w = wrapper.weight.detach()
                    axis = wrapper.axis("weight")
                    dims = [d for d in range(w.dim()) if d != axis] if axis is not None else list(range(w.dim()))
                    init = 2 * w.abs().mean(dim=dims) / math.sqrt(self._qmax(wrapper, kind))
                    wrapper.register_parameter("weight_scale", nn.Parameter(init.clamp_min(1e-8)))
                else:
                    wrapper.register_parameter(f"{kind}_scale", nn.Parameter(torch.ones(())))
                    wrapper.state[f"{kind}_initialised"] = False

    @staticmethod
    def _qmax(wrapper: QuantWrapper, kind: str) -> int:
        return qrange(wrapper.bits(kind), wrapper.signed)[1]

    @staticmethod
    def _scale(wrapper: QuantWrapper, kind: str) -> torch.Tensor:
        return getattr(wrapper, f"{kind}_scale").abs().clamp_min(1e-8)

    def _lsq(self, x: torch.Tensor, wrapper: QuantWrapper, kind: str) -> torch.Tensor:
        qmin, qmax = qrange(wrapper.bits(kind), wrapper.signed)
        if kind != "weight" and not wrapper.state[f"{kind}_initialised"]:
            if not wrapper.training:
                return x  # never trained: nothing learned yet
            with torch.no_grad():
                getattr(wrapper, f"{kind}_scale").copy_(2 * x.detach().abs().mean() / math.sqrt(qmax) + 1e-8)
            wrapper.state[f"{kind}_initialised"] = True
        s = self._scale(wrapper, kind)
        grad_scale = 1.0 / math.sqrt(x.numel() / s.numel() * qmax)
        s = s.detach() + (s * grad_scale - (s * grad_scale).detach())  # value s exactly, gradient scaled
        axis = wrapper.axis(kind)
        if axis is not None:
            shape = [1] * x.dim()
            shape[axis] = -1
            s = s.reshape(shape)
        return round_ste(torch.clamp(x / s, qmin, qmax)) * s

    def quantize_weight(self, weight: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return self._lsq(weight, wrapper, "weight")

    def quantize_input(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return self._lsq(x, wrapper, "input")

    def quantize_output(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return self._lsq(x, wrapper, "output")

    def _missing_hint(self) -> str:
        return "train on some batches first (activation step sizes start on the first training batch)"

    def calibration(self, wrapper: QuantWrapper, kind: str) -> QuantParams:
        if kind != "weight" and not wrapper.state[f"{kind}_initialised"]:
            return super().calibration(wrapper, kind)  # raises: nothing learned yet
        scale = self._scale(wrapper, kind).detach().float().cpu().numpy()
        return params_from_scale(scale, 0, bits=wrapper.bits(kind), signed=wrapper.signed, axis=wrapper.axis(kind))
