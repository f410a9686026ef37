"""Empirical bias correction of quantized layers (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV, section 4.2; the empirical variant with calibration data).

Rounding a layer's weights to int8 shifts the mean of its output channels: ``E[W~x] - E[Wx] = (W~ - W) E[x]``
is not zero per channel (the rounding errors of one output channel do not cancel, above all in a 3x3
depthwise conv with 9 weights per channel), and clipped activation ranges shift it further. Every layer
after adds its own shift, and the network's output drifts. The correction measures, on calibration
data, the mean of each output channel of a quantized layer in the quantized simulation (every earlier
layer quantized and already corrected, so accumulated shifts are included) and in the float model, and
subtracts the difference from the layer's bias::

    b_c <- b_c - (mean_{n,spatial} y~_c - mean_{n,spatial} y_c)

Layers are corrected in the order the forward calls them, each before any later layer runs (one quantized
pass over the whole calibration set, the output of a corrected layer shifted as its new bias shifts it). A layer without a bias gets one (the exported graph folds it into a following
BatchNorm's bias, or carries it as the Conv/Gemm bias). Only the bias changes: the weights, and hence
their integer values and scales, stay as calibrated.

Why written here rather than taken from a library: AIMET's ``aimet_torch.bias_correction`` corrects its
own ``QuantizationSimModel`` (its own quantizer placement, not the :class:`~.calib_config.CalibConfig`
the graph is built from) and pins its own torch; onnxruntime's ``quantize_static`` and ModelOpt's ONNX PTQ
have no bias correction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import call_with_batch

if TYPE_CHECKING:
    from .ptq import PTQQuantizer

__all__ = ["BiasCorrection", "channel_axis", "channel_means", "correct_bias"]

log = logging.getLogger(__name__)


def channel_axis(module: nn.Module) -> int:
    """Axis of the output channels in the module's output: 1 for convolutions ``(N, C, ...)``, -1 for
    Linear-like layers ``(..., C)``."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def channel_means(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
    """Sum over every axis but ``axis`` (float64) and the number of values summed per channel."""
    axis = axis % y.dim()
    dims = [d for d in range(y.dim()) if d != axis]
    return y.detach().sum(dim=dims, dtype=torch.float64), y.numel() // y.shape[axis]


@dataclass
class BiasCorrection:
    """What :func:`correct_bias` changed: per layer, the shift subtracted from its bias (output units)."""

    shifts: dict[str, torch.Tensor] = field(default_factory=dict)
    #: layers not corrected, with the reason (called more than once per forward, not called, ...)
    skipped: dict[str, str] = field(default_factory=dict)

    def biases(self, quantizer: "PTQQuantizer") -> dict[str, torch.Tensor]:
        """The corrected bias of every corrected layer (copies)."""
        return {n: quantizer.wrappers[n].module.bias.detach().clone() for n in self.shifts}  # type: ignore[union-attr]


class _Means:
    """Forward hooks accumulating per-channel output sums of chosen modules (and their call counts)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.order: list[str] = []
        self.handles = [m.register_forward_hook(self._hook(n, channel_axis(m))) for n, m in modules.items()]

    def _hook(self, name: str, axis: int):
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            if name not in self.calls:
                self.order.append(name)
            self.calls[name] = self.calls.get(name, 0) + 1
            s, n = channel_means(out, axis)
            self.sums[name] = self.sums.get(name, 0) + s
            self.counts[name] = self.counts.get(name, 0) + n

        return hook

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.counts[name]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _pass(model: nn.Module, batches: Iterable[Any], means: _Means) -> None:
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                call_with_batch(model, batch, i)
    finally:
        means.close()


def _concat(batches: list[Any]) -> Any:
    """One batch holding every calibration batch (tensors, tuples or dicts of tensors concatenated on dim 0)."""
    first = batches[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([b[k] for b in batches]) if isinstance(first[k], torch.Tensor) else first[k] for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(torch.cat([b[i] for b in batches]) if isinstance(v, torch.Tensor) else v for i, v in enumerate(first))
    return torch.cat(batches)


def correct_bias(quantizer: "PTQQuantizer", batches: Iterable[Any], *, progress: bool = True) -> BiasCorrection:
    """Correct, in place, the bias of every weight-quantized layer of a calibrated ``quantizer``'s model.

    ``batches``: calibration inputs (tensors, tuples or dicts of forward's arguments whose tensors share the
    batch dimension 0). Two forward passes: the float model batch by batch (reference channel means), then
    the quantized simulation once on all batches concatenated, each layer's output shifted and its bias
    corrected as the forward reaches it, so every later layer sees the corrected earlier ones (the sequential
    correction, in one pass; memory: the activations of the whole calibration set at once). Layer outputs are
    averaged over every axis but the channel axis (:func:`channel_axis`). A layer called more than once per
    forward (shared weights) is skipped and named in the result. Raises :class:`~.quantizer.QuantizerError`
    when the quantizer is not calibrated or no batch is given.
    """
    from .quantizer import QuantizerError

    if not quantizer.calibrated:
        raise QuantizerError("bias correction needs a calibrated quantizer: run calibrate(batches) first")
    batches = list(batches)
    if not batches:
        raise QuantizerError("bias correction got no batches: pass the calibration batches")
    layers = {n: w.module for n, w in quantizer.wrappers.items() if "weight" in w.quant_types}
    result = BiasCorrection()
    was_training = quantizer.model.training
    quantizer.model.eval()
    try:
        with quantizer.float_mode():
            reference = _Means(layers)
            _pass(quantizer.model, tqdm(batches, desc="bias correction (float)", unit="batch", leave=False, disable=not progress),
                  reference)
        for name in layers:
            calls = reference.calls.get(name, 0)
            if not calls:
                result.skipped[name] = "not called by the forward"
            elif calls != len(batches):
                result.skipped[name] = f"called {calls} times in {len(batches)} batches (shared layer)"
        handles = [layers[n].register_forward_hook(_corrector(n, layers[n], reference.mean(n), result))
                   for n in reference.order if n not in result.skipped]
        try:
            with torch.no_grad():
                call_with_batch(quantizer.model, _concat(batches))
        finally:
            for h in handles:
                h.remove()
    finally:
        quantizer.model.train(was_training)
    if result.skipped:
        log.info("bias correction skipped %s", result.skipped)
    log.info("bias correction: %d layers corrected, largest shift %.3g", len(result.shifts),
             max((float(s.abs().max()) for s in result.shifts.values()), default=0.0))
    return result


def _corrector(name: str, module: nn.Module, reference: torch.Tensor, result: BiasCorrection):
    axis = channel_axis(module)

    def hook(_module: nn.Module, _args: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or name in result.shifts:
            return None
        total, count = channel_means(out, axis)
        shift = total / count - reference
        with torch.no_grad():
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros(shift.numel(), dtype=module.weight.dtype, device=module.weight.device))
            module.bias.sub_(shift.to(module.bias.dtype))
        result.shifts[name] = shift.float()
        shape = [1] * out.dim()
        shape[axis] = -1
        return out - shift.to(out.dtype).reshape(shape)  # what the corrected bias gives, for the layers after

    return hook
