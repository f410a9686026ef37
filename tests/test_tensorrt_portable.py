"""build_engine(..., backend="tensorrt") without TensorRT writes a portable bundle; the device package imports
and runs with torch absent. Oracles: the PyTorch model run here, the ONNX files read here, Triton's own
ModelConfig message."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import deploycompress as dc
from deploycompress.backends.tensorrt import tensorrt_available
from deploycompress.bundle import verify_bundle
from deploycompress.export import lint_qdq
from deploycompress_device.device_build import compare_golden
from deploycompress_device.plan import BuildPlan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def portable(trained_digits_module, digits_data, tmp_path_factory):
    model = trained_digits_module
    out = tmp_path_factory.mktemp("trt") / "digits"
    art = dc.build_engine(model, example_inputs=digits_data.test_x[:2], backend="tensorrt", precision="int8", out_dir=out,
                          calib_data=list(digits_data.batches(64))[:4], eval_inputs=digits_data.test_x[:32], name="digits",
                          max_batch_size=16, backend_options={"portable": True, "workspace_mib": 512, "optimization_level": 4},
                          progress=False)
    return art, model, digits_data


@pytest.fixture(scope="module")
def trained_digits_module(_trained_digits):
    import copy

    return copy.deepcopy(_trained_digits[0]).eval()


def test_bundle_layout_and_manifest_say_the_engine_is_pending(portable):
    art, _, _ = portable
    root = art.out_dir
    manifest = verify_bundle(root)
    assert manifest.backend == "tensorrt" and manifest.artifact == "tensorrt/model.int8.onnx"
    assert manifest.extra["tensorrt"]["status"] == "pending-device-build"
    for rel in ("tensorrt/build_plan.json", "tensorrt/model.int8.onnx", "tensorrt/model.fp16.onnx", "tensorrt/golden.npz",
                "tensorrt/config.pbtxt", "tensorrt/commands.sh", "device/deploycompress_device/trt.py",
                "device/deploycompress_device/data/onnx_tensorrt_operators.json", "source/model.fp32.onnx", "calibration.json"):
        assert (root / rel).is_file(), rel
    assert not (root / "model_repository").exists()  # no engine yet, so no Triton model
    assert any("portable bundle" in n for n in art.report.notes)
    with pytest.raises(dc.BackendError, match="portable bundle, not an engine"):
        art.load()


def test_int8_graph_is_symmetric_s8_and_lint_clean(portable):
    art, _, _ = portable
    g = onnx.load(str(art.out_dir / "tensorrt/model.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    zps = [inits[n.input[2]] for n in g.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    assert lint_qdq(g, "tensorrt") == []


def test_fp16_graph_has_fp16_weights_and_fp32_io(portable):
    art, model, data = portable
    g = onnx.load(str(art.out_dir / "tensorrt/model.fp16.onnx"))
    weights = [i for i in g.graph.initializer if i.dims and len(i.dims) > 1]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert g.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    import onnxruntime as ort

    x = data.test_x[:32].numpy()
    y = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {g.graph.input[0].name: x})[0]
    with torch.no_grad():
        ref = model(data.test_x[:32]).numpy()
    assert np.abs(y - ref).max() < 0.05 * max(1.0, np.abs(ref).max())


def test_golden_outputs_are_the_pytorch_outputs(portable):
    art, model, data = portable
    graph = onnx.load(str(art.out_dir / "source/model.fp32.onnx"))
    with np.load(art.out_dir / "tensorrt/golden.npz") as g:
        x, y = g[f"input:{graph.graph.input[0].name}"], g[f"output:{graph.graph.output[0].name}"]
    np.testing.assert_array_equal(x, data.test_x[:8].numpy())
    with torch.no_grad():
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-6)


def test_build_plan_profiles_options_tolerances_and_commands(portable):
    art, _, _ = portable
    plan = BuildPlan.load(art.out_dir / "tensorrt/build_plan.json")
    assert plan.precision == "int8" and set(plan.graphs) == {"int8", "fp16"}
    name = plan.inputs[0]["name"]
    p = plan.profiles[name]
    assert (p.min, p.opt, p.max) == ((1, 1, 8, 8), (2, 1, 8, 8), (16, 1, 8, 8))
    assert plan.options.workspace_mib == 512 and plan.options.optimization_level == 4
    # the int8 graph is the mixed one (int8 Q/DQ, fp16 elsewhere): strongly typed builds take its types as given
    assert plan.graph_types == {"int8": {"qdq": True, "fp16": True}, "fp16": {"qdq": False, "fp16": True}}
    assert plan.tensorrt["min"] == "10.0" and plan.tensorrt["below"] == "12.0"
    tol = plan.tolerances["int8"]
    assert 0 < tol["max_abs"] and 0.9 < tol["min_cosine"] <= 0.98 and "min_top1_agreement" in tol
    cmds = plan.commands()
    t10, t11 = cmds["trtexec_trt10_int8"], cmds["trtexec_trt11_int8"]
    assert "--stronglyTyped" in t10 and "--int8" not in t10  # a QDQ graph: its types are the engine's
    for c in (t11, cmds["trtexec_trt11_fp16"], cmds["polygraphy_trt11_int8"]):
        assert not any(f in c.split() for f in ("--int8", "--fp16", "--best", "--stronglyTyped"))
    assert f"--minShapes={name}:1x1x8x8" in t10 and f"--maxShapes={name}:16x1x8x8" in t10 and f"--optShapes={name}:2x1x8x8" in t10
    assert "--memPoolSize=workspace:512M" in t10 and "--builderOptimizationLevel=4" in t10
    poly = shlex.split(cmds["polygraphy_trt10_fp16"])
    assert poly[poly.index("--trt-max-shapes") + 1] == f"{name}:[16,1,8,8]" and poly[poly.index("--pool-limit") + 1] == "workspace:512M"
    assert "--strongly-typed" in poly  # an fp16 graph on TensorRT 10: strongly typed too
    assert "tensorrt/model.fp16.onnx" in cmds["trtexec_trt11_fp16"]
    script = (art.out_dir / "tensorrt/commands.sh").read_text()
    assert t10 in script and t11 in script


def test_triton_config_parses_as_a_tensorrt_plan_model(portable):
    from test_bundle import parse_config

    art, _, _ = portable
    cfg = parse_config((art.out_dir / "tensorrt/config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.name == "digits" and cfg.max_batch_size == 16
    assert [list(t.dims) for t in cfg.input] == [[1, 8, 8]]


def test_compare_golden_reports_real_differences():
    ref = {"y": np.array([[1.0, 0.0], [0.0, 1.0]])}
    got = {"y": np.array([[0.5, 0.0], [2.0, 1.0]])}
    s = compare_golden(ref, got)["y"]
    assert s["max_abs"] == 2.0
    assert s["top1_agreement"] == 0.5
    assert abs(s["cosine"] - 1.5 / (np.sqrt(2) * np.sqrt(0.25 + 4 + 1))) < 1e-12


_BLOCK = textwrap.dedent('''
    import importlib.abc, sys
    BLOCKED = ("torch", "torchvision", "deploycompress", "onnxruntime", "onnx_graphsurgeon", "polygraphy", "onnxconverter_common")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError("blocked for this test: " + name)
            return None
    sys.meta_path.insert(0, Block())
''')


def _run_torch_free(code: str, *, pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_device_package_in_the_bundle_imports_and_runs_with_torch_absent(portable, tmp_path):
    art, _, _ = portable
    root = art.out_dir
    r = _run_torch_free(f'''
        import json, onnx
        import deploycompress_device.device_build, deploycompress_device.trt, deploycompress_device.cudart
        from deploycompress_device.checks import check_operators
        from deploycompress_device.plan import BuildPlan
        assert "torch" not in sys.modules and "deploycompress" not in sys.modules
        assert deploycompress_device.__file__.startswith({str(root / "device")!r}), deploycompress_device.__file__
        plan = BuildPlan.load({str(root / "tensorrt/build_plan.json")!r})
        findings = check_operators(onnx.load({str(root / "tensorrt/model.int8.onnx")!r}), "10.1")
        print(json.dumps({{"errors": [f.rule for f in findings if f.severity == "error"], "graphs": sorted(plan.graphs)}}))
        from deploycompress_device.device_build import main
        sys.exit(main([{str(root)!r}]))
    ''', pythonpath=root / "device", cwd=tmp_path)
    assert "ModuleNotFoundError" not in r.stderr and "blocked for this test" not in r.stderr, r.stderr
    first = json.loads(r.stdout.splitlines()[0])
    assert first == {"errors": [], "graphs": ["fp16", "int8"]}
    if tensorrt_available():
        pytest.skip("TensorRT is installed: the device build itself runs in tests/test_tensorrt_gpu.py")
    assert r.returncode == 1
    assert "TensorRT is not installed" in r.stderr or "type stubs" in r.stderr
    verify_bundle(root)  # nothing written, no bytecode left in the bundle


def test_device_build_refuses_a_tampered_bundle_before_anything_else(portable, tmp_path):
    import shutil

    art, _, _ = portable
    copy = tmp_path / "copy"
    shutil.copytree(art.out_dir, copy)
    with open(copy / "tensorrt/golden.npz", "ab") as fh:
        fh.write(b"x")
    r = _run_torch_free(f'''
        from deploycompress_device.device_build import main
        sys.exit(main([{str(copy)!r}]))
    ''', pythonpath=ROOT, cwd=tmp_path)
    assert r.returncode == 1 and "failed verification" in r.stderr and "tensorrt/golden.npz" in r.stderr


def test_cli_inspect_shows_tensorrt_checks_for_the_bundle(portable, capsys):
    from deploycompress.cli import main

    art, _, _ = portable
    assert main(["inspect", str(art.out_dir), "--target", "tensorrt", "--dla-core", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lint"]["findings"] == []
    trt = data["tensorrt"]
    assert trt["dla_core"] == 0 and "onnx-tensorrt" in trt["op_table"]
    assert not [f for f in trt["findings"] if f["severity"] == "error"]
    assert main(["inspect", str(art.out_dir), "--target", "tensorrt", "--dla-core", "0", "--tensorrt-version", "11.2", "--json"]) == 0
    rules = {f["rule"] for f in json.loads(capsys.readouterr().out)["tensorrt"]["findings"]}
    assert "dla-unavailable" in rules
