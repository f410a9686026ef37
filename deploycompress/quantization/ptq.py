"""Post-training quantization: observe activations on calibration data, then simulate int8."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np

import torch
from torch import nn
from tqdm.auto import tqdm

from calibrators import QuantError, create_calibrator

from ..batches import call_with_batch
from .fake_quant import fake_quantize
from .quantizer import Quantizer, QuantizerError
from .wrapper import QuantWrapper

__all__ = ["CalibrationRangeWarning", "PTQQuantizer", "NaiveQuantizer"]

log = logging.getLogger(__name__)


class CalibrationRangeWarning(UserWarning):
    """A calibrated activation range is zero or degenerate (all batches zero or constant)."""


def _warn_degenerate(where: str, params: Any, batches: int) -> None:
    lo, hi = np.asarray(params.min, dtype=np.float64), np.asarray(params.max, dtype=np.float64)
    if np.all(hi - lo <= 1e-12 * np.maximum(1.0, np.abs(hi))):
        warnings.warn(
            f"calibration of {where}: the observed range is [{float(lo.min()):g}, {float(hi.max()):g}] over {batches} batch(es); "
            "the quantized tensor cannot represent other values: calibrate on representative data",
            CalibrationRangeWarning,
            stacklevel=3,
        )


class NaiveQuantizer(Quantizer):
    """Weights only, min/max range (NNI's NaiveQuantizer: 8-bit symmetric unless the config says otherwise)."""

    algorithm = "NaiveQuantizer"
    supported_quant_types = ("weight",)

    def __init__(self, model: nn.Module, config_list: list[dict[str, Any]]) -> None:
        super().__init__(model, config_list)
        for wrapper in self.wrappers.values():
            wrapper.params["weight"] = self.weight_params(wrapper)

    def quantize_weight(self, weight: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return fake_quantize(weight, wrapper.params["weight"])


class PTQQuantizer(Quantizer):
    """Observers on every selected tensor, one calibrator each; ``calibrate(batches)`` then fake-quantizes.

    Weights: min/max of the weight itself, per-channel symmetric by default (what TensorRT and
    onnxruntime's per-channel kernels take). Activations: per-tensor, range from ``calibrator``
    (``"minmax"``, ``"percentile"``, ``"entropy"``, ``"mse"``; ``calibrator_kwargs`` go to it).
    Observation runs the float model, as TensorRT and onnxruntime calibrate.
    """

    algorithm = "PTQQuantizer"
    default_granularity = "per_channel"

    def __init__(self, model: nn.Module, config_list: list[dict[str, Any]], calibrator: str = "minmax", **calibrator_kwargs: Any) -> None:
        super().__init__(model, config_list)
        self.calibrator = calibrator
        self.calibrator_kwargs = calibrator_kwargs
        self.observing = False
        self.calibrated = False
        self._float = False
        try:
            self._reset()
        except QuantError as exc:
            self.unwrap_model()
            raise QuantizerError(str(exc)) from None

    def _reset(self) -> None:
        """Fresh calibrators for the activations, weight parameters from the current weights."""
        for wrapper in self.wrappers.values():
            for kind in wrapper.quant_types:
                if kind == "weight":
                    wrapper.params["weight"] = self.weight_params(wrapper)
                    continue
                wrapper.params.pop(kind, None)
                wrapper.calibrators[kind] = create_calibrator(
                    self.calibrator,
                    bits=wrapper.bits(kind),
                    signed=wrapper.signed,
                    symmetric=wrapper.symmetric,
                    axis=None,
                    name=f"{wrapper.name}.{kind}",
                    **self.calibrator_kwargs,
                )

    def _missing_hint(self) -> str:
        return "run calibrate(batches) first"

    def calibrate(self, batches: Iterable[Any], *, num_batches: int | None = None, progress: bool = True) -> None:
        """Run ``batches`` (tensors, or tuples of model inputs) through the float model, then fix the ranges.
        ``progress=False`` hides the progress bar."""
        total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)  # type: ignore[arg-type]
        self._reset()  # recalibrating starts afresh
        self.calibrated = False
        was_training = self.model.training
        self.model.eval()
        self.observing = True
        seen = 0
        try:
            with torch.no_grad():
                for batch in tqdm(batches, total=total, desc=f"calibrating ({self.calibrator})", unit="batch", leave=False, disable=not progress):
                    if num_batches is not None and seen >= num_batches:
                        break
                    call_with_batch(self.model, batch, seen)  # a tensor, positional inputs, or inputs keyed by name
                    seen += 1
        except QuantError as exc:
            raise QuantizerError(f"calibration failed: {exc}") from None
        finally:
            self.observing = False
            self.model.train(was_training)
        if not seen:
            raise QuantizerError("calibrate() got no batches: pass an iterable of input tensors")
        try:
            for wrapper in self.wrappers.values():
                for kind, cal in wrapper.calibrators.items():
                    wrapper.params[kind] = cal.compute()
                    _warn_degenerate(f"{wrapper.name}.{kind}", wrapper.params[kind], seen)
        except QuantError as exc:
            raise QuantizerError(f"calibration failed: {exc}") from None
        self.calibrated = True
        log.info("%s: calibrated %d tensors on %d batches", self.algorithm, len(self.export_calib_config()), seen)

    @contextmanager
    def float_mode(self) -> Iterator[None]:
        """Within the block the wrapped model computes in float (no fake quantization, no observation)."""
        before = self._float
        self._float = True
        try:
            yield
        finally:
            self._float = before

    def correct_bias(self, batches: Iterable[Any], *, progress: bool = True) -> Any:
        """Empirical bias correction of every weight-quantized layer (Nagel et al. 2019), after
        :meth:`calibrate`: see :func:`deploycompress.quantization.bias_correction.correct_bias`. Changes the
        wrapped modules' biases in place; returns the :class:`~.bias_correction.BiasCorrection` applied."""
        from .bias_correction import correct_bias

        return correct_bias(self, batches, progress=progress)

    def _activation(self, x: torch.Tensor, wrapper: QuantWrapper, kind: str) -> torch.Tensor:
        if self._float:
            return x
        if self.observing:
            wrapper.calibrators[kind].observe(x.detach().float().cpu().numpy())
            return x
        params = wrapper.params.get(kind)
        return x if params is None else fake_quantize(x, params)

    def quantize_input(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return self._activation(x, wrapper, "input")

    def quantize_output(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return self._activation(x, wrapper, "output")

    def quantize_weight(self, weight: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        if self.observing or not self.calibrated or self._float:
            return weight
        return fake_quantize(weight, wrapper.params["weight"])
