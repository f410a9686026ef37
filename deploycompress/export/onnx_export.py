"""PyTorch -> ONNX with the TorchScript exporter, returning the graph and a verified name map.

Why the TorchScript exporter (``dynamo=False``) and not torch 2.14's default dynamo exporter: it
keeps each module's scope in the node names (``/layer1/layer1.0/conv1/Conv``), exports opset 17
directly (the dynamo exporter builds opset 18 and down-converting failed on ``ReduceMean``), takes
0.2 s instead of 7 s on the digits CNN, and it does not leave a BatchNorm-folded weight under the
unfolded parameter's name (the dynamo exporter's ``conv1.weight`` after ``FuseBatchNormIntoConv``
holds folded values). Names are only a starting point: :mod:`.name_map` checks each match against
the module's weight values, op type and tensor shapes.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from ..errors import StepError
from ..backends.base import TensorSpec
from .name_map import NameMap, build_name_map, record_calls

__all__ = ["ExportError", "ExportResult", "to_onnx", "tensor_specs"]

log = logging.getLogger(__name__)

MIN_OPSET = 13


class ExportError(StepError, RuntimeError):
    """The model could not be exported; the message names the failing operator when known."""


@dataclass
class ExportResult:
    model: onnx.ModelProto
    name_map: NameMap
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def save(self, path) -> None:
        onnx.save(self.model, str(path))


def _as_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ExportError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


_OP_PATTERNS = (
    re.compile(r"operator '?([\w:.]+)'?"),
    re.compile(r"(aten::\w+|prim::\w+|onnx::\w+)"),
)


def _failing_op(exc: BaseException) -> str | None:
    text = str(exc)
    for pattern in _OP_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1)
    return None


def tensor_specs(values: Sequence[onnx.ValueInfoProto]) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
        specs.append(TensorSpec(v.name, shape, str(helper.tensor_dtype_to_np_dtype(t.elem_type))))
    return specs


def to_onnx(
    model: nn.Module,
    example_inputs,
    *,
    dynamic_batch: bool = True,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export ``model`` (in eval mode) and map every module to the ONNX nodes and tensors it became."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: QDQ per-channel weights need opset >= {MIN_OPSET}")
    args = _as_tuple(example_inputs)
    input_names = list(input_names) if input_names else (["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))])
    if len(input_names) != len(args):
        raise ExportError(f"{len(input_names)} input_names for {len(args)} example inputs")
    was_training = model.training
    model.eval()
    try:
        calls, reference = record_calls(model, args)
        outs = reference if isinstance(reference, (tuple, list)) else (reference,)
        if output_names is None:
            output_names = ["output"] if len(outs) == 1 else [f"output{i}" for i in range(len(outs))]
        output_names = list(output_names)
        if len(output_names) != len(outs):
            raise ExportError(f"{len(output_names)} output_names for {len(outs)} model outputs")
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(
                    model,
                    args,
                    buf,
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
        except Exception as exc:  # the exporter raises many types; all end here with the op named
            op = _failing_op(exc)
            what = f"operator {op}" if op else "an operator"
            raise ExportError(
                f"cannot export {type(model).__name__} to ONNX opset {opset}: {what} is not supported ({exc})"
            ) from exc
        proto = onnx.load_from_string(buf.getvalue())
        proto = onnx.shape_inference.infer_shapes(proto)
        name_map = build_name_map(model, args, proto, calls)
    finally:
        model.train(was_training)
    log.info("exported %s: %d nodes, %d modules mapped", type(model).__name__, len(proto.graph.node), len(name_map))
    return ExportResult(proto, name_map, tensor_specs(proto.graph.input), tensor_specs(proto.graph.output))


def onnx_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    return None
