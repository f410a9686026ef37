"""build_engine on a bare Hugging Face encoder: int8 (QDQ) on onnxruntime with dynamic batch and sequence.

Oracle: the PyTorch fp32 model run here, against the bundle's onnxruntime graph run here on a batch and
sequence length the build never saw.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

import deploycompress as dc  # noqa: E402
from deploycompress.checks import CheckError  # noqa: E402


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def batch(n: int, seq: int, seed: int, pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    if pad:
        mask[-1, seq // 2 :] = 0
    return ids, mask


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.mark.parametrize("as_dict", [False, True])
def test_build_engine_int8_on_a_bare_bert_model(tmp_path, as_dict: bool) -> None:  # noqa: ANN001
    model = tiny_bert()
    ids, mask = batch(2, 12, 1)
    example = {"input_ids": ids, "attention_mask": mask} if as_dict else (ids, mask)
    calib = [batch(4, 16 + 4 * i, 10 + i) for i in range(4)]  # other sequence lengths than the example's
    axes = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    art = dc.build_engine(model, example_inputs=example, calib_data=calib, out_dir=tmp_path / "b", dynamic_axes=axes,
                          progress=False, iterations=3, warmup=1)
    assert [s.name for s in art.manifest.inputs] == ["input_ids", "attention_mask"]
    assert [s.name for s in art.manifest.outputs] == ["last_hidden_state", "pooler_output"]
    q = art.report.quantized_layers
    assert q["requested"] == q["in_qdq"] == q["in_optimized"] == 13  # 12 encoder Linears + the pooler
    graph = onnx.load(str(art.out_dir / art.manifest.artifact))
    # one activation QuantizeLinear per distinct Linear input: q/k/v share theirs, so 4 per layer + the pooler
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) == 2 * 4 + 1
    sess = ort.InferenceSession(str(art.out_dir / art.manifest.artifact), providers=["CPUExecutionProvider"])
    x = batch(3, 20, 99)  # a batch size and sequence length the build did not see
    got = sess.run(None, {"input_ids": x[0].numpy(), "attention_mask": x[1].numpy()})
    with torch.no_grad():
        ref = model(*x)
    hidden, pooled = ref.last_hidden_state.numpy(), ref.pooler_output.numpy()
    assert got[0].shape == hidden.shape and got[1].shape == pooled.shape
    assert cosine(got[0], hidden) > 0.999 and cosine(got[1], pooled) > 0.999
    # int8 is not fp32: the graph differs measurably from PyTorch (the check above is not vacuous)
    assert float(np.abs(got[0] - hidden).max()) > 1e-5


def test_calibration_batches_may_differ_on_dynamic_axes_only(tmp_path) -> None:  # noqa: ANN001
    model = tiny_bert()
    ids, mask = batch(2, 12, 1)
    bad = [(torch.randint(3, 100, (2, 12, 1)), torch.ones(2, 12, 1, dtype=torch.long))]
    with pytest.raises(CheckError, match=r"calib_data batch 0 'input_ids' has shape \(2, 12, 1\)"):
        dc.build_engine(model, example_inputs=(ids, mask), calib_data=bad, out_dir=tmp_path / "c",
                        dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}, progress=False)
    with pytest.raises(CheckError, match="every axis after the batch axis must match"):
        dc.build_engine(model, example_inputs=(ids, mask), calib_data=[batch(2, 16, 3)], out_dir=tmp_path / "d", progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
