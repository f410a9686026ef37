"""DoReFa-Net and BNN: weight transforms rather than affine quantizers, and what of them deploys.

DoReFa's k-bit weights take the values ``q / (2**k - 1)`` for odd ``q`` in ``[-(2**k - 1), 2**k - 1]``:
an affine grid only with a half-integer zero point, which ONNX cannot store. The same values are
a symmetric signed grid of ``k + 1`` bits with scale ``1 / (2**k - 1)``, so that is what is exported
(8-bit DoReFa weights deploy as 9-bit, i.e. in an int16 container), with the transformed weights
written by ``export_model``/``unwrap_model(bake=True)``. DoReFa activations, ``clip(x, 0, 1)``
quantized to k bits, are exactly an unsigned k-bit QuantizeLinear with scale ``1 / (2**k - 1)``.

BNN weights ``sign(w)`` in ``{-1, +1}`` deploy as a 2-bit signed grid with scale 1. BNN activations
(``sign(x)``) cannot be written as QuantizeLinear/DequantizeLinear at all: exporting them raises.
"""

from __future__ import annotations

import torch

from calibrators import QuantParams, params_from_scale

from ..config import ConfigError
from .fake_quant import fake_quantize_ste, round_ste
from .quantizer import Quantizer, QuantizerError
from .wrapper import QuantWrapper

__all__ = ["DoReFaQuantizer", "BNNQuantizer"]


class DoReFaQuantizer(Quantizer):
    """DoReFa-Net (Zhou et al., 2016): ``w' = 2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``;
    activations (input/output) ``quantize_k(clip(x, 0, 1))``; straight-through rounding."""

    algorithm = "DoReFaQuantizer"
    min_bits = 1

    def __init__(self, model, config_list) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, config_list)
        for wrapper in self.wrappers.values():
            if "weight" in wrapper.quant_types and wrapper.bits("weight") > 15:
                self.unwrap_model()
                raise ConfigError(
                    f"module {wrapper.name!r}: DoReFa weights of {wrapper.bits('weight')} bits deploy as "
                    f"{wrapper.bits('weight') + 1}-bit integers, above the 16-bit limit; use at most 15"
                )

    @staticmethod
    def _levels(wrapper: QuantWrapper, kind: str) -> int:
        return (1 << wrapper.bits(kind)) - 1

    def _step(self, wrapper: QuantWrapper, kind: str, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(1.0 / self._levels(wrapper, kind), dtype=torch.float32, device=like.device)

    def quantize_weight(self, weight: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        n = self._levels(wrapper, "weight")
        t = torch.tanh(weight.float())
        unit = t / (2 * t.abs().max().detach().clamp_min(1e-12)) + 0.5
        odd = 2 * round_ste(unit * n) - n  # odd integers in [-n, n]
        return (odd * self._step(wrapper, "weight", weight)).to(weight.dtype)

    def _activation(self, x: torch.Tensor, wrapper: QuantWrapper, kind: str) -> torch.Tensor:
        return fake_quantize_ste(x, self.calibration(wrapper, kind))

    def quantize_input(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return self._activation(x, wrapper, "input")

    def quantize_output(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return self._activation(x, wrapper, "output")

    def calibration(self, wrapper: QuantWrapper, kind: str) -> QuantParams:
        step = 1.0 / self._levels(wrapper, kind)
        if kind == "weight":
            return params_from_scale(step, 0, bits=wrapper.bits("weight") + 1, signed=True)
        return params_from_scale(step, 0, bits=max(wrapper.bits(kind), 2), signed=False)


class _SignSTE(torch.autograd.Function):
    """``sign`` with 0 -> +1; gradient passes where ``|x| <= 1`` (BNN's hard-tanh estimator)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1)


class BNNQuantizer(Quantizer):
    """Binarized Neural Networks (Courbariaux et al., 2016): weights and activations ``sign(.)``.

    ``quant_bits`` is ignored (always binary). Only the weights can be exported (see module docs).
    """

    algorithm = "BNNQuantizer"
    min_bits = 1
    supported_quant_types = ("weight", "output")

    def quantize_weight(self, weight: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return _SignSTE.apply(weight)

    def quantize_output(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return _SignSTE.apply(x)

    def calibration(self, wrapper: QuantWrapper, kind: str) -> QuantParams:
        if kind == "weight":
            return params_from_scale(1.0, 0, bits=2, signed=True)  # {-1, +1} exactly, q in {-1, 1}
        raise QuantizerError(
            f"{wrapper.name}.{kind}: BNN binarizes it with sign(), which QuantizeLinear/DequantizeLinear "
            "cannot express (1-bit activations are not representable in ONNX QDQ); to deploy, quantize only "
            "weights with BNN (quant_types=['weight'])"
        )
