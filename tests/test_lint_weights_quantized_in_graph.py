"""lint_qdq on NVIDIA ModelOpt's layout: float weights quantized in the graph (initializer -> QuantizeLinear ->
DequantizeLinear -> Conv), which TensorRT folds into an int8 weight, the same placement as an int8 initializer
behind a DequantizeLinear. The graphs are written here node by node in that layout (ModelOpt 0.47's
``--quantize_mode int8`` output: per-channel weight Q/DQ on axis 0, int8 zero points, float bias, the
classifier Gemm left float)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploycompress.export import lint_qdq


def _modelopt_layout(weight_scale: np.ndarray, weight_axis: int = 0, weight_zp_dtype=np.int8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((5, 8)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(w, "conv.weight"),
        numpy_helper.from_array(weight_scale.astype(np.float32), "conv.weight_scale"),
        numpy_helper.from_array(np.zeros(weight_scale.shape, weight_zp_dtype), "conv.weight_zp"),
        numpy_helper.from_array(np.zeros(8, np.float32), "conv.bias"),
        numpy_helper.from_array(fc, "fc.weight"),
        numpy_helper.from_array(np.zeros(5, np.float32), "fc.bias"),
    ]
    axis = {"axis": weight_axis} if weight_scale.size > 1 else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DequantizeLinear"),
        helper.make_node("QuantizeLinear", ["conv.weight", "conv.weight_scale", "conv.weight_zp"], ["w_q"], name="w_QuantizeLinear", **axis),
        helper.make_node("DequantizeLinear", ["w_q", "conv.weight_scale", "conv.weight_zp"], ["w_dq"], name="w_DequantizeLinear", **axis),
        helper.make_node("Conv", ["x_dq", "w_dq", "conv.bias"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["p"], ["f"], name="/Flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(nodes, "modelopt_layout", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_weights_quantized_in_the_graph_are_the_equivalent_placement():
    model = _modelopt_layout(np.full(8, 0.01))
    assert lint_qdq(model, "tensorrt") == []
    # the layout is a runnable graph (onnxruntime folds the weight pair too)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros((1, 3, 8, 8), np.float32)})[0]
    assert out.shape == (1, 5)


@pytest.mark.parametrize("scale, axis, zp_dtype, rule", [
    (np.array(0.01), 0, np.int8, "weight-per-channel"),  # one scale for the whole weight
    (np.full(3, 0.01), 1, np.int8, "weight-per-channel"),  # per input channel
    (np.full(8, 0.01), 0, np.uint8, "weight-symmetric"),  # uint8: not symmetric int8
])
def test_rules_still_apply_to_weights_quantized_in_the_graph(scale, axis, zp_dtype, rule):
    model = _modelopt_layout(scale, axis, zp_dtype)
    rules = {f.rule for f in lint_qdq(model, "tensorrt") if f.node == "/conv/Conv"}
    assert rule in rules
