"""build_engine conformance matrix: model family x mask style x calibration source x precision.

Each cell builds a bundle and checks it against oracles built here, not by the code under test:

* every output of the bundle (onnxruntime) against the deployed PyTorch model on evaluation inputs:
  fp32 within 1e-4 relative; int8 against the fake-quant simulation of that model (PTQQuantizer on the
  same calibration batches): cosine > 0.99, and the deployed graph sits much closer to the simulation
  than the simulation sits to the float model (speedup's exactness against the user's masked model
  is the speedup tests' concern);
* zero lint findings for the onnxruntime target;
* the number of weighted ops running in int8 in the graph onnxruntime optimizes (QLinearConv,
  QGemm, MatMulInteger, ...) equals the number of calls of quantized layers (counted by hooks here).
"""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conformance_models import FAMILIES
from deploycompress import L1NormPruner, build_engine
from deploycompress.engine import default_quant_config
from deploycompress.export import get_target
from deploycompress.quantization import PTQQuantizer
from deploycompress.tensor_io import flatten_outputs

INT8_KERNELS = ("QLinearConv", "QGemm", "MatMulInteger", "QLinearMatMul", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
HEADS = {"dict_out": ["seg", "fc"], "unet": ["head"], "encoder": ["cls"]}


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _masked(model, masks):
    """The user's masked model: masks multiplied into exactly the tensors they name."""
    m = copy.deepcopy(model)
    modules = dict(m.named_modules())
    with torch.no_grad():
        for name, entry in (masks or {}).items():
            for pname, keep in entry.items():
                getattr(modules[name], pname).mul_(keep.to(getattr(modules[name], pname).dtype))
    return m.eval()


def _masks(model, family, style, example):
    if style == "none":
        return None
    ops = FAMILIES[family][2]
    config = [{"op_types": ops, "sparsity": 0.5}]
    if family in HEADS:
        config.append({"exclude": True, "op_names": HEADS[family]})
    dummy = tuple(example.values()) if isinstance(example, dict) else example
    pruner = L1NormPruner(copy.deepcopy(model), config, dependency_aware=style == "dependency", dummy_input=dummy if style == "dependency" else None)
    _, masks = pruner.compress()
    return {k: {p: v.clone() for p, v in e.items()} for k, e in masks.items()}


def _np(outputs):
    return {k: v.detach().numpy() for k, v in flatten_outputs(outputs).items()}


def _feeds(inputs, names):
    if isinstance(inputs, dict):
        return {k: inputs[k].numpy() for k in names}
    return {names[0]: inputs.numpy()}


def _int8_kernels(path):
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    return sum(ops.count(k) for k in INT8_KERNELS), ops


def _quantized_calls(model, calib, inputs):
    """How many times layers with a weight calibration run in one forward (hooks, here)."""
    names = {m for m, k, _ in calib.items() if k == "weight"}
    count = [0]
    handles = [mod.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
               for n, mod in model.named_modules() if n in names]
    with torch.no_grad():
        _call(model, inputs)
    for h in handles:
        h.remove()
    return count[0]


CELLS = [(f, m, c, p) for f in FAMILIES for m in ("none", "dependency", "independent")
         for p in ("fp32", "int8") for c in (("calib_data", "calib_config") if p == "int8" else ("-",))]


@pytest.mark.parametrize("family,mask_style,calib_source,precision", CELLS, ids=["-".join(c) for c in CELLS])
def test_build_engine_conformance(family, mask_style, calib_source, precision, tmp_path):
    factory, data, _ = FAMILIES[family]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = factory().eval()
    example = data(2, g)
    batches = [data(16, g) for _ in range(2)]
    eval_x = data(16, g)
    masks = _masks(model, family, mask_style, example)
    calib = None
    if precision == "int8" and calib_source == "calib_config":
        masked = _masked(model, masks)
        q = PTQQuantizer(copy.deepcopy(masked), default_quant_config(masked, example))
        q.calibrate(batches)
        calib = q.export_calib_config()  # taken on the masked model, as a user would
    art = build_engine(
        model, masks, calib, example_inputs=example, precision=precision, out_dir=tmp_path / "b",
        calib_data=batches if calib_source == "calib_data" else None, eval_inputs=eval_x,
        batch_sizes=(), compare_fp32=False, progress=False, backend_options={"threads": 1},
    )
    runner = art.load(threads=1)
    names = [s.name for s in runner.inputs]
    got = runner.run(_feeds(eval_x, names))
    deployed = art.model
    with torch.no_grad():
        ref = _np(_call(deployed, eval_x))
    assert sorted(got) == sorted(ref), (list(got), list(ref))
    if precision == "fp32":
        for k in ref:
            err = np.abs(got[k] - ref[k]).max() / max(1.0, np.abs(ref[k]).max())
            assert err < 1e-4, (k, err)
        return
    sim = PTQQuantizer(copy.deepcopy(deployed), default_quant_config(deployed, example))
    sim.calibrate(batches)
    flavour = get_target("onnxruntime").activation_flavour  # the same ranges, as the deployed uint8 grid
    for module, kind, p in art.calib_config.items():  # the calibration the bundle was built from
        sim.wrappers[module].params[kind] = p if kind == "weight" else flavour(p)
    with torch.no_grad():
        simulated = _np(_call(sim.model, eval_x))
    for k in ref:
        # RMS: a rounding flip at a quantized output moves one value by a whole step, rarely
        sim_err = np.sqrt(np.mean((simulated[k] - ref[k]) ** 2))
        dep_err = np.sqrt(np.mean((got[k] - simulated[k]) ** 2))
        print(f"{k}: deployed vs simulation {dep_err:.3g}, simulation vs float {sim_err:.3g}")
        a, b = got[k].reshape(len(got[k]), -1), simulated[k].reshape(len(got[k]), -1)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        assert cos.min() > 0.99, (k, cos.min())
        assert dep_err <= 0.5 * sim_err + 1e-4, (k, dep_err, sim_err)
    assert art.report.qdq["lint"] == [], art.report.qdq["lint"]
    n_int8, ops = _int8_kernels(art.out_dir / "source" / "model.qdq.onnx")
    expected = _quantized_calls(deployed, art.calib_config, eval_x)
    assert n_int8 == expected, (n_int8, expected, ops)
