"""QuantizeLinear/DequantizeLinear surgery: the calibration written into the graph.

Rules (TensorRT's explicit quantization, which onnxruntime also runs well):

* weights: per-channel (axis 0 for Conv and Gemm with transB, axis 1 for ConvTranspose, MatMul and
  Gemm without transB), symmetric int8, zero point 0, stored as int8 initializers behind a
  DequantizeLinear; a BatchNorm folded into the weight rescales each channel's scale by the same
  factor, so the integer weights equal the simulated ones;
* activations per-tensor, placed on the inputs of weighted ops; for TensorRT the outputs of
  weighted ops stay float unless they feed another weighted op or are one branch of a residual Add; a Concat gets one shared scale
  on all its inputs and its output, and so do both sides of a MaxPool/Reshape/Flatten/Transpose
  (they then run in int8); graph outputs stay float;
* the flavour follows the target from the one calibration (observed min/max): ``tensorrt`` gets
  S8 symmetric activations, ``onnxruntime`` U8 asymmetric activations and int32 biases, which its
  x86 kernels (QLinearConv, MatMulInteger on VNNI) run fastest.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from calibrators import QuantParams, params_from_range, qrange

from ..quantization.calib_config import CalibConfig
from .name_map import WEIGHTED_OPS, NameMap, NameMapError
from .onnx_export import MIN_OPSET, onnx_opset

__all__ = ["QDQError", "TARGETS", "insert_qdq", "needs_reduced_range"]

log = logging.getLogger(__name__)

TARGETS = ("onnxruntime", "tensorrt")
_SAME_SCALE_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")


class QDQError(ValueError):
    """The calibration cannot be written into this graph; the message names modules and tensors."""


@dataclass
class _Act:
    params: QuantParams
    sources: list[str]  # "module.kind" entries that gave this range


def _union(a: QuantParams, b: QuantParams) -> QuantParams:
    return params_from_range(
        np.minimum(a.min, b.min), np.maximum(a.max, b.max), bits=a.bits, signed=a.signed, symmetric=a.symmetric, axis=None
    )


def _collect(calib: CalibConfig, name_map: NameMap, graph_tensors: set[str]):
    """Calibration entries -> weight and activation tensors; all naming errors raised together."""
    missing: list[str] = []
    weights: dict[str, tuple[str, QuantParams]] = {}
    acts: dict[str, _Act] = {}
    for module, kind, params in calib.items():
        try:
            m = name_map.require(module)
        except NameMapError as exc:
            missing.append(str(exc))
            continue
        if kind == "weight":
            if m.weight is None:
                missing.append(f"module {module!r} has a weight calibration but no weight initializer in the graph")
                continue
            weights[module] = (m.weight, params)
            continue
        if params.axis is not None and params.scale.size > 1:
            raise QDQError(f"calibration of {module}.{kind}: activations must be per-tensor, got axis {params.axis}")
        tensors = m.inputs if kind == "input" else m.outputs
        if not any(tensors):
            why = f"BatchNorm {m.folded[0]!r} was folded into it" if m.folded else "it has no such tensor in the graph"
            log.warning("calibration of %s.%s is not used: %s", module, kind, why)
            continue
        for t in tensors:
            if not t:
                continue
            if t not in graph_tensors:
                missing.append(f"tensor {t!r} ({module}.{kind}) is not in the graph")
                continue
            if t in acts:
                acts[t] = _Act(_union(acts[t].params, params), acts[t].sources + [f"{module}.{kind}"])
            else:
                acts[t] = _Act(params, [f"{module}.{kind}"])
    if missing:
        raise QDQError("the calibration names modules or tensors the model lacks:\n  " + "\n  ".join(missing))
    return weights, acts


def _place(graph: gs.Graph, acts: dict[str, _Act], target: str) -> dict[str, _Act]:
    """Apply the placement rules (TensorRT output rule, residual Add, shared Concat scale)."""
    producers = {o.name: n for n in graph.nodes for o in n.outputs}
    graph_outputs = {t.name for t in graph.outputs}
    weighted_out = {name for name, n in producers.items() if n.op in WEIGHTED_OPS}
    chosen = {t: a for t, a in acts.items() if t not in graph_outputs}
    if target == "tensorrt":
        feeds_weighted = {n.inputs[0].name for n in graph.nodes if n.op in WEIGHTED_OPS and n.inputs}
        keep = {t: a for t, a in chosen.items() if t not in weighted_out or t in feeds_weighted}
        for node in graph.nodes:
            if node.op != "Add" or any(i.name in keep for i in node.inputs):
                continue
            branch = sorted((i.name for i in node.inputs if i.name in chosen), key=lambda t: t in weighted_out)
            if branch:
                keep[branch[0]] = chosen[branch[0]]
        chosen = keep
    else:
        # onnxruntime drops a Relu/Clip that feeds a uint8 Q (its range already clamps), and then fuses
        # Conv+Q into QLinearConv; a Q/DQ pair before the Relu would block that fusion.
        for node in graph.nodes:
            if node.op in ("Relu", "Clip") and node.outputs[0].name in chosen:
                src = node.inputs[0]
                if src.name in chosen and all(c is node for c in src.outputs):
                    del chosen[src.name]
    for node in reversed(graph.nodes):  # outputs before inputs: a chain of such ops propagates back
        src = node.inputs[0] if node.inputs else None
        if (node.op in _SAME_SCALE_OPS and src is not None and src.name not in chosen and src.name not in graph_outputs
                and node.outputs[0].name in chosen and len(src.outputs) == 1 and not isinstance(src, gs.Constant)):
            # values pass unchanged, so the output's range holds for the input; quantizing before the op lets
            # the producer (a pooling op, e.g. a functional global average pool) run in int8 as well
            out = chosen[node.outputs[0].name]
            chosen[src.name] = _Act(out.params, out.sources + [f"propagated back through {node.name}"])
    for node in graph.nodes:
        if node.op in _SAME_SCALE_OPS and node.inputs and node.inputs[0].name in chosen and node.outputs[0].name in chosen:
            # a data-movement op between two Q/DQ pairs runs in int8 only when both sides agree
            a, b = chosen[node.inputs[0].name], chosen[node.outputs[0].name]
            shared = _Act(_union(a.params, b.params), a.sources + b.sources + [f"shared scale of {node.name}"])
            chosen[node.inputs[0].name] = chosen[node.outputs[0].name] = shared
        if node.op != "Concat":
            continue
        members = [t.name for t in node.inputs] + [node.outputs[0].name]
        known = [t for t in members if t in chosen or t in acts]
        if not known:
            continue
        out = node.outputs[0].name
        shared = None
        for t in known:
            p = (chosen.get(t) or acts[t]).params
            shared = p if shared is None else _union(shared, p)
        targets = members if out in known else known
        for t in targets:
            if t in graph_outputs:
                continue
            chosen[t] = _Act(shared, (chosen.get(t) or acts.get(t) or _Act(shared, [])).sources + [f"shared scale of {node.name}"])
    return chosen


def _act_flavour(p: QuantParams, target: str, where: str) -> QuantParams:
    if p.bits != 8:
        raise QDQError(f"{where}: {p.bits}-bit activations cannot be expressed as QDQ for {target} (8 bits only)")
    if target == "tensorrt":
        return p.with_flavour(symmetric=True, signed=True)
    return p.with_flavour(symmetric=False, signed=False)


def needs_reduced_range(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU without VNNI (uint8 x int8 products saturate there with 8-bit weights)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False  # unknown CPU: keep the weights exactly as calibrated
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def _weight_scales(module: str, p: QuantParams, channels: int, fold: np.ndarray | None, bits: int) -> np.ndarray:
    if p.bits != 8:
        raise QDQError(f"calibration of {module}.weight: {p.bits}-bit weights cannot be expressed as int8 QDQ")
    sym = p.with_flavour(symmetric=True, signed=True, bits=bits)
    scale = np.asarray(sym.scale, dtype=np.float64).reshape(-1)
    if scale.size not in (1, channels):
        raise QDQError(
            f"calibration of {module}.weight has {scale.size} scales but the graph weight has {channels} output channels "
            "(calibrate the model that is exported, e.g. after speedup)"
        )
    scale = np.broadcast_to(scale, (channels,)).copy()
    if fold is not None:
        scale = scale * np.abs(fold.astype(np.float64))
        scale = np.where(scale > 0, scale, 1.0)
    return scale.astype(np.float32)


def _qdq_pair(graph: gs.Graph, tensor: gs.Variable, scale, zero_point, *, axis: int | None = None) -> gs.Variable:
    base = tensor.name
    s = gs.Constant(f"{base}_scale", np.asarray(scale, dtype=np.float32))
    z = gs.Constant(f"{base}_zero_point", np.asarray(zero_point))
    q = gs.Variable(f"{base}_quantized", dtype=z.values.dtype, shape=tensor.shape)
    dq = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=tensor.shape)
    attrs = {} if axis is None else {"axis": axis}
    consumers = list(tensor.outputs)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}_QuantizeLinear", attrs=dict(attrs), inputs=[tensor, s, z], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}_DequantizeLinear", attrs=dict(attrs), inputs=[q, s, z], outputs=[dq]))
    for node in consumers:
        for i, inp in enumerate(node.inputs):
            if inp is tensor:
                node.inputs[i] = dq
    return dq


def _dq_constant(graph: gs.Graph, name: str, values: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> gs.Variable:
    q = gs.Constant(f"{name}_quantized", values)
    s = gs.Constant(f"{name}_scale", scale.astype(np.float32))
    z = gs.Constant(f"{name}_zero_point", zp)
    out = gs.Variable(f"{name}_dequantized", dtype=np.float32, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}_DequantizeLinear", attrs={"axis": axis}, inputs=[q, s, z], outputs=[out]))
    return out


def _const_values(t) -> np.ndarray | None:
    """Values of a constant input, looking through the exporter's Identity nodes."""
    for _ in range(8):
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        if not t.inputs or t.inputs[0].op != "Identity":
            return None
        t = t.inputs[0].inputs[0]
    return None


def insert_qdq(
    onnx_model: onnx.ModelProto,
    calib_config: CalibConfig,
    name_map: NameMap,
    *,
    target: str = "onnxruntime",
    reduce_range: bool | None = None,
) -> onnx.ModelProto:
    """Return a copy of ``onnx_model`` with the calibration written in as Q/DQ nodes for ``target``.

    ``reduce_range`` (onnxruntime only) stores weights in 7 bits: x86 CPUs without VNNI multiply
    uint8 x int8 with ``vpmaddubsw``, whose int16 pair sums saturate with full-range weights (measured
    here: logits off by 2.2 on the digits CNN instead of 0.18). ``None`` decides from this host's CPU.
    """
    if target not in TARGETS:
        raise QDQError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if reduce_range is None:
        reduce_range = target == "onnxruntime" and needs_reduced_range()
    if reduce_range and target == "tensorrt":
        raise QDQError("reduce_range is an onnxruntime (x86 without VNNI) work-around; TensorRT takes full int8 weights")
    wbits = 7 if reduce_range else 8
    opset = onnx_opset(onnx_model)
    if opset < MIN_OPSET:
        raise QDQError(f"the graph's opset is {opset}; QDQ with per-channel weights needs opset >= {MIN_OPSET}")
    if not len(calib_config):
        raise QDQError("the calibration is empty: nothing to quantize")
    graph = gs.import_onnx(onnx_model)
    tensors = graph.tensors()
    weights, acts = _collect(calib_config, name_map, set(tensors))
    placed = _place(graph, acts, target)

    act_params: dict[str, QuantParams] = {}
    dq_source: dict[str, str] = {}  # dequantized tensor -> the activation it stands for
    for tname, act in placed.items():
        p = _act_flavour(act.params, target, f"calibration of {', '.join(act.sources)}")
        act_params[tname] = p
        zp = np.asarray(p.zero_point.reshape(()), dtype=np.int8 if p.signed else np.uint8)
        dq = _qdq_pair(graph, tensors[tname], np.float32(p.scale.reshape(())), zp)
        dq_source[dq.name] = tname

    nodes_by_name = {n.name: n for n in graph.nodes}
    for module, (init_name, p) in weights.items():
        m = name_map[module]
        node = nodes_by_name.get(m.weight_node or "")
        if node is None:
            raise QDQError(f"module {module!r}: its node {m.weight_node!r} is not in this graph")
        w = _const_values(node.inputs[1])
        if w is None:
            raise QDQError(f"module {module!r}: the weight of node {node.name} is not a constant")
        axis = int(m.weight_axis or 0)
        scale = _weight_scales(module, p, w.shape[axis], m.weight_fold, wbits)
        bshape = [1] * w.ndim
        bshape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(bshape)), *qrange(wbits, True)).astype(np.int8)
        node.inputs[1] = _dq_constant(graph, init_name, q, scale, np.zeros(scale.shape, np.int8), axis)
        # int32 bias for onnxruntime: with it the Conv/Gemm and its Q/DQ fuse into one integer kernel
        x_name = dq_source.get(node.inputs[0].name)
        if target == "onnxruntime" and len(node.inputs) > 2 and x_name in act_params and node.op in ("Conv", "Gemm") and axis == 0:
            b = _const_values(node.inputs[2])
            if b is not None and b.ndim == 1 and b.size == scale.size:
                bscale = (np.float64(act_params[x_name].scale.reshape(())) * scale.astype(np.float64)).astype(np.float32)
                qb = np.clip(np.round(b / bscale), -(2**31), 2**31 - 1).astype(np.int32)
                node.inputs[2] = _dq_constant(graph, f"{node.name}_bias", qb, bscale, np.zeros(bscale.shape, np.int32), 0)

    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    del out.opset_import[:]
    out.opset_import.extend(onnx_model.opset_import)
    out.ir_version = onnx_model.ir_version
    onnx.checker.check_model(out)
    log.info("inserted Q/DQ for %s: %d activation tensors, %d weights", target, len(act_params), len(weights))
    return out
