"""Everything checkable about a TensorRT build without TensorRT: the ONNX-TensorRT operator table, the
Q/DQ rules (:func:`~deploycompress.export.lint.lint_qdq` with target ``tensorrt``: zero point 0,
per-channel scales on weights only, residual Add and Concat placement) and DLA's layer rules.
``deploycompress inspect --target tensorrt`` prints the result; ``build_engine(..., backend="tensorrt")``
refuses to start a build when it holds an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import onnx

from deploycompress_device.checks import Finding, check_dla, check_operators, op_table

from .lint import lint_qdq

__all__ = ["DEFAULT_TENSORRT_VERSION", "TensorRTCheck", "check_tensorrt"]

#: the TensorRT version checked against when none is given (the newest operator table in the project)
DEFAULT_TENSORRT_VERSION = "10.1"


@dataclass
class TensorRTCheck:
    """Findings of :func:`check_tensorrt`; ``gpu_layers`` lists the nodes DLA would leave to the GPU."""

    tensorrt_version: str
    op_table: str
    findings: list[Finding] = field(default_factory=list)
    dla_core: int | None = None
    gpu_layers: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"tensorrt_version": self.tensorrt_version, "op_table": self.op_table, "dla_core": self.dla_core,
                "findings": [f.to_dict() for f in self.findings], "gpu_layers": list(self.gpu_layers)}

    def summary(self) -> str:
        return "\n  ".join(f"{f.severity} [{f.rule}] {f.node}: {f.message}" for f in self.findings)


def check_tensorrt(
    model: onnx.ModelProto,
    *,
    tensorrt_version: str | None = None,
    precision: str = "int8",
    dla_core: int | None = None,
    gpu_fallback: bool = True,
    static_shapes: Mapping[str, Sequence[int]] | None = None,
    lint: bool = True,
) -> TensorRTCheck:
    """All pre-build checks for ``model``; with ``lint`` a QDQ graph is also linted with the TensorRT Q/DQ rules."""
    version = tensorrt_version or DEFAULT_TENSORRT_VERSION
    table_version, table = op_table(version)
    result = TensorRTCheck(version, table["source"], check_operators(model, version), dla_core)
    if lint and any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        result.findings += [Finding(f.node, f.rule, f.message, f.severity) for f in lint_qdq(model, "tensorrt")]
    if dla_core is not None:
        dla = check_dla(model, trt_version=version, precision=precision, gpu_fallback=gpu_fallback, static_shapes=static_shapes)
        result.findings += dla.findings
        result.gpu_layers = dla.gpu_layers
    return result
