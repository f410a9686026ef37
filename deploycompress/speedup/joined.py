"""Masks of the parameters joined to masked channels: what deployment removes along with them.

A pruner masks a Conv's output channels; speedup can remove them only if they are exactly zero in
the user's masked model, which a BatchNorm bias, ViT's class token or position embedding, or a
downstream bias on those channels prevents. :func:`joined_masks` runs speedup's own channel analysis
once with those constants dropped, and returns the masks plus a mask for every parameter slice that
speedup would then remove (producer rows and biases, norm affine parameters, per-channel scales,
class token and position-embedding rows, the q/k/v rows of removed heads). Fine-tuning with these
masks attached and then speeding up is exact. Buffers (running statistics) are never masked: an
affine-free norm's running mean keeps its channel, which the speedup report names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..graph import ProducerRecord, trace_channels
from ..graph.trace import as_input_tuple, check_norm_spans
from .core import _user_masked
from .masks import Masks
from .resolve import decide_removals

__all__ = ["joined_masks"]


def _producer_mask(weight: torch.Tensor, rec: ProducerRecord, keep: torch.Tensor) -> torch.Tensor:
    """Weight mask keeping the output channels ``keep`` of a producer (any kind, any groups)."""
    keep = keep.to(weight.device)
    if rec.kind == "conv_transpose":  # weight (in, out / groups, ...): group g's rows read its own out slice
        per_group = keep.view(rec.groups, -1)
        rows = per_group.repeat_interleave(weight.shape[0] // rec.groups, 0)  # (in, out / groups)
        return rows.reshape(rows.shape + (1,) * (weight.dim() - 2)).expand_as(weight)
    return keep.reshape((-1,) + (1,) * (weight.dim() - 1)).expand_as(weight)


def _merge(out: dict[str, dict[str, torch.Tensor]], module: str, attr: str, mask: torch.Tensor) -> None:
    mask = mask.detach().to("cpu", torch.bool)
    old = out.setdefault(module, {}).get(attr)
    out[module][attr] = (mask & old if old is not None else mask).clone()


def joined_masks(model: nn.Module, masks: Masks, example_inputs: Any, *, norm_spans: str = "keep") -> dict[str, dict[str, torch.Tensor]]:
    """``masks`` (as bool tensors) plus masks of every parameter speedup removes with the masked channels.

    ``model`` may carry a pruner's mask parametrizations; it is not modified. Returns a new dict
    ``{module: {param: bool mask}}`` in the layout of ``masks`` (masks of the same tensor are ANDed).
    Raises ``MaskError`` for masks that do not fit ``model``.
    """
    check_norm_spans(norm_spans)
    inputs = as_input_tuple(example_inputs, model)
    work, checked = _user_masked(model, masks, inplace=False)
    trace = trace_channels(work, inputs, zero_dead_norms=True, norm_spans=norm_spans)
    removal = decide_removals(trace)
    out = {name: {attr: m.clone() for attr, m in per.items()} for name, per in checked.items()}
    modules = dict(work.named_modules(remove_duplicate=False))
    for name, rec in trace.producers.items():
        keep = removal.keep(rec.out_ids)
        if bool(keep.all()):
            continue
        module = modules[name]
        weight, bias = getattr(module, rec.weight_attr), getattr(module, rec.bias_attr, None)
        if rec.weight_attr in module._parameters:
            _merge(out, name, rec.weight_attr, _producer_mask(weight, rec, keep))
        if isinstance(bias, torch.Tensor) and rec.bias_attr in module._parameters:
            _merge(out, name, rec.bias_attr, keep)
    for (mname, attr), sl in trace.params.items():
        keep = removal.keep(sl.ids)
        module = modules[mname]
        if bool(keep.all()) or attr not in module._parameters:
            continue  # buffers (running statistics) are not masked
        t = getattr(module, attr)
        shape = [1] * t.dim()
        shape[sl.axis] = -1
        _merge(out, mname, attr, keep.reshape(shape).expand_as(t))
    return out
