"""Hugging Face BERT-family self-attention after its projections shrank (see ``graph/hf_attention.py``).

The trace removes whole heads from ``query``/``key``/``value`` (rows) and from the output projection
(columns); the Hugging Face forward reshapes by ``attention_head_size`` with ``-1`` heads, so it runs
unchanged once the attributes it and its callers read are rewritten: ``num_attention_heads`` and
``all_head_size`` (BERT, RoBERTa, ...) or ``n_heads`` and ``dim`` (DistilBERT); the head width stays.

When every head of a layer goes, the attention contributes only the output projection's bias (its
input is zero), so the residual passes through: the self-attention module becomes :class:`NoHeads`
(a zero-width output, no projections) and every Linear left without inputs becomes
:class:`BiasOnly` (its bias, broadcast), which exports to ONNX without zero-sized matrices.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..graph.hf_attention import HFAttentionSpec, hf_attention_spec

log = logging.getLogger(__name__)

Kept = dict[str, tuple[torch.Tensor, torch.Tensor]]

__all__ = ["BiasOnly", "NoHeads", "fix_hf_attention"]


class NoHeads(nn.Module):
    """A self-attention layer whose heads were all removed: returns ``(hidden[..., :0], None)``.

    ``hidden_states`` is (batch, seq, hidden); the output (batch, seq, 0) feeds the output projection,
    which is then a :class:`BiasOnly`. ``with_projection`` (DistilBERT, whose output projection is
    inside the attention module) returns the projection's bias broadcast to (batch, seq, out) instead.
    """

    def __init__(self, out_bias: torch.Tensor | None = None, out_features: int = 0) -> None:
        super().__init__()
        self.out = BiasOnly(out_bias, out_features) if out_features else None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if self.out is not None:
            return self.out(hidden_states), None
        return hidden_states[..., :0], None


class BiasOnly(nn.Module):
    """A Linear with no input features left: ``x`` (..., 0 or any) -> ``bias`` broadcast to (..., out)."""

    def __init__(self, bias: torch.Tensor | None, out_features: int) -> None:
        super().__init__()
        value = bias.detach().clone() if bias is not None else torch.zeros(out_features)
        self.bias = nn.Parameter(value)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*x.shape[:-1], self.out_features)


def _kept_heads(spec: HFAttentionSpec, q_keep: torch.Tensor, k_keep: torch.Tensor, v_keep: torch.Tensor) -> list[int]:
    per_head = torch.stack([m.view(spec.num_heads, spec.head_size) for m in (q_keep, k_keep, v_keep)], 1).reshape(spec.num_heads, -1)
    whole = per_head.all(1)
    if not bool((whole | ~per_head.any(1)).all()):
        raise RuntimeError(f"{spec.name}: part of a head was removed; heads must be kept or removed whole")
    return torch.nonzero(whole).flatten().tolist()


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def fix_hf_attention(model: nn.Module, kept: Kept) -> None:
    """After producers shrank: rewrite head attributes; replace layers without heads and Linears without inputs."""
    for name, module in list(model.named_modules()):
        spec = hf_attention_spec(name, module)
        if spec is None:
            continue
        names = [f"{name}.{c}" if name else c for c in spec.child_names]
        if not all(n in kept for n in names):
            continue  # the rule did not follow this module: nothing was shrunk
        heads = _kept_heads(spec, *(kept[n][1] for n in names))
        if len(heads) == spec.num_heads:
            continue
        log.info("%s: keeps heads %s of %d (head size %d)", name, heads, spec.num_heads, spec.head_size)
        n = len(heads)
        if spec.kind == "bert":
            module.num_attention_heads, module.all_head_size = n, n * spec.head_size
        else:
            module.n_heads, module.dim = n, n * spec.head_size
        if n == 0:
            out = spec.out
            new = NoHeads(out.bias, out.out_features) if out is not None else NoHeads()
            new.train(module.training)
            _set_child(model, name, new)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.in_features == 0:
            _set_child(model, name, BiasOnly(module.bias, module.out_features))
