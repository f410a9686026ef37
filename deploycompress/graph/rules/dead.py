"""Pre-rules that zero parameters behind exactly-zero channels (``zero_dead_norms``).

They edit the traced model itself, so only a private copy is traced this way: a BatchNorm's affine
entries (or an affine-free norm's running mean) behind a zero channel, and a parameter added to
(ViT's position embedding) or concatenated with (its class token) zero channels, are zeroed, so the
channel stays zero and can be removed. This changes the model's function wherever those entries
were not zero already.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .registry import arg, pre_rule

if TYPE_CHECKING:
    from ..trace import Tracer

PARAM_JOIN_OPS = {"add", "add_", "__add__", "__radd__", "__iadd__", "cat", "concat", "concatenate"}


@pre_rule("batch_norm", "instance_norm")
def zero_dead_norm(tracer: "Tracer", name: str, args: tuple, kwargs: dict) -> None:
    """Make a BatchNorm output exactly zero where its input channel is."""
    if not tracer.zero_dead_norms:
        return
    x = args[0]
    _, zero = tracer.channel_vec(x, 1)
    if not bool(zero.any()):
        return
    running_mean, weight, bias = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    zero = zero.to(x.device)
    with torch.no_grad():
        if weight is not None:
            weight[zero] = 0
            if bias is not None:
                bias[zero] = 0
        elif running_mean is not None:
            running_mean[zero] = 0


@pre_rule(*PARAM_JOIN_OPS)
def zero_dead_params(tracer: "Tracer", name: str, args: tuple, kwargs: dict) -> None:
    """A parameter added to or concatenated with exactly-zero channels is zeroed there too."""
    if not tracer.zero_dead_norms:
        return
    if name in ("cat", "concat", "concatenate"):
        parts, dim = list(arg(args, kwargs, 0, "tensors")), arg(args, kwargs, 1, "dim", 0)
    else:
        parts, dim = list(args[:2]), None
    infos = [tracer.info(t) for t in parts if isinstance(t, torch.Tensor)]
    traced = [i for i in infos if i is not None and i.axis is not None]
    if not traced or any(len(i.shape) != len(traced[0].shape) or i.axis != traced[0].axis for i in traced):
        return
    nd, axis = len(traced[0].shape), traced[0].axis
    if dim is not None and dim % nd == axis:
        return
    zero = traced[0].zero.clone()
    for i in traced[1:]:
        zero &= i.zero
    if not bool(zero.any()):
        return
    for t in parts:
        if not isinstance(t, torch.Tensor) or tracer.info(t) is not None:
            continue
        base, k = tracer.owned_base(t), axis - (nd - t.dim())
        if base is None or not 0 <= k < t.dim() or base.shape[k] != zero.numel():
            continue
        with torch.no_grad():
            base.index_fill_(k, torch.nonzero(zero).flatten().to(base.device), 0)
