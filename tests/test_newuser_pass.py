"""What a new user met on models and inputs the project was not built around; each expected value
comes from the user's own model run in the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deploycompress as dc

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(progress=False, iterations=1, warmup=0, compare_fp32=False)


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_runner_takes_one_tensor_for_a_one_input_graph(tmp_path):
    model, x = _small_cnn(), torch.randn(2, 3, 8, 8)
    dc.build_engine(model, None, None, example_inputs=x[:1], precision="fp32", out_dir=tmp_path / "b", **FAST)
    runner = dc.load_bundle(tmp_path / "b")
    with torch.no_grad():
        expected = model(x).numpy()
    by_tensor = runner.run(x)  # a torch tensor, as the user holds it
    by_array = runner.run(x.numpy())
    by_name = runner.run({runner.inputs[0].name: x.numpy()})
    for got in (by_tensor, by_array, by_name):
        np.testing.assert_allclose(got["output"], expected, rtol=1e-4, atol=1e-5)


def test_runner_of_a_two_input_graph_names_its_inputs(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    dc.build_engine(Two().eval(), None, None, example_inputs=(torch.randn(1, 4), torch.randn(1, 5)), precision="fp32",
                    out_dir=tmp_path / "b", **FAST)
    runner = dc.load_bundle(tmp_path / "b")
    with pytest.raises(dc.InputError, match=r"\['left', 'right'\]"):
        runner.run(torch.randn(1, 4))


def test_speedup_report_counts_the_weights_of_a_model_still_wrapped_by_its_pruner():
    from deploycompress.zoo import DigitsNet

    model = DigitsNet().eval()
    conv2_params = model.conv2.weight.numel() + (model.conv2.bias.numel() if model.conv2.bias is not None else 0)
    _, masks = dc.L1NormPruner(model, [{"sparsity": 0.5, "op_names": ["conv2"]}]).compress()  # parametrized in place
    _, report = dc.speedup_with_report(model, masks, torch.randn(1, 1, 8, 8))
    row = next(r for r in report.layers if r.name == "conv2")
    assert row.params_before == conv2_params
    assert row.params_after == conv2_params // 2


def test_a_quantizer_wrapped_model_is_refused_with_the_fix_named(tmp_path):
    from deploycompress.export import ExportError, to_onnx

    model, x = _small_cnn(), torch.randn(4, 3, 8, 8)
    quantizer = dc.PTQQuantizer(model, [{"quant_types": ["input", "weight"], "op_types": ["Conv2d", "Linear"]}])
    quantizer.calibrate([x])
    with pytest.raises(dc.EngineError, match="unwrap_model"):
        dc.build_engine(model, None, quantizer.export_calib_config(), example_inputs=x[:1], out_dir=tmp_path / "b", **FAST)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ExportError, match="unwrap_model"):
        to_onnx(model, x[:1])
    plain = quantizer.unwrap_model()  # the fix the message names works
    dc.build_engine(plain, None, quantizer.export_calib_config(), example_inputs=x[:1], out_dir=tmp_path / "b", **FAST)


def _tensorrt_runs_here() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return getattr(tensorrt, "Builder", None) is not None


@pytest.mark.skipif(_tensorrt_runs_here(), reason="TensorRT is installed: the device build would run")
def test_portable_bundle_then_device_build_without_tensorrt_refuses_clearly(tmp_path, capsys, caplog):
    from deploycompress.cli import main

    model, x = _small_cnn(), torch.randn(8, 3, 8, 8)
    art = dc.build_engine(model, None, None, example_inputs=x[:1], calib_data=[x[:4], x[4:]], backend="tensorrt",
                          precision="int8", out_dir=tmp_path / "trt", progress=False)
    assert (tmp_path / "trt" / "tensorrt").is_dir() and (tmp_path / "trt" / "device" / "deploycompress_device").is_dir()
    import json

    assert json.loads((tmp_path / "trt" / "manifest.json").read_text())["extra"]["tensorrt"]["status"] == "pending-device-build"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "portable bundle" in said and f"deploycompress device-build {tmp_path / 'trt'}" in said
    before = sorted(p.name for p in (tmp_path / "trt").rglob("*"))
    capsys.readouterr()
    code = main(["device-build", str(tmp_path / "trt")])
    err = capsys.readouterr().err
    assert code == 1
    assert "TensorRT" in err and "pip install tensorrt" in err
    assert sorted(p.name for p in (tmp_path / "trt").rglob("*")) == before  # nothing written


def test_device_package_names_a_missing_dependency():
    code = ("import sys, runpy; sys.modules['onnx'] = None; "
            "runpy.run_module('deploycompress_device', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, "somewhere"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert "'onnx' is missing" in out.stderr and "pip install onnx" in out.stderr
    assert "Traceback" not in out.stderr


class _Tied(nn.Module):
    """A language-model head tied to its embedding (``dec.weight is emb.weight``)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.dec = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, ids):
        return self.dec(torch.relu(self.mid(self.emb(ids))))


def test_speedup_of_a_model_with_tied_weights_reproduces_the_masked_model():
    torch.manual_seed(0)
    model, ids = _Tied().eval(), torch.randint(0, 50, (3, 7))
    keep = torch.arange(16) % 2 == 0
    masks = {"mid": {"weight": keep[:, None].expand(16, 16).clone(), "bias": keep.clone()}}
    oracle = _Tied().eval()
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        oracle.mid.weight.mul_(masks["mid"]["weight"])
        oracle.mid.bias.mul_(masks["mid"]["bias"])
        expected = oracle(ids)
    with pytest.warns(dc.SpeedupWarning, match="tied weights"):
        small = dc.speedup(model, masks, ids)
    with torch.no_grad():
        got = small(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert small.dec.weight is small.emb.weight  # still one tensor
    assert model.dec.weight is model.emb.weight and model.mid.weight.shape == (16, 16)  # the caller's model untouched


def test_one_output_channel_is_not_a_per_channel_lint_finding():
    from deploycompress.export import lint_qdq

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.cls, self.reg = nn.Conv2d(6, 8, 1), nn.Conv2d(8, 3, 1), nn.Conv2d(8, 1, 1)  # a 1-channel head

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"cls": self.cls(h), "reg": self.reg(h)}

    from deploycompress.export import insert_qdq, to_onnx

    model, x = TwoHeads().eval(), torch.randn(16, 6, 4, 4)
    q = dc.PTQQuantizer(model, [{"quant_types": ["input", "weight"], "op_types": ["Conv2d"]}])
    q.calibrate([x])
    calib, plain = q.export_calib_config(), q.unwrap_model()
    exported = to_onnx(plain, x[:1])
    for target in ("onnxruntime", "tensorrt"):
        qdq = insert_qdq(exported.model, calib, exported.name_map, target=target)
        assert [f for f in lint_qdq(qdq, target) if f.rule == "weight-per-channel"] == []
        assert any(n.op_type == "DequantizeLinear" for n in qdq.graph.node)
        bad = onnx_with_per_tensor_weight(qdq)  # a real per-tensor weight on a 3-channel conv still is one
        assert any(f.rule == "weight-per-channel" for f in lint_qdq(bad, target))


def test_tensorrt_keeps_gemv_heads_float_and_names_them():
    from deploycompress.export import insert_qdq, lint_qdq, to_onnx

    class LinearHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.cls, self.reg = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 1)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"cls": self.cls(h), "reg": self.reg(h)}

    model, x = LinearHeads().eval(), torch.randn(16, 6)
    q = dc.PTQQuantizer(model, [{"quant_types": ["input", "weight"], "op_types": ["Linear"]}])
    q.calibrate([x])
    calib, plain = q.export_calib_config(), q.unwrap_model()
    exported = to_onnx(plain, x[:1])
    # TensorRT keeps one-row-per-sample Gemms (GEMV at batch 1) float, as ModelOpt does, and says so by name
    with pytest.warns(Warning, match="matrix-vector product") as caught:
        qdq = insert_qdq(exported.model, calib, exported.name_map, target="tensorrt")
    assert {str(w.message).split()[2] for w in caught if "matrix-vector" in str(w.message)} >= {"cls.weight", "reg.weight"}
    assert lint_qdq(qdq, "tensorrt") == []


def onnx_with_per_tensor_weight(model):
    """The QDQ graph with the 3-output conv's weight scale collapsed to one value (written here, not by the code)."""
    import copy

    import onnx
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        w = inits.get(node.input[0])
        if w is None or numpy_helper.to_array(w).shape != (3, 8, 1, 1):
            continue
        for pos in (1, 2):
            arr = numpy_helper.to_array(inits[node.input[pos]])
            inits[node.input[pos]].CopyFrom(numpy_helper.from_array(arr.reshape(-1)[:1].reshape(()), node.input[pos]))
        for a in list(node.attribute):
            if a.name == "axis":
                node.attribute.remove(a)
    onnx.checker.check_model(model)
    return model


def test_cli_int8_without_calibration_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    from deploycompress.cli import main

    (tmp_path / "slowmodel.py").write_text(
        "import pathlib, torch\n"
        "def make():\n"
        "    pathlib.Path('built').write_text('x')\n"
        "    return torch.nn.Linear(4, 2)\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {factory: 'slowmodel:make'}\ninput_shape: [1, 4]\n"
                      "prune: {pruner: AGPPruner, config_list: [{sparsity: 0.5, op_types: [Linear]}], "
                      "options: {pruning_algorithm: l1, total_iteration: 2}, report: search/}\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--calib" in err and "quantize.data" in err
    assert not (tmp_path / "built").exists() and not (tmp_path / "search").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode, memory_format", [("train", torch.contiguous_format), ("eval", torch.channels_last)])
def test_train_mode_and_channels_last_build_the_eval_model_and_leave_the_caller_alone(tmp_path, mode, memory_format):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    getattr(model, mode)()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 8, 8).to(memory_format=memory_format)
    keep = torch.arange(8) % 2 == 0
    masks = {"4": {"weight": keep.view(8, 1, 1, 1).expand(8, 8, 3, 3).clone(), "bias": keep.clone()}}
    oracle = copy_eval(model)
    with torch.no_grad():
        oracle[4].weight.mul_(masks["4"]["weight"])
        oracle[4].bias.mul_(masks["4"]["bias"])
        expected = oracle(x.contiguous()).numpy()
    dc.build_engine(model, masks, None, example_inputs=x[:1], precision="fp32", out_dir=tmp_path / "b", **FAST)
    got = dc.load_bundle(tmp_path / "b").run(x.contiguous().numpy())["output"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert model.training == (mode == "train")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BatchNorm statistics untouched


def copy_eval(model):
    import copy

    return copy.deepcopy(model).eval()


def test_calibration_dict_with_a_misspelt_input_suggests_the_name(tmp_path):
    model, x = _small_cnn(), torch.randn(4, 3, 8, 8)
    with pytest.raises(dc.InputError, match="did you mean 'input'"):
        dc.build_engine(model, None, None, example_inputs=x[:1], calib_data=[{"inp": x}], out_dir=tmp_path / "b", **FAST)


def test_inspect_for_tensorrt_of_an_onnxruntime_bundle_checks_the_models_float_graph(tmp_path, capsys):
    import json

    from deploycompress.cli import main

    model, x = _small_cnn(), torch.randn(8, 3, 8, 8)
    dc.build_engine(model, None, None, example_inputs=x[:1], calib_data=[x], precision="int8", out_dir=tmp_path / "b", **FAST)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "b"), "--target", "tensorrt", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "built for onnxruntime" in doc["note"] and "--backend tensorrt" in doc["note"]
    # the optimized onnxruntime graph holds com.microsoft ops (QGemm ...); the model itself has none TensorRT lacks
    assert any(op.startswith("QLinear") or op == "QGemm" for op in doc["ops"])
    assert [f for f in doc["tensorrt"]["findings"] if f["rule"].startswith("op-")] == []


def test_ptq_calibration_on_a_loader_of_pairs_says_what_to_pass():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randint(0, 2, (16,))), batch_size=8)
    q = dc.PTQQuantizer(model, [{"quant_types": ["input", "weight"], "op_types": ["Linear"]}])
    with pytest.raises(TypeError, match=r"\(input, target\) pairs pass \(x for x, _ in loader\)"):
        q.calibrate(pairs, progress=False)
    q.calibrate((x for x, _ in pairs), progress=False)  # the fix the message names
    assert set(q.export_calib_config().modules) == {"0", "2"}


class _TwoInTwoOut(nn.Module):
    """An image and a table in, a dict of a class head and a (large) regression head out."""

    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.tab = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.cls, self.reg = nn.Linear(16, 4), nn.Linear(16, 1)

    def forward(self, image, table):
        h = torch.cat([self.img(image), self.tab(table)], 1)
        return {"cls": self.cls(h), "reg": 100 * self.reg(h)}


def test_cli_validate_holds_value_tolerances_on_every_output(tmp_path, capsys):
    from deploycompress.cli import main

    torch.manual_seed(0)
    model = _TwoInTwoOut().eval()
    image, table = torch.randn(32, 3, 8, 8), torch.randn(32, 5)
    dc.build_engine(model, None, None, example_inputs=(image[:1], table[:1]), calib_data=[(image, table)], precision="int8",
                    out_dir=tmp_path / "b", **FAST)
    np.savez(tmp_path / "eval.npz", image=image.numpy(), table=table.numpy())
    runner = dc.load_bundle(tmp_path / "b")
    got = runner.run({"image": image.numpy(), "table": table.numpy()})
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model(image, table).items()}
    err = {k: float(np.abs(got[k] - ref[k]).max()) for k in ref}
    assert err["reg"] > 4 * err["cls"] > 0  # the regression head's error is the larger one
    threshold = (err["reg"] + err["cls"]) / 2
    capsys.readouterr()
    code = main(["validate", str(tmp_path / "b"), "--data", str(tmp_path / "eval.npz"), "--iterations", "1",
                 "--max-abs-error", f"{threshold:.6g}"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "max |diff| (reg)" in out and "max |diff| (cls)" not in out
    assert "[reg] max |diff|" in out and "[cls] max |diff|" in out


# --- second pass (2026-11-30, afternoon): models and inputs of the features that landed since ---------------------


def test_int32_bias_of_a_layer_reading_small_unit_inputs_is_not_clipped(tmp_path):
    """Inputs in small units (x ~ 1e-7) under a Linear with a bias of 0.5: ``x_scale * w_scale`` is ~1e-12,
    so the int32 bias could hold at most ~0.004 and was clipped (the engine answered ~0.004 where the
    model answers 0.5). Shufflenet_v2 pruned 50 % met the same through its tiny random-weight activations."""
    from deploycompress.export.qdq import BiasRangeWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].bias.fill_(0.5)
        model[2].bias.copy_(torch.tensor([0.5, -0.25, 0.125]))
    batches = [torch.randn(32, 16) * 1e-7 for _ in range(4)]
    x = torch.randn(64, 16) * 1e-7
    with pytest.warns(BiasRangeWarning, match=r"0\.weight: 8 of 8 channel\(s\) of Gemm"):
        dc.build_engine(model, None, None, example_inputs=x[:1], calib_data=batches, precision="int8",
                        out_dir=tmp_path / "b", **FAST)
    got = dc.load_bundle(tmp_path / "b").run(x.numpy())["output"]
    with torch.no_grad():
        expected = model(x).numpy()  # ~ the biases through the ReLU: 0.5 * sum(W2 row) + b2
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=2e-3)


class _Fire(nn.Module):
    """SqueezeNet's Fire module in small: two branches concatenated, with a ReLU on each branch before the
    Concat (SqueezeNet's) or one ReLU after it (Inception-like, ``Conv -> Concat -> ReLU -> Conv``)."""

    def __init__(self, relu_before_cat: bool):
        super().__init__()
        self.relu_before_cat = relu_before_cat
        self.squeeze = nn.Conv2d(3, 8, 1)
        self.e1, self.e3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        a, b = self.e1(s), self.e3(s)
        y = torch.cat([torch.relu(a), torch.relu(b)], 1) if self.relu_before_cat else torch.relu(torch.cat([a, b], 1))
        return self.head(y).mean((2, 3))


@pytest.mark.parametrize("relu_before_cat", [True, False], ids=["squeezenet-fire", "relu-after-concat"])
def test_portable_tensorrt_bundle_of_a_fire_block_builds_with_measured_tolerances(tmp_path, relu_before_cat):
    """SqueezeNet's Fire: the mixed int8 + fp16 graph did not run in onnxruntime's default session (its QDQ
    fusion makes a QLinearConcat that refuses fp16 scales), so the int8 golden tolerances fell back to the
    floors and top-1 agreement was not checked on the device at all. With the ReLU after the Concat the
    build was refused: the placement quantized the convs' outputs for a Concat that stays float, which its
    own TensorRT check then rejected (``output-quantized``)."""
    import json

    import onnxruntime as ort

    torch.manual_seed(0)
    model, ev = _Fire(relu_before_cat).eval(), torch.randn(8, 3, 16, 16)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    dc.build_engine(model, None, None, example_inputs=ev[:1], calib_data=batches, backend="tensorrt", precision="int8",
                    out_dir=tmp_path / "b", eval_inputs=ev, **FAST)
    plan = json.loads((tmp_path / "b/tensorrt/build_plan.json").read_text())
    golden = np.load(tmp_path / "b/tensorrt/golden.npz")
    with torch.no_grad():
        expected = model(torch.from_numpy(golden["input:x"])).numpy()
    np.testing.assert_allclose(golden["output:output"], expected, rtol=1e-5, atol=1e-6)  # golden = the user's model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every node as written
    session = ort.InferenceSession(str(tmp_path / "b/tensorrt/model.int8.onnx"), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": golden["input:x"]})[0]
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    # docs/tensorrt.md: top-1 agreement >= onnxruntime's - 0.05 (stated only where onnxruntime measured it)
    assert plan["tolerances"]["int8"]["min_top1_agreement"] == pytest.approx(max(0.0, agreement - 0.05), abs=1e-6)


def test_a_second_pruner_on_a_model_still_masked_by_the_first_is_refused():
    """Trying another sparsity in the same session: the first pruner's masks stayed in force, the second's
    masks said 2 of 8 filters of conv 0 where the model had 4 zero filters, and speedup of them kept the rest."""
    from deploycompress.config import ConfigError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    first = dc.L1NormPruner(model, [{"op_types": ["Conv2d"], "sparsity": 0.5}], dummy_input=x)
    first.compress()
    with pytest.raises(ConfigError, match=r"still holds another pruner's masks .*unwrap_model\(\)"):
        dc.L1NormPruner(model, [{"op_types": ["Conv2d"], "sparsity": 0.25}], dummy_input=x)
    plain = first.unwrap_model()  # the fix the message names
    _, masks = dc.L1NormPruner(plain, [{"op_types": ["Conv2d"], "sparsity": 0.75}], dummy_input=x).compress()
    zero_filters = int((plain[0].weight.detach().flatten(1).abs().sum(1) == 0).sum())
    assert int((~masks["0"]["weight"]).flatten(1).all(1).sum()) == 6 and zero_filters == 6  # the masks describe the model


def test_recipe_report_of_a_one_shot_pruner_is_written_and_carried_in_the_bundle(tmp_path, monkeypatch):
    """``prune: {pruner: L1NormPruner, report: prunerep/}`` left an empty folder and no ``pruning/`` in the bundle:
    the report key was ignored for one-shot pruners."""
    import json

    from deploycompress.cli import main

    (tmp_path / "tinymodel.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3),\n"
        "                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 2))\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {factory: 'tinymodel:make'}\ninput_shape: [1, 3, 8, 8]\n"
                      "prune: {pruner: L1NormPruner, config_list: [{sparsity: 0.5, op_types: [Conv2d]}], report: prunerep/}\n"
                      "build: {precision: fp32, iterations: 1}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "-q"]) == 0
    for where in (tmp_path / "prunerep", tmp_path / "o" / "pruning"):
        rows = json.loads((where / "pruning_history.json").read_text())
        assert rows[0]["pruner"] == "L1NormPruner"
        assert rows[0]["layers"] == {"0": 0.5, "2": 0.5}  # 4 of 8 and 3 of 6 filters
        assert rows[0]["sparsity"] == pytest.approx((4 * 27 + 3 * 72) / (8 * 27 + 6 * 72))
    dc.load_bundle(tmp_path / "o")  # listed in the manifest with its checksum


@pytest.mark.parametrize("quantize, build, named", [
    ("{bias_correction: true, calibration: calib.json}", "{precision: int8}", "--calib-data"),
    ("{bias_correction: true, data: 'slowmodel:batches'}", "{precision: fp32}", "--precision int8"),
    ("{bias_correction: true, data: 'slowmodel:batches'}", "{precision: int8, backend: tensorrt}", "--backend tensorrt"),
], ids=["calibration-json", "fp32", "tensorrt"])
def test_cli_bias_correction_that_cannot_apply_is_refused_before_pruning(tmp_path, capsys, monkeypatch, quantize, build, named):
    """Refused by build_engine, i.e. after the recipe's pruning rounds and fine-tuning, naming Python arguments."""
    from deploycompress.cli import main

    (tmp_path / "slowmodel.py").write_text(
        "import pathlib, torch\n"
        "def make():\n"
        "    pathlib.Path('built').write_text('x')\n"
        "    return torch.nn.Linear(4, 2)\n"
        "def batches():\n"
        "    return torch.randn(8, 4)\n")
    (tmp_path / "calib.json").write_text("{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {factory: 'slowmodel:make'}\ninput_shape: [1, 4]\n"
                      "prune: {pruner: AGPPruner, config_list: [{sparsity: 0.5, op_types: [Linear]}], "
                      "options: {pruning_algorithm: l1, total_iteration: 2}}\n"
                      f"quantize: {quantize}\nbuild: {build}\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--bias-correction" in err and named in err
    assert not (tmp_path / "built").exists() and not (tmp_path / "o").exists()


def test_quantize_transformer_takes_the_path_of_a_distilbert_graph(tmp_path):
    """docs/transformers.md's ``quantize_transformer(fp32_onnx, ...)`` given a path (as onnxruntime's quantizers
    take one): ``AttributeError: 'str' object has no attribute 'graph'``."""
    import onnx
    import onnxruntime as ort
    import transformers

    from deploycompress.hf import Encoder
    from deploycompress.hf.int8 import quantize_transformer

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    encoder = Encoder(transformers.DistilBertModel(config).eval())
    ids, mask = torch.randint(3, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    exported = dc.to_onnx(encoder, (ids, mask))
    path = tmp_path / "distilbert.onnx"
    onnx.save(exported.model, str(path))
    rng = np.random.RandomState(0)
    feeds = [{"input_ids": rng.randint(3, 100, (2, 12)).astype(np.int64), "attention_mask": np.ones((2, 12), np.int64)}
             for _ in range(4)]
    result = quantize_transformer(str(path), feeds, fuse="plain", flavour="qdq")
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = fp32.run(None, feeds[0])[0], int8.run(None, feeds[0])[0]
    assert any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for n in result.model.graph.node)
    assert float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min()) > 0.99
    with pytest.raises(ValueError, match="not a file"):
        quantize_transformer(str(tmp_path / "missing.onnx"), feeds)


def test_speedup_warning_names_each_layers_coupled_partners_once():
    """shufflenet_v2 pruned dependency-aware: the SpeedupWarning said, for one layer, "coupled with unmasked
    channels of 'a', 'b', 'c', coupled with unmasked channels of 'a', 'b', coupled with ..." (one reason per
    distinct partner set)."""
    import re

    import torchvision

    from deploycompress.speedup.report import SpeedupWarning

    torch.manual_seed(0)
    model, x = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    pruner = dc.L1NormPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    with pytest.warns(SpeedupWarning) as record:
        dc.speedup(pruner.unwrap_model(), masks, x)
    text = " ".join(str(w.message) for w in record if "keep" in str(w.message))
    layers = re.findall(r"(\S+) keeps \d+ \((.*?)\)(?:; |$| and \d+ more layers)", text)
    assert layers, text
    for name, why in layers:
        assert why.count("coupled with unmasked channels of") <= 1, (name, why)


def test_dependency_aware_pruning_and_speedup_take_a_dict_of_inputs_as_build_engine_does():
    """``build_engine(example_inputs={"image": ..., "table": ...})`` works; the same dict as the pruner's
    ``dummy_input`` raised ``TypeError: forward() missing 1 required positional argument: 'table'``, and
    ``speedup`` refused it."""
    torch.manual_seed(0)
    model = _TwoInTwoOut().eval()
    x = {"table": torch.randn(1, 5), "image": torch.randn(1, 3, 8, 8)}  # not in forward's order
    reference = copy_eval(model)  # the user's model before pruning
    pruner = dc.L1NormPruner(model, [{"sparsity": 0.5, "op_names": ["img.0", "tab.0"]}], dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    plain = pruner.unwrap_model()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, entry in masks.items():  # the user's masked model: masks multiplied into the named tensors
            for attr, mask in entry.items():
                getattr(modules[name], attr).mul_(mask.to(torch.float32))
    small = dc.speedup(plain, masks, x)
    assert small.img[0].out_channels == 4 and small.tab[0].out_features == 4
    ev = {"image": torch.randn(6, 3, 8, 8), "table": torch.randn(6, 5)}
    with torch.no_grad():
        got, expected = small(**ev), reference(**ev)
    for key in ("cls", "reg"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_a_copied_portable_tensorrt_bundle_names_its_own_device_build_command(tmp_path):
    """Loading a portable bundle said ``build it on the device first: python -m deploycompress_device BUNDLE``:
    neither the folder nor the PYTHONPATH the device package needs (docs/tensorrt.md)."""
    import re
    import shutil

    torch.manual_seed(0)
    model, x = _small_cnn(), torch.randn(4, 3, 8, 8)
    dc.build_engine(model, None, None, example_inputs=x[:1], calib_data=[x], backend="tensorrt", precision="int8",
                    out_dir=tmp_path / "b", backend_options={"portable": True}, **FAST)
    copied = Path(shutil.copytree(tmp_path / "b", tmp_path / "elsewhere" / "b"))
    with pytest.raises(dc.BackendError, match=re.escape(f"deploycompress device-build {copied} ")) as info:
        dc.load_bundle(copied)
    assert f"PYTHONPATH={copied}/device python3 -B -m deploycompress_device {copied}" in str(info.value)
    runner = dc.load_bundle(copied, member="source/model.fp32.onnx", backend="onnxruntime")  # the alternative named
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(runner.run(x.numpy())["output"], expected, rtol=1e-4, atol=1e-5)


def test_cli_validate_reads_one_hot_labels_and_refuses_labels_outside_the_classes(tmp_path, capsys):
    """One-hot ``y`` (N, classes) gave ``operands could not be broadcast together with shapes (16,) (64,)``
    (exit 1); labels past the model's classes scored 0 % accuracy and PASSED."""
    import json

    from deploycompress.cli import main

    torch.manual_seed(0)
    model, x = _small_cnn(), torch.randn(16, 3, 8, 8)
    dc.build_engine(model, None, None, example_inputs=x[:1], precision="fp32", out_dir=tmp_path / "b", **FAST)
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    y = predicted.copy()
    y[:5] = (y[:5] + 1) % 4  # 11 of 16 right
    np.savez(tmp_path / "onehot.npz", x=x.numpy(), y=np.eye(4, dtype=np.float32)[y])
    np.savez(tmp_path / "outside.npz", x=x.numpy(), y=y + 4)
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "b"), "--data", str(tmp_path / "onehot.npz"), "--json", "-q",
                 "--iterations", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert json.dumps(doc).count(str(11 / 16)) >= 1, doc  # the accuracy, as computed here
    assert main(["validate", str(tmp_path / "b"), "--data", str(tmp_path / "outside.npz"), "-q"]) == 2
    assert "4 classes (0 to 3)" in capsys.readouterr().err


@pytest.mark.parametrize("entry", [{"quant_bits": 4}, {"quant_bits": {"weight": 8, "input": 6}}, {"quant_dtype": "int4"}],
                         ids=["bits", "bits-dict", "nni3-dtype"])
def test_build_engine_refuses_non_8_bit_quant_config_before_calibrating(tmp_path, entry):
    """``quant_config_list`` with 4-bit weights was refused only at the Q/DQ step, after calibrating on every batch."""
    seen = []

    class Counting(nn.Module):  # counts the calibration's forward passes
        def __init__(self):
            super().__init__()
            self.net = _small_cnn()

        def forward(self, x):
            seen.append(len(x))
            return self.net(x)

    model, x = Counting().eval(), torch.randn(8, 3, 8, 8)
    config = [{"op_types": ["Conv2d"], "quant_types": ["input", "weight"], **entry}]
    if "quant_dtype" in entry:
        config[0]["quant_bits"] = 8
    with pytest.raises(dc.EngineError, match=r"quant_config_list\[0\] asks for [46]-bit .*give quant_bits 8"):
        dc.build_engine(model, None, None, example_inputs=x[:1], calib_data=[x[:4], x[4:]], quant_config_list=config,
                        precision="int8", out_dir=tmp_path / "b", **FAST)
    assert 4 not in seen  # no calibration batch went through the model
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("cls", ["AGPPruner", "LinearPruner"])
def test_total_sparsity_with_speedup_rounds_ends_near_the_asked_budget(cls):
    """Three rounds with speedup between them on a residual block end at the asked 0.5 counted from the widths, at
    most one residual channel (the stem's and c2's filters: 0.024 of the weights) below it (before: AGP 0.745,
    Linear 0.416: residual partners pruned apart, later rounds ranking channels at their shrunk cost)."""
    from deploycompress import pruning
    from scheduled_helpers import ResBlockNet

    torch.manual_seed(0)
    model, x, names = ResBlockNet().eval(), torch.randn(2, 3, 8, 8), ["stem", "c1", "c2", "c3"]
    p = getattr(pruning, cls)(model, [{"total_sparsity": 0.5, "op_types": ["Conv2d"]}], "fpgm", total_iteration=3,
                              speedup=True, dummy_input=x, pruning_params={"dependency_aware": True})  # fmt: skip
    out, _ = p.compress()
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    removed = sum((model.get_submodule(n).weight.shape[0] - out.get_submodule(n).weight.shape[0]) * model.get_submodule(n).weight[0].numel() for n in names)
    slot = (model.stem.weight[0].numel() + model.c2.weight[0].numel()) / total
    assert 0.5 - slot <= removed / total <= 0.5, removed / total
    assert abs(p.history[-1].sparsity - removed / total) < 1e-9
