"""Small lookups on ONNX graphs shared by the name map, the Q/DQ surgery and its lint.

One description each of: the output-channel axis of a weighted op's weight, and the constant behind
a tensor (looking through the TorchScript exporter's ``Identity`` chains and ``Constant`` nodes).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["WEIGHTED_OPS", "weight_axis", "through_identity", "gs_constant", "has_weight", "is_gemv", "pad_constant"]

#: ops whose input 1 is a weight that int8 kernels take per output channel
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

_MAX_CHAIN = 8


def weight_axis(op_type: str, trans_b: int = 0) -> int:
    """Output-channel axis of input 1 of ``op_type``: 0 for Conv and Gemm(transB=1) (out, in, ...);
    1 for ConvTranspose (in, out/groups, ...), MatMul and Gemm(transB=0) (in, out). ONNX operator spec."""
    if op_type in ("ConvTranspose", "MatMul"):
        return 1
    if op_type == "Gemm":
        return 0 if trans_b else 1
    return 0


def through_identity(start, producer: Callable) -> object:
    """Follow ``Identity`` producers back from ``start``; ``producer(t)`` returns ``(op_type, input0)``
    of the node producing ``t`` or None. Returns the first tensor not produced by an Identity."""
    t = start
    for _ in range(_MAX_CHAIN):
        p = producer(t)
        if p is None or p[0] != "Identity":
            return t
        t = p[1]
    return t


def _gs_producer(t):
    return (t.inputs[0].op, t.inputs[0].inputs[0]) if t.inputs and t.inputs[0].inputs else None


def gs_constant(t) -> np.ndarray | None:
    """Values of an onnx-graphsurgeon tensor when it is constant (an initializer or a ``Constant``
    node, possibly behind ``Identity`` nodes); None for an activation."""
    if t is None:
        return None
    t = through_identity(t, _gs_producer)
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant":
        return np.asarray(t.inputs[0].attrs["value"].values)
    return None


def has_weight(node: gs.Node) -> bool:
    """A weighted op whose input 1 is a weight (a constant, a dequantized constant, or a constant
    quantized and dequantized in the graph), not an activation (attention's ``q @ k``)."""
    if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    for _ in range(2):  # DequantizeLinear, then QuantizeLinear (weights quantized in the graph)
        p = w.inputs[0] if w.inputs else None
        if p is None or p.op not in ("DequantizeLinear", "QuantizeLinear"):
            break
        w = p.inputs[0]
    return gs_constant(w) is not None


def is_gemv(node: gs.Node) -> bool:
    """A Gemm/MatMul with a weight whose data input holds one row per sample: ``(N, K)`` (a classifier
    after global pooling), or ``(N, 1, ..., K)``; at batch 1 a matrix-vector product. Unknown shapes: False."""
    if node.op not in ("Gemm", "MatMul") or not has_weight(node):
        return False
    if node.op == "Gemm":
        return not node.attrs.get("transA", 0)  # A is (M, K): one row per sample
    shape = node.inputs[0].shape
    if shape is None or len(shape) < 2:
        return False
    return all(isinstance(d, int) and d == 1 for d in shape[1:-1])


def pad_constant(node: gs.Node) -> float | None:
    """The value a constant-mode Pad writes (ONNX Pad, opset >= 11: input 2, default 0); None for
    other ops and modes (reflect/edge/wrap copy input values) or a constant computed at run time."""
    if node.op != "Pad" or node.attrs.get("mode", "constant") != "constant":
        return None
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return 0.0
    v = gs_constant(node.inputs[2])
    if v is None:
        return None
    return float(np.asarray(v).reshape(-1)[0]) if np.asarray(v).size else 0.0
