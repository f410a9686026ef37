"""Pre-build checks that need no TensorRT: the ONNX-TensorRT parser's operator table and DLA's layer rules.

* Operators: every node against onnx-tensorrt's own support matrix (``docs/operators.md``), kept in
  ``data/onnx_tensorrt_operators.json`` with its source URL and commit; the table for the requested
  TensorRT version is used, or the newest older one (said in a finding, never silently).
* DLA: "DLA Supported Layers and Restrictions" of the TensorRT developer guide
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-layer-restrictions.html):
  int8/fp16 only, no dynamic dimensions (min = opt = max), batch <= 4096, other dimensions <= 8192,
  2D convolutions (kernel 1-32, stride 1-8, <= 8192 channels), 2D pools (window 1-8), Concat on the
  channel axis only, the listed activations and element-wise ops; DLA is absent from TensorRT
  11.0-11.3 and back in 11.4 for AGX Orin only. Nodes outside the rules are the layers that run on
  the GPU (with GPU fallback) or fail the build (without it).

The Q/DQ rules (zero point 0, per-channel scales on weights only) are checked by
``deploycompress.export.lint_qdq`` on the host, the one description of them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "Finding",
    "DLAResult",
    "OP_TABLE_PATH",
    "DLA_SOURCE",
    "op_table",
    "check_operators",
    "check_dla",
    "dla_available",
    "parse_version",
]

log = logging.getLogger(__name__)

OP_TABLE_PATH = Path(__file__).resolve().parent / "data" / "onnx_tensorrt_operators.json"
DLA_SOURCE = "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-layer-restrictions.html"
_STANDARD_DOMAINS = ("", "ai.onnx")

#: ONNX ops DLA runs (mapped to the DLA layer list); any other op runs on the GPU
DLA_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul",  # Convolution / Deconvolution / Fully Connected
    "Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "PRelu",  # Activation, Parametric ReLU
    "Add", "Sub", "Mul", "Max", "Min", "Div", "Pow",  # ElementWise
    "Equal", "Greater", "Less",  # Comparison
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",  # Pooling
    "Concat", "BatchNormalization", "LRN", "Resize", "Softmax", "Slice",
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",  # Shuffle
    "QuantizeLinear", "DequantizeLinear", "Identity", "Constant",  # fused or folded by the builder
})


@dataclass(frozen=True)
class Finding:
    """One rule a graph breaks for TensorRT: ``severity`` "error" refuses the build, "warning" may run slower
    or elsewhere (DLA -> GPU), "info" is a documented restriction of an op the graph uses."""

    node: str
    rule: str
    message: str
    severity: str = "error"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class DLAResult:
    """DLA findings and the nodes that would run on the GPU instead (``"name (OpType): why"``)."""

    findings: list[Finding] = field(default_factory=list)
    gpu_layers: list[str] = field(default_factory=list)


def parse_version(version: str | int | float) -> tuple[int, int]:
    """'10' -> (10, 0); '10.13.0.35' -> (10, 13)."""
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else 0
    except ValueError as exc:
        raise ValueError(f"TensorRT version {version!r} is not of the form MAJOR[.MINOR]") from exc


@lru_cache(maxsize=None)
def _tables() -> dict[str, Any]:
    return json.loads(OP_TABLE_PATH.read_text())["tables"]


def op_table(trt_version: str | int | float) -> tuple[str, dict[str, Any]]:
    """(table version, table) for ``trt_version``: the exact MAJOR.MINOR table, else the newest older one,
    else the oldest (the caller reports which one was used)."""
    want = parse_version(trt_version)
    tables = _tables()
    versions = sorted(tables, key=parse_version)
    older = [v for v in versions if parse_version(v) <= want]
    chosen = older[-1] if older else versions[0]
    return chosen, tables[chosen]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), default=0)


def check_operators(model: onnx.ModelProto, trt_version: str | int | float = "10") -> list[Finding]:
    """Every node against the ONNX-TensorRT parser's support table for ``trt_version``.

    Errors: an op the table marks unsupported or does not list, a node of a custom domain (needs a
    plugin), an opset below the table's range. Warnings: the table is not the requested version's, the
    opset is above the documented range. Info: an op with documented restrictions (once per op type).
    """
    used, table = op_table(trt_version)
    findings: list[Finding] = []
    if parse_version(used) != parse_version(trt_version):
        findings.append(Finding("<graph>", "op-table-version",
                                f"no operator table for TensorRT {trt_version} in the project; checked against TensorRT {used}'s "
                                f"({table['source']})", "warning"))
    opset = _opset(model)
    lo, hi = table.get("opset_range") or (0, 10**6)
    if opset < lo:
        findings.append(Finding("<graph>", "opset", f"opset {opset} is below TensorRT {used}'s range {lo}-{hi}"))
    elif opset > hi:
        findings.append(Finding("<graph>", "opset", f"opset {opset} is above TensorRT {used}'s documented range {lo}-{hi}", "warning"))
    ops = table["operators"]
    noted: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if node.domain not in _STANDARD_DOMAINS:
            findings.append(Finding(name, "op-custom-domain",
                                    f"{node.domain}::{node.op_type} is not an ONNX operator: TensorRT needs a plugin for it"))
            continue
        entry = ops.get(node.op_type)
        if entry is None:
            findings.append(Finding(name, "op-unsupported", f"{node.op_type} is not in TensorRT {used}'s ONNX operator table"))
        elif not entry["supported"]:
            findings.append(Finding(name, "op-unsupported", f"{node.op_type} is marked unsupported by the ONNX-TensorRT parser ({used})"))
        elif entry.get("restrictions") and node.op_type not in noted:
            noted.add(node.op_type)
            findings.append(Finding(name, "op-restrictions", f"{node.op_type}: {entry['restrictions']}", "info"))
    return findings


def dla_available(trt_version: str | int | float) -> tuple[bool, str]:
    """(available, note): DLA is in TensorRT 8/10, absent from 11.0-11.3, back in 11.4 for AGX Orin only."""
    major, minor = parse_version(trt_version)
    if major == 11 and minor < 4:
        return False, f"DLA is not supported in TensorRT {major}.{minor} (absent from 11.0-11.3)"
    if major > 11 or (major == 11 and minor >= 4):
        return True, f"TensorRT {major}.{minor}: DLA is supported on Jetson AGX Orin only"
    return True, ""


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes only refine the checks
        inferred = model
    out: dict[str, list[int | str]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return out


def _dla_reason(node: onnx.NodeProto, shapes: Mapping[str, Sequence[int | str]], consts: Mapping[str, np.ndarray]) -> str | None:
    """Why DLA cannot run ``node`` (None when it can), per the DLA layer restrictions."""
    op = node.op_type
    if op not in DLA_OPS:
        return f"{op} is not a DLA layer"
    if op in ("Conv", "ConvTranspose"):
        w = consts.get(node.input[1]) if len(node.input) > 1 else None
        kernel = list(_attr(node, "kernel_shape", []) or (list(w.shape[2:]) if w is not None else []))
        if len(kernel) != 2:
            return f"{op} is {len(kernel)}D; DLA runs 2D convolutions only"
        if op == "Conv":
            if any(k < 1 or k > 32 for k in kernel):
                return f"kernel {kernel} outside DLA's [1, 32]"
            strides = list(_attr(node, "strides", [1, 1]))
            if any(s < 1 or s > 8 for s in strides):
                return f"strides {strides} outside DLA's [1, 8]"
            if w is not None and w.shape[0] > 8192:
                return f"{w.shape[0]} output channels > 8192"
        else:
            if int(_attr(node, "group", 1)) != 1 or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
                return "grouped or dilated deconvolution"
            if any(p != 0 for p in _attr(node, "pads", [0, 0, 0, 0])):
                return "deconvolution padding must be 0 on DLA"
    elif op == "MatMul" and (len(node.input) < 2 or node.input[1] not in consts):
        return "MatMul of two activations (DLA runs fully connected layers with constant weights only)"
    elif op in ("MaxPool", "AveragePool"):
        kernel = list(_attr(node, "kernel_shape", []))
        if len(kernel) != 2:
            return f"{len(kernel)}D pooling; DLA pools in 2D only"
        if any(k < 1 or k > 8 for k in kernel):
            return f"pooling window {kernel} outside DLA's [1, 8]"
    elif op in ("GlobalAveragePool", "GlobalMaxPool"):
        shape = shapes.get(node.input[0], [])
        spatial = [d for d in shape[2:]]
        if len(spatial) != 2 or any(not isinstance(d, int) or d < 1 or d > 8 for d in spatial):
            return f"global pooling over {spatial or '?'}: DLA's window is [1, 8]"
    elif op == "Concat":
        axis = int(_attr(node, "axis", 0))
        rank = len(shapes.get(node.output[0], [])) or 4
        if axis % rank != 1:
            return f"Concat on axis {axis}; DLA concatenates on the channel axis only"
    return None


def check_dla(
    model: onnx.ModelProto,
    *,
    trt_version: str | int | float = "10",
    precision: str = "int8",
    gpu_fallback: bool = True,
    static_shapes: Mapping[str, Sequence[int]] | None = None,
) -> DLAResult:
    """DLA rules for building ``model`` on a DLA core.

    ``static_shapes`` are the build shapes (the optimization profile with min = opt = max) DLA needs;
    without them a dynamic input dimension is an error. Nodes DLA cannot run are listed in
    ``gpu_layers``; they are warnings with ``gpu_fallback`` and errors without it.
    """
    result = DLAResult()
    add = result.findings.append
    ok, note = dla_available(trt_version)
    if not ok:
        add(Finding("<graph>", "dla-unavailable", note))
        return result
    if note:
        add(Finding("<graph>", "dla-platform", note, "warning"))
    if precision not in ("int8", "fp16"):
        add(Finding("<graph>", "dla-precision", f"DLA runs int8 and fp16 only, not {precision}"))
    initializers = {i.name for i in model.graph.initializer}
    shapes = _shapes(model)
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = shapes.get(inp.name, [])
        fixed = list((static_shapes or {}).get(inp.name, []))
        if fixed and len(fixed) != len(dims):
            add(Finding(inp.name, "dla-dynamic-shape", f"build shape {fixed} does not match the input's rank {len(dims)}"))
            continue
        real = [f if not isinstance(d, int) or d <= 0 else d for d, f in zip(dims, fixed)] if fixed else dims
        dynamic = [i for i, d in enumerate(real) if not isinstance(d, int) or d <= 0]
        if dynamic:
            add(Finding(inp.name, "dla-dynamic-shape",
                        f"axes {dynamic} of {dims} are dynamic; DLA needs one shape (profile min = opt = max): give static_shapes"))
            continue
        if real and int(real[0]) > 4096:
            add(Finding(inp.name, "dla-batch", f"batch {real[0]} > DLA's 4096"))
        if any(int(d) > 8192 for d in real[1:]):
            add(Finding(inp.name, "dla-dimension", f"a non-batch dimension of {real} is > DLA's 8192"))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
        if node.op_type == "DequantizeLinear" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]  # a dequantized weight is still a constant
    for i, node in enumerate(model.graph.node):
        why = _dla_reason(node, shapes, consts)
        if why is None:
            continue
        name = node.name or f"{node.op_type}_{i}"
        result.gpu_layers.append(f"{name} ({node.op_type}): {why}")
        add(Finding(name, "dla-gpu-layer", f"runs on the GPU, not DLA: {why}", "warning" if gpu_fallback else "error"))
    return result


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]
