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

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from ..errors import StepError
from ..quantization.wrapper import QuantWrapper
from ..tensor_io import InputNamingError, TensorSpec, flatten_outputs, name_inputs
from .name_map import NameMap, build_name_map, record_calls

__all__ = ["ExportError", "ExportResult", "TracerWarning", "to_onnx", "tensor_specs"]

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
    tracer_warnings: list[str] = field(default_factory=list)  # what the exporter's tracer warned about

    def save(self, path) -> None:
        onnx.save(self.model, str(path))


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


def _export_failure(model: nn.Module, opset: int, exc: BaseException) -> str:
    """What to tell the user when ``torch.onnx.export`` raised: the unsupported operator, or -- when
    forward itself refused the positional call the exporter makes (a TypeError about its arguments,
    as recent Hugging Face models raise) -- that, with the wrapper that calls it by keyword."""
    name = type(model).__name__
    if isinstance(exc, TypeError) and "argument" in str(exc):
        hint = "; wrap it so forward takes tensors positionally"
        if type(model).__module__.startswith("transformers."):
            hint = "; wrap a Hugging Face model in deploycompress.hf.Encoder(model) (input_ids, attention_mask)"
        return f"cannot export {name}: forward() refused the exporter's positional call ({exc}){hint}"
    op = _failing_op(exc)
    what = f"operator {op}" if op else "an operator"
    return f"cannot export {name} to ONNX opset {opset}: {what} is not supported ({exc})"


def tensor_specs(values: Sequence[onnx.ValueInfoProto]) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
        specs.append(TensorSpec(v.name, shape, str(helper.tensor_dtype_to_np_dtype(t.elem_type))))
    return specs


@contextlib.contextmanager
def _given_arguments_only(model: nn.Module, n_args: int) -> Iterator[None]:
    """While exporting a Hugging Face ``transformers`` model, hide its forward's defaults from the exporter.

    TorchScript's exporter appends the default of every parameter after the given ones as positional
    arguments (``_decide_input_format``); ``transformers``' forward decorators then set ``use_cache`` (and
    others) as keywords too, and the call fails with "got multiple values for argument 'use_cache'".
    The instance gets a forward taking exactly the given positional arguments for the export; the class is
    untouched and the attribute removed afterwards."""
    if not any(c.__module__.startswith("transformers.") for c in type(model).__mro__[:-2]) or "forward" in vars(model):
        yield
        return
    bound = model.forward

    def forward(*args: Any) -> Any:
        return bound(*args[:n_args])

    model.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.forward


def to_onnx(
    model: nn.Module,
    example_inputs,
    *,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export ``model`` (in eval mode) and map every module to the ONNX nodes and tensors it became.

    ``example_inputs``: a tensor, a tuple of tensors or a dict of tensors keyed by forward's parameter
    names. Inputs are named after forward's parameters and outputs after the structure forward returns
    (:mod:`deploycompress.tensor_io`), unless ``input_names``/``output_names`` say otherwise.
    ``dynamic_batch`` makes axis 0 of every input and output dynamic ("batch"); ``dynamic_axes`` adds
    more per input, e.g. ``{"ids": {1: "sequence"}}``. Raises :class:`ExportError` naming the problem.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: QDQ per-channel weights need opset >= {MIN_OPSET}")
    wrapped = [n for n, m in model.named_modules() if isinstance(m, QuantWrapper)]
    if wrapped:  # fake-quant wrappers do not export; the calibration goes into Q/DQ nodes instead
        raise ExportError(f"the model still holds quantizer wrappers ({', '.join(wrapped[:3])}{', ...' if len(wrapped) > 3 else ''}): "
                          "export quantizer.unwrap_model() and pass quantizer.export_calib_config() to insert_qdq "
                          "(or to build_engine)")
    try:
        named = name_inputs(model, example_inputs)
    except InputNamingError as exc:
        raise ExportError(str(exc)) from None
    args = named.args
    input_names = list(input_names) if input_names else list(named.names)
    if len(input_names) != len(named.names):
        raise ExportError(f"{len(input_names)} input_names for {len(named.names)} example inputs")
    unknown = sorted(set(dynamic_axes or {}) - set(input_names))
    if unknown:
        raise ExportError(f"dynamic_axes names {unknown}, which are not inputs; inputs are {input_names}")
    flags = [(m, m.training) for m in model.modules()]  # each module's own: train(was) would flip an eval-mode
    model.eval()  # submodule under a wrapper in training mode (a Hugging Face model in deploycompress.hf.Encoder)
    try:
        calls, reference = record_calls(model, args)
        try:
            flat = flatten_outputs(reference)
        except TypeError as exc:
            raise ExportError(str(exc)) from None
        if output_names is None:
            output_names = list(flat)
        output_names = list(output_names)
        if len(output_names) != len(flat):
            raise ExportError(f"{len(output_names)} output_names for {len(flat)} model outputs")
        axes: dict[str, dict[int, str]] = {}
        if dynamic_batch:
            axes = {n: {0: "batch"} for n in input_names + output_names}
        for n, extra in (dynamic_axes or {}).items():
            axes.setdefault(n, {}).update({int(k): str(v) for k, v in extra.items()})
        buf = io.BytesIO()
        with warnings.catch_warnings(record=True) as caught, _given_arguments_only(model, len(args)):
            warnings.simplefilter("always")
            try:
                torch.onnx.export(
                    model,
                    args,
                    buf,
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=axes or None,
                    do_constant_folding=True,
                )
            except Exception as exc:  # the exporter raises many types; all end here with the op named
                raise ExportError(_export_failure(model, opset, exc)) from exc
        tracer = _surface_tracer_warnings(caught)
        proto = onnx.load_from_string(buf.getvalue())
        proto = onnx.shape_inference.infer_shapes(proto)
        name_map = build_name_map(model, args, proto, calls)
    finally:
        for m, flag in flags:
            m.training = flag
    log.info("exported %s: %d nodes, %d modules mapped", type(model).__name__, len(proto.graph.node), len(name_map))
    return ExportResult(proto, name_map, tensor_specs(proto.graph.input), tensor_specs(proto.graph.output), tracer)


class TracerWarning(UserWarning):
    """The exporter traced Python control flow or a value as a constant: the graph may hold one branch only."""


def _surface_tracer_warnings(caught) -> list[str]:
    """Re-issue the tracer's warnings (data-dependent control flow, tensors converted to Python
    values) as :class:`TracerWarning`; the exporter's deprecation notices are dropped."""
    found = []
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            text = str(w.message).split("\n")[0]
            if text not in found:
                found.append(text)
    for text in found:
        warnings.warn(f"ONNX export traced a Python value as a constant: {text}", TracerWarning, stacklevel=3)
    return found


def onnx_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    return None
