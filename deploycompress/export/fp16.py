"""The fp16 graph for TensorRT's strongly typed builds: precision lives in the graph's types (TensorRT 11
has no FP16 builder flag). Converted with onnxconverter-common's ``float16.convert_float_to_float16``
(the converter onnxruntime's and ONNX's tooling use); inputs and outputs stay fp32 (Casts inside the
graph), and numerically sensitive ops stay fp32 (:data:`FP32_OPS`: reductions, normalizations,
exp/log/pow, whose fp16 range overflows or loses the small terms).
"""

from __future__ import annotations

import logging
from typing import Iterable

import onnx

__all__ = ["FP32_OPS", "Fp16RangeWarning", "to_fp16"]

log = logging.getLogger(__name__)

class Fp16RangeWarning(UserWarning):
    """Weights outside fp16's range were clamped by the converter (one warning with the count)."""


#: ops kept in fp32 in the fp16 graph
FP32_OPS = ("LayerNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
            "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Softplus", "InstanceNormalization", "GroupNormalization",
            "QuantizeLinear", "DequantizeLinear")


def to_fp16(model: onnx.ModelProto, *, keep_fp32: Iterable[str] = FP32_OPS) -> onnx.ModelProto:
    """A copy of ``model`` with float tensors in fp16, except the ops in ``keep_fp32`` and the graph's inputs
    and outputs; weights outside the fp16 range are clamped by the converter (it warns)."""
    import warnings

    from onnxconverter_common import float16

    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block, disable_shape_infer=False)
    clamped = [w for w in caught if "truncated" in str(w.message)]
    if clamped:
        warnings.warn(f"fp16 graph: {len(clamped)} weight value(s) outside fp16's range were clamped "
                      f"(e.g. {clamped[0].message})", Fp16RangeWarning, stacklevel=2)
    for w in caught:
        if w not in clamped:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    onnx.checker.check_model(out)
    kept = sum(1 for n in model.graph.node if n.op_type in set(keep_fp32))
    log.info("fp16 graph: %d nodes, %d kept in fp32 (%s)", len(out.graph.node), kept, ", ".join(sorted(set(keep_fp32) & {n.op_type for n in model.graph.node})) or "none")
    return out
