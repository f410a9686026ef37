"""TensorRT pre-build checks without TensorRT: the ONNX-TensorRT operator table, Q/DQ rules, DLA rules;
build options, strong typing and profiles; build_engine refuses before any work on an error."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import deploycompress as dc
from deploycompress.engine import EngineError
from deploycompress.export.tensorrt_checks import check_tensorrt
from deploycompress_device.checks import OP_TABLE_PATH, check_dla, check_operators, op_table
from deploycompress_device.plan import BuildOptions, Profile, make_profiles, network_is_strongly_typed


def _graph(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_operator_table_is_onnx_tensorrt_support_matrix_with_its_source():
    data = json.loads(OP_TABLE_PATH.read_text())
    table = data["tables"]["10.1"]
    assert table["source"] == f"https://github.com/onnx/onnx-tensorrt/blob/{table['commit']}/docs/operators.md"
    assert table["opset_range"] == [9, 20]
    ops = table["operators"]
    assert ops["Conv"]["supported"] and not ops["Bernoulli"]["supported"] and not ops["ConvInteger"]["supported"]
    assert "must be 0" in ops["QuantizeLinear"]["restrictions"]
    # a newer version falls back to the newest older table; an older one to the oldest there is
    assert op_table("10.13")[0] == "10.1" and op_table("9")[0] == "10.1"


def test_unsupported_unknown_and_custom_ops_are_errors_naming_the_node():
    m = _graph(
        [helper.make_node("Bernoulli", ["x"], ["b"], name="coin"),
         helper.make_node("FancyOp", ["b"], ["c"], name="mystery"),
         helper.make_node("Gelu", ["c"], ["y"], name="plugin", domain="com.example")],
        [_vi("x", [1, 4])], [_vi("y", [1, 4])],
    )
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    found = {(f.node, f.rule, f.severity) for f in check_operators(m, "10.1")}
    assert ("coin", "op-unsupported", "error") in found
    assert ("mystery", "op-unsupported", "error") in found
    assert ("plugin", "op-custom-domain", "error") in found


def test_opset_outside_the_tables_range():
    m = _graph([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x", [1])], [_vi("y", [1])], opset=8)
    assert any(f.rule == "opset" and f.severity == "error" for f in check_operators(m, "10.1"))


def test_asymmetric_qdq_is_a_tensorrt_error_through_the_one_lint():
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(3, np.uint8), "z")
    m = _graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
        [_vi("x", [1, 4])], [_vi("y", [1, 4])], inits=[s, z],
    )
    check = check_tensorrt(m)
    assert {(f.node, f.rule) for f in check.errors} >= {("q", "tensorrt-symmetric"), ("dq", "tensorrt-symmetric")}
    assert not any(f.rule == "tensorrt-symmetric" for f in check_tensorrt(m, lint=False).findings)


def _dla_model():
    """Conv2d (DLA), Conv3d-shaped Conv (GPU), Concat on axis 2 (GPU), Relu (DLA)."""
    w2 = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w2"], ["c"], name="conv2d", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Concat", ["r", "r"], ["cat"], name="cat_h", axis=2),
        helper.make_node("Transpose", ["cat"], ["cat_t"], name="t", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["cat", "cat_t"], ["y"], name="mm"),
    ]
    m = _graph(nodes, [_vi("x", ["batch", 3, 8, 8])], [_vi("y", ["batch", 4, 16, 16])], inits=[w2])
    onnx.checker.check_model(m)
    return m


def test_dla_rules_list_the_layers_that_run_on_the_gpu():
    m = _dla_model()
    res = check_dla(m, trt_version="10.1", precision="int8", static_shapes={"x": [1, 3, 8, 8]})
    gpu = {g.split(" ")[0] for g in res.gpu_layers}
    assert gpu == {"cat_h", "mm"}
    assert all(f.severity == "warning" for f in res.findings)
    strict = check_dla(m, trt_version="10.1", precision="int8", gpu_fallback=False, static_shapes={"x": [1, 3, 8, 8]})
    assert {f.node for f in strict.findings if f.severity == "error"} == {"cat_h", "mm"}


def test_dla_needs_static_shapes_int8_or_fp16_and_a_tensorrt_that_has_it():
    m = _dla_model()
    assert any(f.rule == "dla-dynamic-shape" and f.node == "x" for f in check_dla(m).findings)
    assert any(f.rule == "dla-precision" for f in check_dla(m, precision="fp32", static_shapes={"x": [1, 3, 8, 8]}).findings)
    for version in ("11.0", "11.3"):
        assert [f.rule for f in check_dla(m, trt_version=version).findings] == ["dla-unavailable"]
    assert any(f.rule == "dla-platform" and "AGX Orin" in f.message for f in check_dla(m, trt_version="11.4", static_shapes={"x": [1, 3, 8, 8]}).findings)
    assert any(f.rule == "dla-batch" for f in check_dla(m, static_shapes={"x": [5000, 3, 8, 8]}).findings)


@pytest.mark.parametrize("major,qdq,fp16,override,expected", [
    (11, False, False, None, True), (11, True, False, True, True),
    (10, True, False, None, True), (10, False, True, None, True), (10, False, False, None, False),
    (10, True, False, False, False), (10, False, False, True, True),
])
def test_strong_typing_rule(major, qdq, fp16, override, expected):
    assert network_is_strongly_typed(major, qdq, fp16, override) is expected


def test_strong_typing_rule_refuses_impossible_requests():
    with pytest.raises(ValueError, match="strongly typed networks only"):
        network_is_strongly_typed(11, True, False, False)
    with pytest.raises(ValueError, match="older"):
        network_is_strongly_typed(8, True, False)


@pytest.mark.parametrize("kwargs,message", [
    ({"hardware_compatibility": "turing"}, "hardware_compatibility"), ({"optimization_level": 6}, "0-5"),
    ({"exclude_lean_runtime": True}, "version_compatible"), ({"strip_weights": True}, "refit"),
    ({"dla_core": 0, "hardware_compatibility": "ampere_plus"}, "DLA"), ({"workspace_mib": 0}, ">= 1"),
])
def test_build_options_refuse_contradictions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BuildOptions(**kwargs)
    with pytest.raises(ValueError, match="unknown TensorRT build option"):
        BuildOptions.from_dict({"int8_calibrator": "x"})


def test_profiles_cover_every_dynamic_axis():
    p = make_profiles([("x", ["batch", 3, 32, 32]), ("ids", ["batch", "seq"]), ("k", [1, 4])],
                      {"x": [2, 3, 32, 32], "ids": [2, 7]}, max_batch_size=16)
    assert p["x"] == Profile((1, 3, 32, 32), (2, 3, 32, 32), (16, 3, 32, 32))
    assert p["ids"] == Profile((1, 7), (2, 7), (16, 7)) and "k" not in p
    assert make_profiles([("x", ["batch", 3])], {"x": [4, 3]}, max_batch_size=16, static=True)["x"].static
    with pytest.raises(ValueError, match="no example shape"):
        make_profiles([("x", ["batch", 3])], {}, max_batch_size=4)


class _Det(torch.nn.Module):
    """Linear, then a determinant (ONNX Det: onnxruntime runs it, the ONNX-TensorRT parser does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * torch.linalg.det(y.view(-1, 2, 2)).unsqueeze(1)


def test_build_engine_refuses_an_unsupported_op_before_writing_anything(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(EngineError, match=r"(?s)Det.*op-unsupported"):
        dc.build_engine(_Det().eval(), example_inputs=torch.randn(2, 4), backend="tensorrt", precision="fp32",
                        out_dir=out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_build_engine_refuses_unknown_tensorrt_options(tmp_path):
    with pytest.raises(EngineError, match="unknown TensorRT build option"):
        dc.build_engine(_Det().eval(), example_inputs=torch.randn(2, 4), backend="tensorrt", precision="fp32",
                        out_dir=tmp_path / "b", backend_options={"fp16": True}, progress=False)
    with pytest.raises(EngineError, match="precision must be one of"):
        dc.build_engine(_Det().eval(), example_inputs=torch.randn(2, 4), backend="onnxruntime", precision="fp16",
                        out_dir=tmp_path / "b", progress=False)


def test_switch_options_map_to_each_tools_own_flag_spelling():
    from deploycompress_device.plan import BuildOptions, Profile, polygraphy_command, trtexec_command

    profiles = {"x": Profile((1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8))}
    on = BuildOptions(version_compatible=True, exclude_lean_runtime=True, refit=True, strip_weights=True)
    trt = trtexec_command("m.onnx", "m.plan", "int8", 11, profiles, on, strongly_typed=True)
    pg = polygraphy_command("m.onnx", "m.plan", "int8", 11, profiles, on, strongly_typed=True)
    # spelled as trtexec --help and polygraphy convert --help write them
    assert {"--versionCompatible", "--excludeLeanRuntime", "--refit", "--stripWeights"} <= set(trt)
    assert {"--version-compatible", "--exclude-lean-runtime", "--refittable", "--strip-plan"} <= set(pg)
    off_trt = trtexec_command("m.onnx", "m.plan", "int8", 11, profiles, BuildOptions(), strongly_typed=True)
    assert not {"--versionCompatible", "--refit", "--stripWeights"} & set(off_trt)
