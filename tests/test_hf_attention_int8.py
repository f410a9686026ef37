"""int8 attention MatMuls (deploycompress.hf.linear_int8.quantize_attention_matmuls) on onnxruntime against
PyTorch: the oracle is the tiny BertModel itself with its two attention ``torch.matmul`` calls reading
inputs quantized by the ONNX ``DynamicQuantizeLinear`` spec, written here."""

from __future__ import annotations

import copy
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

from deploycompress.export import to_onnx  # noqa: E402
from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.hf.linear_int8 import attention_matmuls, quantize_attention_matmuls  # noqa: E402
from test_hf_attention import inputs, tiny_bert  # noqa: E402

_matmul = torch.matmul


def dynamic_quantize(x: torch.Tensor) -> torch.Tensor:
    """ONNX DynamicQuantizeLinear then back to float: uint8, range widened to 0, zero point rounded and
    saturated, values rounded half to even and saturated (the operator's spec)."""
    x = x.float()
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = torch.tensor((hi - lo) / 255.0, dtype=torch.float32)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return (q - zp) * scale


def int8_matmul(kinds: set[str]):  # noqa: ANN201
    """``torch.matmul`` whose 4-D x 4-D calls (the attention MatMuls; Linears call F.linear) quantize both
    inputs, for the calls of ``kinds``: the first of a layer is the scores, the second the context."""
    calls = [0]

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() != 4 or b.dim() != 4:
            return _matmul(a, b)
        kind = ("scores", "context")[calls[0] % 2]
        calls[0] += 1
        return _matmul(dynamic_quantize(a), dynamic_quantize(b)) if kind in kinds else _matmul(a, b)

    return matmul


@pytest.fixture(scope="module")
def exported():
    model = Encoder(tiny_bert())
    axes = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    return model, to_onnx(model, inputs(), dynamic_axes=axes).model


@pytest.mark.parametrize("kinds", [("context",), ("scores", "context")])
def test_attention_matmuls_int8_match_pytorch_with_spec_quantization(exported, kinds) -> None:
    model, fp32 = exported
    found = attention_matmuls(fp32)
    assert sorted(found.values()) == ["context", "context", "scores", "scores"]  # two layers
    q = quantize_attention_matmuls(fp32, kinds)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 * len(kinds) and ops.count("DynamicQuantizeLinear") == 4 * len(kinds)
    assert ops.count("MatMul") == sum(n.op_type == "MatMul" for n in fp32.graph.node) - 2 * len(kinds)
    with torch.no_grad():  # larger weights than the init's: peaked attention, so quantization shows
        big = Encoder(tiny_bert(seed=3))
        for p in big.parameters():
            p.mul_(4.0)
    big_fp32 = to_onnx(big, inputs(), dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}).model
    for m, graph in ((model, q), (big, quantize_attention_matmuls(big_fp32, kinds))):
        sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        for b, s in ((3, 11), (1, 5)):  # dynamic batch and sequence
            ids, mask = inputs(b, s)
            got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            with torch.no_grad():
                ref_fp32 = m(ids, mask).numpy()
                with mock.patch.object(torch, "matmul", int8_matmul(set(kinds))):
                    ref = m(ids, mask).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
        if m is big:  # the oracle is not the float model: the quantization is really there
            assert np.abs(ref - ref_fp32).max() > 10 * (np.abs(got - ref).max() + 1e-6)


def test_unknown_kind_and_graph_without_attention_are_refused(exported) -> None:
    _, fp32 = exported
    with pytest.raises(ValueError, match="kinds must be among"):
        quantize_attention_matmuls(fp32, ("values",))
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="no attention MatMul"):
        quantize_attention_matmuls(to_onnx(lin, torch.zeros(2, 4)).model)


def test_quantize_transformer_attention_int8_true_false_and_bad_value(exported) -> None:
    from deploycompress.hf.int8 import quantize_transformer
    from test_hf_int8 import feeds

    _, fp32 = exported
    calib, check = feeds(3, 2, 8, 0), feeds(2, 2, 8, 1)
    with pytest.raises(ValueError, match="attention_int8"):
        quantize_transformer(fp32, calib, attention_int8="yes")
    softmax_read = {}
    for flag in (True, False):
        r = quantize_transformer(fp32, calib, check, fuse="plain", flavour="integer", attention_int8=flag, min_cosine=0.9, repeats=1)
        assert [c.name for c in r.candidates] == (["plain/integer+context-int8"] if flag else ["plain/integer"])
        assert r.candidates[0].quantized == r.candidates[0].linears == 12  # Linears only, not the attention MatMuls
        producer = {o: n for n in r.model.graph.node for o in n.output}
        softmax = {n.output[0] for n in r.model.graph.node if n.op_type == "Softmax"}
        softmax_read[flag] = sorted(n.op_type for n in r.model.graph.node if set(n.input) & softmax)
        assert all(producer[t].op_type == "Softmax" for t in softmax)
    assert softmax_read == {True: ["DynamicQuantizeLinear"] * 2, False: ["MatMul"] * 2}



def tiny_distilbert(seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=32)
    model = transformers.DistilBertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return Encoder(model)


def spec_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):  # noqa: ANN001, ANN201
    """``scaled_dot_product_attention`` written here (softmax(Q K^T scale + mask), fully masked rows 0) with the
    probabilities and V read through the ONNX ``DynamicQuantizeLinear`` spec: what an int8 context MatMul computes."""
    assert not is_causal and dropout_p == 0.0
    s = _matmul(query, key.transpose(-2, -1)) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return _matmul(dynamic_quantize(p), dynamic_quantize(value))


def test_distilbert_context_matmuls_recognised_and_int8_match_pytorch_with_spec_quantization() -> None:
    """DistilBERT's attention probabilities reach the context MatMul through a NaN guard (Where(IsNaN(p), 0, p)):
    recognised as "context", and the int8 graph matches the model with spec-quantized probabilities and values
    (the oracle: PyTorch with its attention written in this test) on batch/length the export never saw."""
    axes = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    for scale in (1.0, 3.0):  # 3x weights: peaked attention, so the quantization shows
        model = tiny_distilbert(seed=2, scale=scale)
        ids, mask = inputs(2, 8)
        fp32 = to_onnx(model, {"input_ids": ids, "attention_mask": mask}, dynamic_axes=axes).model
        assert sorted(attention_matmuls(fp32).values()) == ["context", "context", "scores", "scores"]
        q = quantize_attention_matmuls(fp32, ("context",))
        assert [n.op_type for n in q.graph.node].count("MatMulIntegerToFloat") == 2
        sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        for b, s in ((3, 11), (1, 5)):
            ids, mask = inputs(b, s)
            got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            with torch.no_grad():
                ref_fp32 = model(ids, mask).numpy()
                with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spec_sdpa):
                    ref = model(ids, mask).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
        if scale > 1:  # the oracle is not the float model: the quantization is really there
            assert np.abs(ref - ref_fp32).max() > 10 * (np.abs(got - ref).max() + 1e-6)


class _NoAttention(torch.nn.Module):
    """An encoder-shaped graph without attention: embedding, a Linear, the mask added."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = torch.nn.Embedding(100, 32), torch.nn.Linear(32, 32)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(input_ids)) + attention_mask.unsqueeze(-1)


def test_attention_int8_without_recognised_attention_matmuls_is_said_not_ignored() -> None:
    """A graph without attention MatMuls attention_matmuls knows (here none at all; a fused Attention op): an
    explicit attention_int8=True is named in the notes (and logged as a warning) instead of doing nothing; 'auto'
    says why it offered no candidate. (DistilBERT's sdpa export, the case first found, is recognised now:
    tests/test_newuser_pass4.py.)"""
    from deploycompress.hf.int8 import quantize_transformer
    from test_hf_int8 import feeds

    torch.manual_seed(0)
    model = _NoAttention().eval()
    ids = torch.randint(3, 100, (2, 8))
    axes = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    fp32 = to_onnx(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, dynamic_axes=axes).model
    assert "context" not in attention_matmuls(fp32).values()
    calib, check = feeds(3, 2, 8, 0), feeds(2, 2, 8, 1)
    r = quantize_transformer(fp32, calib, check, fuse="plain", flavour="integer", attention_int8=True, min_cosine=0.9, repeats=1)
    assert [c.name for c in r.candidates] == ["plain/integer"]
    assert any("attention_int8=True" in n and "stays float" in n for n in r.notes), r.notes
    auto = quantize_transformer(fp32, calib, check, fuse="plain", flavour="integer", attention_int8="auto", min_cosine=0.9, repeats=1)
    assert any("no int8-attention candidate" in n for n in auto.notes), auto.notes
