"""Report every QDQ rule a graph breaks, per node, before a backend build fails or runs slow."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .name_map import WEIGHTED_OPS
from .onnx_export import MIN_OPSET, onnx_opset

__all__ = ["LintFinding", "LINT_RULES", "lint_qdq"]

LINT_RULES = {
    "opset": "QDQ with per-channel weights needs opset >= 13",
    "scale-positive": "every Q/DQ scale must be positive and finite",
    "weight-unquantized": "a weighted op's weight must come from a DequantizeLinear when the graph is quantized",
    "weight-per-channel": "weights are quantized per output channel on the right axis",
    "weight-symmetric": "weights are int8 with zero point 0",
    "input-unquantized": "the data input of a weighted op must come from a DequantizeLinear",
    "activation-per-tensor": "activations are quantized per tensor",
    "tensorrt-symmetric": "TensorRT takes only int8 Q/DQ with zero point 0",
    "output-quantized": "TensorRT: outputs of weighted ops stay float (unless they feed another weighted op or a residual Add)",
    "residual-add": "TensorRT: one input of a residual Add must be dequantized so the Add fuses into the conv",
    "concat-shared-scale": "all inputs of a Concat share one scale and zero point",
    "qdq-pair": "a QuantizeLinear feeds DequantizeLinear nodes with the same scale and zero point",
    "float-output": "onnxruntime: a weighted op whose output reaches no QuantizeLinear runs in float",
}


@dataclass(frozen=True)
class LintFinding:
    node: str
    rule: str
    message: str
    severity: str = "error"  # "error": the target rejects or mis-runs it; "warning": it runs, but slower

    def to_dict(self) -> dict:
        return asdict(self)


def _const(t) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant":
        return np.asarray(t.inputs[0].attrs["value"].values)
    if t.inputs and t.inputs[0].op == "Identity":
        return _const(t.inputs[0].inputs[0])
    return None


def _producer(t) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def _weight_axis(node: gs.Node) -> int:
    if node.op in ("ConvTranspose", "MatMul"):
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 0


def _qparams(node: gs.Node) -> tuple[np.ndarray | None, np.ndarray | None]:
    scale = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    zp = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    return scale, zp


def _through_act(t) -> list:
    """Consumers of ``t``, looking through one Relu/Clip (which onnxruntime folds into the Q)."""
    out = []
    for c in t.outputs:
        out.append(c)
        if c.op in ("Relu", "Clip"):
            out.extend(c.outputs[0].outputs)
    return out


def lint_qdq(model: onnx.ModelProto, target: str = "tensorrt") -> list[LintFinding]:
    """Every rule of :data:`LINT_RULES` that ``model`` breaks for ``target`` ('tensorrt' or 'onnxruntime')."""
    if target not in ("tensorrt", "onnxruntime"):
        raise ValueError(f"target must be 'tensorrt' or 'onnxruntime', got {target!r}")
    findings: list[LintFinding] = []

    def add(node: str, rule: str, message: str, severity: str = "error") -> None:
        findings.append(LintFinding(node, rule, message, severity))

    opset = onnx_opset(model)
    if opset < MIN_OPSET:
        add("<graph>", "opset", f"opset {opset} < {MIN_OPSET}")
    graph = gs.import_onnx(model)
    qdq = [n for n in graph.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]
    quantized = bool(qdq)

    for n in qdq:
        scale, zp = _qparams(n)
        if scale is None:
            add(n.name, "scale-positive", "scale is not a constant")
            continue
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            add(n.name, "scale-positive", f"scale holds non-positive or non-finite values (min {float(np.min(scale)):g})")
        if target == "tensorrt" and zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
            add(n.name, "tensorrt-symmetric", f"zero point is {zp.dtype} {np.unique(zp)[:4].tolist()}, TensorRT needs int8 zero point 0")
        is_weight = n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)
        if not is_weight and scale.size > 1:
            add(n.name, "activation-per-tensor", f"activation {n.inputs[0].name!r} has {scale.size} scales")
        if n.op == "QuantizeLinear":
            for c in n.outputs[0].outputs:
                if c.op != "DequantizeLinear":
                    add(n.name, "qdq-pair", f"quantized tensor feeds {c.op} {c.name!r}, not a DequantizeLinear")
                    continue
                cs, cz = _qparams(c)
                if cs is None or cs.shape != scale.shape or not np.allclose(cs, scale) or (
                    zp is not None and cz is not None and (cz.dtype != zp.dtype or np.any(cz != zp))
                ):
                    add(c.name, "qdq-pair", f"scale/zero point differ from its QuantizeLinear {n.name!r}")

    if not quantized:
        return findings

    for node in graph.nodes:
        if node.op in WEIGHTED_OPS and len(node.inputs) > 1:
            x, w = node.inputs[0], node.inputs[1]
            wp = _producer(w)
            if wp is None or wp.op != "DequantizeLinear":
                if _const(w) is not None:
                    add(node.name, "weight-unquantized", f"weight {w.name!r} is float in a quantized graph")
            else:
                scale, zp = _qparams(wp)
                wv = _const(wp.inputs[0])
                axis = _weight_axis(node)
                channels = wv.shape[axis] if wv is not None and wv.ndim > axis else None
                if scale is not None and (scale.size == 1 or wp.attrs.get("axis", 1) != axis or scale.size != channels):
                    add(node.name, "weight-per-channel",
                        f"weight scale has {scale.size} value(s) on axis {wp.attrs.get('axis', 1)}; expected {channels} on axis {axis}")
                if (wv is not None and wv.dtype != np.int8) or (zp is not None and np.any(zp != 0)):
                    add(node.name, "weight-symmetric", f"weight is {getattr(wv, 'dtype', '?')} with zero point(s) {np.unique(zp)[:4].tolist() if zp is not None else '?'}")
            xp = _producer(x)
            if xp is None or xp.op != "DequantizeLinear":
                add(node.name, "input-unquantized", f"input {x.name!r} is not dequantized: the op runs in float")
            out = node.outputs[0]
            if target == "tensorrt":
                quantizers = [c for c in out.outputs if c.op == "QuantizeLinear"]
                readers = [r for q in quantizers for dq in q.outputs[0].outputs for r in dq.outputs[0].outputs]
                needed = any(r.op in ("Add",) + WEIGHTED_OPS for r in readers)
                if quantizers and not needed:
                    add(node.name, "output-quantized", f"output {out.name!r} is quantized; TensorRT wants it float")
            elif not any(c.op == "QuantizeLinear" for c in _through_act(out)) and out not in graph.outputs:
                add(node.name, "float-output", f"output {out.name!r} reaches no QuantizeLinear: onnxruntime keeps this op in float", "warning")
        elif node.op == "Add" and target == "tensorrt":
            producers = [_producer(i) for i in node.inputs]
            from_weighted = any(p is not None and p.op in WEIGHTED_OPS for p in producers)
            dequantized = any(p is not None and p.op == "DequantizeLinear" for p in producers)
            if from_weighted and not dequantized and not any(isinstance(i, gs.Constant) for i in node.inputs):
                add(node.name, "residual-add", "no input is dequantized: quantize the residual branch")
        elif node.op == "Concat":
            params = []
            for i in node.inputs:
                p = _producer(i)
                params.append(_qparams(p) if p is not None and p.op == "DequantizeLinear" else None)
            if any(p is not None for p in params):
                if any(p is None for p in params):
                    add(node.name, "concat-shared-scale", "some inputs are dequantized and some are float")
                else:
                    first = params[0]
                    if any(p[0] is None or not np.allclose(p[0], first[0]) or (p[1] is not None and first[1] is not None and np.any(p[1] != first[1])) for p in params[1:]):
                        add(node.name, "concat-shared-scale", "inputs carry different scales or zero points")
    return findings
