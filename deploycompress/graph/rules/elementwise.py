"""Rules of elementwise ops: unary ops keep channels; binary ops couple them (a residual add)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..channels import CONST, TensorInfo
from .registry import Call, rule, unknown

if TYPE_CHECKING:
    from ..trace import Tracer

UNARY_OPS = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "hardswish", "hardswish_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "softplus", "tanh", "tanh_",
    "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "neg", "__neg__", "abs", "sqrt", "square",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "erf", "sin", "cos", "log_sigmoid", "logsigmoid",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "float", "half", "double", "to", "type", "type_as", "contiguous", "clone", "detach", "cpu", "cuda",
    "requires_grad_", "reciprocal", "rsqrt", "sign", "softsign", "tanhshrink", "threshold",
}  # fmt: skip
ADD_OPS = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub",
           "maximum", "minimum", "fmax", "fmin"}  # fmt: skip
MUL_OPS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"}
DIV_OPS = {"div", "div_", "__truediv__", "__itruediv__", "true_divide", "divide"}


@rule(*UNARY_OPS)
def unary(tracer: "Tracer", call: Call) -> None:
    """Same channels out; a zero channel stays zero when the op maps 0 to 0 (probed on a scalar)."""
    args, out = call.args, call.out
    info = call.maybe_info(0)
    if info is None or not isinstance(out, torch.Tensor) or out.shape != info.shape:
        return unknown(tracer, call)
    keeps_zero = True
    if bool(info.zero.any()):
        probe = torch.zeros((), dtype=args[0].dtype if args[0].is_floating_point() else torch.float32)
        kw = {k: v for k, v in call.kwargs.items() if k != "inplace"}
        try:
            keeps_zero = bool(call.func(probe, *args[1:], **kw) == 0)
        except Exception:  # noqa: BLE001 - an op we cannot probe: assume it breaks zeros
            keeps_zero = False
    tracer.set_info(out, TensorInfo(info.shape, info.axis, info.ids, info.zero & keeps_zero))


@rule("pow", "__pow__")
def power(tracer: "Tracer", call: Call) -> None:
    """``x ** c`` is unary; a tensor exponent has no rule."""
    if isinstance(call.args[1] if len(call.args) > 1 else None, torch.Tensor):
        return unknown(tracer, call)
    return unary(tracer, call)


@rule(*ADD_OPS, *MUL_OPS, *DIV_OPS, "__rtruediv__", "where")
def binary(tracer: "Tracer", call: Call) -> None:
    """Operands' channels coupled (union) slice by slice; a constant operand that varies along the
    channels is recorded as a per-channel parameter (or pins them when it is not a parameter)."""
    name, args, out, before = call.name, call.args, call.out, call.before
    if not isinstance(out, torch.Tensor):
        return unknown(tracer, call)
    if name == "where":
        tracer.pin(tracer.info(args[0]), "where() condition")
        ops = list(args[1:3])
    else:
        ops = list(args[:2])
    shape, nd = out.shape, out.dim()
    traced, consts = [], []
    for i, op in enumerate(ops):
        if isinstance(op, torch.Tensor) and before.get(id(op)) is not None:
            traced.append((i, op, before[id(op)]))
        else:
            consts.append((i, op))
    axes = {info.axis + nd - len(info.shape) for _, _, info in traced if info.axis is not None}
    zeros: list[tuple[int, torch.Tensor]] = []
    if len(axes) <= 1:
        axis = next(iter(axes), None)
        size = shape[axis] if axis is not None else 1
        ids = torch.full((size,), CONST, dtype=torch.long)
        for _, _, info in traced:
            vec = info.ids.expand(size)
            tracer.uf.union_many(ids, vec)
            ids = torch.where(ids >= 0, ids, vec)
            zeros.append((0, info.zero.expand(size)))
        for i, c in consts:
            zeros.append((i, _const_zero(c, nd, axis, size)))
            _const_param(tracer, name, c, nd, axis, ids)
        result = TensorInfo(shape, axis, ids, _combine_zero(name, zeros))
    else:  # ids vary along different axes: couple element by element
        labels = torch.full(shape, float(CONST), dtype=torch.float64)
        zero_parts = []
        for i, _, info in traced:
            lab, z = info.materialize()
            lab = lab.expand(shape)
            tracer.uf.union_many(labels.long(), lab.long())
            labels = torch.where(labels >= 0, labels, lab)
            zero_parts.append((i, z.expand(shape) > 0.5))
        for i, c in consts:
            zero_parts.append((i, (c == 0).cpu().expand(shape) if isinstance(c, torch.Tensor) else torch.tensor(c == 0).expand(shape)))
            if isinstance(c, torch.Tensor) and c.numel() > 1:
                ids = labels[labels >= 0].long().unique()
                tracer.pin(ids, f"{name}() with a constant tensor across channels")
        result = tracer.canon(labels, _combine_zero(name, zero_parts).double())
    tracer.set_info(out, result)


def _combine_zero(name: str, zeros: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Zero flags of the result: any zero factor (mul), the dividend (div), every zero term (add)."""
    parts = [z for _, z in zeros]
    if name in MUL_OPS:
        z = parts[0]
        for p in parts[1:]:
            z = z | p
        return z
    if name in DIV_OPS:
        return next(z for i, z in zeros if i == 0)
    if name == "__rtruediv__":
        return next(z for i, z in zeros if i == 1)
    z = parts[0]
    for p in parts[1:]:
        z = z & p
    return z


def _const_zero(c: Any, nd: int, axis: int | None, size: int) -> torch.Tensor:
    if not isinstance(c, torch.Tensor):
        return torch.tensor(bool(c == 0)).expand(size)
    c = c.detach()
    if axis is not None:
        k = axis - (nd - c.dim())
        if 0 <= k < c.dim() and c.shape[k] > 1:
            return (c == 0).movedim(k, 0).reshape(c.shape[k], -1).all(1).cpu()
    return torch.tensor(bool((c == 0).all())).expand(size)


def _const_param(tracer: "Tracer", name: str, c: Any, nd: int, axis: int | None, ids: torch.Tensor) -> None:
    """A constant operand that varies along the channel axis must shrink with it, or pins it."""
    if not isinstance(c, torch.Tensor) or c.numel() <= 1 or not bool((ids >= 0).any()):
        return
    big = [d for d in range(c.dim()) if c.shape[d] > 1]
    k = None if axis is None else axis - (nd - c.dim())
    if axis is None or k is None or k < 0 or k not in big:
        if axis is None:
            tracer.pin(ids[ids >= 0], f"{name}() with a constant tensor across channels")
        return
    owner = tracer.owner.get(id(c))
    if owner is None:  # not a parameter: nothing could shrink with the channels
        tracer.pin(ids[ids >= 0], f"{name}() with a constant tensor that is no parameter")
        return
    tracer.record_param(owner[0], owner[1], k, ids)  # also when it varies along other axes (position embedding)
