"""Fake quantization in PyTorch with exactly ONNX QuantizeLinear/DequantizeLinear semantics.

``q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)``, ``x' = (q - zero_point) * scale``,
in float32, with scale and zero point from :class:`calibrators.QuantParams`: a simulated tensor and
the deployed int8 graph see the same integers. (``torch.fake_quantize_per_*`` multiplies by
``1/scale`` instead of dividing, which can round a value to the neighbouring integer.)
"""

from __future__ import annotations

import numpy as np
import torch

from calibrators import QuantParams

__all__ = ["fake_quantize", "fake_quantize_ste", "params_tensors", "round_ste"]


def params_tensors(params: QuantParams, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point as float32 tensors shaped to broadcast against ``like`` along ``params.axis``."""
    scale = torch.as_tensor(np.asarray(params.scale, dtype=np.float32), device=like.device)
    zp = torch.as_tensor(np.asarray(params.zero_point, dtype=np.float32), device=like.device)
    if params.axis is None:
        return scale.reshape(()), zp.reshape(())
    if not -like.dim() <= params.axis < like.dim() or like.shape[params.axis] != scale.numel():
        raise ValueError(
            f"per-channel parameters with {scale.numel()} channels on axis {params.axis} do not fit a tensor "
            f"of shape {tuple(like.shape)}"
        )
    shape = [1] * like.dim()
    shape[params.axis] = -1
    return scale.reshape(shape), zp.reshape(shape)


def _fq(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):  # in place on one temporary: calibration and evaluation
        q = torch.div(x, scale)
        return q.round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)
    q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def fake_quantize(x: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Quantize then dequantize ``x`` (no gradient through the rounding; see :func:`fake_quantize_ste`)."""
    scale, zp = params_tensors(params, x)
    return _fq(x.float(), scale, zp, params.qmin, params.qmax).to(x.dtype)


class _STE(torch.autograd.Function):
    """Straight-through estimator: the gradient passes where ``x`` lies inside the representable range
    ``[(qmin - zp) * scale, (qmax - zp) * scale]`` and is 0 where the quantizer saturates."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin, qmax):  # type: ignore[override]
        ctx.save_for_backward(x, scale, zp)
        ctx.bounds = (qmin, qmax)
        return _fq(x, scale, zp, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, scale, zp = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        inside = (x >= (qmin - zp) * scale) & (x <= (qmax - zp) * scale)
        return grad * inside, None, None, None, None


def fake_quantize_ste(x: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """:func:`fake_quantize` with the clipped straight-through gradient (quantization-aware training)."""
    scale, zp = params_tensors(params, x)
    return _STE.apply(x.float(), scale, zp, params.qmin, params.qmax).to(x.dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return x + (torch.round(x) - x).detach()
