"""tools/bench_transformers.ort_peer: onnxruntime's quantizers built from a JSON spec (the matched peers of target (b))."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_transformers import ort_peer  # noqa: E402


def two_linears() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n) for n in ("w1", "w2"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="second")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], [w1, w2])  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def float_matmuls(m: onnx.ModelProto) -> set[str]:
    """Names of the nodes still a float MatMul reading a float initializer as B."""
    floats = {i.name for i in m.graph.initializer if i.data_type == TensorProto.FLOAT}
    return {n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in floats}


def test_dynamic_spec_leaves_excluded_nodes_float(tmp_path: Path) -> None:
    fp32 = two_linears()
    q = ort_peer(fp32, None, {"tool": "dynamic", "name": "x", "per_channel": True, "weight_type": "QUInt8", "nodes_to_exclude": ["first"]}, tmp_path)
    assert float_matmuls(q) == {"first"}
    weights = {i.data_type for i in q.graph.initializer if i.name.startswith("w2") and i.data_type != TensorProto.FLOAT}  # not the scales
    assert weights == {TensorProto.UINT8}  # "QUInt8" by name
    assert float_matmuls(ort_peer(fp32, None, {"tool": "dynamic"}, tmp_path)) == set()


def test_static_spec_calibrates_on_the_feeds_and_reuses_the_cache(tmp_path: Path) -> None:
    fp32 = two_linears()
    calib = [{"x": np.random.default_rng(i).standard_normal((4, 16)).astype(np.float32)} for i in range(3)]
    spec = {"tool": "static", "quant_format": "QOperator", "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
            "calibrate_method": "MinMax", "nodes_to_exclude": ["second"]}  # fmt: skip
    cache = tmp_path / "ranges.json"
    q = ort_peer(fp32, calib, spec, tmp_path, cache)
    assert float_matmuls(q) == {"second"} and "QLinearMatMul" in {n.op_type for n in q.graph.node}
    assert cache.is_file()
    again = ort_peer(fp32, None, spec, tmp_path, cache)  # no feeds: the ranges come from the cache
    assert [n.op_type for n in again.graph.node] == [n.op_type for n in q.graph.node]


def test_unknown_tool_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantize_dynamic"):
        ort_peer(two_linears(), None, {"tool": "qat"}, tmp_path)
