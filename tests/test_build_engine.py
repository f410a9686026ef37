"""build_engine on real data (load_digits): prune 50% + fine-tune -> speedup -> PTQ -> onnxruntime int8 -> bundle."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import deploycompress as dc
from deploycompress.engine import BuildStepError, EngineError, default_quant_config
from deploycompress.zoo import accuracy, train


@pytest.fixture(scope="module")
def digits(digits_data):
    return digits_data


@pytest.fixture(scope="module")
def pruned(digits, _trained_digits):
    """A trained DigitsNet, conv2/conv3 pruned 50% by L1 norm and fine-tuned: (plain model, masks)."""
    torch.manual_seed(0)
    model = copy.deepcopy(_trained_digits[0])
    pruner = dc.L1NormPruner(
        model, [{"op_types": ["Conv2d"], "sparsity": 0.5}, {"exclude": True, "op_names": ["conv1"]}], dummy_input=digits.test_x[:1]
    )
    _, masks = pruner.compress()
    train(model, digits, epochs=2, lr=1e-3)
    return pruner.unwrap_model(), masks


@pytest.fixture(scope="module")
def artifact(pruned, digits, tmp_path_factory):
    model, masks = pruned
    return dc.build_engine(
        model, masks, None, example_inputs=digits.test_x[:1], precision="int8", out_dir=tmp_path_factory.mktemp("b") / "digits",
        calib_data=list(digits.batches(64)), eval_inputs=digits.test_x, eval_labels=digits.test_y, batch_sizes=(1, 16),
        iterations=20, warmup=3, name="digits", progress=False,
    )


def _ort_logits(runner, x: torch.Tensor) -> np.ndarray:
    return next(iter(runner.run({runner.inputs[0].name: x.numpy()}).values()))


def test_int8_engine_meets_the_accuracy_targets(artifact, digits):
    """Accuracy within 1 point of fp32, and top-1 agreement >= 99% with the PyTorch fake-quant simulation."""
    deployed = artifact.model
    fp32_acc = accuracy(deployed, digits.test_x, digits.test_y)
    assert fp32_acc > 0.9
    int8 = artifact.load()
    logits = _ort_logits(int8, digits.test_x)
    int8_acc = float((logits.argmax(1) == digits.test_y.numpy()).mean())
    assert int8_acc >= fp32_acc - 0.01

    quantizer = dc.PTQQuantizer(copy.deepcopy(deployed), default_quant_config(deployed, digits.test_x[:1]))
    quantizer.calibrate(list(digits.batches(64)))
    assert quantizer.export_calib_config().digest() == artifact.calib_config.digest()
    with torch.no_grad():
        sim = quantizer.model(digits.test_x).numpy()
    agreement = float((sim.argmax(1) == logits.argmax(1)).mean())
    assert agreement >= 0.99

    acc = {(a.label, a.metric): a for a in artifact.report.accuracy}
    assert acc[("onnxruntime int8", "top1")].value == pytest.approx(int8_acc)


def test_speedup_shrank_the_model_and_the_report_says_so(artifact, pruned):
    model, _ = pruned
    sizes = {s.stage: s for s in artifact.report.sizes}
    assert sizes["original"].params == sum(p.numel() for p in model.parameters())
    assert artifact.model.conv2.out_channels == 16 and artifact.model.conv3.in_channels == 16
    assert sizes["speeded up"].params < 0.6 * sizes["original"].params
    assert sizes["speeded up"].flops < 0.6 * sizes["original"].flops
    labels = [(r.precision, r.batch_size) for r in artifact.report.latency]
    assert labels == [("fp32", 1), ("fp32", 16), ("int8", 1), ("int8", 16)]
    assert artifact.report.layers and all(l.mean_ms >= 0 for l in artifact.report.layers)
    assert set(artifact.report.steps) >= {"speedup", "calibrate", "export", "qdq", "build", "validate", "profile"}


def test_bundle_round_trip(artifact, digits):
    manifest = dc.verify_bundle(artifact.out_dir)
    assert manifest.calibration_digest == artifact.calib_config.digest()
    assert manifest.precision == "int8" and manifest.max_batch_size == 32
    assert {"calibration.json", "report.json", "report.html", "source/model.qdq.onnx", manifest.artifact} <= set(manifest.files)
    runner = dc.load_bundle(artifact.out_dir)
    x = digits.test_x[:7]
    np.testing.assert_array_equal(_ort_logits(runner, x), _ort_logits(artifact.load(), x))
    assert dc.Report.load(artifact.out_dir) == artifact.report


def test_masked_model_calibration_is_fitted_to_the_speeded_up_model(pruned, digits, tmp_path):
    """A calibration taken on the masked model: weight scales are re-derived for resized layers."""
    model, masks = pruned
    quantizer = dc.PTQQuantizer(copy.deepcopy(model), default_quant_config(model))
    quantizer.calibrate(list(digits.batches(128)))
    calib = quantizer.export_calib_config()
    assert calib.get("conv2", "weight").scale.size == 32
    art = dc.build_engine(model, masks, calib, example_inputs=digits.test_x[:1], out_dir=tmp_path / "b", eval_inputs=digits.test_x,
                          eval_labels=digits.test_y, iterations=5, warmup=1, compare_fp32=False, progress=False)
    assert art.calib_config.get("conv2", "weight").scale.size == 16
    assert art.calib_config.get("conv2", "input") == calib.get("conv2", "input")  # activations kept as calibrated
    assert art.calib_config.get("conv1", "weight") == calib.get("conv1", "weight")  # unchanged layer kept bit for bit
    int8_acc = art.report.accuracy[-1]
    assert int8_acc.value >= int8_acc.reference_value - 0.015


def test_bad_input_is_refused_before_work(pruned, digits, tmp_path):
    model, masks = pruned
    x = digits.test_x[:1]
    with pytest.raises(EngineError, match="precision must be one of"):
        dc.build_engine(model, None, None, example_inputs=x, precision="int4", out_dir=tmp_path / "a")
    with pytest.raises(EngineError, match="precision 'int8' needs a calibration"):
        dc.build_engine(model, None, None, example_inputs=x, out_dir=tmp_path / "a")
    with pytest.raises(EngineError, match="not a module of the model"):
        dc.build_engine(model, {"conv9": {"weight": torch.ones(1, dtype=torch.bool)}}, None, example_inputs=x, precision="fp32", out_dir=tmp_path / "a")
    with pytest.raises(EngineError, match="norm_spans must be one of 'keep', 'prune'"):
        dc.build_engine(model, masks, None, example_inputs=x, precision="fp32", norm_spans="drop", out_dir=tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(EngineError, match="is not empty"):
        dc.build_engine(model, None, None, example_inputs=x, precision="fp32", out_dir=tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_failed_build_leaves_no_partial_out_dir(pruned, digits, tmp_path):
    model, _ = pruned
    calib = dc.CalibConfig()
    quantizer = dc.PTQQuantizer(copy.deepcopy(model), default_quant_config(model))
    quantizer.calibrate(list(digits.batches(256))[:1])
    good = quantizer.export_calib_config()
    for module, kind, params in good.items():
        calib.set(module.replace("fc2", "head"), kind, params)  # names a module the model lacks
    with pytest.raises((BuildStepError, EngineError), match="head"):
        dc.build_engine(model, None, calib, example_inputs=digits.test_x[:1], out_dir=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_plain_copy_leaves_the_pruned_model_working():
    """The README flow: the model returned by compress() still runs (and stays masked) after a copy is stripped."""
    from torch.nn.utils import parametrize

    from deploycompress import L1NormPruner
    from deploycompress.model_copy import plain_copy
    from deploycompress.zoo import DigitsNet

    torch.manual_seed(0)
    model, masks = L1NormPruner(DigitsNet(width=8).eval(), [{"op_types": ["Conv2d"], "sparsity": 0.5}]).compress()
    model.eval()
    x = torch.rand(2, 1, 8, 8)
    before = model(x).detach()
    plain = plain_copy(model)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert any(parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(plain(x), before, rtol=0, atol=0)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # the caller's model and class untouched
    name = next(iter(masks))
    w = dict(plain.named_modules())[name].weight
    assert isinstance(w, torch.nn.Parameter) and bool((w.detach()[~masks[name]["weight"]] == 0).all())
