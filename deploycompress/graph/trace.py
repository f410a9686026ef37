"""Concrete channel tracing with a ``TorchFunctionMode``.

Why a concrete trace and not torch.fx or torch.export: symbolic tracing fails on models whose
forward branches on tensor values or shapes (torchvision's Swin pads by computed sizes, detection
heads loop over data), and torch.export takes seconds to minutes per model and rejects some
Python. A ``TorchFunctionMode`` sees every torch call of one real forward pass -- module or
functional, Python control flow already resolved -- at the cost of one forward pass. Modules are
recognised by the identity of their parameters, so functional calls such as Swin's
``F.linear(x, self.qkv.weight)`` are seen too. The price: the graph holds for the example input's
code path only (the same limitation as torch.jit.trace), which is what speedup needs.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .attention import install_module_rules
from .channels import CONST, TensorInfo, UnionFind, canonicalize

log = logging.getLogger(__name__)

PRODUCER_OPS = {
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
    "conv_transpose1d": "conv_transpose", "conv_transpose2d": "conv_transpose", "conv_transpose3d": "conv_transpose",
    "linear": "linear",
}  # fmt: skip
UNARY_OPS = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "hardswish", "hardswish_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "softplus", "tanh", "tanh_",
    "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "neg", "__neg__", "abs", "sqrt", "square",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "erf", "sin", "cos", "log_sigmoid", "logsigmoid",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "float", "half", "double", "to", "type", "type_as", "contiguous", "clone", "detach", "cpu", "cuda",
    "requires_grad_", "pow", "__pow__", "reciprocal", "rsqrt", "sign", "softsign", "tanhshrink", "threshold",
}  # fmt: skip
ADD_OPS = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub",
           "maximum", "minimum", "fmax", "fmin"}  # fmt: skip
MUL_OPS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"}
DIV_OPS = {"div", "div_", "__truediv__", "__itruediv__", "true_divide", "divide"}
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
POOL_OPS = {
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    "_max_pool1d", "_max_pool2d", "_max_pool3d", "fn",
}  # fmt: skip
REDUCE_OPS = {"mean", "sum", "amax", "amin", "std", "var", "norm", "max", "min", "nansum", "nanmean"}
_PARAM_JOIN_OPS = {"add", "add_", "__add__", "__radd__", "__iadd__", "cat", "concat", "concatenate"}
BATCHNORM_OPS = {"batch_norm", "instance_norm"}
SPANNING_NORM_OPS = {"layer_norm", "rms_norm"}
NORM_SPANS = ("keep", "prune")  # what speedup does with channels a LayerNorm/RMSNorm/GroupNorm normalises over
IGNORED_OPS = {"__get__", "__set__", "dim", "size", "numel", "__len__", "is_contiguous", "is_floating_point",
               "__format__", "__repr__", "item", "tolist", "__bool__", "__index__", "__int__", "__float__",
               "element_size", "stride", "storage_offset", "data_ptr", "untyped_storage", "__hash__",
               "__setstate__", "__reduce_ex__", "_is_view", "get_device", "has_names"}  # fmt: skip


@dataclass
class ProducerRecord:
    """A Conv/ConvTranspose/Linear module as traced: ids of its output and input channels."""

    name: str
    kind: str  # "conv" | "conv_transpose" | "linear"
    out_ids: torch.Tensor
    in_ids: torch.Tensor
    groups: int
    order: int
    calls: int = 1
    weight_attr: str = "weight"  # nn.MultiheadAttention keeps its packed q/k/v projection in "in_proj_weight"
    bias_attr: str = "bias"


@dataclass
class ParamSlice:
    """A per-channel parameter or buffer (BatchNorm, PReLU, layer scale) indexed by channel ids."""

    module: str
    attr: str
    axis: int
    ids: torch.Tensor


@dataclass
class ChannelTrace:
    """What one forward pass told us about channels; see :func:`trace_channels`."""

    uf: UnionFind
    producers: dict[str, ProducerRecord]
    params: dict[tuple[str, str], ParamSlice]
    pinned: list[torch.Tensor]
    live: list[torch.Tensor]  # ids some consumer reads while they are non-zero
    balances: list[tuple[str, list[torch.Tensor]]]  # (reason, pieces): pieces must keep equal counts
    output: Any = None
    unknown_ops: set[str] = field(default_factory=set)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # norm_spans="prune": norm module -> channel ids
    width_reads: list[torch.Tensor] = field(default_factory=list)  # normalised ids whose width Python code read

    def roots(self) -> torch.Tensor:
        return self.uf.roots()

    def blocked_roots(self, roots: torch.Tensor, *, live: bool) -> torch.Tensor:
        """Per root id: True when the class is pinned (or, with ``live``, read while non-zero)."""
        blocked = torch.zeros(len(roots), dtype=torch.bool)
        for ids in self.pinned + (self.live if live else []):
            if ids.numel():
                blocked[roots[ids]] = True
        return blocked


def _name(func: Callable) -> str:
    return getattr(func, "__name__", "") or ""


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module, zero_dead_norms: bool, norm_spans: str = "keep") -> None:
        super().__init__()
        self.zero_dead_norms = zero_dead_norms
        self.prune_norms = norm_spans == "prune"
        self.width_reads: list[torch.Tensor] = []  # ids of channel axes whose size Python code read
        self.uf = UnionFind()
        self.infos: dict[int, tuple[weakref.ref, TensorInfo]] = {}
        self.owner: dict[int, tuple[str, str, nn.Module]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is not None and id(t) not in self.owner:
                    self.owner[id(t)] = (mname, attr, module)
        self.trace = ChannelTrace(self.uf, {}, {}, [], [], [])
        self._module_ids: dict[str, torch.Tensor] = {}
        self.opaque = 0  # > 0 while a module with its own rule runs: its inner calls are not traced one by one

    # ---- bookkeeping -------------------------------------------------------------------------
    def info(self, t: Any) -> TensorInfo | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.infos.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def set_info(self, t: torch.Tensor, info: TensorInfo) -> None:
        key = id(t)
        infos = self.infos

        def drop(ref: weakref.ref, key: int = key) -> None:
            if key in infos and infos[key][0] is ref:
                del infos[key]

        infos[key] = (weakref.ref(t, drop), info)

    def info_or_const(self, t: torch.Tensor) -> TensorInfo:
        info = self.info(t)
        if info is not None:
            return info
        if t.numel() == 1:
            return TensorInfo.const(t.shape, bool(t.detach().reshape(-1)[0] == 0))
        return TensorInfo.const(t.shape, bool((t.detach() == 0).all()))

    def pin(self, info: TensorInfo | None) -> None:
        if info is not None and info.real_ids().numel():
            self.trace.pinned.append(info.real_ids())

    def mark_outputs(self, out: Any, make: Callable[[torch.Tensor], TensorInfo]) -> None:
        for t in _tensors(out):
            self.set_info(t, make(t))

    def canon(self, labels: torch.Tensor, zero: torch.Tensor) -> TensorInfo:
        return canonicalize(labels, zero, self.uf, self.trace.pinned)

    # ---- dispatch ---------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.opaque:
            return func(*args, **kwargs)
        name = _name(func)
        if name in IGNORED_OPS:
            if self.prune_norms and name in ("size", "__get__"):
                self._width_read(func, name, args, kwargs)
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        traced = [t for t in inputs if self.info(t) is not None]
        if name in PRODUCER_OPS and len(args) > 1 and id(args[1]) in self.owner:
            return self._producer(func, name, args, kwargs)
        if not traced:
            return func(*args, **kwargs)
        if name in BATCHNORM_OPS:
            self._zero_dead_norm(args, kwargs)
        elif self.zero_dead_norms and name in _PARAM_JOIN_OPS:
            self._zero_dead_params(name, args, kwargs)
        before = {id(t): self.info(t) for t in traced}
        out = func(*args, **kwargs)
        handler = self._handler(name, args, kwargs)
        try:
            handler(func, name, args, kwargs, out, before)
        except Exception as exc:  # a rule that cannot follow this call must not break the forward pass
            log.debug("channel rule for %s failed (%s); pinning its inputs", name, exc)
            self._unknown(func, name, args, kwargs, out, before)
        return out

    def _handler(self, name: str, args: tuple, kwargs: dict) -> Callable:
        if name in UNARY_OPS:
            if name in ("pow", "__pow__") and isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
                return self._unknown
            return self._unary
        if name in ADD_OPS or name in MUL_OPS or name in DIV_OPS or name in ("__rtruediv__", "where"):
            return self._binary
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return self._binary
        if name in MOVE_OPS:
            return self._move
        if name in POOL_OPS:
            return self._pool
        if name in REDUCE_OPS:
            return self._reduce
        if name in BATCHNORM_OPS:
            return self._batchnorm
        if name in SPANNING_NORM_OPS:
            return self._layernorm
        if name == "group_norm":
            return self._groupnorm
        if name == "prelu":
            return self._prelu
        if name in ("softmax", "log_softmax"):
            return self._softmax
        return self._unknown

    # ---- rules ------------------------------------------------------------------------------
    def _unknown(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        self.trace.unknown_ops.add(name)
        for info in before.values():
            self.pin(info)
        self.mark_outputs(out, lambda t: TensorInfo.const(t.shape))

    def _unary(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        info = before[id(args[0])] if id(args[0]) in before else None
        if info is None or not isinstance(out, torch.Tensor) or out.shape != info.shape:
            return self._unknown(func, name, args, kwargs, out, before)
        keeps_zero = True
        if bool(info.zero.any()):
            probe = torch.zeros((), dtype=args[0].dtype if args[0].is_floating_point() else torch.float32)
            rest = tuple(a for a in args[1:])
            kw = {k: v for k, v in kwargs.items() if k != "inplace"}
            try:
                keeps_zero = bool(func(probe, *rest, **kw) == 0)
            except Exception:  # noqa: BLE001 - an op we cannot probe: assume it breaks zeros
                keeps_zero = False
        self.set_info(out, TensorInfo(info.shape, info.axis, info.ids, info.zero & keeps_zero))

    def _operands(self, name: str, args: tuple) -> list[Any]:
        if name == "where":
            self.pin(self.info(args[0]))
            return list(args[1:3])
        return list(args[:2])

    def _binary(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        if not isinstance(out, torch.Tensor):
            return self._unknown(func, name, args, kwargs, out, before)
        ops = self._operands(name, args)
        shape, nd = out.shape, out.dim()
        traced, consts = [], []
        for i, op in enumerate(ops):
            if isinstance(op, torch.Tensor) and id(op) in before and before[id(op)] is not None:
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
                self.uf.union_many(ids, vec)
                ids = torch.where(ids >= 0, ids, vec)
                zeros.append((0, info.zero.expand(size)))
            for i, c in consts:
                zeros.append((i, self._const_zero(c, nd, axis, size)))
                self._const_param(c, nd, axis, ids)
            result = TensorInfo(shape, axis, ids, self._combine_zero(name, zeros, size))
        else:  # ids vary along different axes: couple element by element
            full = [(i, info.materialize()) for i, _, info in traced]
            labels = torch.full(shape, float(CONST), dtype=torch.float64)
            zero_parts = []
            for i, (lab, z) in full:
                lab = lab.expand(shape)
                self.uf.union_many(labels.long(), lab.long())
                labels = torch.where(labels >= 0, labels, lab)
                zero_parts.append((i, z.expand(shape) > 0.5))
            for i, c in consts:
                zero_parts.append((i, (c == 0).cpu().expand(shape) if isinstance(c, torch.Tensor) else torch.tensor(c == 0).expand(shape)))
                if isinstance(c, torch.Tensor) and c.numel() > 1:
                    self.pin_labels(labels)
            z = self._combine_zero(name, zero_parts, None)
            result = self.canon(labels, z.double())
        self.set_info(out, result)

    def pin_labels(self, labels: torch.Tensor) -> None:
        ids = labels[labels >= 0].long().unique()
        if ids.numel():
            self.trace.pinned.append(ids)

    def _combine_zero(self, name: str, zeros: list[tuple[int, torch.Tensor]], size: int | None) -> torch.Tensor:
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

    def _const_zero(self, c: Any, nd: int, axis: int | None, size: int) -> torch.Tensor:
        if not isinstance(c, torch.Tensor):
            return torch.tensor(bool(c == 0)).expand(size)
        c = c.detach()
        if axis is not None:
            k = axis - (nd - c.dim())
            if 0 <= k < c.dim() and c.shape[k] > 1:
                return (c == 0).movedim(k, 0).reshape(c.shape[k], -1).all(1).cpu()
        return torch.tensor(bool((c == 0).all())).expand(size)

    def _const_param(self, c: Any, nd: int, axis: int | None, ids: torch.Tensor) -> None:
        """A constant operand that varies along the channel axis must shrink with it, or pins it."""
        if not isinstance(c, torch.Tensor) or c.numel() <= 1 or not bool((ids >= 0).any()):
            return
        big = [d for d in range(c.dim()) if c.shape[d] > 1]
        k = None if axis is None else axis - (nd - c.dim())
        if axis is None or k is None or k < 0 or k not in big:
            if axis is None:
                self.trace.pinned.append(ids[ids >= 0])
            return
        owner = self.owner.get(id(c))
        if owner is None:  # not a parameter: nothing could shrink with the channels
            self.trace.pinned.append(ids[ids >= 0])
            return
        self._record_param(owner[0], owner[1], k, ids)  # also when it varies along other axes (position embedding)

    def _record_param(self, module: str, attr: str, axis: int, ids: torch.Tensor) -> None:
        key = (module, attr)
        old = self.trace.params.get(key)
        if old is None:
            self.trace.params[key] = ParamSlice(module, attr, axis, ids.clone())
            return
        if old.axis != axis or old.ids.numel() != ids.numel():
            self.trace.pinned.extend([old.ids[old.ids >= 0], ids[ids >= 0]])
            return
        self._couple(old.ids, ids)

    def _couple(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Two id vectors that index the same weights: union, and pin ids paired with constants."""
        self.uf.union_many(a, b)
        mixed = (a >= 0) != (b >= 0)
        if bool(mixed.any()):
            self.trace.pinned.append(torch.cat([a[mixed & (a >= 0)], b[mixed & (b >= 0)]]))

    def _owned_base(self, t: torch.Tensor) -> torch.Tensor | None:
        """The model parameter ``t`` is, or whose broadcast view it is (``class_token.expand(n, -1, -1)``)."""
        base = t if id(t) in self.owner else t._base
        if base is None or id(base) not in self.owner or base.dim() != t.dim() or t.data_ptr() != base.data_ptr():
            return None
        return base if all(b in (s, 1) for b, s in zip(base.shape, t.shape)) else None

    def _cat_params(self, args: tuple, kwargs: dict, before: dict) -> None:
        """A parameter (or its expanded view) concatenated along another axis than the channels -- ViT's
        class token -- is sliced with the channels it joins, instead of pinning them as a constant."""
        tensors, dim = _arg(args, kwargs, 0, "tensors"), _arg(args, kwargs, 1, "dim", 0)
        ref = next((before[id(t)] for t in tensors if before.get(id(t)) is not None and before[id(t)].axis is not None), None)
        if ref is None or dim % len(ref.shape) == ref.axis:
            return
        axis = ref.axis
        for t in tensors:
            base = None if id(t) in before or t.dim() != len(ref.shape) else self._owned_base(t)
            if base is None or base.shape[axis] != t.shape[axis]:
                continue
            owner = self.owner[id(base)]
            self._record_param(owner[0], owner[1], axis, ref.ids)
            zero = (t.detach() == 0).movedim(axis, 0).reshape(t.shape[axis], -1).all(1).cpu()
            before[id(t)] = TensorInfo(t.shape, axis, ref.ids, zero)

    def _move(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        if name in ("cat", "concat", "concatenate"):
            self._cat_params(args, kwargs, before)
        def sub(which: int) -> Callable[[Any], Any]:
            def f(x: Any) -> Any:
                if not isinstance(x, torch.Tensor):
                    return x
                info = before.get(id(x)) or self.info_or_const(x)
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
        if name == "pad" and _arg(args, kwargs, 2, "mode", "constant") == "constant":
            value = _arg(args, kwargs, 3, "value", 0.0) or 0.0
            lab_kwargs = dict(kwargs, value=float(CONST))
            zero_kwargs = dict(kwargs, value=1.0 if value == 0 else 0.0)
            lab_args, zero_args = lab_args[:3], zero_args[:3]
        on_labels = {"view": torch.Tensor.reshape, "view_as": torch.Tensor.reshape_as}.get(name, func)
        labels = on_labels(*lab_args, **lab_kwargs)
        zeros = on_labels(*zero_args, **zero_kwargs)
        outs, lab_outs, zero_outs = _tensors(out), _tensors(labels), _tensors(zeros)
        results = [self.canon(lab, z) for lab, z in zip(lab_outs, zero_outs)]
        for t, info in zip(outs, results):
            self.set_info(t, info)
        if name in SLICING_OPS:
            self._check_slicing(name, before.get(id(args[0])), results)

    def _check_slicing(self, name: str, src: TensorInfo | None, results: list[TensorInfo]) -> None:
        """Hard-coded indices along the channel axis would pick other channels once some are removed."""
        if src is None or src.axis is None or not src.real_ids().numel():
            return
        if all(r.axis is not None and torch.equal(r.ids, src.ids) for r in results):
            return
        pieces = [r.ids for r in results]
        if name == "chunk" or (name in ("split", "tensor_split") and len({p.numel() for p in pieces}) == 1):
            if len(pieces) > 1 and torch.equal(torch.cat(pieces), src.ids):
                self.trace.balances.append((name, pieces))
                return
        self.pin(src)

    def _pool(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        info = before.get(id(args[0]))
        first = _tensors(out)[0]
        if info is None or info.axis not in (None, 1) or args[0].dim() < 3:
            return self._unknown(func, name, args, kwargs, out, before)
        self.set_info(first, TensorInfo(first.shape, info.axis, info.ids, info.zero))
        for t in _tensors(out)[1:]:
            self.set_info(t, TensorInfo.const(t.shape))

    def _reduce(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        info = before.get(id(args[0]))
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
        if name == "norm":
            dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
        if info is None or dim is None or (isinstance(dim, (list, tuple)) and not dim):
            return self._unknown(func, name, args, kwargs, out, before)
        nd = len(info.shape)
        dims = {d % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        first = _tensors(out)[0]
        if info.axis in dims:
            return self._unknown(func, name, args, kwargs, out, before)
        axis = info.axis if (info.axis is None or keepdim) else info.axis - sum(d < info.axis for d in dims)
        self.set_info(first, TensorInfo(first.shape, axis, info.ids, info.zero))
        for t in _tensors(out)[1:]:
            self.set_info(t, TensorInfo.const(t.shape))

    def _channel_vec(self, t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, zero) per channel along ``axis``; ids along another axis are pinned and read as constants."""
        info = self.info_or_const(t)
        size = t.shape[axis] if t.dim() else 1
        got = info.along(axis)
        if got is None:
            self.pin(info)
            return torch.full((size,), CONST, dtype=torch.long), torch.zeros(size, dtype=torch.bool)
        ids, zero = got
        if info.axis is None and info.ids[0] < 0 and t.dim() and self.info(t) is None:
            zero = (t.detach() == 0).movedim(axis, 0).reshape(size, -1).all(1).cpu()
        return ids.clone(), zero.clone()

    def _zero_dead_params(self, name: str, args: tuple, kwargs: dict) -> None:
        """A parameter added to (ViT's position embedding) or concatenated with (its class token) channels
        that are exactly zero is zeroed there too: a removed channel must stay zero, as behind a BatchNorm."""
        if name in ("cat", "concat", "concatenate"):
            tensors, dim = list(_arg(args, kwargs, 0, "tensors")), _arg(args, kwargs, 1, "dim", 0)
        else:
            tensors, dim = list(args[:2]), None
        infos = [self.info(t) for t in tensors if isinstance(t, torch.Tensor)]
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
        for t in tensors:
            if not isinstance(t, torch.Tensor) or self.info(t) is not None:
                continue
            base, k = self._owned_base(t), axis - (nd - t.dim())
            if base is None or not 0 <= k < t.dim() or base.shape[k] != zero.numel():
                continue
            with torch.no_grad():
                base.index_fill_(k, torch.nonzero(zero).flatten().to(base.device), 0)

    def _zero_dead_norm(self, args: tuple, kwargs: dict) -> None:
        """Make a BatchNorm output exactly zero where its input channel is: the masked model's contract."""
        if not self.zero_dead_norms:
            return
        x = args[0]
        _, zero = self._channel_vec(x, 1)
        if not bool(zero.any()):
            return
        running_mean, weight, bias = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
        zero = zero.to(x.device)
        with torch.no_grad():
            if weight is not None:
                weight[zero] = 0
                if bias is not None:
                    bias[zero] = 0
            elif running_mean is not None:
                running_mean[zero] = 0

    def _batchnorm(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        x = args[0]
        ids, zero = self._channel_vec(x, 1)
        running_mean, running_var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
        weight, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
        for p in (running_mean, running_var, weight, bias):
            if isinstance(p, torch.Tensor) and id(p) in self.owner:
                owner = self.owner[id(p)]
                self._record_param(owner[0], owner[1], 0, ids)
        if weight is not None:
            out_zero = zero & (weight.detach() == 0).cpu() & ((bias.detach() == 0).cpu() if bias is not None else True)
        elif running_mean is not None:
            out_zero = zero & (running_mean.detach() == 0).cpu()
        else:  # instance norm without affine or running stats: (0 - 0) / sqrt(0 + eps) == 0
            out_zero = zero
        info = self.info(x) if self.info(x) is not None else before.get(id(x))
        axis = 1 if (info is not None and info.axis == 1) else None
        if axis is None:
            ids, out_zero = ids[:1], out_zero[:1].clone() & bool(out_zero.all())
        self.set_info(out, TensorInfo(out.shape, axis, ids, out_zero))

    def _layernorm(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        info = before.get(id(args[0]))
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
        nd = len(info.shape)
        spans = info.axis is None or info.axis >= nd - k
        params = [_arg(args, kwargs, 2, "weight")] + ([_arg(args, kwargs, 3, "bias")] if name == "layer_norm" else [])
        if spans and k == 1 and info.axis == nd - 1 and self._prunable_norm(params, "normalized_shape", info.ids, 1):
            return self.set_info(out, TensorInfo(info.shape, info.axis, info.ids, info.zero.clone()))
        if spans:
            self.pin(info)
        self.set_info(out, TensorInfo(info.shape, info.axis, info.ids, torch.zeros_like(info.zero)))

    def _groupnorm(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        info = before.get(id(args[0]))
        params = [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")]
        groups = int(_arg(args, kwargs, 1, "num_groups")) if self.prune_norms else 1
        if info.axis == 1 and self._prunable_norm(params, "num_channels", info.ids, groups):
            return self.set_info(out, TensorInfo(info.shape, info.axis, info.ids, info.zero.clone()))
        self.pin(info)
        self.set_info(out, TensorInfo(info.shape, info.axis, info.ids, torch.zeros_like(info.zero)))

    def _prunable_norm(self, params: list[Any], width_attr: str, ids: torch.Tensor, groups: int) -> bool:
        """norm_spans="prune": record a norm's affine tensors as sliced with ``ids`` and its groups as a balance.

        Only a norm module that owns its affine weight and stores its width in ``width_attr`` (so speedup
        can rewrite it) qualifies. A zero input channel then counts as zero after the norm too: the
        masks meant to remove it, and removing it is what changes the norm's statistics.
        """
        if not self.prune_norms or not isinstance(params[0], torch.Tensor):
            return False
        owners = [self.owner.get(id(p)) for p in params if p is not None]
        if any(o is None or o[0] != owners[0][0] for o in owners) or any(p.dim() != 1 for p in params if p is not None):
            return False
        module_name, _, module = owners[0]
        width = getattr(module, width_attr, None)
        width = width[-1] if isinstance(width, (tuple, list, torch.Size)) and len(width) == 1 else width
        if width != ids.numel() or ids.numel() % groups:
            return False
        for mname, attr, _ in owners:
            self._record_param(mname, attr, 0, ids)
        if groups > 1:
            self.trace.balances.append((f"groups:{module_name}", list(ids.chunk(groups))))
        self.trace.norms[module_name] = ids.clone()
        return True

    def _width_read(self, func, name, args, kwargs) -> None:  # noqa: ANN001
        """Note ids whose width Python code reads (``x.shape``, ``x.size(-1)``) while norm_spans="prune"."""
        if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") != "shape":
            return
        info = self.info(args[0]) if args else None
        if info is None or info.axis is None:
            return
        dim = _arg(args, kwargs, 1, "dim")
        if dim is None or (isinstance(dim, int) and dim % len(info.shape) == info.axis):
            self.width_reads.append(info.real_ids())

    def read_norm_widths(self) -> list[torch.Tensor]:
        """The normalised channels whose width the code read. A shape computed from them (``C // num_heads``,
        a hard-coded reshape) may not shrink with the norm; speedup pins them only if the narrowed model
        fails, since most reads are harmless (batch sizes, assertion messages)."""
        norm_ids = [ids[ids >= 0] for ids in self.trace.norms.values()]
        if not self.width_reads or not norm_ids:
            return []
        roots = self.uf.roots()
        normed = torch.zeros(len(roots), dtype=torch.bool)
        normed[roots[torch.cat(norm_ids)]] = True
        hits = [ids[normed[roots[ids]]] for ids in self.width_reads]
        return [h for h in hits if h.numel()]

    def _prelu(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        info = before.get(id(args[0]))
        weight = _arg(args, kwargs, 1, "weight")
        if weight.numel() > 1:
            ids, _ = self._channel_vec(args[0], 1)
            owner = self.owner.get(id(weight))
            if owner is None:
                self.pin(info)
            else:
                self._record_param(owner[0], owner[1], 0, ids)
        self.set_info(out, TensorInfo(info.shape, info.axis, info.ids, info.zero))

    def _softmax(self, func, name, args, kwargs, out, before) -> None:  # noqa: ANN001
        info = before.get(id(args[0]))
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None or info.axis is None or dim % len(info.shape) == info.axis:
            self.pin(info)
        self.set_info(out, TensorInfo(info.shape, info.axis, info.ids, torch.zeros_like(info.zero)))

    def _producer(self, func, name: str, args: tuple, kwargs: dict) -> torch.Tensor:  # noqa: ANN001
        kind = PRODUCER_OPS[name]
        x, weight = args[0], args[1]
        bias = _arg(args, kwargs, 2, "bias")
        groups = int(_arg(args, kwargs, 6, "groups", 1)) if kind != "linear" else 1
        in_ids, in_zero = self._channel_vec(x, x.dim() - 1 if kind == "linear" else 1)
        out = func(*args, **kwargs)
        record, out_zero = self.record_producer(self.owner[id(weight)][0], kind, weight, bias, in_ids, in_zero, groups)
        out_axis = out.dim() - 1 if kind == "linear" else 1
        if out.dim() == 0:
            self.set_info(out, TensorInfo.const(out.shape))
        else:
            self.set_info(out, TensorInfo(out.shape, out_axis, record.out_ids, out_zero))
        return out

    def record_producer(
        self, module_name: str, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
        in_ids: torch.Tensor, in_zero: torch.Tensor, groups: int = 1,
    ) -> tuple[ProducerRecord, torch.Tensor]:  # fmt: skip
        """Register one call of a producer: its record (ids), the live input ids, and its output zero flags.

        Shared by functional Conv/Linear calls and composite-module rules (attention projections).
        """
        w = weight.detach()
        if not bool(in_zero.any()) and bool(w.all()):  # dense weights, live inputs: nothing to inspect
            c_out = w.shape[1] * groups if kind == "conv_transpose" else w.shape[0]
            c_in = in_ids.numel()
            contributes, col_zero = torch.ones(c_out, dtype=torch.bool), torch.zeros(in_ids.numel(), dtype=torch.bool)
        elif kind == "conv_transpose":
            c_in, out_per_group = w.shape[0], w.shape[1]
            c_out = out_per_group * groups
            used = (w != 0).flatten(2).any(-1).cpu()  # (in, out/g)
            reads = used & ~in_zero.view(-1, 1)
            contributes = reads.view(groups, c_in // groups, out_per_group).any(1).reshape(-1)
            col_zero = ~used.any(1)
        else:
            c_out, in_per_group = w.shape[0], w.shape[1]
            c_in = in_per_group * groups
            used = (w != 0).reshape(c_out, in_per_group, -1).any(-1).cpu()  # (out, in/g)
            nonzero_in = (~in_zero).view(groups, 1, in_per_group).expand(groups, c_out // groups, in_per_group)
            contributes = (used & nonzero_in.reshape(c_out, in_per_group)).any(1)
            col_zero = ~used.view(groups, c_out // groups, in_per_group).any(1).reshape(-1)
        bias_zero = (bias.detach() == 0).cpu() if bias is not None else torch.ones(c_out, dtype=torch.bool)
        out_zero = ~contributes & bias_zero
        live = in_ids[(in_ids >= 0) & ~in_zero & ~col_zero]
        if live.numel():
            self.trace.live.append(live)
        record = self.trace.producers.get(module_name)
        if record is None:
            out_ids = self.uf.add(c_out)
            record = ProducerRecord(module_name, kind, out_ids, in_ids, groups, len(self.trace.producers))
            owner = self.owner.get(id(weight))
            if owner is not None and owner[0] == module_name:
                record.weight_attr = owner[1]
                if bias is not None and id(bias) in self.owner:
                    record.bias_attr = self.owner[id(bias)][1]
            self.trace.producers[module_name] = record
            self._couple_groups(record, in_ids, c_in, c_out)
        else:
            record.calls += 1
            self._couple(record.in_ids, in_ids)
        return record, out_zero

    def _couple_groups(self, record: ProducerRecord, in_ids: torch.Tensor, c_in: int, c_out: int) -> None:
        g = record.groups
        if g == 1:
            return
        if c_in == g:  # depthwise: output channel o reads input channel o // multiplier only
            src = in_ids.repeat_interleave(c_out // c_in)
            if bool((src < 0).any()):
                self.trace.pinned.append(record.out_ids[src < 0])
            self.uf.union_many(record.out_ids, src)
            return
        self.trace.balances.append((f"groups:{record.name}", list(in_ids.chunk(g))))
        self.trace.balances.append((f"groups:{record.name}", list(record.out_ids.chunk(g))))


def as_input_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a Tensor or a tuple of Tensors, got {type(example_inputs).__name__}")


def check_norm_spans(norm_spans: Any) -> str:
    if norm_spans not in NORM_SPANS:
        raise ValueError(f"norm_spans must be one of {', '.join(map(repr, NORM_SPANS))}, got {norm_spans!r}")
    return norm_spans


def trace_channels(model: nn.Module, example_inputs: Any, *, zero_dead_norms: bool = False, norm_spans: str = "keep") -> ChannelTrace:
    """Run ``model`` once in eval mode and return its channel ids, couplings and pins.

    With ``zero_dead_norms`` the BatchNorm affine parameters behind channels that are exactly zero
    are zeroed in place, so the channel stays zero after the norm (what a mask on a Conv means
    once the Conv is removed); only speedup's own copy of the model is traced that way.
    ``norm_spans="keep"`` pins the channels a LayerNorm/RMSNorm/GroupNorm normalises over (removing
    one changes the statistics); ``"prune"`` lets them go with the norm's affine tensors (GroupNorm:
    equal counts per group) and lists those norms in ``ChannelTrace.norms``.
    """
    check_norm_spans(norm_spans)
    inputs = as_input_tuple(example_inputs)
    training = {m: m.training for m in model.modules()}
    model.eval()
    tracer = _Tracer(model, zero_dead_norms, norm_spans)
    for t in inputs:
        if isinstance(t, torch.Tensor):
            tracer.set_info(t, TensorInfo.const(t.shape))
    hooks = install_module_rules(model, tracer)
    try:
        with torch.no_grad(), tracer:
            output = model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.train(flag)
    for t in _tensors(output):
        tracer.pin(tracer.info(t))
    tracer.trace.width_reads = tracer.read_norm_widths()
    tracer.trace.output = output
    if tracer.trace.unknown_ops:
        log.debug("ops without a channel rule (their inputs are kept whole): %s", sorted(tracer.trace.unknown_ops))
    return tracer.trace
