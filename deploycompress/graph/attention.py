"""Channel rules for attention modules, applied to the module as a whole.

Why whole modules: inside attention a tensor's channels are split into heads x head_dim, q and k
meet in a matmul and v is mixed across positions; one id per slice along one axis cannot express
that op by op, so every inner op would pin. At module level the structure is simple: the packed
q/k/v projection is one producer, each head's q, k and v rows form one channel class (a head is
removed whole or not at all), and the output projection reads the v rows. A head is removable
exactly when no output projection column reads a non-zero v row of it; q/k rows are never "live"
on their own, because a head whose values are zero adds nothing whatever its attention weights.

Known types: ``nn.MultiheadAttention`` with a packed in-projection (``kdim == vdim == embed_dim``),
the pruned replacement speedup builds for it, and torchvision's Swin ``ShiftedWindowAttention``
(V1 and V2) and MaxViT's ``RelativePositionalMultiHeadAttention``, recognised by class path so
torchvision stays optional.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .channels import TensorInfo

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .trace import Tracer

log = logging.getLogger(__name__)

SWIN_CLASSES = {
    "torchvision.models.swin_transformer.ShiftedWindowAttention",
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2",
}
MAXVIT_CLASS = "torchvision.models.maxvit.RelativePositionalMultiHeadAttention"
PRUNED_MHA_CLASS = "deploycompress.speedup.attention.PrunedMultiheadAttention"


@dataclass
class AttentionSpec:
    """Where one attention module keeps its projections: what the rule and speedup need."""

    name: str
    module: nn.Module
    kind: str  # "mha" | "swin" | "maxvit"
    qkv: nn.Module  # owner of the packed (3 * heads * head_dim, in) projection
    weight_attr: str
    bias_attr: str
    out: nn.Module  # the output projection (an nn.Linear)
    num_heads: int
    head_rows: nn.Module | None = None  # a Linear inside, traced as usual, whose output row h belongs to head h (Swin V2's bias MLP)


def _class_paths(module: nn.Module) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}


def attention_spec(name: str, module: nn.Module) -> AttentionSpec | None:
    """The spec of a known attention module, None for any other module."""
    paths = _class_paths(module)
    if isinstance(module, nn.MultiheadAttention) or PRUNED_MHA_CLASS in paths:
        return AttentionSpec(name, module, "mha", module, "in_proj_weight", "in_proj_bias", module.out_proj, int(module.num_heads))
    if paths & SWIN_CLASSES:
        mlp = getattr(module, "cpb_mlp", None)
        head_rows = mlp[-1] if isinstance(mlp, nn.Sequential) and isinstance(mlp[-1], nn.Linear) else None
        return AttentionSpec(name, module, "swin", module.qkv, "weight", "bias", module.proj, int(module.num_heads), head_rows)
    if MAXVIT_CLASS in paths:  # q, k, v chunks of (heads, head_dim) rows, like the others
        return AttentionSpec(name, module, "maxvit", module.to_qkv, "weight", "bias", module.merge, int(module.n_heads))
    return None


def projection_attrs(module: nn.Module) -> tuple[str, str]:
    """Names of the weight and bias whose rows are a producer module's output channels (for masks)."""
    if getattr(module, "in_proj_weight", None) is not None and not hasattr(module, "weight"):
        return "in_proj_weight", "in_proj_bias"  # nn.MultiheadAttention and its pruned replacement
    return "weight", "bias"


def _supported(spec: AttentionSpec) -> str | None:
    """Why the rule cannot follow this module (None: it can)."""
    if getattr(spec.qkv, spec.weight_attr, None) is None:
        return "separate q/k/v projections (kdim or vdim != embed_dim)"
    if spec.kind == "mha" and (getattr(spec.qkv, "bias_k", None) is not None or getattr(spec.qkv, "add_zero_attn", False)):
        return "bias_k/bias_v or add_zero_attn"
    rows = getattr(spec.qkv, spec.weight_attr).shape[0]
    if rows % (3 * spec.num_heads):
        return f"q/k/v projection rows {rows} not divisible by 3 x {spec.num_heads} heads"
    return None


def _inputs(spec: AttentionSpec, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors the q/k/v projection reads: (query, key, value) for MHA, the one input for Swin."""
    if spec.kind != "mha":
        return [args[0] if args else kwargs["x"]]
    names = ("query", "key", "value")
    got = [kwargs[n] if n in kwargs else args[i] for i, n in enumerate(names)]
    unique: list[torch.Tensor] = []
    for t in got:
        if not any(t is u for u in unique):
            unique.append(t)
    return unique


def _apply_rule(tracer: "Tracer", spec: AttentionSpec, args: tuple, kwargs: dict, output: Any) -> None:
    inputs = _inputs(spec, args, kwargs)
    outs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    reason = _supported(spec)
    if reason is None and len({t.shape[-1] for t in inputs}) != 1:
        reason = "query, key and value of different widths"
    if reason is not None:
        log.debug("%s: %s; its inputs are kept whole", spec.name, reason)
        _opaque(tracer, spec, inputs, outs)
        return
    in_ids, in_zero = tracer.channel_vec(inputs[0], inputs[0].dim() - 1)
    for other in inputs[1:]:  # the same projection columns read query, key and value
        ids, zero = tracer.channel_vec(other, other.dim() - 1)
        tracer.couple(in_ids, ids)
        in_ids, in_zero = torch.where(in_ids >= 0, in_ids, ids), in_zero & zero
    weight, bias = getattr(spec.qkv, spec.weight_attr), getattr(spec.qkv, spec.bias_attr, None)
    qkv_name = tracer.owner[id(weight)][0]
    qkv, qkv_zero = tracer.record_producer(qkv_name, "linear", weight, bias, in_ids, in_zero)
    heads = qkv.out_ids.view(3, spec.num_heads, -1)  # (q/k/v, head, head_dim)
    per_head = heads.transpose(0, 1).reshape(spec.num_heads, -1)
    tracer.uf.union_many(per_head[:, :1].expand_as(per_head), per_head)  # a head goes whole or not at all
    rows = _head_rows_record(tracer, spec)
    if rows is not None:
        if rows.out_ids.numel() != spec.num_heads:
            raise ValueError(f"{rows.name} has {rows.out_ids.numel()} outputs for {spec.num_heads} heads")
        tracer.uf.union_many(per_head[:, 0], rows.out_ids)
    out_name = tracer.owner[id(spec.out.weight)][0]
    out, out_zero = tracer.record_producer(out_name, "linear", spec.out.weight, spec.out.bias, heads[2].reshape(-1), qkv_zero.view(3, -1)[2])
    first = outs[0]
    tracer.set_info(first, TensorInfo(first.shape, first.dim() - 1, out.out_ids, out_zero))
    for t in outs[1:]:  # attention weights: one slice per head when not averaged, else constant
        axis = t.dim() - 3
        if axis >= 0 and t.shape[axis] == spec.num_heads:
            tracer.set_info(t, TensorInfo(t.shape, axis, per_head[:, 0].clone(), torch.zeros(spec.num_heads, dtype=torch.bool)))
        else:
            tracer.set_info(t, TensorInfo.const(t.shape))


def _head_rows_record(tracer: "Tracer", spec: AttentionSpec) -> Any:
    if spec.head_rows is None:
        return None
    return tracer.trace.producers.get(tracer.owner[id(spec.head_rows.weight)][0])


def _opaque(tracer: "Tracer", spec: AttentionSpec, inputs: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    tracer.trace.unknown_ops.add(type(spec.module).__name__)
    for t in inputs:
        tracer.pin(tracer.info(t), f"attention {spec.name!r} ({type(spec.module).__name__}) has no channel rule for this call")
    rows = _head_rows_record(tracer, spec)
    if rows is not None:  # its outputs feed untraced code: keep them
        tracer.pin(rows.out_ids, f"attention {spec.name!r} runs untraced")
    for t in outs:
        tracer.set_info(t, TensorInfo.const(t.shape))


def install_module_rules(model: nn.Module, tracer: "Tracer") -> list["RemovableHandle"]:
    """Hook every known attention module of ``model``: its inner calls run untraced, its rule runs after.

    The rule runs while the trace mode is active; ``tracer.opaque`` stays raised until it is done, so
    the rule's own torch calls pass through untraced.
    """
    handles = []
    for name, module in model.named_modules():
        spec = attention_spec(name, module)
        if spec is None:
            continue

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            tracer.opaque += 1

        def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any, spec: AttentionSpec = spec) -> None:
            try:
                if tracer.opaque == 1:  # an attention module nested in another is covered by the outer rule
                    _apply_rule(tracer, spec, args, kwargs, output)
            except Exception as exc:  # a rule that cannot follow this call must not break the forward pass
                log.debug("attention rule for %s failed (%s); pinning its inputs", spec.name, exc)
                _opaque(tracer, spec, _inputs(spec, args, kwargs), [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)])
            finally:
                tracer.opaque -= 1

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
        if spec.head_rows is not None:
            handles += _traced_inside(tracer, getattr(module, "cpb_mlp"))
    return handles


def _traced_inside(tracer: "Tracer", child: nn.Module) -> list["RemovableHandle"]:
    """Trace ``child`` as usual although its parent runs untraced (its widths prune like any MLP's)."""
    saved: list[int] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        saved.append(tracer.opaque)
        tracer.opaque = 0

    def post(mod: nn.Module, args: tuple, output: Any) -> None:
        tracer.opaque = saved.pop()

    return [child.register_forward_pre_hook(pre), child.register_forward_hook(post)]
