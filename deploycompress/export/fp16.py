"""The fp16 graphs for TensorRT's strongly typed builds: precision lives in the graph's types (TensorRT 11
has no FP16 builder flag). Converted with onnxconverter-common's ``float16.convert_float_to_float16``
(the converter onnxruntime's and ONNX's tooling use); inputs and outputs stay fp32 (Casts inside the
graph), and numerically sensitive ops stay fp32 (:data:`FP32_OPS`: reductions, normalizations,
exp/log/pow, whose fp16 range overflows or loses the small terms).

An int8 QDQ graph converts to the *mixed* graph (int8 where the Q/DQ pairs are, fp16 elsewhere): the Q/DQ
pairs then take fp16 inputs and fp16 scales, which QuantizeLinear/DequantizeLinear accept from opset 19
on (ONNX operator spec: ``T1``/``T2`` gained float16 in opset 19; opset 13 takes float32 only). So a QDQ
graph below opset 19 is first converted with ``onnx.version_converter``. Keeping the Q/DQ in fp32 instead
would put a Cast between each DequantizeLinear and its conv, which TensorRT's Q/DQ fusion does not cross.
"""

from __future__ import annotations

import logging
from typing import Iterable

import onnx

__all__ = ["FP32_OPS", "QDQ_FP16_OPSET", "Fp16RangeWarning", "to_fp16"]

log = logging.getLogger(__name__)

class Fp16RangeWarning(UserWarning):
    """Weights outside fp16's range were clamped by the converter (one warning with the count)."""


#: ops kept in fp32 in the fp16 graph
FP32_OPS = ("LayerNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
            "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Softplus", "InstanceNormalization", "GroupNormalization")
#: the first opset whose QuantizeLinear/DequantizeLinear take fp16 inputs and scales
QDQ_FP16_OPSET = 19
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def to_fp16(model: onnx.ModelProto, *, keep_fp32: Iterable[str] = FP32_OPS) -> onnx.ModelProto:
    """A copy of ``model`` with float tensors in fp16, except the ops in ``keep_fp32`` and the graph's inputs
    and outputs; weights outside the fp16 range are clamped by the converter (it warns).

    A graph with QuantizeLinear/DequantizeLinear becomes the mixed int8 + fp16 graph at opset >= 19 (its
    scales in fp16); ValueError when the ONNX version converter cannot take it to opset 19, naming the cause.
    """
    import warnings

    from onnxconverter_common import float16

    keep = set(keep_fp32)
    if any(n.op_type in _QDQ for n in model.graph.node) and not keep & set(_QDQ):
        opset = _default_opset(model)
        if opset < QDQ_FP16_OPSET:
            from onnx import version_converter

            try:
                model = version_converter.convert_version(model, QDQ_FP16_OPSET)
            except Exception as exc:  # noqa: BLE001 - the converter raises its own types; said in the message
                raise ValueError(f"the QDQ graph (opset {opset}) cannot be converted to opset {QDQ_FP16_OPSET}, which fp16 Q/DQ "
                                 f"scales need: {exc}; export it at opset {QDQ_FP16_OPSET} (to_onnx(..., opset={QDQ_FP16_OPSET}))") from exc
            log.info("fp16 graph: QDQ graph converted from opset %d to %d (fp16 Q/DQ scales)", opset, QDQ_FP16_OPSET)
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | keep)
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
    kept = sum(1 for n in model.graph.node if n.op_type in keep)
    log.info("fp16 graph: %d nodes, %d kept in fp32 (%s)", len(out.graph.node), kept, ", ".join(sorted(keep & {n.op_type for n in model.graph.node})) or "none")
    return out
