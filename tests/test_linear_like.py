"""Hugging Face ``Conv1D`` (GPT-2's layer: weight ``(in, out)``, ``y = x @ W + b``, not an ``nn.Linear``): selected by
``op_types: ["Linear"]``, quantized per output feature, lowered to ``nn.Linear`` for speedup and export, refused by
the pruners with the way out. On a tiny randomly initialised GPT2Model (no download)."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2Model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from deploycompress.config import ConfigError, select_modules  # noqa: E402
from deploycompress.linear_like import to_linear  # noqa: E402

N_LAYER = 2
CONV1D = [f"h.{i}.{m}" for i in range(N_LAYER) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def _gpt2() -> GPT2Model:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=N_LAYER, n_head=2, use_cache=False,
                     attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    model = GPT2Model(cfg).eval()
    with torch.no_grad():  # GPT-2 starts its biases at zero: give them values so a lost bias shows
        for m in model.modules():
            if isinstance(m, Conv1D):
                m.bias.normal_(0, 0.1)
    return model


class Hidden(nn.Module):
    """input_ids -> last hidden state, with the mask and positions explicit (exportable)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions).last_hidden_state


def _ids(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))


def test_linear_selects_conv1d_but_not_under_nni_exact_matching():
    model = _gpt2()
    picked = select_modules(model, [{"op_types": ["Linear"], "quant_types": ["weight"]}], kind="quantization")
    assert sorted(picked) == sorted(CONV1D)
    with pytest.raises(ConfigError, match="matches no module"):
        select_modules(model, [{"op_types": ["Linear"], "op_types_match": "exact", "quant_types": ["weight"]}], kind="quantization")


def test_to_linear_is_exact_and_leaves_the_model_alone():
    model = _gpt2()
    lin = to_linear(model)
    ids = _ids(1)
    assert all(isinstance(lin.get_submodule(n), nn.Linear) for n in CONV1D)
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in CONV1D)
    with torch.no_grad():
        torch.testing.assert_close(lin(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=1e-6)


def test_pruners_refuse_conv1d_by_name_with_the_way_out():
    from deploycompress.pruning import L1NormPruner

    with pytest.raises(ConfigError, match=r"h\.0\.attn\.c_attn \(Conv1D\).*to_linear"):
        L1NormPruner(_gpt2(), [{"op_types": ["Linear"], "sparse_ratio": 0.5}])


def test_pruning_and_speedup_of_the_linear_form_is_exact_against_the_masked_conv1d_model():
    from deploycompress.pruning import L1NormPruner
    from deploycompress.speedup import speedup

    model = _gpt2()
    targets = [f"h.{i}.mlp.c_fc" for i in range(N_LAYER)]
    lin = to_linear(model)
    ids = _ids(2)
    pruner = L1NormPruner(lin, [{"op_names": targets, "sparse_ratio": 0.5}], dummy_input=ids)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = speedup(to_linear(model), masks, ids)
    assert [small.get_submodule(t).out_features for t in targets] == [32] * N_LAYER
    # the user's masked model: the original GPT-2, each Conv1D's masked output columns and bias entries set to zero
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for t in targets:
            keep = masks[t]["weight"].reshape(masks[t]["weight"].shape[0], -1).any(1)  # output features kept
            layer = masked.get_submodule(t)
            layer.weight[:, ~keep] = 0
            layer.bias[~keep] = 0
    with torch.no_grad():
        want = masked(ids).last_hidden_state
        got = small(ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_ptq_quantizes_conv1d_per_output_feature():
    from deploycompress.quantization import PTQQuantizer

    model = _gpt2()
    q = PTQQuantizer(copy.deepcopy(model), [{"op_types": ["Linear"], "quant_types": ["input", "weight"], "quant_bits": 8}])
    q.calibrate([_ids(i) for i in range(3)], progress=False)
    calib = q.export_calib_config()
    w = model.h[0].attn.c_attn.weight.detach()  # (in 16, out 48)
    p = calib.get("h.0.attn.c_attn", "weight")
    assert p.axis == 1 and p.scale.size == 48
    np.testing.assert_allclose(p.scale, w.abs().amax(0).numpy() / 127, rtol=1e-6)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_build_engine_int8_runs_every_conv1d_in_integer_kernels(tmp_path):
    from deploycompress import build_engine

    net = Hidden(_gpt2())
    ids = _ids(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = build_engine(net, example_inputs=ids, out_dir=tmp_path / "b", calib_data=[_ids(10 + i) for i in range(4)],
                           iterations=1, warmup=0, compare_fp32=False, progress=False, strict=True)
    audit = art.report.quantized_layers
    assert sorted(audit["layers"]) == sorted(f"model.{n}" for n in CONV1D)
    assert audit["in_optimized"] == len(CONV1D) and not audit["short"]
    ops = _ops(art.artifact_path)  # onnxruntime's optimized graph
    integer = sum(ops[k] for k in ("MatMulIntegerToFloat", "MatMulInteger", "QGemm", "QLinearMatMul"))
    assert integer == len(CONV1D)
    assert ops["Gemm"] == 0
    # the engine follows the float model (the caller's Conv1D layers untouched)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(art.artifact_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        want = net(ids).numpy()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    assert isinstance(net.model.h[0].attn.c_attn, Conv1D)


def test_build_engine_takes_masks_and_calibration_in_conv1d_layout(tmp_path):
    """Masks and a calibration taken on the Conv1D model (weight (in, out)) are transposed/re-axed for its Linear form."""
    from deploycompress import build_engine
    from deploycompress.quantization import PTQQuantizer

    net = Hidden(_gpt2())
    target = "model.h.0.mlp.c_fc"
    keep = torch.zeros(64, dtype=torch.bool)
    keep[::2] = True
    masks = {target: {"weight": keep.expand(16, 64).float().clone(), "bias": keep.float()}}  # (in, out): columns
    q = PTQQuantizer(copy.deepcopy(net), [{"op_types": ["Linear"], "quant_types": ["input", "weight"], "quant_bits": 8}])
    q.calibrate([_ids(i) for i in range(3)], progress=False)
    calib = q.export_calib_config()
    ids = _ids(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = build_engine(net, masks=masks, calib_config=calib, example_inputs=ids, out_dir=tmp_path / "b",
                           iterations=1, warmup=0, compare_fp32=False, progress=False, strict=True)
    assert art.model.get_submodule(target).out_features == 32
    assert art.report.quantized_layers["in_optimized"] == len(CONV1D)
    assert art.calib_config.get(target, "weight").axis == 0 and art.calib_config.get(target, "weight").scale.size == 32
    masked = copy.deepcopy(net)
    with torch.no_grad():
        layer = masked.get_submodule(target)
        layer.weight[:, ~keep] = 0
        layer.bias[~keep] = 0
        torch.testing.assert_close(art.model(ids), masked(ids), rtol=0, atol=1e-5)
