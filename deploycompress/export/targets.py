"""One description per QDQ target: where Q/DQ go, in which flavour, and what the target fuses.

The same :class:`QDQTarget` drives :func:`~deploycompress.export.insert_qdq` (placing Q/DQ) and
:func:`~deploycompress.export.lint_qdq` (checking a graph), so the two cannot disagree. A backend with
its own kernels registers its own entry with :func:`register_target`.

References: onnxruntime's QDQ format and its x86 int8 kernels (QLinearConv, QGemm, MatMulInteger;
"Quantize ONNX models", onnxruntime docs), TensorRT's explicit quantization ("Working with Quantized
Types", TensorRT developer guide: Q/DQ placement, symmetric int8 only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from calibrators import QuantParams

from ..suggest import did_you_mean

__all__ = ["QDQTarget", "QDQ_TARGETS", "get_target", "register_target", "target_names"]


@dataclass(frozen=True)
class QDQTarget:
    """How one runtime wants a QDQ graph.

    Weights are always int8, symmetric (zero point 0), per output channel (axis from
    :func:`~deploycompress.export.graph_utils.weight_axis`); activations are per tensor.
    """

    name: str
    #: activation Q/DQ dtype: "uint8" (asymmetric, onnxruntime x86) or "int8"
    activation_dtype: str
    #: activations with zero point 0 (and int8): required by TensorRT
    activation_symmetric: bool
    #: the bias of a Conv/Gemm is stored as int32 behind a DequantizeLinear (scale = x_scale * w_scale)
    int32_bias: bool = False
    #: weights may be stored in 7 bits (x86 without VNNI, onnxruntime only)
    reduce_range_allowed: bool = False
    #: outputs of weighted ops are quantized only when they feed another weighted op or are one
    #: branch of a residual Add (TensorRT fuses the Add into the conv); otherwise they stay float
    weighted_outputs_float: bool = False
    #: graph outputs stay float even when calibrated (else a calibrated output keeps its Q/DQ, as the
    #: simulation quantized it, and lets onnxruntime fuse the last Conv into QLinearConv)
    graph_outputs_float: bool = False
    #: the lint requires one dequantized input on an Add fed by a weighted op (residual fusion)
    residual_add_branch: bool = False
    #: the ops that fuse a residual Add into themselves (TensorRT: convolutions; a Gemm/MatMul-fed Add in a
    #: transformer is not such a fusion, as in ModelOpt's residual-Add rule, which looks for a Conv backbone)
    residual_fusing_ops: tuple[str, ...] = ("Conv", "ConvTranspose")
    #: activations the runtime folds into the QuantizeLinear after them (their range clamps already):
    #: a Q/DQ on their input would block the producer's fusion, so it is dropped; the lint looks
    #: through them when asking whether a weighted op's output reaches a QuantizeLinear
    folds_into_quantize: tuple[str, ...] = ()
    #: data-movement ops whose input and output share one scale (the op then runs in int8); the
    #: output's range is propagated back to an unquantized input
    same_scale_ops: tuple[str, ...] = ()
    #: ops whose inputs and output all share one scale (the lint checks their inputs agree)
    shared_scale_ops: tuple[str, ...] = ("Concat",)
    #: value-copying ops between a quantized tensor and a weighted op's input (padding in any mode:
    #: Pad, the Slice+Concat of circular padding; reshapes): the Q/DQ moves past them so the weighted
    #: op's own input is dequantized (its kernel needs the DQ right before it)
    moves_past: tuple[str, ...] = ()
    #: constant-mode Pads run on the quantized tensor: one Q before the Pad, its constant written in the
    #: quantized domain, one DQ after it, so the Pad and the weighted op after it run in int8 through a
    #: single Q/DQ pair (onnxruntime's Pad kernel takes uint8/int8, but its CPU QDQ transformer has no
    #: Pad rule: a DQ -> Pad -> Q group stays a float Pad between two conversions)
    quantized_pads: bool = False
    #: ops the runtime fuses between a DequantizeLinear and a weighted op: the lint accepts them on
    #: the path from the DQ to the weighted op's input
    fuses_through: tuple[str, ...] = ()
    #: a tensor calibrated only as some module's *input* is dequantized for that module's nodes; its
    #: other readers (a residual skip) keep the float value, as in the PTQ/QAT simulation, whose wrapper
    #: quantizes the module's own input only. False: one shared Q/DQ for every reader (TensorRT fuses
    #: a quantized residual Add into the conv, and the simulation then differs on the skip)
    skip_reads_float: bool = False
    #: ops with an integer kernel the runtime fuses when every input is dequantized and the output is
    #: quantized (onnxruntime: QLinearAdd): an input calibrated only as a module's input (a residual skip
    #: that skip_reads_float would leave float) is dequantized for them too, so they do not run in float
    integer_binary_ops: tuple[str, ...] = ()
    #: Gemm/MatMul with one row per sample (:func:`~.graph_utils.is_gemv`: a classifier head) stay float: at
    #: batch 1 a matrix-vector product, for which TensorRT's int8 kernels are no faster (ModelOpt's GEMV rule),
    #: and the head is the layer whose rounding the logits feel most; the lint accepts them float
    float_gemv: bool = False
    #: lint severity when a weighted op's output reaches no QuantizeLinear (the op runs in float);
    #: None: not a finding for this target
    float_output_severity: str | None = None
    #: the weighted ops whose integer kernel needs a quantized output (onnxruntime: QLinearConv;
    #: Gemm and MatMul have float-output kernels, QGemm and MatMulIntegerToFloat)
    needs_quantized_output: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    #: the graph carries the runtime's symbolic shapes (onnxruntime's ``SymbolicShapeInference``): ONNX shape
    #: inference names a batch dim read back from a computed Pad ``unk__N``, and onnxruntime's ReshapeFusion
    #: then cannot prove ``x.view(x.size(0), -1)``'s Shape->Gather->Unsqueeze->Concat equal to the data's own
    #: dim 0; it stays five ops run at every inference instead of one constant Reshape
    symbolic_shapes: bool = False
    notes: str = field(default="", compare=False)

    @property
    def activation_signed(self) -> bool:
        return self.activation_dtype == "int8"

    def activation_flavour(self, p: QuantParams) -> QuantParams:
        """The calibrated range as this target's activation parameters (same min/max, its dtype/scheme)."""
        return p.with_flavour(symmetric=self.activation_symmetric, signed=self.activation_signed)


#: value-copying ops: they move or repeat values without changing them
_COPY_OPS = ("Pad", "Slice", "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")
_SAME_SCALE = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")

QDQ_TARGETS: dict[str, QDQTarget] = {}


def register_target(target: QDQTarget) -> QDQTarget:
    """Add or replace the description for ``target.name``."""
    QDQ_TARGETS[target.name] = target
    return target


def get_target(name: str | QDQTarget) -> QDQTarget:
    """The registered description; ValueError naming the known targets otherwise."""
    if isinstance(name, QDQTarget):
        return name
    try:
        return QDQ_TARGETS[name]
    except KeyError:
        raise ValueError(f"target must be one of {target_names()}, got {name!r}{did_you_mean(name, target_names())}") from None


def target_names() -> list[str]:
    return list(QDQ_TARGETS)


register_target(QDQTarget(
    name="onnxruntime",
    activation_dtype="uint8",
    activation_symmetric=False,
    int32_bias=True,
    reduce_range_allowed=True,
    folds_into_quantize=("Relu", "Clip"),
    same_scale_ops=_SAME_SCALE,
    moves_past=_COPY_OPS,
    quantized_pads=True,
    skip_reads_float=True,
    integer_binary_ops=("Add",),
    float_output_severity="warning",
    needs_quantized_output=("Conv", "ConvTranspose"),
    symbolic_shapes=True,
    notes="U8S8: uint8 asymmetric activations, int8 per-channel weights, int32 bias; QLinearConv/QGemm/MatMulInteger",
))

# TensorRT's explicit quantization (developer guide, "Q/DQ layer-placement recommendations"; the ONNX
# parser's table: QuantizeLinear/DequantizeLinear zero point must be 0): quantize every input of a
# weighted op, leave weighted-op outputs float unless another weighted op reads them, quantize the
# residual (shortcut) input of an Add so the Add fuses into the conv before it, one scale across a
# Concat; a GEMV-shaped Gemm/MatMul (the classifier head) stays float, as in NVIDIA ModelOpt. Checked on resnet18 and an Inception-style block by tests/test_tensorrt_qdq.py; the TensorRT
# pre-build checks (export/tensorrt_checks.py) lint with this entry, no second rule set.
register_target(QDQTarget(
    name="tensorrt",
    activation_dtype="int8",
    activation_symmetric=True,
    weighted_outputs_float=True,
    graph_outputs_float=True,
    residual_add_branch=True,
    float_gemv=True,
    same_scale_ops=_SAME_SCALE,
    moves_past=_COPY_OPS,
    notes="S8S8 symmetric, zero point 0, per-channel weights only (TensorRT explicit quantization; strongly typed builds)",
))
