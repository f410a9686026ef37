"""Masks that narrow a Hugging Face encoder's hidden size (the residual stream), for ``norm_spans="prune"``.

The hidden size is one set of channels running through the whole encoder: the word/position/token-type
embedding columns, every LayerNorm, the rows of every Linear that writes into the residual stream
(attention output projection, FFN output) and the columns of every Linear reading it (Q/K/V, FFN input,
pooler). Speedup with ``norm_spans="prune"`` removes a channel exactly when the masked model has it zero
everywhere in the stream: the masks must name the embedding columns, the LayerNorms' weight and bias and
the writing Linears' rows and biases (the readers' columns then read zeros and go by themselves).
:func:`hidden_masks` writes exactly those masks, choosing the channels by L1 norm (the sum over every
tensor of the stream of the channel's absolute weights) or taking them from ``keep``.

The stream is found by the channel trace (``trace_channels(..., norm_spans="prune")``): the channel
classes the model's norms span, so BERT, RoBERTa, DistilBERT and MiniLM need no per-model table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..graph.trace import as_input_tuple, trace_channels

__all__ = ["hidden_masks"]


def hidden_masks(
    model: nn.Module, example_inputs: Any, *, sparsity: float | None = None, keep: torch.Tensor | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Masks ``{module: {param: bool}}`` removing hidden channels of ``model``'s residual stream.

    ``example_inputs``: the model's inputs, e.g. ``(input_ids, attention_mask)`` (batch, seq) or a dict.
    Exactly one of ``sparsity`` (share of the hidden channels to remove, by smallest L1 norm over the
    stream's tensors) and ``keep`` ((hidden,) bool, True = keep, in the order of the stream's channels:
    the channels most of the model's LayerNorms span, so ELECTRA's narrower embedding size is not taken).
    Channels speedup must keep whatever the masks say (pinned by the trace: tied weights such as a masked-LM
    decoder sharing the word embeddings, layer outputs returned with ``output_hidden_states=True``) are never
    chosen. Raises ``ValueError`` naming the reason when more channels are asked than can go, or ``keep``
    drops such a channel; also when the model has no prunable norm-spanned stream (no LayerNorm owning
    its affine weight), when ``keep`` has the wrong length, or when nothing or everything would go.
    ``model`` is not modified. Pass the masks to ``speedup(..., norm_spans="prune")``.
    """
    if (sparsity is None) == (keep is None):
        raise ValueError("hidden_masks: give exactly one of sparsity= and keep=")
    trace = trace_channels(model, as_input_tuple(example_inputs, model), norm_spans="prune")
    if not trace.norms:
        raise ValueError("hidden_masks: the model has no LayerNorm spanning its hidden size that speedup can narrow "
                         "(a norm must own its affine weight and normalise the last axis)")
    roots = trace.roots()
    spans: dict[tuple[int, ...], int] = {}  # the channel classes a norm spans -> how many norms span them
    for ids in list(trace.norms.values()) + list(trace.widened_norms.values()):
        key = tuple(roots[ids].tolist())
        spans[key] = spans.get(key, 0) + 1
    # the residual stream is what most norms span (ELECTRA/ALBERT: the embedding LayerNorm spans the
    # narrower embedding size, projected to the hidden size by a Linear)
    stream = torch.tensor(max(spans, key=lambda k: spans[k]))  # (hidden,) class of each hidden channel
    width = stream.numel()
    pinned = trace.blocked_roots(roots, live=False)[stream]  # (hidden,) True where speedup must keep the channel
    why = sorted({reason for ids, reason in zip(trace.pinned, trace.pin_reasons) if bool(torch.isin(roots[ids], stream).any())})
    index = torch.full((len(roots),), -1, dtype=torch.long)
    index[stream] = torch.arange(width)  # class root -> hidden channel
    modules = dict(model.named_modules())
    tensors: list[tuple[str, str, int, torch.Tensor]] = []  # (module, attr, axis, hidden channel per slice)
    for name, rec in trace.producers.items():
        ch = index[roots[rec.out_ids]]
        if bool((ch >= 0).any()):
            tensors.append((name, rec.weight_attr, 0, ch))
            if getattr(modules[name], rec.bias_attr, None) is not None:
                tensors.append((name, rec.bias_attr, 0, ch))
    for (mname, attr), sl in trace.params.items():
        ch = index[roots[sl.ids.clamp(min=0)]]
        ch[sl.ids < 0] = -1
        if bool((ch >= 0).any()) and attr in modules[mname]._parameters:
            tensors.append((mname, attr, sl.axis, ch))
    for name, ids in trace.widened_norms.items():  # the last norm: masked too, so the output is zero there
        ch = index[roots[ids.clamp(min=0)]]
        for attr in ("weight", "bias"):
            if isinstance(getattr(modules[name], attr, None), nn.Parameter):
                tensors.append((name, attr, 0, ch))
    if keep is None:
        assert sparsity is not None
        if not 0 < sparsity < 1:
            raise ValueError(f"hidden_masks: sparsity must be in (0, 1), got {sparsity!r}")
        score = torch.zeros(width, dtype=torch.float64)
        for mname, attr, axis, ch in tensors:
            if isinstance(modules[mname], nn.modules.normalization.LayerNorm) or attr.endswith("bias"):
                continue  # L1 of the weights that carry the channel: embedding columns, writing rows
            t = getattr(modules[mname], attr).detach().abs().double().movedim(axis, 0).reshape(ch.numel(), -1).sum(1)
            score.index_add_(0, ch[ch >= 0], t[ch >= 0])
        n_drop = int(round(sparsity * width))
        if n_drop > int((~pinned).sum()):
            raise ValueError(f"hidden_masks: {int(pinned.sum())} of the {width} hidden channels cannot be removed exactly "
                             f"({'; '.join(why[:3])}); asked to remove {n_drop}")
        score[pinned] = float("inf")
        keep = torch.ones(width, dtype=torch.bool)
        keep[torch.argsort(score, stable=True)[:n_drop]] = False
    keep = torch.as_tensor(keep, dtype=torch.bool).flatten()
    if keep.numel() != width:
        raise ValueError(f"hidden_masks: keep has {keep.numel()} entries, the hidden size is {width}")
    if bool(keep.all()) or not bool(keep.any()):
        raise ValueError("hidden_masks: the masks would remove no hidden channel or all of them")
    if bool((~keep & pinned).any()):
        raise ValueError(f"hidden_masks: hidden channels {torch.nonzero(~keep & pinned).flatten().tolist()[:8]} cannot be "
                         f"removed exactly ({'; '.join(why[:3])}); keep them")
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for mname, attr, axis, ch in tensors:
        t = getattr(modules[mname], attr)
        per = torch.where(ch >= 0, keep[ch.clamp(min=0)], torch.ones_like(ch, dtype=torch.bool))
        shape = [1] * t.dim()
        shape[axis] = -1
        masks.setdefault(mname, {})[attr] = per.reshape(shape).expand_as(t).clone()
    return masks
