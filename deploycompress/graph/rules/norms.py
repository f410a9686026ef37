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
    zero after the norm exactly where the masked model makes it so: weight and bias zero (whatever
    the input), or a zero input with a zero bias and a zero running mean (or batch statistics)."""
    x, out = call.args[0], call.out
    ids, zero = tracer.channel_vec(x, 1)
    running_mean, running_var = call.arg(1, "running_mean"), call.arg(2, "running_var")
    weight, bias = call.arg(3, "weight"), call.arg(4, "bias")
    for p in (running_mean, running_var, weight, bias):
        if isinstance(p, torch.Tensor) and id(p) in tracer.owner:
            owner = tracer.owner[id(p)]
            tracer.record_param(owner[0], owner[1], 0, ids)
    # y = (x - mean) / sqrt(var + eps) * weight + bias, with mean the running mean (eval) or the
    # batch's (then a zero channel has mean 0): zero wherever weight and bias are, whatever x is
    n = zero.numel()
    w_zero = (weight.detach() == 0).cpu().reshape(-1).expand(n) if weight is not None else torch.zeros(n, dtype=torch.bool)
    b_zero = (bias.detach() == 0).cpu().reshape(-1).expand(n) if bias is not None else torch.ones(n, dtype=torch.bool)
    batch_stats = bool(call.arg(5, "use_input_stats" if call.name == "instance_norm" else "training", False)) or running_mean is None
    mean_zero = torch.ones(n, dtype=torch.bool) if batch_stats else (running_mean.detach() == 0).cpu().reshape(-1).expand(n)
    out_zero = b_zero & (w_zero | (zero & mean_zero))
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
    if spans and k == 1 and info.axis == nd - 1 and widened_norm(tracer, call, params, info):
        return None
    if spans and k == 1 and info.axis == nd - 1 and prunable_norm(tracer, params, "normalized_shape", info.ids, 1):
        return tracer.set_info(call.out, TensorInfo(info.shape, info.axis, info.ids, info.zero.clone()))
    if spans:
        tracer.pin(info, f"{call.name} normalises over them{_norm_owner(tracer, params)} (norm_spans='keep')",
                   by_norm=not tracer.prune_norms)
    tracer.set_info(call.out, TensorInfo(info.shape, info.axis, info.ids, torch.zeros_like(info.zero)))


@rule("group_norm")
def groupnorm(tracer: "Tracer", call: Call) -> None:
    info = call.input_info(0)
    params = [call.arg(2, "weight"), call.arg(3, "bias")]
    groups = int(call.arg(1, "num_groups")) if tracer.prune_norms else 1
    if info.axis == 1 and prunable_norm(tracer, params, "num_channels", info.ids, groups):
        return tracer.set_info(call.out, TensorInfo(info.shape, info.axis, info.ids, info.zero.clone()))
    tracer.pin(info, f"group_norm normalises over them{_norm_owner(tracer, params)} (norm_spans='keep')",
               by_norm=not tracer.prune_norms)
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


def prunable_norm(tracer: "Tracer", params: list[Any], width_attr: str, ids: torch.Tensor, groups: int) -> bool:
    """norm_spans="prune": record a norm's affine tensors as sliced with ``ids`` and its groups as a balance.

    Only a norm module that owns its affine weight and stores its width in ``width_attr`` (so speedup
    can rewrite it) qualifies. A zero input channel then counts as zero after the norm too: the
    masks meant to remove it, and removing it is what changes the norm's statistics.
    """
    if not tracer.prune_norms or not isinstance(params[0], torch.Tensor):
        return False
    owners = [tracer.owner.get(id(p)) for p in params if p is not None]
    if any(o is None or o[0] != owners[0][0] for o in owners) or any(p.dim() != 1 for p in params if p is not None):
        return False
    module_name, _, module = owners[0]
    width = getattr(module, width_attr, None)
    width = width[-1] if isinstance(width, (tuple, list, torch.Size)) and len(width) == 1 else width
    if width != ids.numel() or ids.numel() % groups:
        return False
    for mname, attr, _ in owners:
        tracer.record_param(mname, attr, 0, ids)
    if groups > 1:
        tracer.trace.balances.append((f"groups:{module_name}", list(ids.chunk(groups))))
    tracer.trace.norms[module_name] = ids.clone()
    return True


def widened_norm(tracer: "Tracer", call: Call, params: list[Any], info: TensorInfo) -> bool:
    """norm_spans="prune", a norm whose output is a model output (``Tracer.output_norms``): its input
    channels may go, its output keeps the full width. The output gets channel ids of its own (the model
    output pins them); a channel is zero there where the input is zero and weight and bias are too.
    Speedup rebuilds the full-width input with zeros in the removed places before normalising, which
    is the masked model's computation (``speedup.norms.ZeroPaddedNorm``)."""
    weight = params[0]
    owner = tracer.owner.get(id(weight)) if isinstance(weight, torch.Tensor) else None
    if owner is None or owner[0] not in tracer.output_norms:
        return False
    out = call.out
    zero = info.zero.clone()
    for p in params:
        zero &= (p.detach() == 0).cpu().reshape(-1).expand(zero.numel()) if isinstance(p, torch.Tensor) else True
    ids = info.ids
    tracer.trace.read_live(ids[(ids >= 0) & ~info.zero], f"read while non-zero by {owner[0]!r} (its output is a model output)")
    tracer.trace.widened_norms[owner[0]] = ids.clone()
    tracer.set_info(out, TensorInfo(out.shape, out.dim() - 1, tracer.uf.add(out.shape[-1]), zero))
    return True
