"""A third outside pass: Hugging Face hidden-size narrowing, build_engine on bare encoders, total_sparsity budgets.

Oracles are computed here: the user's masked model (each mask multiplied into exactly the tensor it names), channel
counts read from the masks and from the shapes, onnxruntime run against PyTorch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from deploycompress.speedup import SpeedupWarning, speedup_with_report  # noqa: E402
from test_speedup_cases import user_masked  # noqa: E402  (the shared oracle: masks multiplied into exactly the named tensors)

H = 32


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model.eval()


def _inputs(n: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, seq // 2 :] = 0
    return ids, mask


def test_masked_embedding_columns_that_stay_are_named():
    """Masks on the embedding columns alone (the user forgot the LayerNorms and the writing Linears): no hidden
    channel can go, which is right, but speedup said nothing; now a SpeedupWarning names each tensor and the
    report counts what stays."""
    model = _tiny_bert()
    drop = torch.arange(H) % 4 == 0
    masks = {n: {"weight": (~drop).view(1, -1).expand_as(m.weight).clone()}
             for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    expected = {f"{n}.weight": int((~per["weight"].any(0)).sum()) for n, per in masks.items()}  # wholly masked columns
    ex = _inputs(2, 8, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, report = speedup_with_report(model, masks, ex, norm_spans="prune")
    said = [str(w.message) for w in caught if issubclass(w.category, SpeedupWarning)]
    assert any("embeddings.word_embeddings.weight keeps 8" in s and "coupled with unmasked channels" in s for s in said), said
    assert {t: sum(c.values()) for t, c in report.kept_tensor_masks.items()} == expected
    x = _inputs(3, 11, 2)
    with torch.no_grad():
        want = user_masked(model, masks)(*x).last_hidden_state
        got = small(*x).last_hidden_state
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_independent_layernorm_masks_are_named_with_their_partners():
    """A different mask on every LayerNorm of the stream (not one hidden set): nothing can be removed; said."""
    model = _tiny_bert()
    g = torch.Generator().manual_seed(5)
    masks = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            keep = torch.rand(H, generator=g) > 0.3
            masks[n] = {"weight": keep, "bias": keep.clone()}
    expected = sum(int((~per["weight"]).sum()) + int((~per["bias"]).sum()) for per in masks.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, report = speedup_with_report(model, masks, _inputs(2, 8, 1), norm_spans="prune")
    assert report.params_after == report.params_before
    assert sum(sum(c.values()) for c in report.kept_tensor_masks.values()) == expected
    assert any(issubclass(w.category, SpeedupWarning) and "masked tensors keep" in str(w.message) for w in caught)


def _tiny_bert_plain() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=H, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40)).eval()


def test_calibration_of_another_sequence_length_names_the_axis_and_dynamic_axes(tmp_path):
    """Calibration batches 16 tokens long, the example 12, no dynamic_axes: refused before any work, naming the axis
    that differs and the dynamic_axes entry that lets it vary (before: only 'every axis ... must match')."""
    import deploycompress as dc
    from deploycompress.checks import CheckError

    model = _tiny_bert_plain()
    ex = _inputs(2, 12, 1)
    calib = [_inputs(4, 16, 2)]
    with pytest.raises(CheckError, match=r"axis 1 differs.*dynamic_axes=\{'input_ids': \{1: 'sequence'\}\}"):
        dc.build_engine(model, example_inputs=ex, calib_data=calib, out_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_a_misspelt_input_name_gets_the_closest_parameter(tmp_path):
    import deploycompress as dc

    model = _tiny_bert_plain()
    ids, mask = _inputs(2, 12, 1)
    with pytest.raises(Exception, match=r"\['input_id'\].*did you mean 'input_ids'"):
        dc.build_engine(model, example_inputs={"input_id": ids, "attention_mask": mask}, calib_data=[(ids, mask)],
                        out_dir=tmp_path / "b", progress=False)


def test_inexact_hidden_narrowing_warns_by_name():
    """hidden_masks' masks with one LayerNorm bias left unmasked (a user editing them): the norm then normalises over
    fewer channels and the result differs from the masked model. speedup() returns no report, so the difference
    was silent; now a NormsChangedWarning carries the error, measured here against the masked model."""
    from deploycompress.hf.hidden import hidden_masks
    from deploycompress.speedup import NormsChangedWarning, speedup

    model = _tiny_bert()
    ex = _inputs(2, 8, 1)
    masks = hidden_masks(model, ex, sparsity=0.25)
    del masks["encoder.layer.0.attention.output.LayerNorm"]["bias"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = speedup(model, masks, ex, norm_spans="prune")
    named = [str(w.message) for w in caught if issubclass(w.category, NormsChangedWarning)]
    assert len(named) == 1 and "encoder.layer.0.attention.output.LayerNorm" in named[0]
    with torch.no_grad():
        want = user_masked(model, masks)(*ex).last_hidden_state
        got = small(*ex).last_hidden_state
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel > 1e-3  # really different: the warning is not noise
    assert f"by {rel:.3g} (relative)" in named[0]


def test_selected_depthwise_conv_names_the_unselected_conv_that_loses_filters():
    """mobilenet_v2, only blocks 1-2 selected (block 1's depthwise conv reads the stem conv's channels one to one):
    the masks remove the stem conv's filters too, which the user did not select and a budget does not count. It
    was logged at INFO only; now a PruningWarning names the layer and how many of its filters go."""
    import torchvision

    from deploycompress import pruning
    from deploycompress.pruning.channel import PruningWarning

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 32, 32)
    sel = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith(("features.1.", "features.2."))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = pruning.L1NormPruner(model, [{"sparsity": 0.5, "op_names": sel}], dependency_aware=True, dummy_input=x)
        _, masks = p.compress()
        p.unwrap_model()
    dw = masks["features.1.conv.0.0"]["weight"]
    gone = int((~dw.reshape(dw.shape[0], -1).any(1)).sum())  # the depthwise conv's removed channels
    stem = masks["features.0.0"]["weight"]
    assert gone == 16 and int((~stem.reshape(32, -1).any(1)).sum()) == gone
    said = [str(w.message) for w in caught if issubclass(w.category, PruningWarning)]
    assert any(f"features.0.0 ({gone} of 32)" in s for s in said), said
