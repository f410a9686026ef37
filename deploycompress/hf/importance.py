"""Which heads and FFN channels of a BERT-family encoder matter, measured on real text.

A head's importance is the mean norm (over tokens) of what it adds to the residual stream: its context vectors
through its columns of the attention output projection, ``||ctx_h W_o[:, h]^T||`` per token (the
norm-based analysis of Kobayashi et al., 2020, "Attention is Not Only a Weight: Analyzing
Transformers with Vector Norms"). An FFN channel's importance is likewise ``mean |GELU(x)_j| *
||W_2[:, j]||``: what it writes into the residual. Weight norms alone (L1 of the query/key/value rows)
ignore the data and the output projection; on all-MiniLM-L6-v2 at 50% heads + 50% FFN they keep
cosine 0.507 to the dense embeddings before distillation, these scores 0.587.

:func:`importance_masks` turns the scores into the masks ``speedup`` takes (whole heads in
query/key/value, FFN rows in ``intermediate.dense``), the same share in every layer.
:func:`bias_compensation` measures what the removed heads and FFN channels wrote into the residual
stream on average and :func:`apply_bias_compensation` adds it to the output projections' biases of
the pruned model (the baseline bias compensation of FLAP: An et al., 2024, "Fluctuation-based
Adaptive Structured Pruning for Large Language Models", eq. 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..batches import batch_list
from ..pruning.distill import eval_mode
from ..pruning.evaluator import _call
from .tokens import keep_rows, token_rows

__all__ = ["EncoderImportance", "apply_bias_compensation", "bias_compensation", "encoder_importance", "importance_masks", "layer_masks"]


@dataclass
class EncoderImportance:
    """``heads``: (layers, heads) scores; ``ffn``: (layers, intermediate) scores; higher = keep."""

    heads: torch.Tensor
    ffn: torch.Tensor
    prefix: str  # module path of the layer list inside the scored model, e.g. "model.encoder.layer"


_LAYOUT = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")
"""The submodules every layer of a BERT-style ``encoder.layer`` list has (BertLayer, RobertaLayer, ElectraLayer, ...)."""


def _layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, layers)`` of the model's BERT-style ``encoder.layer`` list; ``ValueError`` naming what is missing
    when there is none or a layer lacks a submodule of :data:`_LAYOUT` (MPNet's ``attention.attn``), before any work."""
    for name, module in model.named_modules():
        if name.endswith("encoder.layer") and isinstance(module, nn.ModuleList):
            for i, layer in enumerate(module):
                names = dict(layer.named_modules())
                if type(names.get("attention.self")).__name__ == "NoHeads":  # speedup's whole-attention removal
                    raise ValueError(f"{name}.{i}: every head of this layer was removed (speedup replaced its self-attention by NoHeads); "
                                     "these encoder helpers need at least one head per layer: keep one (importance_masks and "
                                     "reconstruction_masks always do)")
                missing = [p for p in _LAYOUT if p not in names]
                if missing or not hasattr(names["attention.self"], "num_attention_heads"):
                    raise ValueError(f"{name}.{i} ({type(layer).__name__}) has no {(missing or ['attention.self.num_attention_heads'])[0]}: "
                                     f"only the BERT layer layout ({', '.join(_LAYOUT)}) is supported (BERT, RoBERTa, XLM-R, ELECTRA, "
                                     "MiniLM; not MPNet)")
            return name, module
    raise ValueError("no BERT-style encoder.layer list found (BertModel, RobertaModel, ELECTRA and MiniLM checkpoints have one; "
                     "DistilBERT's transformer.layer and MPNet are not supported)")


def encoder_importance(model: nn.Module, batches: Iterable[Any], count_padding: bool = False) -> EncoderImportance:
    """Scores of every head and FFN channel (module docstring) over ``batches`` (inputs as ``model``
    takes them, e.g. ``(input_ids, attention_mask)`` for :class:`~deploycompress.hf.Encoder`).
    Means over the real tokens (attention mask 1, :func:`deploycompress.hf.tokens.token_rows`): the scores of each
    sentence run alone, unpadded; ``count_padding=True`` counts the padding tokens too.
    The model is only read (eval mode, no grads; every module's training flag is restored)."""
    prefix, layers = _layers(model)
    batches = batch_list(batches, "batches")  # a single tensor or dict is refused by name
    n_heads = [int(layer.attention.self.num_attention_heads) for layer in layers]
    width = [int(layer.attention.self.attention_head_size) for layer in layers]
    heads = torch.zeros(len(layers), max(n_heads))
    ffn = torch.zeros(len(layers), max(int(layer.intermediate.dense.out_features) for layer in layers))
    tokens = [0] * len(layers)
    hooks = []
    rows: dict[str, torch.Tensor | None] = {"keep": None}  # the current batch's real tokens
    for i, layer in enumerate(layers):
        w_o, w_2 = layer.attention.output.dense.weight, layer.output.dense.weight

        def on_context(_m: nn.Module, inp: tuple, i: int = i, w_o: torch.Tensor = w_o) -> None:
            x = keep_rows(inp[0].detach(), rows["keep"], f"encoder_importance ({prefix}.{i})")
            for h in range(n_heads[i]):
                cols = slice(h * width[i], (h + 1) * width[i])
                heads[i, h] += (x[..., cols] @ w_o[:, cols].detach().T).norm(dim=-1).sum()

        def on_ffn(_m: nn.Module, inp: tuple, i: int = i, w_2: torch.Tensor = w_2) -> None:
            x = keep_rows(inp[0].detach(), rows["keep"], f"encoder_importance ({prefix}.{i})")
            ffn[i, : x.shape[-1]] += x.abs().sum(0) * w_2.detach().norm(dim=0)
            tokens[i] += x.shape[0]

        hooks += [layer.attention.output.dense.register_forward_pre_hook(on_context), layer.output.dense.register_forward_pre_hook(on_ffn)]
    try:
        with eval_mode(model), torch.no_grad():
            for b in batches:
                rows["keep"] = None if count_padding else token_rows(b)
                _call(model, b)
    finally:
        for h in hooks:
            h.remove()
    if not tokens[0]:
        raise ValueError("batches is empty (or all padding): give at least one batch of real inputs")
    per_token = torch.tensor(tokens, dtype=torch.float32).view(-1, 1)
    return EncoderImportance(heads / per_token, ffn / per_token, prefix)


def importance_masks(model: nn.Module, scores: EncoderImportance, head_sparsity: float, ffn_sparsity: float) -> dict[str, dict[str, torch.Tensor]]:
    """Masks removing the ``head_sparsity`` share of heads and ``ffn_sparsity`` of FFN channels with the
    lowest scores in every layer (at least one head stays). Keys are ``model``'s module names (the
    model the scores were measured on); values ``{"weight", "bias"}`` masks as ``speedup`` takes them."""
    for name, value in (("head_sparsity", head_sparsity), ("ffn_sparsity", ffn_sparsity)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    prefix, layers = _layers(model)
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for i, layer in enumerate(layers):
        n = int(layer.attention.self.num_attention_heads)
        keep_h = torch.zeros(n, dtype=torch.bool)
        keep_h[scores.heads[i, :n].topk(max(1, n - int(round(head_sparsity * n)))).indices] = True
        m = layer.intermediate.dense.out_features
        keep_f = torch.zeros(m, dtype=torch.bool)
        keep_f[scores.ffn[i, :m].topk(max(1, m - int(round(ffn_sparsity * m)))).indices] = True
        masks.update(layer_masks(model, prefix, i, keep_h, keep_f))
    return masks


def layer_masks(model: nn.Module, prefix: str, i: int, keep_heads: torch.Tensor, keep_ffn: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """``speedup`` masks of layer ``i`` of ``model`` (its layer list at ``prefix``) keeping the heads where
    ``keep_heads`` (heads,) is true (whole heads: the same rows of query, key and value) and the FFN channels
    where ``keep_ffn`` (intermediate,) is true (rows of ``intermediate.dense``): ``{name: {"weight", "bias"}}``."""
    layer = model.get_submodule(f"{prefix}.{i}")
    att = layer.attention.self
    n, d = int(att.num_attention_heads), int(att.attention_head_size)
    if keep_heads.shape != (n,) or keep_ffn.shape != (layer.intermediate.dense.out_features,):
        raise ValueError(f"layer {i}: keep_heads must be ({n},) and keep_ffn ({layer.intermediate.dense.out_features},), "
                         f"got {tuple(keep_heads.shape)} and {tuple(keep_ffn.shape)}")
    masks = {}
    rows = keep_heads.bool().repeat_interleave(d).float()
    for proj in ("query", "key", "value"):
        w = getattr(att, proj).weight
        masks[f"{prefix}.{i}.attention.self.{proj}"] = {"weight": rows.view(-1, 1).expand_as(w).clone(), "bias": rows.clone()}
    dense = layer.intermediate.dense
    keep_f = keep_ffn.float()
    masks[f"{prefix}.{i}.intermediate.dense"] = {"weight": keep_f.view(-1, 1).expand_as(dense.weight).clone(), "bias": keep_f.clone()}
    return masks


def bias_compensation(model: nn.Module, masks: dict[str, dict[str, torch.Tensor]], batches: Iterable[Any],
                      count_padding: bool = False) -> dict[str, torch.Tensor]:
    """What the units ``masks`` removes (as :func:`importance_masks` writes them: rows of
    ``attention.self.query``, of ``intermediate.dense``) add to each layer's output on average over
    ``batches``: ``{output Linear name: (hidden,) bias delta}``, for ``attention.output.dense``
    ``W_o[:, removed] @ mean(context[..., removed])`` and for ``output.dense``
    ``W_2[:, removed] @ mean(GELU(x)[..., removed])`` (means over the real tokens of every batch, padding left out
    unless ``count_padding``, as :func:`encoder_importance`).
    ``model`` is the dense model the masks were made for (only read). Adding the deltas to the
    pruned model's biases (:func:`apply_bias_compensation`) replaces each removed unit by its mean
    output instead of zero (FLAP's bias compensation). Raises ``ValueError`` for an empty ``batches``
    or masks naming no known layer."""
    prefix, layers = _layers(model)
    batches = batch_list(batches, "batches")  # a single tensor or dict is refused by name
    removed: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for i in range(len(layers)):
        q, f = masks.get(f"{prefix}.{i}.attention.self.query"), masks.get(f"{prefix}.{i}.intermediate.dense")
        removed[i] = (None if q is None else q["bias"] == 0, None if f is None else f["bias"] == 0)
    if all(q is None and f is None for q, f in removed.values()):
        raise ValueError(f"masks name no {prefix}.<i>.attention.self.query or .intermediate.dense: nothing to compensate")
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    hooks = []
    rows: dict[str, torch.Tensor | None] = {"keep": None}  # the current batch's real tokens
    for i, layer in enumerate(layers):
        for module, rm, name in ((layer.attention.output.dense, removed[i][0], "attention.output.dense"), (layer.output.dense, removed[i][1], "output.dense")):
            if rm is None or not bool(rm.any()):
                continue
            key = f"{prefix}.{i}.{name}"

            def keep(_m: nn.Module, inp: tuple, key: str = key) -> None:
                x = keep_rows(inp[0].detach(), rows["keep"], f"bias_compensation ({key})")
                sums[key] = sums.get(key, 0) + x.double().sum(0)
                count[key] = count.get(key, 0) + x.shape[0]

            hooks.append(module.register_forward_pre_hook(keep))
    n_batches = 0
    try:
        with eval_mode(model), torch.no_grad():
            for b in batches:
                rows["keep"] = None if count_padding else token_rows(b)
                _call(model, b)
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if not n_batches:
        raise ValueError("batches is empty: give at least one batch of real inputs")
    deltas = {}
    for key, total in sums.items():
        i = int(key[len(prefix) + 1 :].split(".")[0])
        rm = removed[i][0 if key.endswith("attention.output.dense") else 1]
        w = model.get_submodule(key).weight.detach()
        mean = (total / count[key]).to(w.dtype) * rm.to(w.dtype)  # the model's dtype (float64 models too)
        deltas[key] = w @ mean
    return deltas


def apply_bias_compensation(pruned: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add ``deltas`` (from :func:`bias_compensation`) to the biases of ``pruned``'s Linears of those
    names, in place (the pruned model is the caller's to change: e.g. the model ``speedup`` returned).
    Raises ``ValueError`` for a name missing, without a bias, or of another width (nothing changed)."""
    targets = {}
    for key, delta in deltas.items():
        try:
            m = pruned.get_submodule(key)
        except AttributeError:
            raise ValueError(f"the pruned model has no module {key!r}") from None
        if getattr(m, "bias", None) is None or m.bias.shape != delta.shape:
            raise ValueError(f"{key!r} has no bias of shape {tuple(delta.shape)} to compensate")
        targets[key] = m
    with torch.no_grad():
        for key, m in targets.items():
            m.bias += deltas[key].to(m.bias.dtype)
