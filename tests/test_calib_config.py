"""CalibConfig: the versioned JSON every later step reads, its checks, and NNI's calibration dicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from calibrators import params_from_range
from deploycompress.quantization import CALIB_VERSION, CalibConfig, CalibConfigError


def _calib() -> CalibConfig:
    c = CalibConfig()
    c.set("conv1", "weight", params_from_range(np.array([-1.0, -2.0]), np.array([1.0, 0.5]), axis=0))
    c.set("conv1", "input", params_from_range(0.0, 1.0, signed=False, symmetric=False))
    c.set("fc", "output", params_from_range(-3.0, 5.0))
    return c


def test_round_trip_is_exact_and_atomic(tmp_path):
    c = _calib()
    path = c.save(tmp_path / "sub" / "calib.json")
    data = json.loads(path.read_text())
    assert data["version"] == CALIB_VERSION and set(data["modules"]) == {"conv1", "fc"}
    assert data["modules"]["conv1"]["weight"]["axis"] == 0 and len(data["modules"]["conv1"]["weight"]["scale"]) == 2
    back = CalibConfig.load(path)
    assert back.to_dict() == c.to_dict() and back.digest() == c.digest() and len(back) == 3
    assert [p.name for p in path.parent.iterdir()] == ["calib.json"]  # no temp file left


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("version"), "no 'version' field"),
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d["modules"]["conv1"]["weight"].pop("scale"), r"conv1.weight: missing field\(s\) \['scale'\]"),
        (lambda d: d["modules"]["fc"]["output"].update(scale=[float("nan")]), "fc.output: 'scale' holds NaN or inf"),
        (lambda d: d["modules"]["fc"]["output"].update(min=[float("inf")]), "fc.output: 'min' holds NaN or inf"),
        (lambda d: d["modules"]["fc"]["output"].update(bits=40), "fc.output: 'bits' must be an integer from 2 to 16"),
        (lambda d: d["modules"]["fc"]["output"].update(zero_point=[300]), r"fc.output: 'zero_point' must be integers in \[-128, 127\]"),
        (lambda d: d["modules"]["fc"]["output"].update(dtype="float"), "fc.output: 'dtype' must be 'int' or 'uint'"),
        (lambda d: d["modules"]["conv1"]["weight"].update(zero_point=[0]), "conv1.weight: scale, zero_point, min and max differ in length"),
        (lambda d: d["modules"]["fc"].update(bias={}), "calibration of fc: unknown tensor kind 'bias'"),
        (lambda d: d["modules"]["fc"]["output"].update(extra=1), r"fc.output: unknown field\(s\) \['extra'\]"),
    ],
)
def test_malformed_files_name_the_tensor_and_field(tmp_path, mutate, message):
    data = _calib().to_dict()
    mutate(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibConfigError, match=message):
        CalibConfig.load(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(CalibConfigError, match="does not exist"):
        CalibConfig.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibConfigError, match="is not valid JSON"):
        CalibConfig.load(tmp_path / "bad.json")
    with pytest.raises(CalibConfigError, match="tensor kind must be one of"):
        CalibConfig().set("a", "bias", params_from_range(0.0, 1.0))


def test_validate_against_a_model():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 2, 3))
    model.add_module("fc", nn.Linear(4, 4))
    c = _calib()
    c.validate(model)
    c.set("conv1", "weight", params_from_range(np.zeros(3), np.ones(3), axis=0))
    with pytest.raises(CalibConfigError, match="conv1.weight: 3 scales on axis 0, but the weight has 2 channels"):
        c.validate(model)
    c.set("conv9", "input", params_from_range(0.0, 1.0))
    with pytest.raises(CalibConfigError, match=r"module\(s\) the model lacks: \['conv9'\]"):
        c.validate(model)


def test_nni_calibration_dicts():
    nni = {
        "conv1": {
            "weight_bits": 8,
            "weight_scale": torch.tensor([0.01, 0.02]),
            "weight_zero_point": torch.tensor([0, 0]),
            "input_bits": 8,
            "tracked_min_input": -1.0,
            "tracked_max_input": 2.0,
        },
        "fc": {"output_bits": 8, "tracked_min_output": 0.0, "tracked_max_output": 6.0},
    }
    c = CalibConfig.from_dict(nni)
    w = c.get("conv1", "weight")
    assert w.axis == 0 and w.scale.tolist() == pytest.approx([0.01, 0.02]) and w.symmetric and w.dtype == "int"
    # a QAT export (weight_scale present): NNI 2.x QAT's default activations are uint8 affine
    # (nni/compression/pytorch/quantization/settings.py), scale = range / 255, zp = -round(min / scale)
    x = c.get("conv1", "input")
    assert x.dtype == "uint" and x.scale[0] == np.float32(3.0 / 255) and x.zero_point[0] == 85
    assert c.get("fc", "output").max[0] == pytest.approx(6.0) and len(c) == 3
    u8 = CalibConfig.from_nni({"a": {"weight_bits": 8, "weight_scale": 0.1, "weight_zero_point": 128}})
    assert u8.get("a", "weight").dtype == "uint" and u8.get("a", "weight").zero_point[0] == 128
    with pytest.raises(CalibConfigError, match=r"NNI 2.x calibration of conv1.input: 'tracked_min_input' is empty or not finite"):
        CalibConfig.from_nni({"conv1": {"input_bits": 8, "tracked_min_input": float("nan"), "tracked_max_input": 1.0}})
    with pytest.raises(CalibConfigError, match="'output_bits' given without"):
        CalibConfig.from_nni({"fc": {"output_bits": 8}})
