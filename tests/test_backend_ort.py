"""The onnxruntime backend: build (optimized model saved atomically), load, run, profile; the registry."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from deploycompress.backends import Backend, BackendError, LayerTime, Runner, get_backend
from test_qdq import write_digits_graphs

KINDS = {nn.Conv2d: ("input", "weight"), nn.Linear: ("input", "weight"), nn.MaxPool2d: ("output",)}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ort")
    model, x = write_digits_graphs(tmp, 32, KINDS)
    return model, x, tmp


def test_build_load_run_fp32_matches_torch(graphs, tmp_path):
    model, x, src = graphs
    backend = get_backend("onnxruntime")
    assert isinstance(backend, Backend)
    path = backend.build(src / "fp32.onnx", tmp_path / "out", precision="fp32", optimization_level="extended", threads=1)
    assert path == tmp_path / "out" / "model.onnx" and path.is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.onnx"]  # no temp file left behind
    runner = backend.load(path, threads=1)
    assert isinstance(runner, Runner)
    assert runner.inputs[0].name == "x" and runner.inputs[0].shape[1:] == (1, 8, 8)
    out = runner.run({"x": x.numpy()})
    np.testing.assert_allclose(out["output"], model(x).detach().numpy(), atol=1e-4)


def test_int8_build_fuses_into_integer_kernels_and_profiles(graphs, tmp_path):
    _, x, src = graphs
    backend = get_backend("onnxruntime")
    runner = backend.load(backend.build(src / "int8.onnx", tmp_path, precision="int8", threads=1), threads=1)
    layers = runner.profile({"x": x[:4].numpy()}, iterations=3)
    assert layers and all(isinstance(lt, LayerTime) and lt.mean_ms >= 0 for lt in layers)
    ops = {lt.op_type for lt in layers}
    assert "QLinearConv" in ops, ops  # DQ -> Conv -> Q became one integer convolution
    assert layers == sorted(layers, key=lambda lt: -lt.mean_ms)
    assert all(lt.extra["provider"] == "CPUExecutionProvider" for lt in layers)


def test_optimization_levels_agree(graphs, tmp_path):
    _, x, src = graphs
    backend = get_backend("onnxruntime")
    path = backend.build(src / "int8.onnx", tmp_path, precision="int8")
    outs = [backend.load(path, optimization_level=lvl, threads=1).run({"x": x.numpy()})["output"] for lvl in ("disable", "all")]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


def test_build_errors_are_clear_and_leave_nothing(graphs, tmp_path):
    _, _, src = graphs
    backend = get_backend("onnxruntime")
    out = tmp_path / "out"
    with pytest.raises(BackendError, match="needs a QDQ graph"):
        backend.build(src / "fp32.onnx", out, precision="int8")
    with pytest.raises(BackendError, match="precision 'int8'"):
        backend.build(src / "int8.onnx", out, precision="fp32")
    with pytest.raises(BackendError, match="precision must be one of"):
        backend.build(src / "int8.onnx", out, precision="fp16")
    with pytest.raises(BackendError, match="optimization_level"):
        backend.build(src / "int8.onnx", out, optimization_level="max")
    with pytest.raises(BackendError, match="TensorrtExecutionProvider"):
        backend.build(src / "int8.onnx", out, providers=["TensorrtExecutionProvider"])
    with pytest.raises(BackendError, match="does not exist"):
        backend.build(tmp_path / "missing.onnx", out)
    assert not out.exists()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(BackendError, match="not a readable ONNX model"):
        backend.build(broken, out, precision="fp32")
    assert not out.exists()


def test_run_checks_feed_names(graphs, tmp_path):
    _, x, src = graphs
    backend = get_backend("onnxruntime")
    runner = backend.load(backend.build(src / "fp32.onnx", tmp_path, precision="fp32"))
    with pytest.raises(BackendError, match="missing \\['x'\\]"):
        runner.run({"input": x.numpy()})


def test_registry_names_tensorrt_and_unknown_backends(tmp_path):
    """The TensorRT backend is always registered; without TensorRT its build and load say how to get it."""
    try:
        import tensorrt

        real = hasattr(tensorrt, "Builder")
    except ImportError:
        real = False
    trt_backend = get_backend("tensorrt")
    assert trt_backend.name == "tensorrt" and trt_backend.artifact_name == "model.plan"
    if not real:
        onnx_file = tmp_path / "m.onnx"
        onnx_file.write_bytes(b"")
        with pytest.raises(BackendError, match="TensorRT is not installed.*portable bundle"):
            trt_backend.build(onnx_file, tmp_path / "out", precision="fp32")
        (tmp_path / "model.plan").write_bytes(b"x")
        with pytest.raises(BackendError, match="TensorRT is not installed"):
            trt_backend.load(tmp_path / "model.plan")
    with pytest.raises(BackendError, match="portable bundle, not an engine"):
        trt_backend.load(tmp_path / "model.onnx")
    with pytest.raises(BackendError, match="known backends"):
        get_backend("openvino")
