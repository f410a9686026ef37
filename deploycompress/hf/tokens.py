"""Which tokens of a text batch are real: the one rule every calibration statistic of :mod:`deploycompress.hf` uses
(the least-squares refit and selection of :mod:`.refit`, the scores and means of :mod:`.importance`, the relation
loss of :mod:`.distill_losses`). Padding tokens (attention mask 0) are left out: their hidden states are whatever
the model computes for a token nobody reads, and in padding-heavy batches they outnumber the real ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["attention_mask_of", "keep_rows", "token_rows"]


def attention_mask_of(batch: Any, names: Sequence[str] = ("input_ids", "attention_mask")) -> Any:
    """The attention mask of a batch: a dict's ``"attention_mask"``, or in a tuple/list the element at the position of
    ``"attention_mask"`` in ``names`` (the model's forward parameters in order; the default reads
    ``(input_ids, attention_mask, ...)``); None otherwise (no such name, or the tuple is shorter)."""
    if isinstance(batch, dict):
        return batch.get("attention_mask")
    names = list(names)
    if isinstance(batch, (tuple, list)) and "attention_mask" in names and names.index("attention_mask") < len(batch):
        return batch[names.index("attention_mask")]
    return None


def token_rows(batch: Any) -> torch.Tensor | None:
    """The real (non-padding) tokens of a text batch, (B, T) bool: its attention mask (:func:`attention_mask_of`) != 0;
    None for a batch without one (every token counts). ``ValueError`` when that item is not a (B, T) tensor."""
    mask = attention_mask_of(batch)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise ValueError(f"the batch's attention mask (its second item or 'attention_mask') must be a (batch, sequence) tensor, got "
                         f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}; pass count_padding=True to count every token")
    return mask != 0


def keep_rows(x: torch.Tensor, keep: torch.Tensor | None, where: str) -> torch.Tensor:
    """``x`` (B, T, C) as (M, C) rows: the tokens where ``keep`` (B, T) is true (None: all). ``ValueError`` naming
    ``where`` when the shapes do not match (a module that does not see one row per token)."""
    if keep is None:
        return x.reshape(-1, x.shape[-1])
    if tuple(x.shape[:-1]) != tuple(keep.shape):
        raise ValueError(f"{where}: inputs of shape {tuple(x.shape)} do not have one row per token of the attention mask {tuple(keep.shape)}; "
                         "pass count_padding=True")
    return x[keep]
