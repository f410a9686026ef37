"""Pre-rules that zero parameters behind exactly-zero channels (``zero_dead_norms``).

They edit the traced model itself, so only a private copy is traced this way: a BatchNorm's affine
entries (or an affine-free norm's running mean) behind a zero channel, and a parameter added to
(ViT's position embedding) or concatenated with (its class token) zero channels, are zeroed, so the
channel stays zero and can be removed. This changes the model's function wherever those entries
were not zero already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .registry import arg, pre_rule

__all__ = ["DroppedConstant", "restore_kept"]


@dataclass
class DroppedConstant:
    """Slices ``index`` of ``tensor`` along ``axis`` (channel ids ``ids``) held ``values`` before being zeroed."""

    name: str
    tensor: torch.Tensor
    axis: int
    ids: torch.Tensor
    index: torch.Tensor
    values: torch.Tensor


def restore_kept(dropped: list[DroppedConstant], keep: Callable[[torch.Tensor], torch.Tensor]) -> list[str]:
    """Put back the dropped values of channels that stay (``keep(ids)`` True); names of tensors still changed."""
    changed: list[str] = []
    for d in dropped:
        kept = keep(d.ids).to(d.index.device)
        if bool(kept.any()):
            with torch.no_grad():
                d.tensor.index_copy_(d.axis, d.index[kept], d.values.index_select(d.axis, torch.nonzero(kept).flatten().to(d.index.device)))
        if not bool(kept.all()) and d.name not in changed:
            changed.append(d.name)
    return changed

if TYPE_CHECKING:
    from ..trace import Tracer

PARAM_JOIN_OPS = {"add", "add_", "__add__", "__radd__", "__iadd__", "cat", "concat", "concatenate"}


@pre_rule("batch_norm", "instance_norm")
def zero_dead_norm(tracer: "Tracer", name: str, args: tuple, kwargs: dict) -> None:
    """Make a BatchNorm output exactly zero where its input channel is."""
    if not tracer.zero_dead_norms:
        return
    x = args[0]
    ids, zero = tracer.channel_vec(x, 1)
    if not bool(zero.any()):
        return
    running_mean, weight, bias = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    for t in ([weight, bias] if weight is not None else [running_mean]):
        if t is not None and t.dim() == 1 and t.numel() == zero.numel():
            _drop(tracer, t, 0, ids, zero)


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
    zero, ids = traced[0].zero.clone(), traced[0].ids
    for i in traced[1:]:
        zero &= i.zero
        ids = torch.where(ids >= 0, ids, i.ids)
    if not bool(zero.any()):
        return
    for t in parts:
        if not isinstance(t, torch.Tensor) or tracer.info(t) is not None:
            continue
        base, k = tracer.owned_base(t), axis - (nd - t.dim())
        if base is None or not 0 <= k < t.dim() or base.shape[k] != zero.numel():
            continue
        _drop(tracer, base, k, ids, zero)


def _drop(tracer: "Tracer", t: torch.Tensor, axis: int, ids: torch.Tensor, zero: torch.Tensor) -> None:
    """Zero the slices ``zero`` of ``t`` along ``axis`` and note their old values in ``ChannelTrace.dropped``."""
    index = torch.nonzero(zero).flatten().to(t.device)
    old = t.detach().index_select(axis, index).clone()
    if not bool((old != 0).any()):
        return
    owner = tracer.owner.get(id(t))
    name = ".".join(p for p in owner[:2] if p) if owner is not None else "an unnamed tensor"
    tracer.trace.dropped.append(DroppedConstant(name, t, axis, ids[zero.to(ids.device)].clone(), index, old))
    with torch.no_grad():
        t.index_fill_(axis, index, 0)
