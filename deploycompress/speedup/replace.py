"""Physically shrink modules and per-channel tensors to the kept channels."""

from __future__ import annotations

import torch
from torch import nn

from ..graph import ChannelTrace, ProducerRecord
from .attention import fix_attention_modules
from .hf_attention import fix_hf_attention
from .norms import narrow_norms, plan_norms
from .resolve import Removal

# module attributes that mirror the length of a per-channel tensor, by the tensor that sets them
# (normalized_shape: LayerNorm, torchvision's LayerNorm2d and RMSNorm pass it to the functional norm)
_WIDTH_ATTRS = {
    "num_features": ("weight", "running_mean"), "num_parameters": ("weight",), "num_channels": ("weight",),
    "normalized_shape": ("weight",),
}  # fmt: skip


def _set_width(module: nn.Module, attr: str, n: int) -> None:
    old = getattr(module, attr, None)
    if isinstance(old, int) and not isinstance(old, bool):
        setattr(module, attr, n)
    elif isinstance(old, tuple) and len(old) == 1:
        setattr(module, attr, (n,))


def _set_tensor(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value.contiguous()


def _shrink_weight(w: torch.Tensor, rec: ProducerRecord, in_keep: torch.Tensor, out_keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """New weight and group count: per group, kept output rows x kept input columns."""
    g = rec.groups
    in_local = in_keep.view(g, -1).to(w.device)
    out_local = out_keep.view(g, -1).to(w.device)
    transposed = rec.kind == "conv_transpose"
    per_in, per_out = in_local.shape[1], out_local.shape[1]
    parts = []
    for gi in range(g):
        if not bool(in_local[gi].any()):
            continue  # a depthwise channel removed with its input
        if transposed:
            block = w[gi * per_in : (gi + 1) * per_in][in_local[gi]][:, out_local[gi]]
        else:
            block = w[gi * per_out : (gi + 1) * per_out][out_local[gi]][:, in_local[gi]]
        parts.append(block)
    return torch.cat(parts, 0), len(parts)


def shrink_producer(module: nn.Module, rec: ProducerRecord, in_keep: torch.Tensor, out_keep: torch.Tensor) -> None:
    if bool(in_keep.all()) and bool(out_keep.all()):
        return
    w = getattr(module, rec.weight_attr).detach()
    if rec.kind == "linear":
        new_w, groups = w[out_keep.to(w.device)][:, in_keep.to(w.device)], 1
    else:
        new_w, groups = _shrink_weight(w, rec, in_keep, out_keep)
    _set_tensor(module, rec.weight_attr, new_w)
    bias = getattr(module, rec.bias_attr, None)
    if bias is not None:
        _set_tensor(module, rec.bias_attr, bias.detach()[out_keep.to(w.device)])
    n_in, n_out = int(in_keep.sum()), int(out_keep.sum())
    if rec.kind == "linear":
        if isinstance(module, nn.Linear):
            module.in_features, module.out_features = n_in, n_out
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.in_channels, module.out_channels, module.groups = n_in, n_out, groups


def shrink_model(model: nn.Module, trace: ChannelTrace, removal: Removal) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Shrink every traced producer and per-channel tensor in place; returns (in_keep, out_keep) per producer.

    Norms narrowed exactly (``speedup.norms``) are listed in ``removal.norms_exact``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    plans = plan_norms(model, trace, removal)  # full-width copies, taken before the slicing below
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, rec in trace.producers.items():
        in_keep, out_keep = removal.keep(rec.in_ids), removal.keep(rec.out_ids)
        shrink_producer(modules[name], rec, in_keep, out_keep)
        kept[name] = (in_keep, out_keep)
    for (mname, attr), sl in trace.params.items():
        keep = removal.keep(sl.ids)
        if bool(keep.all()):
            continue
        module = modules[mname]
        t = getattr(module, attr).detach()
        _set_tensor(module, attr, t.index_select(sl.axis, torch.nonzero(keep).flatten().to(t.device)))
        for width_attr, sources in _WIDTH_ATTRS.items():
            if attr in sources:
                _set_width(module, width_attr, int(keep.sum()))
    fix_attention_modules(model, kept)
    fix_hf_attention(model, kept)
    removal.norms_exact = narrow_norms(model, plans)
    return kept
