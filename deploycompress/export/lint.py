"""Report every QDQ rule a graph breaks, per node, before a backend build fails or runs slow."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph_utils import WEIGHTED_OPS, gs_constant, has_weight, is_gemv, pad_constant, weight_axis
from .onnx_export import MIN_OPSET, onnx_opset
from .targets import QDQTarget, get_target

__all__ = ["LintFinding", "LINT_RULES", "lint_qdq"]

LINT_RULES = {
    "opset": "QDQ with per-channel weights needs opset >= 13",
    "scale-positive": "every Q/DQ scale must be positive and finite",
    "weight-unquantized": "a weighted op's weight must come from a DequantizeLinear when the graph is quantized",
    "weight-per-channel": "weights are quantized per output channel on the right axis",
    "weight-symmetric": "weights are int8 with zero point 0",
    "input-unquantized": "the data input of a weighted op must come from a DequantizeLinear",
    "activation-per-tensor": "activations are quantized per tensor",
    "tensorrt-symmetric": "a symmetric target (TensorRT) takes only int8 Q/DQ with zero point 0",
    "activation-dtype": "activations use the target's dtype (onnxruntime x86: uint8)",
    "output-quantized": "TensorRT: outputs of weighted ops stay float (unless they feed another weighted op or a residual Add)",
    "residual-add": "TensorRT: one input of a residual Add must be dequantized so the Add fuses into the conv",
    "concat-shared-scale": "all inputs of a Concat (the target's shared-scale ops) share one scale and zero point",
    "qdq-pair": "a QuantizeLinear feeds DequantizeLinear nodes with the same scale and zero point (through constant Pads where the target runs them quantized)",
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


def _producer(t) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def _qparams(node: gs.Node) -> tuple[np.ndarray | None, np.ndarray | None]:
    scale = gs_constant(node.inputs[1]) if len(node.inputs) > 1 else None
    zp = gs_constant(node.inputs[2]) if len(node.inputs) > 2 else None
    return scale, zp


def _through(t, ops: tuple[str, ...]) -> list:
    """Consumers of ``t``, looking through one op of ``ops`` (activations the target folds into the Q)."""
    out = []
    for c in t.outputs:
        out.append(c)
        if c.op in ops:
            out.extend(c.outputs[0].outputs)
    return out


def _weight_values(dq: gs.Node) -> np.ndarray | None:
    """The weight a DequantizeLinear stands for: its constant input (int8, stored quantized), or the float
    constant a QuantizeLinear quantizes in the graph (ModelOpt's form: TensorRT folds the pair into an
    int8 weight, the same placement); None for an activation."""
    v = gs_constant(dq.inputs[0])
    if v is not None:
        return v
    q = _producer(dq.inputs[0])
    return gs_constant(q.inputs[0]) if q is not None and q.op == "QuantizeLinear" else None


def _dequantized(x, ops: tuple[str, ...], zero_pads: bool = False) -> bool:
    """``x`` comes from a DequantizeLinear, possibly through ops the target fuses through (and, with
    ``zero_pads``, zero constant Pads, which onnxruntime folds into the Conv)."""
    for _ in range(16):
        p = _producer(x)
        if p is None:
            return False
        if p.op == "DequantizeLinear":
            return True
        if zero_pads and pad_constant(p) == 0.0:
            x = p.inputs[0]
            continue
        if p.op not in ops or not p.inputs:
            return False
        x = p.inputs[0]
    return False


def lint_qdq(model: onnx.ModelProto, target: str | QDQTarget = "tensorrt") -> list[LintFinding]:
    """Every rule of :data:`LINT_RULES` that ``model`` breaks for ``target`` (a name registered in
    :mod:`.targets` or a :class:`~.targets.QDQTarget`): the description ``insert_qdq`` places by.
    ValueError names the known targets."""
    spec = get_target(target)
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
        is_weight = _weight_values(n) is not None if n.op == "DequantizeLinear" else gs_constant(n.inputs[0]) is not None
        is_bias = zp is not None and zp.dtype == np.int32  # int32 bias of an integer kernel (int32_bias targets)
        if spec.activation_symmetric and zp is not None and not (is_bias and spec.int32_bias) and (zp.dtype != np.int8 or np.any(zp != 0)):
            add(n.name, "tensorrt-symmetric", f"zero point is {zp.dtype} {np.unique(zp)[:4].tolist()}, {spec.name} needs int8 zero point 0")
        elif not is_weight and zp is not None and not is_bias and str(zp.dtype) != spec.activation_dtype:
            add(n.name, "activation-dtype", f"activation {n.inputs[0].name!r} is {zp.dtype}; {spec.name} runs {spec.activation_dtype} fastest",
                "warning")
        if not is_weight and scale.size > 1:
            add(n.name, "activation-per-tensor", f"activation {n.inputs[0].name!r} has {scale.size} scales")
        if n.op == "QuantizeLinear":
            readers = list(n.outputs[0].outputs)
            for c in readers:
                if spec.quantized_pads and pad_constant(c) is not None:
                    readers.extend(c.outputs[0].outputs)  # the Pad copies integers; the DQ comes after it
                    continue
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
        if has_weight(node):
            x, w = node.inputs[0], node.inputs[1]
            wp = _producer(w)
            if spec.float_gemv and is_gemv(node) and (wp is None or wp.op != "DequantizeLinear"):
                continue  # a float GEMV (classifier head): what this target wants
            if wp is None or wp.op != "DequantizeLinear":
                if gs_constant(w) is not None:
                    add(node.name, "weight-unquantized", f"weight {w.name!r} is float in a quantized graph")
            else:
                scale, zp = _qparams(wp)
                wv = _weight_values(wp)
                # stored int8 behind the DQ, or float quantized in the graph to the zero point's dtype
                stored = wv.dtype if gs_constant(wp.inputs[0]) is not None else (zp.dtype if zp is not None else None)
                axis = weight_axis(node.op, node.attrs.get("transB", 0))
                channels = wv.shape[axis] if wv is not None and wv.ndim > axis else None
                one_channel = channels == 1 and scale is not None and scale.size == 1  # per-tensor is per-channel there
                if scale is not None and not one_channel and (scale.size == 1 or wp.attrs.get("axis", 1) != axis or scale.size != channels):
                    add(node.name, "weight-per-channel",
                        f"weight scale has {scale.size} value(s) on axis {wp.attrs.get('axis', 1)}; expected {channels} on axis {axis}")
                if (stored is not None and stored != np.int8) or (zp is not None and np.any(zp != 0)):
                    add(node.name, "weight-symmetric", f"weight is {stored} with zero point(s) {np.unique(zp)[:4].tolist() if zp is not None else '?'}")
            if not _dequantized(x, spec.fuses_through, spec.quantized_pads):
                add(node.name, "input-unquantized", f"input {x.name!r} is not dequantized: the op runs in float")
            out = node.outputs[0]
            if spec.weighted_outputs_float:
                quantizers = [c for c in out.outputs if c.op == "QuantizeLinear"]
                readers = [r for q in quantizers for dq in q.outputs[0].outputs for r in dq.outputs[0].outputs]
                needed = any(r.op in ("Add",) + WEIGHTED_OPS for r in readers)
                if quantizers and not needed:
                    add(node.name, "output-quantized", f"output {out.name!r} is quantized; TensorRT wants it float")
            elif (spec.float_output_severity and out not in graph.outputs and node.op in spec.needs_quantized_output
                  and not any(c.op == "QuantizeLinear" for c in _through(out, spec.folds_into_quantize))):
                add(node.name, "float-output", f"output {out.name!r} reaches no QuantizeLinear: {spec.name} keeps this op in float",
                    spec.float_output_severity)
        elif node.op == "Add" and spec.residual_add_branch:
            producers = [_producer(i) for i in node.inputs]
            from_weighted = any(p is not None and p.op in spec.residual_fusing_ops for p in producers)
            dequantized = any(p is not None and p.op == "DequantizeLinear" for p in producers)
            if from_weighted and not dequantized and not any(isinstance(i, gs.Constant) for i in node.inputs):
                add(node.name, "residual-add", "no input is dequantized: quantize the residual branch")
        elif node.op in spec.shared_scale_ops:
            params = []
            for i in node.inputs:
                if gs_constant(i) is not None:
                    continue
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
