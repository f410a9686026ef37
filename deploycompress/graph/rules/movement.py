"""Rules of data-movement, pooling and reduction ops.

Data movement (view, permute, cat, channel shuffle, pad ...) is replayed on two small stand-ins of
the input, a tensor of channel ids and one of zero flags, so any op that only moves values is
followed exactly; the result is compressed back to ids along one axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_map

from ..channels import CONST, TensorInfo
from .elementwise import binary
from .registry import Call, rule, tensors, unknown

if TYPE_CHECKING:
    from ..trace import Tracer

MOVE_OPS = {
    "view", "reshape", "flatten", "permute", "transpose", "transpose_", "squeeze", "squeeze_", "unsqueeze",
    "unsqueeze_", "expand", "expand_as", "repeat", "narrow", "select", "split", "split_with_sizes", "chunk",
    "tensor_split", "unbind", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "roll", "flip",
    "movedim", "moveaxis", "unflatten", "t", "view_as", "reshape_as", "__getitem__", "pad", "tile", "index_select",
    "channel_shuffle", "native_channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "swapaxes", "swapdims",
}  # fmt: skip
INDEXED_OPS = {"__getitem__", "index_select", "gather", "take"}  # only arg 0 carries channels
SLICING_OPS = {"__getitem__", "index_select", "narrow", "select", "split", "split_with_sizes", "tensor_split",
               "unbind", "chunk"}  # fmt: skip
CAT_OPS = {"cat", "concat", "concatenate"}
POOL_OPS = {
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    "_max_pool1d", "_max_pool2d", "_max_pool3d", "fn",
}  # fmt: skip
REDUCE_OPS = {"mean", "sum", "amax", "amin", "std", "var", "norm", "nansum", "nanmean"}


@rule(*MOVE_OPS)
def move(tracer: "Tracer", call: Call) -> None:
    name, args, kwargs, before = call.name, call.args, call.kwargs, call.before
    if name in CAT_OPS:
        _cat_params(tracer, call)

    def sub(which: int) -> Callable[[Any], Any]:
        def f(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            info = before.get(id(x)) or tracer.info_or_const(x)
            if info.ids[0] < 0 and info.axis is None and id(x) not in before:
                return torch.full(x.shape, float(CONST), dtype=torch.float64) if which == 0 else (x == 0).double().cpu()
            return info.materialize()[which]

        return f

    if name in INDEXED_OPS:
        rest = tree_map(lambda a: a.cpu() if isinstance(a, torch.Tensor) else a, tuple(args[1:]))
        lab_args = (sub(0)(args[0]),) + rest
        zero_args = (sub(1)(args[0]),) + rest
    else:
        lab_args, zero_args = tree_map(sub(0), args), tree_map(sub(1), args)
    lab_kwargs, zero_kwargs = kwargs, kwargs
    if name == "pad" and call.arg(2, "mode", "constant") == "constant":
        value = call.arg(3, "value", 0.0) or 0.0
        lab_kwargs = dict(kwargs, value=float(CONST))
        zero_kwargs = dict(kwargs, value=1.0 if value == 0 else 0.0)
        lab_args, zero_args = lab_args[:3], zero_args[:3]
    on_labels = {"view": torch.Tensor.reshape, "view_as": torch.Tensor.reshape_as}.get(name, call.func)
    if name == "pad" and call.arg(2, "mode", "constant") == "constant" and not (call.arg(3, "value", 0.0) or 0.0) \
            and _pads_other_axes(before.get(id(args[0])), call.arg(1, "pad")):
        on_labels = _pad_labels  # zero padding of other axes: a zeroed channel stays zero, its border goes with it
    labels = on_labels(*lab_args, **lab_kwargs)
    zeros = on_labels(*zero_args, **zero_kwargs)
    results = [tracer.canon(lab, z) for lab, z in zip(tensors(labels), tensors(zeros))]
    for t, info in zip(tensors(call.out), results):
        tracer.set_info(t, info)
    if name in SLICING_OPS:
        _check_slicing(tracer, name, before.get(id(args[0])), results)


def _pads_other_axes(info: TensorInfo | None, pad: Any) -> bool:
    """A pad that leaves the channel axis alone (F.pad pads the last len(pad) // 2 axes)."""
    return info is not None and info.axis is not None and info.axis < len(info.shape) - len(pad) // 2


def _pad_labels(x: torch.Tensor, pad: Any, mode: str = "constant", value: float | None = None) -> torch.Tensor:
    """F.pad's result shape with each border taking the label of the edge it extends (replicate-style, any rank),
    so a channel padded on its spatial axes stays one channel; negative pads crop."""
    for i in range(len(pad) // 2):
        d = x.dim() - 1 - i
        left, right = int(pad[2 * i]), int(pad[2 * i + 1])
        if left < 0:
            x = x.narrow(d, -left, x.shape[d] + left)
        if right < 0:
            x = x.narrow(d, 0, x.shape[d] + right)
        parts = [x.narrow(d, 0, 1).expand(*[max(left, 0) if k == d else -1 for k in range(x.dim())]), x,
                 x.narrow(d, x.shape[d] - 1, 1).expand(*[max(right, 0) if k == d else -1 for k in range(x.dim())])]
        x = torch.cat(parts, d)
    return x


def _cat_params(tracer: "Tracer", call: Call) -> None:
    """A parameter (or its expanded view) concatenated along another axis than the channels -- ViT's
    class token -- is sliced with the channels it joins, instead of pinning them as a constant."""
    before = call.before
    parts, dim = call.arg(0, "tensors"), call.arg(1, "dim", 0)
    ref = next((before[id(t)] for t in parts if before.get(id(t)) is not None and before[id(t)].axis is not None), None)
    if ref is None or dim % len(ref.shape) == ref.axis:
        return
    axis = ref.axis
    for t in parts:
        base = None if id(t) in before or t.dim() != len(ref.shape) else tracer.owned_base(t)
        if base is None or base.shape[axis] != t.shape[axis]:
            continue
        owner = tracer.owner[id(base)]
        tracer.record_param(owner[0], owner[1], axis, ref.ids)
        zero = (t.detach() == 0).movedim(axis, 0).reshape(t.shape[axis], -1).all(1).cpu()
        before[id(t)] = TensorInfo(t.shape, axis, ref.ids, zero)


def _check_slicing(tracer: "Tracer", name: str, src: TensorInfo | None, results: list[TensorInfo]) -> None:
    """Hard-coded indices along the channel axis would pick other channels once some are removed."""
    if src is None or src.axis is None or not src.real_ids().numel():
        return
    if all(r.axis is not None and torch.equal(r.ids, src.ids) for r in results):
        return
    pieces = [r.ids for r in results]
    if name == "chunk" or (name in ("split", "tensor_split") and len({p.numel() for p in pieces}) == 1):
        if len(pieces) > 1 and torch.equal(torch.cat(pieces), src.ids):
            tracer.trace.balances.append((name, pieces))
            return
    tracer.pin(src, f"{name}() picks channels by index")


@rule(*POOL_OPS)
def pool(tracer: "Tracer", call: Call) -> None:
    """Spatial pooling and resizing keep the channels of (N, C, ...) inputs."""
    info = call.maybe_info(0)
    outs = tensors(call.out)
    if info is None or info.axis not in (None, 1) or call.args[0].dim() < 3:
        return unknown(tracer, call)
    tracer.set_info(outs[0], TensorInfo(outs[0].shape, info.axis, info.ids, info.zero))
    for t in outs[1:]:
        tracer.set_info(t, TensorInfo.const(t.shape))


@rule(*REDUCE_OPS)
def reduce(tracer: "Tracer", call: Call) -> None:
    """A reduction over other axes keeps the channels; over the channel axis it has no rule."""
    name, args, kwargs = call.name, call.args, call.kwargs
    info = call.maybe_info(0)
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
    if name == "norm":
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
    if info is None or dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return unknown(tracer, call)
    nd = len(info.shape)
    dims = {d % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    outs = tensors(call.out)
    if info.axis in dims:
        return unknown(tracer, call)
    axis = info.axis if (info.axis is None or keepdim) else info.axis - sum(d < info.axis for d in dims)
    tracer.set_info(outs[0], TensorInfo(outs[0].shape, axis, info.ids, info.zero))
    for t in outs[1:]:
        tracer.set_info(t, TensorInfo.const(t.shape))


@rule("max", "min")
def max_min(tracer: "Tracer", call: Call) -> None:
    """``max(a, b)`` of two tensors is elementwise; ``max(x, dim)`` a reduction."""
    if len(call.args) > 1 and isinstance(call.args[1], torch.Tensor):
        return binary(tracer, call)
    return reduce(tracer, call)
