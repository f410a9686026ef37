"""A Hugging Face encoder as a plain two-input module: ``(input_ids, attention_mask) -> tensor``."""

from __future__ import annotations

import torch
from torch import nn

POOLING = ("mean", "cls", "none")


class Encoder(nn.Module):
    """Wraps a Hugging Face encoder (``BertModel``, ``RobertaModel``, ``DistilBertModel``, ...).

    ``forward(input_ids, attention_mask)``: both (batch, sequence) int64; returns, by ``pooling``:
    ``"mean"`` -- the attention-mask-weighted mean of the last hidden states, L2-normalised when
    ``normalize`` (sentence-transformers' ``all-MiniLM-L6-v2`` embedding), (batch, hidden);
    ``"cls"`` -- the first token's hidden state, (batch, hidden); ``"none"`` -- the last hidden
    states, (batch, sequence, hidden).

    Why a wrapper: the model is called with keyword arguments, so ``torch.onnx.export`` (which passes
    inputs positionally, and which recent ``transformers`` versions reject positionally) names the
    inputs ``input_ids``/``attention_mask`` and exports one plain tensor output. The model is held, not
    copied; export with a padded example batch so the attention mask stays in the graph.
    """

    def __init__(self, model: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
        self.model, self.pooling, self.normalize = model, pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "none":
            return hidden
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(out, p=2.0, dim=-1) if self.normalize else out
