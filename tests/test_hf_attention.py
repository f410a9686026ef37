"""Hugging Face BERT-family self-attention: heads as channel classes, exact speedup, onnxruntime parity."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

from deploycompress.export import to_onnx  # noqa: E402
from deploycompress.graph import build_channel_groups  # noqa: E402
from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.pruning import L1NormPruner  # noqa: E402
from deploycompress.speedup import speedup_with_report  # noqa: E402
from deploycompress.speedup.hf_attention import BiasOnly, NoHeads  # noqa: E402
from test_speedup_cases import user_masked  # noqa: E402  (the shared oracle: masks multiplied into exactly the named tensors)

HIDDEN, HEADS, HEAD = 32, 4, 8


def tiny_bert(impl: str = "eager", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
        max_position_embeddings=32, attn_implementation=impl,
    )  # fmt: skip
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def inputs(batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0  # padding: the attention mask matters
    return ids, mask



def head_masks(layer: int, drop: list[int], prefix: str = "encoder.layer", names=("query", "key", "value"), sub: str = "attention.self") -> dict:
    keep = torch.ones(HEADS, HEAD, dtype=torch.bool)
    keep[drop] = False
    keep = keep.reshape(-1)
    return {
        f"{prefix}.{layer}.{sub}.{n}": {"weight": keep.view(-1, 1).expand(HIDDEN, HIDDEN).clone(), "bias": keep.clone()}
        for n in names
    }


def ffn_masks(layer: int, keep_every: int = 2) -> dict:
    keep = torch.ones(64, dtype=torch.bool)
    keep[::keep_every] = False
    return {f"encoder.layer.{layer}.intermediate.dense": {"weight": keep.view(-1, 1).expand(64, HIDDEN).clone(), "bias": keep.clone()}}


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_heads_removed_exact_in_torch_and_onnxruntime(impl: str) -> None:
    model = tiny_bert(impl)
    x = inputs()
    masks = {**head_masks(0, [1, 3]), **head_masks(1, [0, 1, 2, 3]), **ffn_masks(0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no speedup warning: every masked channel goes
        small, report = speedup_with_report(model, masks, x)
    attn0 = small.encoder.layer[0].attention.self
    assert (attn0.num_attention_heads, attn0.all_head_size, attn0.attention_head_size) == (2, 16, HEAD)
    assert attn0.query.out_features == attn0.key.out_features == attn0.value.out_features == 16
    assert small.encoder.layer[0].attention.output.dense.in_features == 16
    assert small.encoder.layer[0].intermediate.dense.out_features == 32
    assert small.encoder.layer[0].output.dense.in_features == 32
    # every head of layer 1 went: the attention passes the residual (plus the output bias) through
    assert isinstance(small.encoder.layer[1].attention.self, NoHeads)
    assert isinstance(small.encoder.layer[1].attention.output.dense, BiasOnly)
    assert model.encoder.layer[0].attention.self.num_attention_heads == HEADS  # the caller's model untouched
    expected = user_masked(model, masks)
    with torch.no_grad():
        ref = expected(*x).last_hidden_state
        got = small(*x).last_hidden_state
        longer = inputs(3, 12)  # another batch and sequence length than the traced ones
        ref_long, got_long = expected(*longer).last_hidden_state, small(*longer).last_hidden_state
    assert rel_err(got, ref) < 1e-5 and rel_err(got_long, ref_long) < 1e-5
    assert report.relative_error is not None and report.relative_error < 1e-5
    assert report.params_after == sum(p.numel() for p in small.parameters()) < report.params_before

    exported = to_onnx(Encoder(small, pooling="none"), x, dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}})
    sess = ort.InferenceSession(exported.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == ["input_ids", "attention_mask"]
    out = sess.run(None, {"input_ids": longer[0].numpy(), "attention_mask": longer[1].numpy()})[0]
    assert rel_err(out, ref_long) < 1e-5


def test_heads_are_channel_classes_and_pruner_takes_whole_heads() -> None:
    model = tiny_bert()
    x = inputs()
    groups = {tuple(g.modules): g for g in build_channel_groups(model, x)}
    qkv = tuple(f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value"))
    assert qkv in groups and groups[qkv].num_slots == HEADS and not groups[qkv].pinned
    assert torch.equal(groups[qkv].slots[qkv[0]], torch.arange(HEADS).repeat_interleave(HEAD))
    config = [
        {"op_names": [f"encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "key", "value")], "sparse_ratio": 0.5},
        {"op_names": [f"encoder.layer.{i}.intermediate.dense" for i in range(2)], "sparse_ratio": 0.5},
    ]
    _, masks = L1NormPruner(model, config, dependency_aware=True, dummy_input=x).compress()
    for i in range(2):
        rows = [masks[f"encoder.layer.{i}.attention.self.{n}"]["weight"].all(1).view(HEADS, HEAD) for n in ("query", "key", "value")]
        for r in rows:
            assert bool((r.all(1) | ~r.any(1)).all())  # whole heads
            assert int(r.all(1).sum()) == HEADS // 2
        assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])  # the same heads in q, k and v
    small, report = speedup_with_report(model, masks, x)
    assert small.encoder.layer[0].attention.self.num_attention_heads == HEADS // 2
    assert small.encoder.layer[1].intermediate.dense.out_features == 32
    with torch.no_grad():
        assert rel_err(small(*x).last_hidden_state, user_masked(model, masks)(*x).last_hidden_state) < 1e-5


def test_distilbert_heads_inside_module() -> None:
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=100, dim=HIDDEN, n_layers=2, n_heads=HEADS, hidden_dim=64, max_position_embeddings=32)
    model = transformers.DistilBertModel(cfg).eval()
    x = inputs()
    masks = {**head_masks(0, [0, 2], "transformer.layer", ("q_lin", "k_lin", "v_lin"), "attention"),
             **head_masks(1, [0, 1, 2, 3], "transformer.layer", ("q_lin", "k_lin", "v_lin"), "attention")}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small, _ = speedup_with_report(model, masks, x)
    attn = small.transformer.layer[0].attention
    assert (attn.n_heads, attn.dim, attn.out_lin.in_features) == (2, 16, 16)
    assert isinstance(small.transformer.layer[1].attention, NoHeads)
    with torch.no_grad():
        assert rel_err(small(*x).last_hidden_state, user_masked(model, masks)(*x).last_hidden_state) < 1e-5


def test_roberta_and_partial_head_masks_keep_the_head() -> None:
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64,
        max_position_embeddings=40, pad_token_id=1,
    )  # fmt: skip
    model = transformers.RobertaModel(cfg, add_pooling_layer=False).eval()
    x = inputs()
    masks = head_masks(0, [2])
    masks["encoder.layer.0.attention.self.query"]["weight"][3] = False  # half a head masked in q only: it stays
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = speedup_with_report(model, masks, x)
    assert small.encoder.layer[0].attention.self.num_attention_heads == HEADS - 1
    with torch.no_grad():
        assert rel_err(small(*x).last_hidden_state, user_masked(model, masks)(*x).last_hidden_state) < 1e-5


def test_importance_masks_drop_the_heads_and_channels_that_write_least() -> None:
    from deploycompress.hf.importance import encoder_importance, importance_masks
    from deploycompress.speedup import speedup

    bert = tiny_bert()
    layer = bert.encoder.layer[0]
    with torch.no_grad():  # head 2 of layer 0 writes nothing: its columns of the output projection are zero
        layer.attention.output.dense.weight[:, 2 * HEAD : 3 * HEAD] = 0
        bert.encoder.layer[1].output.dense.weight[:, 5] = 0  # FFN channel 5 of layer 1 likewise
    model = Encoder(bert)
    data = [inputs(), inputs()]
    scores = encoder_importance(model, data)
    assert scores.heads.shape == (2, HEADS) and scores.ffn.shape == (2, 64)
    assert float(scores.heads[0, 2]) == 0.0 and float(scores.ffn[1, 5]) == 0.0 and float(scores.heads.min(1).values[1]) > 0
    # an independent read of head 0's contribution in layer 1: context vectors through its output columns
    ctx = []
    h = bert.encoder.layer[1].attention.output.dense.register_forward_pre_hook(lambda m, i: ctx.append(i[0]))
    with torch.no_grad():
        for ids, mask in data:
            model(ids, mask)
    h.remove()
    w_o = bert.encoder.layer[1].attention.output.dense.weight[:, :HEAD]
    expected = torch.cat([(c[..., :HEAD] @ w_o.T).norm(dim=-1)[mask.bool()] for c, (_, mask) in zip(ctx, data)]).mean()  # real tokens
    assert float(scores.heads[1, 0]) == pytest.approx(float(expected.detach()), rel=1e-5)
    masks = importance_masks(model, scores, 0.25, 0.5)
    assert set(masks) == {f"model.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense")}
    q0 = masks["model.encoder.layer.0.attention.self.query"]["bias"].view(HEADS, HEAD)
    assert q0[2].sum() == 0 and q0.sum() == (HEADS - 1) * HEAD  # the silent head is the one that goes
    assert masks["model.encoder.layer.1.intermediate.dense"]["bias"][5] == 0 and masks["model.encoder.layer.1.intermediate.dense"]["bias"].sum() == 32
    small = speedup(copy.deepcopy(model), masks, inputs())
    assert small.model.encoder.layer[0].attention.self.num_attention_heads == HEADS - 1
    with pytest.raises(ValueError, match="head_sparsity"):
        importance_masks(model, scores, 1.0, 0.5)


def test_export_leaves_a_wrapped_eval_mode_model_in_eval_mode() -> None:
    from deploycompress.export import to_onnx

    bert = tiny_bert()  # eval mode, as from_pretrained leaves it
    wrapper = Encoder(bert)  # a new module: training mode
    to_onnx(wrapper, inputs())
    assert wrapper.training and not any(m.training for m in bert.modules())  # dropout stays off


@pytest.mark.parametrize("what", ["heads", "ffn"])
def test_bias_compensation_keeps_the_mean_output_of_the_first_layer(what: str) -> None:
    """FLAP's bias compensation: in layer 0 (whose inputs pruning cannot change) the pruned model's
    output projection, averaged over the calibration tokens, equals the dense model's (oracle: the
    dense model's own mean, read here with a hook), and differs without the compensation."""
    from deploycompress.hf.importance import apply_bias_compensation, bias_compensation, encoder_importance, importance_masks
    from deploycompress.speedup import speedup

    model = Encoder(tiny_bert())
    data = [inputs(), inputs(3, 6)]
    scores = encoder_importance(model, data)
    masks = importance_masks(model, scores, 0.5 if what == "heads" else 0.0, 0.5 if what == "ffn" else 0.0)
    name = "model.encoder.layer.0." + ("attention.output.dense" if what == "heads" else "output.dense")
    masks = {k: v for k, v in masks.items() if ("query" in k or "key" in k or "value" in k) == (what == "heads") and ".0." in k}

    def mean_out(m: torch.nn.Module) -> torch.Tensor:
        outs = []
        h = m.get_submodule(name).register_forward_hook(lambda mod, i, o: outs.append(o))
        with torch.no_grad():
            for b in data:
                m(*b)
                outs[-1] = outs[-1][b[1].bool()]  # the real tokens
        h.remove()
        return torch.cat(outs).mean(0)

    deltas = bias_compensation(model, masks, data)
    assert set(deltas) == {name}
    small = speedup(copy.deepcopy(model), masks, inputs())
    before = mean_out(small)
    apply_bias_compensation(small, deltas)
    dense = mean_out(model)
    torch.testing.assert_close(mean_out(small), dense, rtol=1e-4, atol=1e-5)
    assert float((before - dense).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="no bias of shape"):
        apply_bias_compensation(small, {name: torch.zeros(3)})
    with pytest.raises(ValueError, match="nothing to compensate"):
        bias_compensation(model, {}, data)


def test_source_sentences_parse_without_importing(tmp_path) -> None:
    from deploycompress.hf.text import source_sentences

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(
        'raise SystemExit("imported")\n'
        'def f():\n    """Return the number of apples in the basket right now.\n\n    >>> f()\n    3\n    """\n'
        'class C:\n    """A small class that holds several values together. Short one."""\n'
    )
    (tmp_path / "pkg" / "broken.py").write_text("def (:\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text('"""A test module docstring that should never be read here."""\n')
    got = source_sentences(roots=[tmp_path])
    assert got == ["Return the number of apples in the basket right now.", "A small class that holds several values together."]
    assert source_sentences(roots=[tmp_path], exclude=[got[0]]) == got[1:]
    assert source_sentences(1, roots=[tmp_path]) == got[:1]
    with pytest.raises(ValueError, match="directories"):
        source_sentences(roots=[tmp_path / "missing"])
