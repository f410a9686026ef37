"""The module wrapper every quantizer installs: it calls the quantizer's hooks around the module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from calibrators import Calibrator, QuantParams

from ..config import ModuleConfig
from ..subclasses import LayerForm, analyse_layer, is_subclass_layer

if TYPE_CHECKING:
    from .quantizer import Quantizer

__all__ = ["QuantWrapper", "weight_axis"]


def weight_axis(module: nn.Module) -> int:
    """Output-channel axis of a weight: 0 for Conv and Linear, 1 for ConvTranspose (``in, out/groups, ...``) and for
    linear-like layers storing ``(in, out)`` (:mod:`deploycompress.linear_like`: transformers' Conv1D)."""
    from ..linear_like import output_axis

    linear_like = output_axis(module)
    if linear_like is not None:
        return linear_like
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


class QuantWrapper(nn.Module):
    """Runs ``quantize_input`` -> module with ``quantize_weight(weight)`` -> ``quantize_output``.

    The float weight stays the module's parameter (training updates it); the quantized weight is
    substituted for the call only, so unwrapping gives the original module back.
    """

    quantizer: "Quantizer"

    def __init__(self, module: nn.Module, config: ModuleConfig, quantizer: "Quantizer") -> None:
        super().__init__()
        self.module = module
        self.name = config.name
        self.config = config
        object.__setattr__(self, "quantizer", quantizer)  # not a submodule: no cycle in state_dict
        self.params: dict[str, QuantParams] = {}
        self.calibrators: dict[str, Calibrator] = {}
        self.state: dict[str, Any] = {}
        #: what a layer subclass computes, checked on its first call (None: a torch class, or not called yet)
        self.form: LayerForm | None = None
        self._form_checked = not is_subclass_layer(module)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped module's float weight parameter."""
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        return w

    @property
    def quant_types(self) -> tuple[str, ...]:
        return self.config.quant_types

    def bits(self, kind: str) -> int:
        return self.config.quant_bits[kind]

    @property
    def signed(self) -> bool:
        return self.config.quant_dtype == "int"

    @property
    def symmetric(self) -> bool:
        return self.config.quant_scheme == "symmetric"

    def axis(self, kind: str) -> int | None:
        """Channel axis of ``kind``: weights per-channel when the granularity asks, activations per-tensor."""
        if kind == "weight" and self.config.granularity == "per_channel":
            return weight_axis(self.module)
        return None

    def _check_form(self, args: tuple) -> None:
        """A layer subclass is quantized as its base only in the forms that keep the base's input and weight."""
        self._form_checked = True
        self.form = analyse_layer(self.name, self.module, args)  # SubclassError names it when no rule covers it
        if self.form.kind == "weight_transform" and "weight" in self.config.quant_types:
            from .quantizer import QuantizerError

            raise QuantizerError(
                f"module {self.name!r} ({self.form.cls}) computes its weight in forward (weight standardisation or "
                "similar): quantizing its parameter would not quantize the weight it runs with. Bake the effective "
                "weight first: deploycompress.subclasses.lower_layers(model, analyse_layers(model, example_inputs)) "
                "(build_engine does this), or exclude it (exclude_op_names)"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        q = self.quantizer
        if not self._form_checked:
            with torch.no_grad():
                self._check_form(args)
        types = self.config.quant_types
        if "input" in types and args and isinstance(args[0], torch.Tensor):
            args = (q.quantize_input(args[0], self),) + args[1:]
        if "weight" in types:
            weight = q.quantize_weight(self.weight, self)
            out = torch.func.functional_call(self.module, {"weight": weight}, args, kwargs)
        else:
            out = self.module(*args, **kwargs)
        if "output" in types and isinstance(out, torch.Tensor):
            out = q.quantize_output(out, self)
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, quant_types={list(self.config.quant_types)}, bits={self.config.quant_bits}"
