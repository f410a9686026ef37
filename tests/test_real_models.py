"""build_engine as a new user runs it: vanished modules, data-dependent control flow, calibration that
cannot be right, the pruner's own (parametrized) model, names of inputs and outputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from deploycompress import L1NormPruner, build_engine
from deploycompress.engine import BuildStepError, EngineError
from deploycompress.export import CalibrationSkippedWarning, TracerWarning, to_onnx
from deploycompress.quantization import CalibConfig, PTQQuantizer
from deploycompress.quantization.ptq import CalibrationRangeWarning
from deploycompress.tensor_io import flatten_outputs, name_inputs
from calibrators import params_from_range


class WithPooler(nn.Module):
    """An encoder whose pooler the wrapper never uses (BERT's pooler under a token-level head)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pooler = nn.Linear(8, 8)  # calibrated by type, absent from the graph
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.conv(x)))


def test_a_calibrated_module_absent_from_the_graph_is_skipped_and_reported(tmp_path):
    torch.manual_seed(0)
    model = WithPooler().eval()
    x = torch.randn(8, 3, 16, 16)
    calib = CalibConfig()
    calib.set("pooler", "input", params_from_range(-1.0, 1.0))
    calib.set("pooler", "weight", params_from_range(-np.ones(8), np.ones(8), axis=0))
    q = PTQQuantizer(model, [{"op_types": ["Conv2d"], "quant_types": ["input", "weight", "output"]}])
    q.calibrate([x])
    for m, k, p in q.export_calib_config().items():
        calib.set(m, k, p)
    q.unwrap_model()
    with pytest.warns(CalibrationSkippedWarning, match="pooler"):
        art = build_engine(model, None, calib, example_inputs=x[:2], out_dir=tmp_path / "b", batch_sizes=(), compare_fp32=False,
                           progress=False)
    skipped = {(s["module"], s["kind"]) for s in art.report.qdq["skipped_calibration"]}
    assert skipped == {("pooler", "input"), ("pooler", "weight")}
    assert art.report.qdq["int8_weighted_ops"] == 2 and art.report.qdq["lint"] == []


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent: the trace keeps one branch
            return self.fc(x)
        return self.fc(-x) * 2


def test_data_dependent_control_flow_is_an_error_naming_the_output(tmp_path):
    model = Branchy().eval()
    pos, neg = torch.rand(4, 4) + 0.1, -torch.rand(16, 4) - 0.1
    with pytest.warns(TracerWarning), pytest.raises(BuildStepError, match="output 'output'.*relative max"):
        build_engine(model, None, None, example_inputs=pos, precision="fp32", eval_inputs=neg, out_dir=tmp_path / "b",
                     batch_sizes=(), progress=False)
    assert not (tmp_path / "b").exists()


def test_zero_calibration_batches_warn_naming_the_tensor():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval()
    q = PTQQuantizer(model, [{"op_types": ["Conv2d"], "quant_types": ["input", "weight"]}])
    with pytest.warns(CalibrationRangeWarning, match=r"calibration of 0\.input: the observed range is \[0, 0\]"):
        q.calibrate([torch.zeros(4, 1, 8, 8)])


@pytest.mark.parametrize("break_it,match", [
    (lambda p: params_from_range(p.min, p.max, axis=4), "axis 4 is out of range"),
    (lambda p: params_from_range(p.min[:2], p.max[:2], axis=0), "2 scales on axis 0"),
    (lambda p: params_from_range(p.min, p.max, axis=0, bits=4), "8-bit"),
])
def test_a_calibration_that_does_not_fit_is_refused_before_work(tmp_path, break_it, match):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    q = PTQQuantizer(model, [{"op_types": ["Conv2d"], "quant_types": ["input", "weight"]}])
    q.calibrate([torch.randn(4, 1, 8, 8)])
    calib = q.export_calib_config()
    q.unwrap_model()
    calib.set("0", "weight", break_it(calib.get("0", "weight")))
    with pytest.raises(EngineError, match=match):
        build_engine(model, None, calib, example_inputs=torch.randn(1, 1, 8, 8), out_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_the_pruners_model_keeps_working_after_a_build(tmp_path):
    """The README flow: build_engine(model, masks) with the model compress() returned, masks still attached."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4)).eval()
    model, masks = L1NormPruner(net, [{"op_types": ["Conv2d"], "sparsity": 0.5}]).compress()
    x = torch.randn(4, 3, 12, 12)
    before = model(x).detach().clone()
    build_engine(model, masks, None, example_inputs=x[:1], precision="fp32", out_dir=tmp_path / "b", batch_sizes=(), progress=False)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_inputs_and_outputs_are_named_after_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 3)

        def forward(self, ids, mask=None, scale=None):
            return {"a": self.a(ids), "pair": (self.b(ids * mask), self.b(ids))}

    x = torch.randn(2, 4)
    named = name_inputs(Net(), {"mask": x, "ids": x})
    assert named.names == ("ids", "mask")
    assert list(flatten_outputs(Net()(x, x))) == ["a", "pair.0", "pair.1"]
    exported = to_onnx(Net().eval(), {"ids": x, "mask": x})
    assert [i.name for i in exported.inputs] == ["ids", "mask"]
    assert [o.name for o in exported.outputs] == ["a", "pair.0", "pair.1"]
    assert list(flatten_outputs(torch.zeros(1))) == ["output"] and list(flatten_outputs((x, x))) == ["output.0", "output.1"]
    with pytest.raises(ValueError, match="'tokens'.*not parameters"):
        name_inputs(Net(), {"tokens": x})
