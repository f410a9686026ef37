"""Attention modules after their projections shrank: head counts, head widths and sized attributes.

Shrinking the packed q/k/v projection removes whole heads (the trace unites each head's rows), but
the modules around it derive sizes from attributes or from the input width:

- ``nn.MultiheadAttention`` checks ``embed_dim`` against the query and splits heads by
  ``embed_dim // num_heads``: it is replaced by :class:`PrunedMultiheadAttention`, the same eval-mode
  math with its own head count and head width.
- torchvision's Swin attention derives ``head_dim = C // num_heads`` from its input width and keeps a
  per-head position-bias table (V1) or per-head logit scale and bias MLP (V2): those are sliced to
  the kept heads and the module's class becomes a subclass whose forward passes ``head_dim``.
- torchvision's MaxViT attention keeps ``n_heads``/``head_dim`` and a per-head bias table, but reshapes
  its output to the input width: the table is sliced and the forward reshapes to ``n_heads * head_dim``.
- torchvision's ``VisionTransformer`` reshapes by ``hidden_dim``, which follows ``conv_proj``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.attention import AttentionSpec, attention_spec

log = logging.getLogger(__name__)

Kept = dict[str, tuple[torch.Tensor, torch.Tensor]]


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed in-projection) with ``num_heads`` heads of ``head_dim`` each.

    The call signature and eval-mode outputs are those of ``nn.MultiheadAttention``; the scale stays
    ``1 / sqrt(head_dim)`` of the original heads. ``kept_heads`` are the original indices of the heads,
    used to pick a per-head 3-D ``attn_mask``. Averaged attention weights average the kept heads.
    """

    # read by nn.TransformerEncoderLayer: False sends it through this forward, not its fused kernel
    # (which assumes embed_dim == num_heads * head_dim)
    _qkv_same_embed_dim = False

    def __init__(
        self, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None, out_proj: nn.Linear,
        kept_heads: list[int], original_heads: int, head_dim: int, batch_first: bool, dropout: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.in_proj_weight = nn.Parameter(in_proj_weight.detach().clone())
        self.in_proj_bias = nn.Parameter(in_proj_bias.detach().clone()) if in_proj_bias is not None else None
        self.out_proj = out_proj
        self.kept_heads = list(kept_heads)
        self.original_heads = original_heads
        self.num_heads = len(kept_heads)
        self.head_dim = head_dim
        self.batch_first = batch_first
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, H * hd) -> (N, H, L, hd)."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive (N, H, L, S) mask (or broadcastable) from nn.MultiheadAttention's mask arguments."""

        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # (N * original heads, L, S): keep the rows of the kept heads
                mask = mask.view(n, self.original_heads, mask.shape[-2], mask.shape[-1])[:, self.kept_heads]
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).view(n, 1, 1, -1)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask, as in nn.MultiheadAttention")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        if not self.batch_first or not batched:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            ws = self.in_proj_weight.chunk(3)
            bs = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), ws, bs))
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn = (q * math.sqrt(1.0 / float(self.head_dim))) @ k.transpose(-2, -1)
        mask = self._mask(attn_mask, key_padding_mask, q.shape[0], q.dtype)
        if mask is not None:
            attn = attn + mask
        attn = F.softmax(attn, dim=-1)
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        out = (attn @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = attn.mean(dim=1) if average_attn_weights else attn
        return out, weights if batched else weights.squeeze(0)


def window_attention(
    x: torch.Tensor, qkv: nn.Linear, proj: nn.Linear, relative_position_bias: torch.Tensor, window_size: list[int],
    num_heads: int, head_dim: int, shift_size: list[int], logit_scale: torch.Tensor | None = None,
    attention_dropout: float = 0.0, dropout: float = 0.0, training: bool = False,
) -> torch.Tensor:  # fmt: skip
    """torchvision's ``shifted_window_attention`` with the head width given, not ``C // num_heads``."""
    B, H, W, C = x.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift = [0 if window_size[i] >= (pad_H, pad_W)[i] else shift_size[i] for i in range(2)]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n_h, n_w = pad_H // window_size[0], pad_W // window_size[1]
    num_windows, n = n_h * n_w, window_size[0] * window_size[1]
    x = x.view(B, n_h, window_size[0], n_w, window_size[1], C).permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, n, C)
    qkv_bias = qkv.bias
    if logit_scale is not None and qkv_bias is not None:  # V2 has no key bias
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    q, k, v = F.linear(x, qkv.weight, qkv_bias).reshape(x.size(0), n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(n_h, window_size[0], n_w, window_size[1]).permute(0, 2, 1, 3).reshape(num_windows, n)
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, n, n) + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), n, num_heads * head_dim)
    x = F.dropout(proj(x), p=dropout, training=training)
    c_out = x.shape[-1]
    x = x.view(B, n_h, n_w, window_size[0], window_size[1], c_out).permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, c_out)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def _swin_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return window_attention(
        x, self.qkv, self.proj, self.get_relative_position_bias(), self.window_size, self.num_heads, self.head_dim,
        self.shift_size, getattr(self, "logit_scale", None), self.attention_dropout, self.dropout, self.training,
    )  # fmt: skip


def _maxvit_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's forward with the output reshaped to ``heads * head_dim`` instead of the input width."""
    B, G, P, _ = x.shape
    H, DH = self.n_heads, self.head_dim
    q, k, v = (t.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4) for t in torch.chunk(self.to_qkv(x), 3, dim=-1))
    dot_prod = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k * self.scale_factor)
    dot_prod = F.softmax(dot_prod + self.get_relative_positional_bias(), dim=-1)
    out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot_prod, v)
    return self.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, H * DH))


_PRUNED_SWIN = {"PrunedShiftedWindowAttention": "ShiftedWindowAttention", "PrunedShiftedWindowAttentionV2": "ShiftedWindowAttentionV2"}
_PRUNED_MAXVIT = {"PrunedRelativePositionalMultiHeadAttention": "RelativePositionalMultiHeadAttention"}
_made: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """The pruned Swin classes are made on first use (torchvision stays optional) yet pickle by name."""
    if name not in _PRUNED_SWIN and name not in _PRUNED_MAXVIT:
        raise AttributeError(name)
    if name not in _made:
        from torchvision.models import maxvit, swin_transformer

        if name in _PRUNED_SWIN:
            base, forward = getattr(swin_transformer, _PRUNED_SWIN[name]), _swin_forward
        else:
            base, forward = getattr(maxvit, _PRUNED_MAXVIT[name]), _maxvit_forward
        doc = f"{base.__name__} with pruned heads: its forward does not derive head widths from the input width."
        _made[name] = type(name, (base,), {"forward": forward, "__module__": __name__, "__doc__": doc})
    return _made[name]


def _kept_heads(spec: AttentionSpec, out_keep: torch.Tensor) -> tuple[list[int], int]:
    """Kept head indices and the head width, from the q/k/v projection's kept rows."""
    per_head = out_keep.view(3, spec.num_heads, -1).transpose(0, 1).reshape(spec.num_heads, -1)
    whole = per_head.all(1)
    if not bool((whole | ~per_head.any(1)).all()):
        raise RuntimeError(f"{spec.name}: part of a head was removed; heads must be kept or removed whole")
    return torch.nonzero(whole).flatten().tolist(), per_head.shape[1] // 3


def _replace_mha(model: nn.Module, spec: AttentionSpec, kept: list[int], head_dim: int) -> None:
    mha = spec.qkv
    new = PrunedMultiheadAttention(
        mha.in_proj_weight, mha.in_proj_bias, mha.out_proj, kept, int(getattr(mha, "original_heads", spec.num_heads)),
        head_dim, bool(mha.batch_first), float(mha.dropout),
    )  # fmt: skip
    if isinstance(mha, PrunedMultiheadAttention):  # pruned again: map to the heads of the first model
        new.kept_heads = [mha.kept_heads[h] for h in kept]
    new.train(mha.training)
    parent_name, _, child = spec.name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _slice_param(module: nn.Module, attr: str, axis: int, index: list[int]) -> None:
    old = getattr(module, attr)
    new = old.detach().index_select(axis, torch.tensor(index, device=old.device)).contiguous()
    setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))


def _fix_swin(spec: AttentionSpec, kept: list[int], head_dim: int) -> None:
    module = spec.module
    v2 = hasattr(module, "cpb_mlp")
    if v2:
        _slice_param(module, "logit_scale", 0, kept)
        last = module.cpb_mlp[-1]
        if last.out_features != len(kept):  # the trace did not shrink it with the heads
            _slice_param(last, "weight", 0, kept)
            if last.bias is not None:
                _slice_param(last, "bias", 0, kept)
            last.out_features = len(kept)
    else:
        _slice_param(module, "relative_position_bias_table", 1, kept)
    module.num_heads = len(kept)
    module.head_dim = head_dim
    module.__class__ = __getattr__("PrunedShiftedWindowAttentionV2" if v2 else "PrunedShiftedWindowAttention")


def _fix_maxvit(spec: AttentionSpec, kept: list[int], head_dim: int) -> None:
    module = spec.module
    _slice_param(module, "relative_position_bias_table", 1, kept)
    module.n_heads, module.head_dim = len(kept), head_dim
    module.__class__ = __getattr__("PrunedRelativePositionalMultiHeadAttention")


def _fix_vit(module: nn.Module) -> None:
    """torchvision's VisionTransformer reshapes patches by ``hidden_dim``: it must follow ``conv_proj``."""
    convs = [m for m in module.conv_proj.modules() if isinstance(m, nn.Conv2d)] if hasattr(module, "conv_proj") else []
    if convs and isinstance(getattr(module, "hidden_dim", None), int):
        module.hidden_dim = convs[-1].out_channels  # conv_proj, or the last conv of a conv stem


def fix_attention_modules(model: nn.Module, kept: Kept) -> None:
    """After producers shrank: rebuild or patch every attention module whose projections changed."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "VisionTransformer":
            _fix_vit(module)
        spec = attention_spec(name, module)
        if spec is None:
            continue
        qkv_name = next((f"{name}.{child}" for child, m in module.named_children() if m is spec.qkv), name)
        if qkv_name not in kept:
            continue  # the rule did not follow this module: nothing was shrunk
        in_keep, out_keep = kept[qkv_name]
        if bool(in_keep.all()) and bool(out_keep.all()):
            continue
        heads, head_dim = _kept_heads(spec, out_keep)
        log.debug("%s: keeps heads %s of %d (head_dim %d)", name, heads, spec.num_heads, head_dim)
        if spec.kind == "mha":
            _replace_mha(model, spec, heads, head_dim)
        elif spec.kind == "maxvit":
            _fix_maxvit(spec, heads, head_dim)
        else:  # a narrower input alone breaks torchvision's C // num_heads too
            _fix_swin(spec, heads, head_dim)
