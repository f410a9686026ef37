"""The TensorRT part of ``build_engine``: pre-build checks, and the portable bundle where TensorRT is absent.

Tolerances written into the build plan (what the device's engine must meet against the PyTorch golden
outputs) are stated relative to what onnxruntime measures on the very same graph here: an engine may
round differently (fused residual adds, fp16 accumulation) but not be several times worse.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from deploycompress_device.device_build import compare_golden
from deploycompress_device.plan import BuildOptions, BuildPlan, make_profiles

from .errors import InputError
from .backends.base import TensorSpec

__all__ = ["MixedPrecisionWarning", "TensorRTCheckError", "GOLDEN_SAMPLES", "TENSORRT_OPTIONS", "check_before_build", "golden_data", "tolerances", "write_portable"]

log = logging.getLogger(__name__)

#: samples (rows of the evaluation/calibration inputs) stored as golden inputs/outputs
GOLDEN_SAMPLES = 8
#: build_engine backend_options that are not BuildOptions fields
#: (``portable``: write the portable bundle even where TensorRT is installed, e.g. to build on a Jetson)
TENSORRT_OPTIONS = ("tensorrt_version", "opt_batch_size", "portable")


class MixedPrecisionWarning(UserWarning):
    """The int8 graph could not be made mixed int8 + fp16: its unquantized layers stay fp32."""


class TensorRTCheckError(InputError, ValueError):
    """The graph breaks a TensorRT rule (operator table, Q/DQ, DLA): the build does not start."""


def split_options(backend_options: Mapping[str, Any] | None) -> tuple[BuildOptions, dict[str, Any]]:
    """(BuildOptions, the other tensorrt options) from build_engine's ``backend_options``; ValueError on unknown keys."""
    opts = dict(backend_options or {})
    other = {k: opts.pop(k) for k in TENSORRT_OPTIONS if k in opts}
    return BuildOptions.from_dict(opts), other


def check_before_build(graph: onnx.ModelProto, precision: str, options: BuildOptions, tensorrt_version: str | None,
                       static_shapes: Mapping[str, Sequence[int]] | None = None):
    """Run every TensorRT pre-build check; raise TensorRTCheckError listing the errors (warnings go to the log)."""
    from .export.tensorrt_checks import check_tensorrt

    check = check_tensorrt(graph, tensorrt_version=tensorrt_version, precision=precision, dla_core=options.dla_core,
                           gpu_fallback=options.gpu_fallback, static_shapes=static_shapes)
    for f in check.findings:
        if f.severity != "error":
            (log.warning if f.severity == "warning" else log.info)("tensorrt check: %s [%s] %s", f.node, f.rule, f.message)
    if check.errors:
        raise TensorRTCheckError(f"TensorRT {check.tensorrt_version} would reject or mis-run this graph:\n  "
                         + "\n  ".join(f"{f.node}: [{f.rule}] {f.message}" for f in check.errors))
    return check


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    raise TypeError(f"model output of type {type(out).__name__} is not a tensor, tuple, list or dict of tensors")


def golden_data(model: nn.Module, inputs: Sequence[torch.Tensor], input_specs: Sequence[TensorSpec],
                output_specs: Sequence[TensorSpec], samples: int = GOLDEN_SAMPLES) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The first ``samples`` rows of ``inputs`` and the PyTorch model's outputs on them, keyed by graph names."""
    rows = [t[:samples].detach().cpu() for t in inputs]
    with torch.no_grad():
        outs = _flatten(model(*rows))
    if len(outs) != len(output_specs):
        raise ValueError(f"the model returns {len(outs)} tensors, the graph has {len(output_specs)} outputs")
    g_in = {s.name: np.ascontiguousarray(t.numpy()) for s, t in zip(input_specs, rows)}
    g_out = {s.name: np.ascontiguousarray(t.detach().float().cpu().numpy()) for s, t in zip(output_specs, outs)}
    return g_in, g_out


def tolerances(precision: str, measured: Mapping[str, Mapping[str, float]], golden_out: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The device engine's tolerances from onnxruntime's errors on the same graph (worst output):
    max_abs <= 4x onnxruntime's + a floor (1e-3, fp16 1e-2, int8 5e-2 of the largest |output|),
    cosine >= 1 - 4x onnxruntime's distance (at most 0.999/0.99/0.98 for fp32/fp16/int8),
    top-1 agreement >= onnxruntime's - 0.05 (2-D outputs)."""
    floor = {"fp32": 1e-3, "fp16": 1e-2, "int8": 5e-2}[precision]
    ceiling = {"fp32": 0.999, "fp16": 0.99, "int8": 0.98}[precision]
    scale = max(float(np.max(np.abs(v))) if v.size else 1.0 for v in golden_out.values())
    worst_abs = max(s["max_abs"] for s in measured.values())
    worst_cos = min(s["cosine"] for s in measured.values())
    tol = {"max_abs": 4.0 * worst_abs + floor * max(scale, 1.0), "min_cosine": min(ceiling, 1.0 - 4.0 * (1.0 - worst_cos))}
    tops = [s["top1_agreement"] for s in measured.values() if "top1_agreement" in s]
    if tops:
        tol["min_top1_agreement"] = max(0.0, min(tops) - 0.05)
    return {k: round(float(v), 6) for k, v in tol.items()}


def _ort_fidelity(path: Path, precision: str, g_in: Mapping[str, np.ndarray], g_out: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]] | None:
    import onnxruntime as ort

    # onnxruntime's own QDQ fusions can break the mixed int8 + fp16 graph (a Concat between Q/DQ pairs becomes a
    # QLinearConcat that refuses fp16 scales: "Type 'tensor(float16)' ... of operator (QLinearConcat) is invalid");
    # the basic level keeps every node and computes what the graph says, which is what the tolerance is about
    levels = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    for level in levels:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            values = session.run(None, dict(g_in))
            break
        except Exception as exc:  # noqa: BLE001 - onnxruntime's CPU kernels lack some fp16 ops; said in the log
            if level == levels[-1]:
                log.warning("onnxruntime cannot run the %s graph here (%s); its tolerance uses the floor only", precision, exc)
                return None
            log.info("onnxruntime's optimized %s graph does not run (%s); measuring it at the basic optimization level", precision, exc)
    names = [o.name for o in session.get_outputs()]
    return compare_golden(g_out, dict(zip(names, values)))


def write_portable(
    *,
    out_dir: str | os.PathLike[str],
    work: Path,
    name: str,
    precision: str,
    deployed: nn.Module,
    inputs: Sequence[torch.Tensor],
    golden_inputs: Sequence[torch.Tensor],
    exported: Any,
    fp32_path: Path,
    qdq_path: Path | None,
    options: BuildOptions,
    extra_options: Mapping[str, Any],
    max_batch_size: int,
    calibration: Any,
    report: Any,
    extra: Mapping[str, Any],
    overwrite: bool,
    findings: Sequence[Any] = (),
    attachments: Mapping[str, Path] | None = None,
):
    """Graphs (int8 QDQ + fp16 for an int8 build), plan, golden data and commands, as a portable bundle."""
    from .bundle.tensorrt_portable import write_portable_bundle
    from .export.fp16 import to_fp16
    from .export.tensorrt_checks import DEFAULT_TENSORRT_VERSION
    from .report import FidelityRecord
    from deploycompress_device.trt import graph_types

    files: dict[str, Path] = {}
    graphs: dict[str, str] = {}
    if precision == "int8":
        assert qdq_path is not None
        # the mixed graph: int8 at the Q/DQ pairs, fp16 elsewhere (opset 19, fp16 scales); in a strongly typed
        # build the fp32 QDQ graph would run every unquantized layer in fp32 (it stays in source/model.qdq.onnx)
        graphs["int8"] = "tensorrt/model.int8.onnx"
        mixed_path = work / "model.int8.fp16.onnx"
        try:
            onnx.save(to_fp16(onnx.load(str(qdq_path))), str(mixed_path))
            files[graphs["int8"]] = mixed_path
        except ValueError as exc:
            warnings.warn(f"the int8 graph stays fp32 between its Q/DQ pairs (TensorRT builds those layers in fp32): {exc}",
                          MixedPrecisionWarning, stacklevel=2)
            files[graphs["int8"]] = qdq_path
    if precision in ("int8", "fp16"):
        fp16_path = work / "model.fp16.onnx"
        onnx.save(to_fp16(exported.model), str(fp16_path))
        graphs["fp16"] = "tensorrt/model.fp16.onnx"
        files[graphs["fp16"]] = fp16_path
    if precision == "fp32":
        graphs["fp32"] = "tensorrt/model.fp32.onnx"
        files[graphs["fp32"]] = fp32_path
    g_in, g_out = golden_data(deployed, golden_inputs, exported.inputs, exported.outputs)
    tol: dict[str, dict[str, float]] = {}
    types: dict[str, dict[str, bool]] = {}
    for p, rel in graphs.items():
        model = onnx.load(str(files[rel]), load_external_data=False)
        types[p] = graph_types(model)
        measured = _ort_fidelity(files[rel], p, g_in, g_out)
        base = measured or {n: {"max_abs": 0.0, "cosine": 1.0} for n in g_out}
        tol[p] = tolerances(p, base, g_out)
        if measured and report is not None:
            worst = min(measured.values(), key=lambda s: s["cosine"])
            report.fidelity.append(FidelityRecord(f"onnxruntime CPU, tensorrt {p} graph", "pytorch fp32",
                                                  float(max(s["max_abs"] for s in measured.values())), float(worst["cosine"]),
                                                  worst.get("top1_agreement")))
    example = {s.name: list(t.shape) for s, t in zip(exported.inputs, inputs)}
    profiles = make_profiles([(s.name, s.shape) for s in exported.inputs], example, max_batch_size=max_batch_size,
                             opt_batch_size=extra_options.get("opt_batch_size"), static=options.dla_core is not None)
    plan = BuildPlan(name=name, precision=precision, graphs=graphs, inputs=[s.to_dict() for s in exported.inputs],
                     outputs=[s.to_dict() for s in exported.outputs], profiles=profiles, options=options, graph_types=types,
                     tolerances=tol, golden="tensorrt/golden.npz", triton_config="tensorrt/config.pbtxt",
                     max_batch_size=0 if options.dla_core is not None else max_batch_size,
                     findings=[f.to_dict() for f in findings])
    plan.tensorrt["checked_against"] = str(extra_options.get("tensorrt_version") or DEFAULT_TENSORRT_VERSION)
    if report is not None:
        report.notes.append(f"TensorRT is not installed on the build machine: this is a portable bundle; build model.plan on the "
                            f"device (python3 -B -m deploycompress_device BUNDLE with PYTHONPATH=BUNDLE/device). Graphs: {sorted(graphs)}.")
    extra_files = {"source/model.fp32.onnx": fp32_path, **dict(attachments or {})}
    if qdq_path is not None:
        extra_files["source/model.qdq.onnx"] = qdq_path
    return write_portable_bundle(out_dir, plan=plan, graph_files=files, golden_inputs=g_in, golden_outputs=g_out,
                                 inputs=exported.inputs, outputs=exported.outputs, calibration=calibration, report=report,
                                 extra_files=extra_files, extra=extra, overwrite=overwrite)
