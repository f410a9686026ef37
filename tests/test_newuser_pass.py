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
