"""int8 QDQ graphs of Hugging Face encoders on onnxruntime (deploycompress.hf.int8)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

pytest.importorskip("transformers")

from deploycompress.export import to_onnx  # noqa: E402
from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.hf.int8 import Int8Error, after_gelu, linear_matmuls, quantize_transformer  # noqa: E402
from test_hf_attention import inputs, tiny_bert  # noqa: E402


def feeds(n: int, batch: int, seq: int, seed: int) -> list[dict[str, np.ndarray]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 2 :] = 0
        out.append({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return out


@pytest.fixture(scope="module")
def exported():
    model = Encoder(tiny_bert())
    x = inputs()
    axes = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    return model, to_onnx(model, x, dynamic_axes=axes).model


def test_every_linear_int8_softmax_and_norms_float(exported) -> None:
    model, fp32 = exported
    linears = linear_matmuls(fp32)
    assert len(linears) == 2 * 6  # q, k, v, attention output, FFN in and out per layer
    assert len(after_gelu(fp32)) == 2
    result = quantize_transformer(fp32, feeds(4, 2, 8, 0), feeds(2, 2, 8, 1), float_after_gelu=False, min_cosine=0.9, repeats=1)
    assert {c.name for c in result.candidates} == {"plain", "fused"}
    best = next(c for c in result.candidates if c.name == result.chosen)
    assert best.quantized == best.linears == 12
    graph = result.model.graph
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:  # float ops read float tensors, never a DequantizeLinear output
        if n.op_type in ("Softmax", "LayerNormalization", "SkipLayerNormalization", "Erf", "Gelu", "BiasGelu"):
            assert all(producer[i].op_type != "DequantizeLinear" for i in n.input if i in producer), n.name
    # dynamic batch and sequence; checked against PyTorch, not against the fp32 graph
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for f in feeds(2, 3, 13, 2):
        got = sess.run(None, f)[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).numpy()
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() > 0.9


def test_bad_arguments_and_unreachable_accuracy(exported) -> None:
    _, fp32 = exported
    with pytest.raises(ValueError, match="fuse"):
        quantize_transformer(fp32, feeds(1, 2, 8, 0), fuse="yes")
    with pytest.raises(ValueError, match="inputs"):
        quantize_transformer(fp32, [{"input_ids": np.zeros((1, 4), np.int64)}])
    with pytest.raises(Int8Error, match="cosine"):
        quantize_transformer(fp32, feeds(1, 2, 8, 0), fuse="plain", float_after_gelu=False, min_cosine=1.0, repeats=1)
