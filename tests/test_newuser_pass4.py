"""A fourth outside pass: what the last rounds added (hf.refit, hidden-size narrowing, quantize_transformer's
attention_int8, ReconstructionPruner, reconstruct, build_engine on bare encoders), tried on models and inputs
nobody built them for.

Oracles are computed here: PyTorch fp32 run against onnxruntime, per-tensor uint8 quantization written with numpy,
the user's masked model built by multiplying masks into exactly the named tensors.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import deploycompress as dc  # noqa: E402
from deploycompress.hf.int8 import Int8Error, quantize_transformer  # noqa: E402
from deploycompress.hf.linear_int8 import attention_matmuls  # noqa: E402


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _feeds(n: int, seq: int, seed: int, pad: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    if pad:
        mask[:, seq - pad :] = 0
    return {"input_ids": torch.randint(3, 100, (n, seq), generator=g), "attention_mask": mask}


def test_sdpa_attention_context_matmuls_are_recognised_and_go_int8():
    """transformers' default attention (``attn_implementation="sdpa"``) exports ``Where(IsNaN(p), 0, p)`` between
    the Softmax and the context MatMul: ``attention_matmuls`` called that MatMul "scores", so
    ``quantize_transformer(attention_int8=True)`` on a BERT/RoBERTa/DistilBERT straight from ``from_pretrained``
    found no context MatMul and left the attention float (the DistilBERT case of the last round was this too)."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, attn_implementation="sdpa"), add_pooling_layer=False).eval()  # fmt: skip
    x = _feeds(2, 9, 1, pad=4)
    fp32 = dc.to_onnx(model, x, dynamic_axes={k: {0: "batch", 1: "sequence"} for k in x})
    kinds = attention_matmuls(fp32.model)
    assert sorted(kinds.values()) == ["context", "context", "scores", "scores"], kinds
    calib = [{k: v.numpy() for k, v in _feeds(4, 12, s, pad=5).items()} for s in range(3)]
    result = quantize_transformer(fp32.model, calib, fuse="plain", flavour="integer", attention_int8=True, repeats=1)
    assert result.chosen == "plain/integer+context-int8", (result.chosen, result.notes)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("DynamicQuantizeLinear") >= 4  # both inputs of each layer's context MatMul
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n, seq, pad in ((1, 1, 0), (3, 17, 9)):  # batches and lengths the calibration never saw
        t = _feeds(n, seq, 7, pad)
        with torch.no_grad():
            ref = model(**t).last_hidden_state.numpy()
        got = sess.run(None, {k: v.numpy() for k, v in t.items()})[0]
        assert _cosines(ref, got).min() > 0.99


class _TwoHeads(nn.Module):
    """Two inputs, dict outputs: ``good`` reads a well-scaled input, ``bad`` one whose channel 0 is 1000x the rest
    (and unused by its Linear), so one per-tensor uint8 scale rounds the channels it uses to almost nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        with torch.no_grad():
            self.b.weight[:, 0] = 0

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"good": self.a(x), "bad": self.b(z)}


def _two_feeds(seed: int, outlier: float) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    x, z = g.standard_normal((2, 6, 8)).astype(np.float32), g.standard_normal((2, 6, 8)).astype(np.float32)
    z[..., 0] = outlier * g.random((2, 6))
    return {"x": x, "z": z}


def test_every_output_is_held_to_min_cosine_not_the_first_alone():
    """quantize_transformer measured each candidate's cosine on the graph's first output only: a graph whose second
    output (a pooler, a second head) int8 ruins was kept and reported accurate."""
    model = _TwoHeads().eval()
    feeds = [_two_feeds(s, 1000.0) for s in range(3)]
    # the oracle: what per-tensor uint8 (asymmetric, range over the calibration) does to z, through b, with numpy
    z = np.concatenate([f["z"] for f in feeds])
    lo, hi = min(float(z.min()), 0.0), max(float(z.max()), 0.0)
    scale = (hi - lo) / 255
    zq = (np.clip(np.round(z / scale) + np.round(-lo / scale), 0, 255) - np.round(-lo / scale)) * scale
    w, b = model.b.weight.detach().numpy(), model.b.bias.detach().numpy()
    assert _cosines(z @ w.T + b, zq @ w.T + b).mean() < 0.95  # int8 cannot keep "bad"
    fp32 = dc.to_onnx(model, tuple(torch.from_numpy(v) for v in feeds[0].values()),
                      dynamic_axes={"x": {0: "batch"}, "z": {0: "batch"}})  # fmt: skip
    assert [o.name for o in fp32.model.graph.output] == ["good", "bad"]
    with pytest.raises(Int8Error):
        quantize_transformer(fp32.model, feeds, fuse="plain", smooth_alpha=None, attention_int8=False, repeats=1)
    # without the outlier both outputs keep their cosine: a graph is still returned, and it is right on both
    # (to_onnx's ExportResult is taken as it is, as the ModelProto it holds)
    easy = [_two_feeds(s, 1.0) for s in range(3)]
    result = quantize_transformer(fp32, easy, fuse="plain", smooth_alpha=None, attention_int8=False, repeats=1)
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for f in easy:
        got = dict(zip(["good", "bad"], sess.run(None, f)))
        with torch.no_grad():
            ref = model(*(torch.from_numpy(v) for v in f.values()))
        for k in ("good", "bad"):
            assert _cosines(ref[k].numpy(), got[k]).mean() >= 0.99
