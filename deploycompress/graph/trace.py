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
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import rules
from .attention import install_module_rules
from .hf_attention import install_hf_rules
from .channels import CONST, TensorInfo, UnionFind, canonicalize
from .rules.producers import PRODUCER_OPS, is_producer_call

log = logging.getLogger(__name__)

NORM_SPANS = ("keep", "prune")  # what speedup does with channels a LayerNorm/RMSNorm/GroupNorm normalises over
IGNORED_OPS = {"__get__", "__set__", "dim", "size", "numel", "__len__", "is_contiguous", "is_floating_point",
               "__format__", "__repr__", "item", "tolist", "__bool__", "__index__", "__int__", "__float__",
               "element_size", "stride", "storage_offset", "data_ptr", "untyped_storage", "__hash__",
               "__setstate__", "__reduce_ex__", "_is_view", "get_device", "has_names"}  # fmt: skip

__all__ = ["ChannelTrace", "ParamSlice", "ProducerRecord", "PRODUCER_OPS", "Tracer", "trace_channels"]


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
    widened_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # "prune": norms whose output is a model output -> input ids
    width_reads: list[torch.Tensor] = field(default_factory=list)  # normalised ids whose width Python code read
    pin_reasons: list[str] = field(default_factory=list)  # why pinned[i] is pinned (same length as pinned)
    pin_by_norm: list[bool] = field(default_factory=list)  # pinned[i] only because norm_spans='keep' keeps a norm whole
    live_reasons: list[str] = field(default_factory=list)  # who reads live[i] while it is non-zero
    dropped: list[Any] = field(default_factory=list)  # zero_dead_norms: rules.dead.DroppedConstant, non-zero slices it zeroed
    may_vanish: set[str] = field(default_factory=set)  # producers speedup may remove whole (a layer's last attention head)

    def pin(self, ids: torch.Tensor, reason: str, *, by_norm: bool = False) -> None:
        """Keep the classes of ``ids`` whole, for ``reason`` (named in the speedup report).

        ``by_norm``: the pin is a norm's under ``norm_spans='keep'`` (``norm_spans='prune'`` would lift it).
        """
        if ids.numel():
            self.pinned.append(ids)
            self.pin_reasons.append(reason)
            self.pin_by_norm.append(by_norm)

    def read_live(self, ids: torch.Tensor, reason: str) -> None:
        """``ids`` are read while non-zero (by ``reason``): they cannot be removed."""
        if ids.numel():
            self.live.append(ids)
            self.live_reasons.append(reason)

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


class Tracer(TorchFunctionMode):
    """The tracer core: channel records of live tensors, the producers and the dispatch to the rules.

    Rules (``deploycompress.graph.rules``) and module rules (``graph.attention``) use its public
    methods: ``info``/``set_info``/``info_or_const``, ``channel_vec``, ``pin``, ``couple``,
    ``record_producer``, ``record_param``, ``owned_base``, ``canon``, and the
    attributes ``trace``, ``uf``, ``owner`` (``id(tensor) -> (module name, attr, module)``) and
    ``opaque`` (> 0 while a module with its own rule runs: its inner calls are not traced one by one).
    """

    def __init__(self, model: nn.Module, zero_dead_norms: bool, norm_spans: str = "keep") -> None:
        super().__init__()
        self.zero_dead_norms = zero_dead_norms
        self.prune_norms = norm_spans == "prune"
        self.output_norms: set[str] = set()  # "prune": norm modules whose output is a model output (see output_norms)
        self.width_reads: list[torch.Tensor] = []  # ids of channel axes whose size Python code read
        self.uf = UnionFind()
        self.infos: dict[int, tuple[weakref.ref, TensorInfo]] = {}
        self.owner: dict[int, tuple[str, str, nn.Module]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is not None and id(t) not in self.owner:
                    self.owner[id(t)] = (mname, attr, module)
        self.trace = ChannelTrace(self.uf, {}, {}, [], [], [])
        self.opaque = 0

    # ---- channel records of tensors ----------------------------------------------------------
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

    def pin(self, info: TensorInfo | torch.Tensor | None, reason: str, *, by_norm: bool = False) -> None:
        """Pin the channels of ``info`` (or a vector of ids) for ``reason`` (``by_norm``: see ``ChannelTrace.pin``)."""
        if isinstance(info, torch.Tensor):
            self.trace.pin(info[info >= 0], reason, by_norm=by_norm)
        elif info is not None:
            self.trace.pin(info.real_ids(), reason, by_norm=by_norm)

    def mark_outputs(self, out: Any, make: Callable[[torch.Tensor], TensorInfo]) -> None:
        for t in rules.tensors(out):
            self.set_info(t, make(t))

    def canon(self, labels: torch.Tensor, zero: torch.Tensor) -> TensorInfo:
        return canonicalize(labels, zero, self.uf, self.trace.pin)

    def channel_vec(self, t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, zero) per channel along ``axis``; ids along another axis are pinned and read as constants."""
        info = self.info_or_const(t)
        size = t.shape[axis] if t.dim() else 1
        got = info.along(axis)
        if got is None:
            self.pin(info, "a producer reads them along another axis than their channel axis")
            return torch.full((size,), CONST, dtype=torch.long), torch.zeros(size, dtype=torch.bool)
        ids, zero = got
        if info.axis is None and info.ids[0] < 0 and t.dim() and self.info(t) is None:
            zero = (t.detach() == 0).movedim(axis, 0).reshape(size, -1).all(1).cpu()
        return ids.clone(), zero.clone()

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
        traced = [t for t in rules.tensors((args, kwargs)) if self.info(t) is not None]
        if not traced and not is_producer_call(self, name, args):
            return func(*args, **kwargs)
        pre = rules.pre_rules(name)
        if pre is not None and traced:
            pre(self, name, args, kwargs)
        before = {id(t): self.info(t) for t in traced}
        out = func(*args, **kwargs)
        call = rules.Call(func, name, args, kwargs, out, before)
        try:
            rules.lookup(name)(self, call)
        except Exception as exc:  # a rule that cannot follow this call must not break the forward pass
            log.debug("channel rule for %s failed (%s); pinning its inputs", name, exc)
            rules.unknown(self, call)
        return out

    # ---- recording -----------------------------------------------------------------------------
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
        self.trace.read_live(live, f"read while non-zero by {module_name!r}")
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
            self.couple(record.in_ids, in_ids)
        return record, out_zero

    def _couple_groups(self, record: ProducerRecord, in_ids: torch.Tensor, c_in: int, c_out: int) -> None:
        g = record.groups
        if g == 1:
            return
        if c_in == g:  # depthwise: output channel o reads input channel o // multiplier only
            src = in_ids.repeat_interleave(c_out // c_in)
            if bool((src < 0).any()):
                self.trace.pin(record.out_ids[src < 0], f"depthwise {record.name!r} reads constant input channels")
            self.uf.union_many(record.out_ids, src)
            return
        self.trace.balances.append((f"groups:{record.name}", list(in_ids.chunk(g))))
        self.trace.balances.append((f"groups:{record.name}", list(record.out_ids.chunk(g))))

    def record_param(self, module: str, attr: str, axis: int, ids: torch.Tensor) -> None:
        key = (module, attr)
        old = self.trace.params.get(key)
        if old is None:
            self.trace.params[key] = ParamSlice(module, attr, axis, ids.clone())
            return
        if old.axis != axis or old.ids.numel() != ids.numel():
            reason = f"{module}.{attr} is read along different axes or widths"
            self.trace.pin(old.ids[old.ids >= 0], reason)
            self.trace.pin(ids[ids >= 0], reason)
            return
        self.couple(old.ids, ids)

    def couple(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Two id vectors that index the same weights: union, and pin ids paired with constants."""
        self.uf.union_many(a, b)
        mixed = (a >= 0) != (b >= 0)
        if bool(mixed.any()):
            self.trace.pin(torch.cat([a[mixed & (a >= 0)], b[mixed & (b >= 0)]]), "the same weights read them and constants in another call")

    def owned_base(self, t: torch.Tensor) -> torch.Tensor | None:
        """The model parameter ``t`` is, or whose broadcast view it is (``class_token.expand(n, -1, -1)``)."""
        base = t if id(t) in self.owner else t._base
        if base is None or id(base) not in self.owner or base.dim() != t.dim() or t.data_ptr() != base.data_ptr():
            return None
        return base if all(b in (s, 1) for b, s in zip(base.shape, t.shape)) else None

    def _width_read(self, func, name, args, kwargs) -> None:  # noqa: ANN001
        """Note ids whose width Python code reads (``x.shape``, ``x.size(-1)``) while norm_spans="prune"."""
        if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") != "shape":
            return
        info = self.info(args[0]) if args else None
        if info is None or info.axis is None:
            return
        dim = rules.arg(args, kwargs, 1, "dim")
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



def as_input_tuple(example_inputs: Any, model: nn.Module | None = None) -> tuple:
    """``example_inputs`` as forward's positional arguments: a tensor, a tuple/list of tensors, or (given
    ``model``) a dict keyed by forward's parameter names, resolved as :func:`deploycompress.tensor_io.name_inputs`
    resolves it for export (parameters left out before the last given one take their defaults)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping) and model is not None:
        from ..tensor_io import name_inputs

        return tuple(name_inputs(model, dict(example_inputs)).args)
    raise TypeError(f"example_inputs must be a Tensor, a tuple of Tensors or a dict of Tensors keyed by forward's "
                    f"parameter names, got {type(example_inputs).__name__}")


def check_norm_spans(norm_spans: Any) -> str:
    if norm_spans not in NORM_SPANS:
        raise ValueError(f"norm_spans must be one of {', '.join(map(repr, NORM_SPANS))}, got {norm_spans!r}")
    return norm_spans


def _pin_tied_parameters(model: nn.Module, tracer: Tracer) -> None:
    """A parameter held by several modules (tied weights: an embedding shared with the output Linear)
    is one tensor: cutting it for one holder would cut it for the others, whose channels are other
    channel spaces. The channels of every layer and per-channel slice that holds one are kept whole."""
    holders: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append(f"{mname}.{attr}" if mname else attr)
    tied = {k: sorted(set(v)) for k, v in holders.items() if len(set(v)) > 1}
    if not tied:
        return
    modules = dict(model.named_modules())

    def reason(module: nn.Module) -> str | None:
        names = [" = ".join(tied[id(p)]) for p in module._parameters.values() if p is not None and id(p) in tied]
        return f"tied weights ({'; '.join(names)}) are one tensor" if names else None

    for name, rec in tracer.trace.producers.items():
        why = reason(modules[name]) if name in modules else None
        if why:
            tracer.pin(rec.out_ids, why)
            tracer.pin(rec.in_ids, why)
    for (mname, attr), sl in tracer.trace.params.items():
        p = getattr(modules.get(mname), attr, None)
        if isinstance(p, torch.Tensor) and id(p) in tied:
            tracer.pin(sl.ids, f"tied weights ({' = '.join(tied[id(p)])}) are one tensor")


OUTPUT_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)  # norms over the last axis whose output speedup can widen back


def output_norms(model: nn.Module, inputs: tuple) -> set[str]:
    """Names of the LayerNorm/RMSNorm modules (exact types) whose output tensor is itself a model output.

    Under ``norm_spans="prune"`` such a norm reads the narrowed stream and gives back the full width (the
    removed channels as the masked model has them), so a model whose output is the normalised stream (a
    Hugging Face encoder's ``last_hidden_state``) keeps its output shape. One extra forward pass with hooks.
    """
    made: dict[int, tuple[str, torch.Tensor]] = {}

    def hook(name: str) -> Callable:
        def record(mod: nn.Module, args: Any, out: Any) -> None:
            made.setdefault(id(out), (name, out))

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if type(m) in OUTPUT_NORM_TYPES]
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return {made[id(t)][0] for t in rules.tensors(out) if id(t) in made and made[id(t)][1] is t}


def trace_channels(model: nn.Module, example_inputs: Any, *, zero_dead_norms: bool = False, norm_spans: str = "keep") -> ChannelTrace:
    """Run ``model`` once in eval mode and return its channel ids, couplings and pins.

    Without options the model is not modified: the zero flags describe the model as it is (the
    user's masked model, in speedup). With ``zero_dead_norms`` the BatchNorm affine parameters (or an
    affine-free norm's running mean) and the parameters added to or concatenated with channels that
    are exactly zero are zeroed in place, so those channels stay zero (speedup's
    ``masked_constants="prune"`` and ``joined_masks``, on private copies); ``ChannelTrace.dropped``
    lists what changed.
    ``norm_spans="keep"`` pins the channels a LayerNorm/RMSNorm/GroupNorm normalises over (removing
    one changes the statistics); ``"prune"`` lets them go with the norm's affine tensors (GroupNorm:
    equal counts per group) and lists those norms in ``ChannelTrace.norms``; a LayerNorm/RMSNorm whose
    output is a model output reads the narrowed channels and keeps its output whole
    (``ChannelTrace.widened_norms``, see :func:`output_norms`).
    """
    check_norm_spans(norm_spans)
    inputs = as_input_tuple(example_inputs, model)
    training = {m: m.training for m in model.modules()}
    model.eval()
    tracer = Tracer(model, zero_dead_norms, norm_spans)
    hooks = []
    try:
        if tracer.prune_norms:
            tracer.output_norms = output_norms(model, inputs)
        for t in inputs:
            if isinstance(t, torch.Tensor):
                tracer.set_info(t, TensorInfo.const(t.shape))
        hooks = install_module_rules(model, tracer) + install_hf_rules(model, tracer)
        with torch.no_grad(), tracer:
            output = model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.train(flag)
    for t in rules.tensors(output):
        tracer.pin(tracer.info(t), "they reach the model output")
    _pin_tied_parameters(model, tracer)
    tracer.trace.width_reads = tracer.read_norm_widths()
    tracer.trace.output = output
    if tracer.trace.unknown_ops:
        log.debug("ops without a channel rule (their inputs are kept whole): %s", sorted(tracer.trace.unknown_ops))
    return tracer.trace
