"""Per-layer distillation signal for a head-pruned BERT-family student: MiniLM's self-attention relations.

The student of a head/FFN prune keeps the teacher's depth and hidden size but has fewer heads, so attention
maps cannot be compared head by head. MiniLMv2's *multi-head self-attention relations* (Wang et al., 2021,
"MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained Transformers", eq. 1-3)
work for any head count: a layer's queries ``Q`` (B, T, H*d) — all heads concatenated, the output of the
``query`` Linear — are split into ``A`` *relation heads* of ``H*d / A`` columns each (``A`` is chosen freely and is
the same for teacher and student, whatever their head counts), and each relation head gives the token-token
distribution ``R = softmax(Q_a Q_a^T / sqrt(d_r))`` (B, A, T, T), ``d_r = H*d / A``. Likewise for keys (K-K)
and values (V-V, the value relation of MiniLM, Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for
Task-Agnostic Compression of Pre-Trained Transformers", eq. 8-9). The loss is the KL divergence
``KL(R_teacher || R_student)`` averaged over the batch, the relation heads and the real (non-padding) query
tokens, summed over the relation types. Padding keys get no probability (the attention mask), padding query rows
are left out. MiniLMv2 transfers one (upper-middle or last) layer; here any list of matching layers can be
given (a head/FFN prune keeps every layer, so all of them give signal).

:class:`AttentionRelationLoss` places forward hooks on the ``query``/``key``/``value`` Linears of both models and
returns the loss of the latest forward passes; pass it to :func:`deploycompress.pruning.distill.distill` as
``extra_loss``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import attention_mask_of

log = logging.getLogger(__name__)

__all__ = ["RELATIONS", "AttentionRelationLoss", "RelationHeadsWarning", "relation_kl", "relation_log_probs"]

RELATIONS = ("query", "key", "value")


class RelationHeadsWarning(UserWarning):
    """``heads`` does not divide a transferred layer's width in the teacher: that layer uses fewer relation heads
    (the greatest common divisor) than asked. (A pruned student's narrower layers falling back is expected.)"""


def relation_log_probs(x: torch.Tensor, heads: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log of the self-attention relation ``softmax(X_a X_a^T / sqrt(d_r))`` of ``x`` split into ``heads`` relation heads.

    ``x``: (B, T, C) the concatenated heads' queries, keys or values of one layer; ``C`` must be divisible by
    ``heads`` (``d_r = C / heads``). ``attention_mask``: (B, T), 1 for real tokens, 0 for padding (padding keys
    get probability 0). Returns (B, heads, T, T) log-probabilities over the last axis (MiniLMv2, eq. 1-2).
    Raises ``ValueError`` when ``C`` is not a multiple of ``heads`` or the mask's shape is not (B, T).
    """
    b, t, c = x.shape
    if heads < 1 or c % heads:
        raise ValueError(f"relation_log_probs: {c} columns do not split into {heads} relation heads; pick a divisor of every model's width")
    xa = x.reshape(b, t, heads, c // heads).transpose(1, 2)  # (B, A, T, d_r)
    logits = xa @ xa.transpose(-1, -2) / math.sqrt(c // heads)
    if attention_mask is not None:
        if attention_mask.shape != (b, t):
            raise ValueError(f"relation_log_probs: attention_mask must be {(b, t)}, got {tuple(attention_mask.shape)}")
        logits = logits.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(logits.dtype).min)
    return F.log_softmax(logits, dim=-1)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, heads: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(R_teacher || R_student)`` of one relation type (MiniLMv2, eq. 3), mean over batch, relation heads and real query tokens.

    ``student`` (B, T, C_s) and ``teacher`` (B, T, C_t): the same layer's queries (or keys, or values) in both
    models; ``C_s`` and ``C_t`` may differ (fewer heads), both divisible by ``heads``. ``attention_mask`` (B, T):
    padding keys get no probability and padding query rows are not counted. Returns a scalar (nats); the
    teacher is detached; half-precision inputs (autocast outputs) are computed in float32. Raises ``ValueError`` when the batch/sequence shapes differ.
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"relation_kl: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in batch or sequence")
    student, teacher = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for t in (student, teacher))  # autocast outputs
    log_s = relation_log_probs(student, heads, attention_mask)
    log_t = relation_log_probs(teacher.detach(), heads, attention_mask)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, A, T); padding keys: 0 * (finite) = 0
    if attention_mask is None:
        return kl.mean()
    rows = attention_mask.to(kl.dtype)[:, None, :].expand_as(kl)
    return (kl * rows).sum() / rows.sum().clamp_min(1.0)


class AttentionRelationLoss:
    """MiniLMv2 relation loss between a head-pruned student and its dense teacher (module docstring).

    ``student``, ``teacher``: BERT-family models (e.g. :class:`~deploycompress.hf.Encoder`) whose modules
    ``<prefix>.<i>.attention.self.{query,key,value}`` exist in both; ``layers``: the layer indices to transfer
    (default: every layer); ``relations``: a subset of :data:`RELATIONS` (``("query", "key", "value")``: Q-Q,
    K-K and V-V as in MiniLMv2); ``heads``: relation heads ``A``; where it does not divide a layer's width in both
    models (a layer that kept 5 heads of 32 columns: 160), that layer uses the greatest common divisor of the
    two widths and ``heads`` (logged), e.g. 12 for MiniLM's 384 against a half-pruned 192, 4 against 160.

    ``loss(batch)`` returns the sum over relation types of the mean over layers of :func:`relation_kl` for the
    latest forward passes of both models (the attention mask is taken from ``batch``: ``(input_ids,
    attention_mask)`` or a dict); call it after running both on ``batch``, as ``distill(..., extra_loss=...)``
    does: each pass's outputs serve one call (``RuntimeError`` when a hooked model did not run since the last one). :meth:`remove` takes the hooks off. Raises ``ValueError`` (at construction) for an unknown relation,
    a missing module, or ``heads < 1``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, layers: Sequence[int] | None = None,
                 relations: Sequence[str] = RELATIONS, heads: int = 12) -> None:
        from .importance import _layers

        bad = [r for r in relations if r not in RELATIONS]
        if bad or not relations:
            raise ValueError(f"AttentionRelationLoss: relations must be a non-empty subset of {RELATIONS}, got {list(relations)}")
        if heads < 1:
            raise ValueError(f"AttentionRelationLoss: heads must be >= 1, got {heads}")
        prefix, all_layers = _layers(teacher)
        layers = list(range(len(all_layers))) if layers is None else list(layers)
        self.heads, self.relations = int(heads), tuple(relations)
        self.names = [f"{prefix}.{i}.attention.self.{r}" for i in layers for r in relations]
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}
        self._handles = []
        self.layer_heads = {n: self.heads for n in self.names}  # relation heads per transferred Linear
        try:
            for model, store, whose in ((student, self.student_out, "student"), (teacher, self.teacher_out, "teacher")):
                modules = dict(model.named_modules())
                for n in self.names:
                    if n not in modules:
                        raise ValueError(f"AttentionRelationLoss: the {whose} has no module {n!r}")
                    self.layer_heads[n] = math.gcd(self.layer_heads[n], modules[n].out_features)
                    self._handles.append(modules[n].register_forward_hook(self._keep(store, n)))
        except ValueError:
            self.remove()
            raise
        for n, a in self.layer_heads.items():
            if a != self.heads:
                log.info("AttentionRelationLoss: %s uses %d relation heads (%d does not divide both widths)", n, a, self.heads)
        t_modules = dict(teacher.named_modules())
        odd = sorted({t_modules[n].out_features for n in self.names if t_modules[n].out_features % self.heads})
        if odd:
            import warnings

            warnings.warn(f"AttentionRelationLoss: heads={self.heads} does not divide the teacher's width {odd}: those layers use "
                          f"{sorted({self.layer_heads[n] for n in self.names if t_modules[n].out_features in odd})} relation heads; "
                          f"pick a divisor of {odd[0]}", RelationHeadsWarning, stacklevel=2)

    @staticmethod
    def _keep(store: dict[str, torch.Tensor], name: str):  # noqa: ANN205
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            store[name] = out

        return hook

    def loss(self, batch: Any) -> torch.Tensor:
        mask = attention_mask_of(batch)
        # each forward pass's outputs are used once: a model the hooks are not on (e.g. the new model refit_encoder
        # returned, or a copy) used to be compared through the outputs of an earlier pass, a constant without gradient
        for store, whose in ((self.student_out, "student"), (self.teacher_out, "teacher")):
            missing = [n for n in self.names if n not in store]
            if missing:
                raise RuntimeError(f"AttentionRelationLoss: the {whose}'s {missing[0]!r} did not run since the last loss: run both models on "
                                   "the batch first, and build the loss on the very modules being trained and distilled from (not a copy)")
        outs = {n: (self.student_out.pop(n), self.teacher_out.pop(n)) for n in self.names}
        total = 0.0
        for r in self.relations:
            names = [n for n in self.names if n.endswith("." + r)]
            terms = [relation_kl(*outs[n], self.layer_heads[n], mask) for n in names]
            total = total + sum(terms) / len(terms)
        return total  # type: ignore[return-value]

    __call__ = loss

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
