"""Ops that read their inputs as values, not as channels: embedding lookups, comparisons and boolean logic.

A Hugging Face encoder calls them on token ids and on the attention mask (``__and__``, ``all``), which
carry no producer channels; their outputs have no channel ids either. An ``embedding`` lookup reads its
indices by value and produces channels: the columns of its weight (see :func:`embedding`). Should a
producer's channels reach one of them, those channels are pinned with the reason named, as for an
op without a rule, but the op itself is known, so no speedup warning lists it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..channels import TensorInfo
from .registry import Call, rule

if TYPE_CHECKING:
    from ..trace import Tracer

VALUE_OPS = (
    "__and__", "__or__", "__xor__", "__invert__", "logical_and", "logical_or", "logical_not",
    "all", "any", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
)  # fmt: skip


@rule(*VALUE_OPS)
def value_read(tracer: "Tracer", call: Call) -> None:
    """Inputs are read by value (indices, comparisons): their channels stay; outputs carry none."""
    for info in call.before.values():
        tracer.pin(info, f"op {call.name!r} reads them by value")
    tracer.mark_outputs(call.out, lambda t: TensorInfo.const(t.shape))


@rule("embedding")
def embedding(tracer: "Tracer", call: Call) -> None:
    """``F.embedding(indices, weight)``: output channel ``c`` (last axis) is column ``c`` of ``weight``.

    ``weight`` (num_embeddings, dim) of a module is a per-channel tensor sliced along axis 1 with the
    channels (Hugging Face's word, position and token-type embeddings then narrow with the hidden size);
    a channel is zero where its column is zero. The indices are read by value (pinned). ``max_norm``
    (rows renormalised across the columns) and weights that are no model parameter pin the output.
    """
    indices, weight = call.args[0], call.arg(1, "weight")
    tracer.pin(call.before.get(id(indices)), "op 'embedding' reads them by value")
    owner = tracer.owner.get(id(weight)) if isinstance(weight, torch.Tensor) else None
    out = call.out
    if owner is None or weight.dim() != 2 or call.arg(3, "max_norm") is not None or not isinstance(out, torch.Tensor):
        return tracer.mark_outputs(out, lambda t: TensorInfo.const(t.shape))
    old = tracer.trace.params.get((owner[0], owner[1]))
    ids = old.ids.clone() if old is not None and old.axis == 1 else tracer.uf.add(weight.shape[1])
    tracer.record_param(owner[0], owner[1], 1, ids)
    zero = (weight.detach() == 0).all(0).cpu()
    tracer.set_info(out, TensorInfo(out.shape, out.dim() - 1, ids, zero))
