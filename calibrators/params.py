"""Quantization parameters and the one place their arithmetic lives.

Every part of the project (calibrators, fake-quant in PyTorch, QDQ surgery) derives scale and zero
point through :func:`params_from_range`, so a tensor quantized in simulation and in the deployed
graph uses bit-identical parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["QuantParams", "QuantError", "qrange", "params_from_range", "params_from_scale", "quantize", "dequantize"]


class QuantError(ValueError):
    """Quantization parameters that cannot be formed: the message says which input is wrong."""


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide integer: int8 -> (-128, 127), uint8 -> (0, 255)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= int(bits) <= 16:
        raise QuantError(f"bits must be an integer from 2 to 16, got {bits!r}")
    bits = int(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one tensor, with the observed range they came from.

    ``axis`` is ``None`` for per-tensor parameters (arrays of length 1), else the channel axis.
    ``min``/``max`` are kept so a backend can derive another flavour (symmetric int8 for TensorRT,
    asymmetric uint8 for onnxruntime on x86) from the same calibration.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    dtype: str  # "int" (signed) or "uint"
    axis: int | None
    min: np.ndarray
    max: np.ndarray
    symmetric: bool

    @property
    def signed(self) -> bool:
        return self.dtype == "int"

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed)[1]

    def to_dict(self) -> dict:
        return {
            "scale": [float(v) for v in np.atleast_1d(self.scale)],
            "zero_point": [int(v) for v in np.atleast_1d(self.zero_point)],
            "bits": int(self.bits),
            "dtype": self.dtype,
            "axis": self.axis,
            "symmetric": bool(self.symmetric),
            "min": [float(v) for v in np.atleast_1d(self.min)],
            "max": [float(v) for v in np.atleast_1d(self.max)],
        }

    def with_flavour(self, *, symmetric: bool, signed: bool, bits: int | None = None) -> "QuantParams":
        """The same observed range re-expressed in another flavour (e.g. S8 -> U8 activations)."""
        return params_from_range(
            self.min, self.max, bits=self.bits if bits is None else bits, signed=signed, symmetric=symmetric, axis=self.axis
        )


def params_from_range(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    *,
    bits: int = 8,
    signed: bool = True,
    symmetric: bool = True,
    axis: int | None = None,
) -> QuantParams:
    """Scale and zero point covering ``[rmin, rmax]`` (widened to include 0, so 0 is exact).

    Symmetric: ``scale = max(|rmin|, |rmax|) / (2**(bits-1) - 1)``, zero point 0 (signed) or
    ``2**(bits-1)`` (unsigned): TensorRT's convention. Affine: ``scale = (rmax - rmin) / (qmax - qmin)``,
    ``zero_point = round(qmin - rmin / scale)``: onnxruntime's convention. A zero range gets scale 1.
    """
    lo = np.atleast_1d(np.asarray(rmin, dtype=np.float64))
    hi = np.atleast_1d(np.asarray(rmax, dtype=np.float64))
    if lo.shape != hi.shape:
        raise QuantError(f"min and max differ in shape: {lo.shape} vs {hi.shape}")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise QuantError(f"range is not finite (min={lo.tolist()}, max={hi.tolist()}): NaN or inf was observed")
    if np.any(lo > hi):
        raise QuantError(f"min exceeds max: min={lo.tolist()}, max={hi.tolist()}")
    if axis is None and lo.size != 1:
        raise QuantError(f"per-tensor parameters need one min/max, got {lo.size}")
    qmin, qmax = qrange(bits, signed)
    lo0, hi0 = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        amax = np.maximum(-lo0, hi0)
        half = (1 << (bits - 1)) - 1
        scale = amax / half
        zp = np.zeros_like(scale) if signed else np.full_like(scale, 1 << (bits - 1))
    else:
        scale = (hi0 - lo0) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(qmin - lo0 / safe), qmin, qmax)
    zero = scale <= 0
    scale = np.where(zero, 1.0, scale)
    if not symmetric:
        zp = np.where(zero, 0 if signed else qmin, zp)
    return _make(scale, zp, bits, signed, axis, lo, hi, symmetric)


def _make(scale, zp, bits, signed, axis, lo, hi, symmetric) -> QuantParams:  # type: ignore[no-untyped-def]
    return QuantParams(
        scale=np.asarray(scale).astype(np.float32),
        zero_point=np.asarray(zp).astype(np.int64),
        bits=int(bits),
        dtype="int" if signed else "uint",
        axis=axis,
        min=np.asarray(lo).astype(np.float32),
        max=np.asarray(hi).astype(np.float32),
        symmetric=bool(symmetric),
    )


def params_from_scale(
    scale: np.ndarray | float,
    zero_point: np.ndarray | int = 0,
    *,
    bits: int = 8,
    signed: bool = True,
    axis: int | None = None,
) -> QuantParams:
    """Parameters for a scale that was learned or fixed (LSQ, DoReFa, BNN, NNI checkpoints), not observed.

    ``min``/``max`` are set to the range the grid represents, chosen so that
    :func:`params_from_range` on them gives back the same scale: symmetric grids report
    ``±(2**(bits-1) - 1) * scale``, affine ones ``(qmin - zp) * scale .. (qmax - zp) * scale``.
    """
    s = np.atleast_1d(np.asarray(scale, dtype=np.float64))
    zp = np.broadcast_to(np.atleast_1d(np.asarray(zero_point)), s.shape)
    if axis is None and s.size != 1:
        raise QuantError(f"per-tensor parameters need one scale, got {s.size}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise QuantError(f"scale must be positive and finite, got {s.tolist()}")
    if np.any(zp != np.round(zp)):
        raise QuantError(f"zero_point must be integers, got {zp.tolist()}")
    qmin, qmax = qrange(bits, signed)
    if np.any(zp < qmin) or np.any(zp > qmax):
        raise QuantError(f"zero_point must lie in [{qmin}, {qmax}], got {zp.tolist()}")
    half = (1 << (bits - 1)) - 1
    symmetric = bool(np.all(zp == (0 if signed else 1 << (bits - 1))))
    if symmetric:
        lo, hi = -half * s, half * s
    else:
        lo, hi = (qmin - zp) * s, (qmax - zp) * s
    return _make(s, zp, bits, signed, axis, lo, hi, symmetric)


def _broadcast(values: np.ndarray, params: QuantParams, ndim: int) -> np.ndarray:
    if params.axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[params.axis] = -1
    return values.reshape(shape)


def quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX QuantizeLinear in float32: ``clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``."""
    x = np.asarray(x, dtype=np.float32)
    scale = _broadcast(np.asarray(params.scale, dtype=np.float32), params, x.ndim)
    zp = _broadcast(np.asarray(params.zero_point, dtype=np.float32), params, x.ndim)
    return np.clip(np.rint(x / scale) + zp, params.qmin, params.qmax).astype(np.int64)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX DequantizeLinear in float32: ``(q - zero_point) * scale``."""
    q = np.asarray(q)
    scale = _broadcast(np.asarray(params.scale, dtype=np.float32), params, q.ndim)
    zp = _broadcast(np.asarray(params.zero_point, dtype=np.float32), params, q.ndim)
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32)
