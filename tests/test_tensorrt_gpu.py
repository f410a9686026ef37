"""TensorRT on a GPU: engines built, compared with onnxruntime, timed; the device build of a portable bundle.

Marked ``tensorrt`` and skipped where TensorRT (the real package, not its stubs) or a GPU is missing;
``tools/device_check.sh`` runs this file in one command on a machine that has them. With
``DC_DEVICE_REPORT=path.json`` the measured figures are written there (int8 vs fp16 said either way).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import deploycompress as dc
from deploycompress.backends.tensorrt import tensorrt_available

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu,
              pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and an NVIDIA GPU (tools/device_check.sh)")]

REPORT: dict = {}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _p50_ms(runner, feeds, n: int = 200) -> float:
    for _ in range(20):
        runner.run(feeds)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        runner.run(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


@pytest.fixture(scope="module")
def resnet18_bundle(tmp_path_factory):
    """A portable bundle of torchvision's resnet18 (int8 QDQ + fp16 graphs), written even though TensorRT is here."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(64, 3, 224, 224)
    out = tmp_path_factory.mktemp("gpu") / "resnet18"
    art = dc.build_engine(model, example_inputs=x[:1], backend="tensorrt", precision="int8", out_dir=out,
                          calib_data=[x[i:i + 16] for i in range(0, 64, 16)], eval_inputs=x[:16], name="resnet18",
                          max_batch_size=32, backend_options={"portable": True, "timing_cache": str(out.parent / "timing.cache")},
                          progress=False)
    return art, model, x


def test_int8_and_fp16_engines_match_onnxruntime_and_int8_is_faster(resnet18_bundle, tmp_path):
    import onnxruntime as ort

    art, model, x = resnet18_bundle
    backend = dc.get_backend("tensorrt")
    name = onnx.load(str(art.out_dir / "source/model.fp32.onnx")).graph.input[0].name
    feeds = {name: x[:8].numpy()}
    results = {}
    for precision in ("int8", "fp16"):
        graph = art.out_dir / f"tensorrt/model.{precision}.onnx"
        plan = backend.build(graph, tmp_path / precision, precision=precision, max_batch_size=32)
        runner = backend.load(plan)
        got = next(iter(runner.run(feeds).values()))
        ref = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        layers = runner.profile({name: x[:1].numpy()}, iterations=10)
        assert layers and all(lt.mean_ms >= 0 for lt in layers)
        results[precision] = {"cosine_vs_onnxruntime": _cosine(got, ref), "max_abs_vs_onnxruntime": float(np.abs(got - ref).max()),
                              "p50_ms_batch1": _p50_ms(runner, {name: x[:1].numpy()}),
                              "p50_ms_batch32": _p50_ms(runner, {name: x[:32].numpy()}, n=50)}
        assert results[precision]["cosine_vs_onnxruntime"] > (0.99 if precision == "int8" else 0.999), results
    faster = results["int8"]["p50_ms_batch32"] < results["fp16"]["p50_ms_batch32"]
    REPORT["resnet18"] = {**results, "int8_faster_than_fp16": faster}
    assert faster, f"int8 is not faster than fp16 on this GPU: {results}"


def test_device_build_publishes_a_checked_engine_and_updates_the_manifest(resnet18_bundle, tmp_path):
    from deploycompress_device.device_build import device_build

    art, _, x = resnet18_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(art.out_dir, bundle)
    res = device_build(bundle, iterations=20)
    manifest = dc.verify_bundle(bundle)
    assert manifest.artifact == "model_repository/resnet18/1/model.plan" and res.plan_path.is_file()
    assert manifest.environment["versions"]["tensorrt"] == res.tensorrt_version
    assert manifest.environment["gpu"]["compute_capability"] == res.gpu["compute_capability"]
    assert manifest.extra["tensorrt"]["status"] == "built"
    assert (bundle / "model_repository/resnet18/config.pbtxt").read_text() == (bundle / "tensorrt/config.pbtxt").read_text()
    runner = dc.load_bundle(bundle)
    name, out = runner.inputs[0].name, runner.outputs[0].name
    with np.load(bundle / "tensorrt/golden.npz") as g:
        got = runner.run({name: g[f"input:{name}"]})[out]
        assert _cosine(got, g[f"output:{out}"]) > 0.98
    report = json.loads((bundle / "tensorrt/device_report.json").read_text())
    assert report["within_tolerances"] and report["layers"] and report["latency_ms"]["p50"] > 0
    REPORT["device_build"] = {"latency_ms": res.latency_ms, "fidelity": res.fidelity, "strongly_typed": res.strongly_typed}


def test_timing_cache_is_written_and_options_build(resnet18_bundle, tmp_path):
    art, _, _ = resnet18_bundle
    backend = dc.get_backend("tensorrt")
    cache = tmp_path / "t.cache"
    graph = art.out_dir / "tensorrt/model.fp16.onnx"
    backend.build(graph, tmp_path / "a", precision="fp16", timing_cache=str(cache), optimization_level=1, workspace_mib=1024)
    assert cache.is_file() and cache.stat().st_size > 0
    backend.build(graph, tmp_path / "b", precision="fp16", timing_cache=str(cache), refit=True, strip_weights=True,
                  hardware_compatibility="ampere_plus")
    assert (tmp_path / "b/model.plan").stat().st_size < (tmp_path / "a/model.plan").stat().st_size  # weights stripped


def test_parser_error_names_the_onnx_node(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="cubic_resize", mode="cubic")
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])], initializer=[scales])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(dc.BackendError, match="cubic_resize"):
        dc.get_backend("tensorrt").build(path, tmp_path / "out", precision="fp32")


def test_dla_fallback_layers_are_listed_where_dla_exists(resnet18_bundle, tmp_path):
    import tensorrt as trt

    if trt.Builder(trt.Logger()).num_DLA_cores == 0:
        pytest.skip("no DLA core on this device")
    art, _, _ = resnet18_bundle
    plan = dc.get_backend("tensorrt").build(art.out_dir / "tensorrt/model.fp16.onnx", tmp_path, precision="fp16",
                                            dla_core=0, example_shapes={"x": [1, 3, 224, 224]})
    assert plan.is_file()


def teardown_module(module):
    path = os.environ.get("DC_DEVICE_REPORT")
    if path and REPORT:
        Path(path).write_text(json.dumps(REPORT, indent=1))
