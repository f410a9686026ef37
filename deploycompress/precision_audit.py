"""Count the weighted layers that really run in the requested precision, after QDQ and after the backend.

A calibration selects layers; the graph may still run fewer of them in int8: a layer the QDQ
insertion could not reach, an input left float, or a Q/DQ pattern the backend did not fuse into an
integer kernel (onnxruntime then dequantizes the weight and runs the float op). Two counts, each
with a reason per missing layer:

* QDQ graph: the layer's weighted node takes a dequantized int8 weight *and* a dequantized input
  (what TensorRT and onnxruntime need to run it in int8);
* optimized graph (onnxruntime: the model it saves after its graph optimisations): the layer's int8
  weight is consumed by an integer kernel (``QLinearConv``, ``QGemm``, ``MatMulInteger``, ...), found
  by the weight initializer's name, which onnxruntime keeps.

:func:`check_precision` turns a shortfall into a :class:`PrecisionShortfallWarning` naming the layers and
reasons, or, with ``strict=True``, into :class:`PrecisionShortfallError`.

Selected layers the quantizer could not wrap at all (``nn.MultiheadAttention.out_proj``, whose weight its parent
reads directly) are carried by name and reason in :attr:`PrecisionAudit.exceptions` (from the calibration's
``provenance["left_float"]``): listed in the summary and the report, not counted as a shortfall.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import StepError
from .export.name_map import NameMap

__all__ = [
    "INTEGER_KERNELS",
    "LayerPrecision",
    "PrecisionAudit",
    "PrecisionShortfallError",
    "PrecisionShortfallWarning",
    "audit_optimized",
    "audit_qdq",
    "check_precision",
]

log = logging.getLogger(__name__)

#: backend -> the op types of its optimized graph that compute in integers
INTEGER_KERNELS: dict[str, tuple[str, ...]] = {
    "onnxruntime": (
        "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul", "QAttention", "QLinearConvTranspose",
    ),
}  # fmt: skip


class PrecisionShortfallWarning(UserWarning):
    """Fewer weighted layers run in the requested precision than the calibration selected."""


class PrecisionShortfallError(StepError, RuntimeError):
    """``strict=True`` and fewer weighted layers run in the requested precision than the calibration selected."""


@dataclass
class LayerPrecision:
    name: str
    in_qdq: bool
    in_optimized: bool | None = None  # None: the backend's optimized graph is not inspected here
    reason: str = ""


@dataclass
class PrecisionAudit:
    """Per selected weighted layer: whether it runs in int8 in the QDQ graph and in the backend's graph."""

    precision: str
    backend: str
    layers: dict[str, LayerPrecision] = field(default_factory=dict)
    #: layers the config selected that stay float for a known, named reason (the quantizer could not
    #: wrap them: ``nn.MultiheadAttention.out_proj``); reported, not counted in ``short`` (``strict`` passes)
    exceptions: dict[str, str] = field(default_factory=dict)

    @property
    def requested(self) -> int:
        return len(self.layers)

    @property
    def in_qdq(self) -> int:
        return sum(l.in_qdq for l in self.layers.values())

    @property
    def in_optimized(self) -> int | None:
        if any(l.in_optimized is None for l in self.layers.values()):
            return None
        return sum(bool(l.in_optimized) for l in self.layers.values())

    @property
    def short(self) -> dict[str, str]:
        """Layer -> why it does not run in the requested precision."""
        return {n: l.reason for n, l in self.layers.items() if not l.in_qdq or l.in_optimized is False}

    def summary(self) -> str:
        opt = "not inspected" if self.in_optimized is None else f"{self.in_optimized}"
        text = (
            f"{self.precision} requested for {self.requested} weighted layers: {self.in_qdq} in the QDQ graph, "
            f"{opt} in {self.backend}'s optimized graph"
        )
        if self.exceptions:
            text += f"; {len(self.exceptions)} selected layer(s) left float by exception: " + "; ".join(
                f"{n} ({why})" for n, why in self.exceptions.items())
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision, "backend": self.backend, "requested": self.requested, "in_qdq": self.in_qdq,
            "in_optimized": self.in_optimized, "short": self.short, "exceptions": dict(self.exceptions),
            "layers": {n: asdict(l) for n, l in self.layers.items()},
        }  # fmt: skip


def _index(model: onnx.ModelProto):
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    return producer, consumers


#: ops between a DequantizeLinear and a weighted node that backends move the Q/DQ across (zero Pad: padded convs)
MOVEMENT_OPS = ("Pad", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "MaxPool")


def _through_movement(model: onnx.ModelProto, producer: dict[str, onnx.NodeProto], tensor: str) -> onnx.NodeProto | None:
    """The producer of ``tensor``, looking back through data-movement ops to a DequantizeLinear if there is one."""
    node = producer.get(tensor)
    first = node
    for _ in range(8):
        if node is None or node.op_type not in MOVEMENT_OPS:
            break
        if node.op_type == "Pad" and not _zero_constant_pad(model, producer, node):
            break
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type == "DequantizeLinear" else first


def _zero_constant_pad(model: onnx.ModelProto, producer: dict[str, onnx.NodeProto], node: onnx.NodeProto) -> bool:
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
    if mode != "constant":
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    value = next((numpy_helper.to_array(i) for i in model.graph.initializer if i.name == node.input[2]), None)
    src = producer.get(node.input[2])
    if value is None and src is not None and src.op_type == "Constant":
        value = next((numpy_helper.to_array(a.t) for a in src.attribute if a.name == "value"), None)
    return value is not None and not np.any(value)


def audit_qdq(qdq_model: onnx.ModelProto, name_map: NameMap, layers: Iterable[str], *, backend: str = "onnxruntime",
              exceptions: Mapping[str, str] | None = None) -> PrecisionAudit:
    """Which of ``layers`` (module names whose weight the calibration quantizes) run in int8 in the QDQ graph.
    ``exceptions``: selected layers the quantizer left float, ``{module: reason}`` (the calibration's
    ``provenance["left_float"]``), carried into the audit by name."""
    producer, _ = _index(qdq_model)
    nodes = {n.name: n for n in qdq_model.graph.node}
    audit = PrecisionAudit("int8", backend, exceptions=dict(exceptions or {}))
    for name in layers:
        m = name_map.get(name)
        node = nodes.get(m.weight_node or "") if m is not None else None
        if node is None:
            why = name_map.unmapped.get(name, "it has no weighted node in the exported graph")
            audit.layers[name] = LayerPrecision(name, False, reason=f"not in the graph: {why}")
            continue
        w = producer.get(node.input[1]) if len(node.input) > 1 else None
        x = _through_movement(qdq_model, producer, node.input[0])
        if w is None or w.op_type != "DequantizeLinear":
            audit.layers[name] = LayerPrecision(name, False, reason=f"node {node.name} ({node.op_type}) takes a float weight")
        elif x is None or x.op_type != "DequantizeLinear":
            what = f"{x.op_type} node {x.name}" if x is not None else "a graph input"
            audit.layers[name] = LayerPrecision(
                name, False, reason=f"node {node.name} ({node.op_type}) takes a float input from {what} (no input calibration reached it)"
            )
        else:
            audit.layers[name] = LayerPrecision(name, True)
    return audit


def audit_optimized(audit: PrecisionAudit, qdq_model: onnx.ModelProto, optimized: onnx.ModelProto, name_map: NameMap) -> PrecisionAudit:
    """Fill ``in_optimized`` from the backend's optimized graph (``audit.backend`` must be in :data:`INTEGER_KERNELS`)."""
    kernels = INTEGER_KERNELS.get(audit.backend)
    if kernels is None:
        return audit
    producer, _ = _index(qdq_model)
    nodes = {n.name: n for n in qdq_model.graph.node}
    _, consumers = _index(optimized)
    for name, layer in audit.layers.items():
        if not layer.in_qdq:
            layer.in_optimized = False
            continue
        node = nodes[name_map[name].weight_node or ""]
        weight_int8 = producer[node.input[1]].input[0]  # the int8 initializer behind the weight's DequantizeLinear
        users = consumers.get(weight_int8, [])
        integer = [u for u in users if u.op_type in kernels]
        layer.in_optimized = bool(integer)
        if not integer:
            seen = ", ".join(f"{u.op_type} {u.name}" for u in users) or "nothing (the weight was folded to float)"
            layer.reason = (
                f"{audit.backend} did not fuse its Q/DQ into an integer kernel: its int8 weight feeds {seen}, "
                "so it runs in float"
            )
    return audit


def check_precision(audit: PrecisionAudit, *, strict: bool = False) -> None:
    """Warn (:class:`PrecisionShortfallWarning`) or, with ``strict``, raise when layers run in less than asked."""
    short = audit.short
    log.info("precision audit: %s", audit.summary())
    for name, why in audit.exceptions.items():
        log.warning("%s stays float: %s", name, why)
    if not short:
        return
    listed = "\n  ".join(f"{n}: {why}" for n, why in list(short.items())[:20])
    more = f"\n  ... and {len(short) - 20} more" if len(short) > 20 else ""
    message = f"{len(short)} of {audit.requested} weighted layers do not run in {audit.precision}: {audit.summary()}\n  {listed}{more}"
    if strict:
        raise PrecisionShortfallError(message + "\n(strict=True: failing instead of building a model quantized less than asked)")
    warnings.warn(message, PrecisionShortfallWarning, stacklevel=3)
