"""Rules of normalisations and per-channel ops: BatchNorm, LayerNorm/RMSNorm, GroupNorm, PReLU, softmax."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..channels import TensorInfo
from .registry import Call, rule

if TYPE_CHECKING:
    from ..trace import Tracer

BATCHNORM_OPS = {"batch_norm", "instance_norm"}
SPANNING_NORM_OPS = {"layer_norm", "rms_norm"}


@rule(*BATCHNORM_OPS)
def batchnorm(tracer: "Tracer", call: Call) -> None:
    """Per-channel: its affine tensors and running stats are sliced with the channels. A channel is
    zero after the norm only where the masked model makes it so (weight and bias zero, or, without
    affine, a zero running mean)."""
    x, out = call.args[0], call.out
    ids, zero = tracer.channel_vec(x, 1)
    running_mean, running_var = call.arg(1, "running_mean"), call.arg(2, "running_var")
    weight, bias = call.arg(3, "weight"), call.arg(4, "bias")
    for p in (running_mean, running_var, weight, bias):
        if isinstance(p, torch.Tensor) and id(p) in tracer.owner:
            owner = tracer.owner[id(p)]
            tracer.record_param(owner[0], owner[1], 0, ids)
    if weight is not None:
        out_zero = zero & (weight.detach() == 0).cpu() & ((bias.detach() == 0).cpu() if bias is not None else True)
    elif running_mean is not None:
        out_zero = zero & (running_mean.detach() == 0).cpu()
    else:  # instance norm without affine or running stats: (0 - 0) / sqrt(0 + eps) == 0
        out_zero = zero
    info = tracer.info(x) if tracer.info(x) is not None else call.before.get(id(x))
    axis = 1 if (info is not None and info.axis == 1) else None
    if axis is None:
        ids, out_zero = ids[:1], out_zero[:1].clone() & bool(out_zero.all())
    tracer.set_info(out, TensorInfo(out.shape, axis, ids, out_zero))


@rule(*SPANNING_NORM_OPS)
def layernorm(tracer: "Tracer", call: Call) -> None:
    """Normalising over the channels pins them (norm_spans="keep") or narrows the norm ("prune")."""
    info = call.input_info(0)
    shape = call.args[1] if len(call.args) > 1 else call.kwargs.get("normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    nd = len(info.shape)
    spans = info.axis is None or info.axis >= nd - k
    params = [call.arg(2, "weight")] + ([call.arg(3, "bias")] if call.name == "layer_norm" else [])
    if spans and k == 1 and info.axis == nd - 1 and tracer.prunable_norm(params, "normalized_shape", info.ids, 1):
        return tracer.set_info(call.out, TensorInfo(info.shape, info.axis, info.ids, info.zero.clone()))
    if spans:
        tracer.pin(info, f"{call.name} normalises over them{_norm_owner(tracer, params)} (norm_spans='keep')")
    tracer.set_info(call.out, TensorInfo(info.shape, info.axis, info.ids, torch.zeros_like(info.zero)))


@rule("group_norm")
def groupnorm(tracer: "Tracer", call: Call) -> None:
    info = call.input_info(0)
    params = [call.arg(2, "weight"), call.arg(3, "bias")]
    groups = int(call.arg(1, "num_groups")) if tracer.prune_norms else 1
    if info.axis == 1 and tracer.prunable_norm(params, "num_channels", info.ids, groups):
        return tracer.set_info(call.out, TensorInfo(info.shape, info.axis, info.ids, info.zero.clone()))
    tracer.pin(info, f"group_norm normalises over them{_norm_owner(tracer, params)} (norm_spans='keep')")
    tracer.set_info(call.out, TensorInfo(info.shape, info.axis, info.ids, torch.zeros_like(info.zero)))


def _norm_owner(tracer: "Tracer", params: list[Any]) -> str:
    owner = next((tracer.owner[id(p)][0] for p in params if isinstance(p, torch.Tensor) and id(p) in tracer.owner), None)
    return f" in {owner!r}" if owner is not None else ""


@rule("prelu")
def prelu(tracer: "Tracer", call: Call) -> None:
    info = call.input_info(0)
    weight = call.arg(1, "weight")
    if weight.numel() > 1:
        ids, _ = tracer.channel_vec(call.args[0], 1)
        owner = tracer.owner.get(id(weight))
        if owner is None:
            tracer.pin(info, "prelu() with a weight that is no parameter")
        else:
            tracer.record_param(owner[0], owner[1], 0, ids)
    tracer.set_info(call.out, TensorInfo(info.shape, info.axis, info.ids, info.zero))


@rule("softmax", "log_softmax")
def softmax(tracer: "Tracer", call: Call) -> None:
    info = call.input_info(0)
    dim = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else None)
    if dim is None or info.axis is None or dim % len(info.shape) == info.axis:
        tracer.pin(info, f"{call.name} over the channels")
    tracer.set_info(call.out, TensorInfo(info.shape, info.axis, info.ids, torch.zeros_like(info.zero)))
