"""Ops that read their inputs as values, not as channels: embedding lookups, comparisons and boolean logic.

A Hugging Face encoder calls them on token ids and on the attention mask (``embedding``, ``__and__``,
``all``), which carry no producer channels; their outputs have no channel ids either. Should a
producer's channels reach one of them, those channels are pinned with the reason named, as for an
op without a rule, but the op itself is known, so no speedup warning lists it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..channels import TensorInfo
from .registry import Call, rule

if TYPE_CHECKING:
    from ..trace import Tracer

VALUE_OPS = (
    "embedding", "__and__", "__or__", "__xor__", "__invert__", "logical_and", "logical_or", "logical_not",
    "all", "any", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
)  # fmt: skip


@rule(*VALUE_OPS)
def value_read(tracer: "Tracer", call: Call) -> None:
    """Inputs are read by value (indices, comparisons): their channels stay; outputs carry none."""
    for info in call.before.values():
        tracer.pin(info, f"op {call.name!r} reads them by value")
    tracer.mark_outputs(call.out, lambda t: TensorInfo.const(t.shape))
