"""Hugging Face ``transformers`` encoders end to end (optional: ``pip install 'deploycompress[hf]'``).

- :class:`~deploycompress.hf.encoder.Encoder`: a BERT-family model as a two-input module
  ``(input_ids, attention_mask) -> tensor`` that exports to ONNX with dynamic batch and sequence;
- :mod:`~deploycompress.hf.text`: real English sentences that ship with Python (standard-library docstrings);
- :mod:`~deploycompress.hf.importance`: which heads and FFN channels matter on real text, as masks;
- :mod:`~deploycompress.hf.refit`: closed-form recovery after head/FFN pruning (least-squares refit of the
  output Linears, heads/channels chosen by what that refit rebuilds);
- :mod:`~deploycompress.hf.block_reconstruct`: each pruned layer trained to map its own inputs to the dense
  layer's outputs, one layer at a time (block reconstruction, before distillation);
- :mod:`~deploycompress.pruning.distill`: distillation fine-tuning of a pruned student on unlabelled text;
- :mod:`~deploycompress.hf.int8`: int8 graphs for onnxruntime (fused or plain, qdq/integer/dynamic
  flavours, SmoothQuant), the fastest that stays accurate; :mod:`~deploycompress.hf.linear_int8` writes them.

Head and FFN pruning needs nothing from here: the channel trace recognises Hugging Face self-attention
(``graph/hf_attention.py``) and speedup rewrites it (``speedup/hf_attention.py``).
"""

from .encoder import Encoder

__all__ = ["Encoder"]
