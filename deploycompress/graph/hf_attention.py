"""Channel rules for Hugging Face encoder self-attention (BERT family), applied to the module as a whole.

Hugging Face BERT-style layers keep query, key and value in three ``nn.Linear`` children and reshape
their outputs by ``attention_head_size`` into heads (``view(*shape, -1, head_size)``), then run either
the eager softmax path or ``scaled_dot_product_attention``. Traced op by op, every view/matmul inside
would pin; traced as a unit the structure is simple (as for ``nn.MultiheadAttention`` in
:mod:`.attention`):

- ``query``, ``key`` and ``value`` are producers reading the same input; rows ``h * head_size ...
  (h + 1) * head_size - 1`` of all three belong to head ``h``, and a head is one channel class
  (removed whole or not at all);
- the attention output (before the output projection) carries the value rows' ids: its channel
  ``c`` is ``sum_j p_j v_j[c]`` with softmax weights that sum to one, so it is zero exactly when
  value row ``c`` is zero (weights and bias) and is then removable with the whole head;
- the output projection (``BertSelfOutput.dense``, outside the module; DistilBERT's ``out_lin``,
  inside it) is an ordinary Linear traced as usual on those ids, so its columns follow the heads.

Known types, by duck typing restricted to classes defined in ``transformers``:
``*SelfAttention`` with ``query``/``key``/``value`` Linears and ``num_attention_heads`` /
``attention_head_size`` (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM checkpoints, which are BertModels) and
with ``q_lin``/``k_lin``/``v_lin``/``out_lin`` and ``n_heads`` (DistilBERT). A call with a cache or
encoder hidden states (decoder or cross attention) is not followed: its inputs are kept whole.
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

__all__ = ["HFAttentionSpec", "hf_attention_spec", "install_hf_rules"]


@dataclass
class HFAttentionSpec:
    """Where one Hugging Face self-attention module keeps its projections and head attributes."""

    name: str
    module: nn.Module
    kind: str  # "bert" | "distilbert"
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear | None  # the output projection when it lives inside the module (DistilBERT)
    num_heads: int
    head_size: int

    @property
    def child_names(self) -> tuple[str, str, str]:
        return ("query", "key", "value") if self.kind == "bert" else ("q_lin", "k_lin", "v_lin")


def _from_transformers(module: nn.Module) -> bool:
    cls = type(module)
    return any(c.__module__.startswith("transformers.") and c.__name__.endswith("SelfAttention") for c in cls.__mro__)


def hf_attention_spec(name: str, module: nn.Module) -> HFAttentionSpec | None:
    """The spec of a Hugging Face BERT-family self-attention module (pruned or not); None otherwise."""
    if not _from_transformers(module):
        return None
    children = dict(module.named_children())
    if all(isinstance(children.get(n), nn.Linear) for n in ("query", "key", "value")) and isinstance(
        getattr(module, "num_attention_heads", None), int
    ):
        heads, size = int(module.num_attention_heads), int(module.attention_head_size)
        return HFAttentionSpec(name, module, "bert", children["query"], children["key"], children["value"], None, heads, size)
    if all(isinstance(children.get(n), nn.Linear) for n in ("q_lin", "k_lin", "v_lin", "out_lin")) and isinstance(
        getattr(module, "n_heads", None), int
    ):
        heads = int(module.n_heads)
        size = int(getattr(module, "attention_head_size", module.q_lin.out_features // max(heads, 1)))
        return HFAttentionSpec(name, module, "distilbert", module.q_lin, module.k_lin, module.v_lin, module.out_lin, heads, size)
    return None


def _unsupported(spec: HFAttentionSpec, args: tuple, kwargs: dict) -> str | None:
    """Why the rule cannot follow this call (None: it can)."""
    for key in ("cache", "past_key_values", "past_key_value", "encoder_hidden_states", "head_mask"):
        if kwargs.get(key) is not None:
            return f"called with {key}"
    rows = {spec.q.out_features, spec.k.out_features, spec.v.out_features}
    if len(rows) != 1 or rows.pop() != spec.num_heads * spec.head_size:
        return f"q/k/v rows differ from {spec.num_heads} heads x {spec.head_size}"
    if len({spec.q.in_features, spec.k.in_features, spec.v.in_features}) != 1:
        return "q, k and v read inputs of different widths"
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.shape[-1] != spec.q.in_features:
        return "its input is not a (..., hidden) tensor"
    return None


class _Rule:
    """Hooks of one module: projections recorded before the call, outputs' channel records after it."""

    def __init__(self, tracer: "Tracer", spec: HFAttentionSpec) -> None:
        self.tracer, self.spec = tracer, spec
        self.followed: list[bool] = []  # one entry per active call (nested calls are covered by the outer rule)
        self.v_ids = self.v_zero = None

    def _name(self, linear: nn.Linear) -> str:
        return self.tracer.owner[id(linear.weight)][0]

    def pre(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        tracer, spec = self.tracer, self.spec
        outer = tracer.opaque == 0
        tracer.opaque += 1
        followed = False
        if outer:
            x = args[0] if args else kwargs.get("hidden_states")
            reason = _unsupported(spec, args, kwargs)
            if reason is None:
                try:
                    self._record(x)
                    followed = True
                except Exception as exc:  # a rule that cannot follow this call must not break the forward pass
                    reason = f"rule failed ({exc})"
            if reason is not None:
                log.debug("%s: %s; its inputs are kept whole", spec.name, reason)
                tracer.trace.unknown_ops.add(type(mod).__name__)
                tracer.pin(tracer.info(x), f"attention {spec.name!r} ({type(mod).__name__}) is not followed: {reason}")
        self.followed.append(followed)

    def _record(self, x: torch.Tensor) -> None:
        tracer, spec = self.tracer, self.spec
        in_ids, in_zero = tracer.channel_vec(x, x.dim() - 1)
        recs, zeros = [], []
        for lin in (spec.q, spec.k, spec.v):
            rec, zero = tracer.record_producer(self._name(lin), "linear", lin.weight, lin.bias, in_ids, in_zero)
            recs.append(rec)
            tracer.trace.may_vanish.add(rec.name)  # speedup replaces a layer without heads (NoHeads)
            zeros.append(zero)
        per_head = torch.stack([r.out_ids.view(spec.num_heads, spec.head_size) for r in recs], 1).reshape(spec.num_heads, -1)
        tracer.uf.union_many(per_head[:, :1].expand_as(per_head), per_head)  # a head goes whole or not at all
        self.v_ids, self.v_zero = recs[2].out_ids.clone(), zeros[2].clone()
        self.head_ids = per_head[:, 0].clone()

    def out_pre(self, mod: nn.Module, args: tuple) -> None:
        """DistilBERT's out_lin: traced as usual, on an input that carries the value rows' ids."""
        self.saved_opaque = self.tracer.opaque
        if self.followed and self.followed[-1] and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            self.tracer.set_info(x, TensorInfo(x.shape, x.dim() - 1, self.v_ids.clone(), self.v_zero.clone()))
            self.tracer.opaque = 0

    def out_post(self, mod: nn.Module, args: tuple, output: Any) -> None:
        self.tracer.opaque = self.saved_opaque

    def post(self, mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        tracer, spec = self.tracer, self.spec
        try:
            followed = self.followed.pop()
            if tracer.opaque != 1:
                return
            outs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
            if not outs:
                return
            first = outs[0]
            if not followed:
                for t in outs:
                    tracer.set_info(t, TensorInfo.const(t.shape))
                return
            if spec.kind == "bert":
                tracer.set_info(first, TensorInfo(first.shape, first.dim() - 1, self.v_ids.clone(), self.v_zero.clone()))
            elif tracer.info(first) is None:  # out_lin did not run traced: nothing follows its output
                tracer.set_info(first, TensorInfo.const(first.shape))
            for t in outs[1:]:  # attention probabilities (batch, heads, query, key): one slice per head
                if t.dim() == 4 and t.shape[1] == spec.num_heads:
                    tracer.set_info(t, TensorInfo(t.shape, 1, self.head_ids.clone(), torch.zeros(spec.num_heads, dtype=torch.bool)))
                else:
                    tracer.set_info(t, TensorInfo.const(t.shape))
        finally:
            tracer.opaque -= 1


def install_hf_rules(model: nn.Module, tracer: "Tracer") -> list["RemovableHandle"]:
    """Hook every Hugging Face BERT-family self-attention module of ``model`` (see the module docstring)."""
    handles = []
    for name, module in model.named_modules():
        spec = hf_attention_spec(name, module)
        if spec is None:
            continue
        r = _Rule(tracer, spec)
        handles.append(module.register_forward_pre_hook(r.pre, with_kwargs=True))
        handles.append(module.register_forward_hook(r.post, with_kwargs=True))
        if spec.out is not None:
            handles.append(spec.out.register_forward_pre_hook(r.out_pre))
            handles.append(spec.out.register_forward_hook(r.out_post))
    return handles
