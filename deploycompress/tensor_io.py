"""Names of a model's inputs and outputs, the one convention export, validation and bundles share.

Inputs are named after the parameters of ``model.forward`` (``def forward(self, ids, mask)`` ->
``ids``, ``mask``); ``example_inputs`` may be one tensor, a tuple of tensors (positional) or a dict
of tensors keyed by parameter name.

Outputs are named after the structure forward returns, flattened depth-first in the order the
TorchScript ONNX exporter flattens it:

* one tensor -> ``output``;
* a tuple/list -> ``output.0``, ``output.1``, ... (nested: ``output.1.0``);
* a dict (or namedtuple) -> its keys (``logits``, ``boxes``); nested: ``heads.cls``, ``aux.0``.

The separator is :data:`OUTPUT_SEPARATOR` (``"."``). ``None`` entries are skipped (the exporter
drops them too).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import InputError
from .suggest import did_you_mean

__all__ = ["TensorSpec", "OUTPUT_SEPARATOR", "NamedInputs", "InputNamingError", "name_inputs", "flatten_outputs", "call_with"]

OUTPUT_SEPARATOR = "."
_SINGLE_OUTPUT = "output"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. A dimension is an int, or a string for a dynamic axis ("batch")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy dtype name: "float32", "int64", ...

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping) -> "TensorSpec":
        return cls(name=str(data["name"]), shape=tuple(data["shape"]), dtype=str(data["dtype"]))


class InputNamingError(InputError, ValueError):
    """``example_inputs`` do not fit the model's forward signature; the message names the parameter."""


@dataclass(frozen=True)
class NamedInputs:
    """``example_inputs`` resolved against forward's signature: ``args`` positional, in order, with
    ``names`` (one per tensor in ``args``; None holes are defaults passed through)."""

    names: tuple[str, ...]
    args: tuple[Any, ...]

    def tensors(self) -> dict[str, Any]:
        """name -> tensor, in graph-input order."""
        return dict(zip(self.names, (a for a in self.args if _is_tensor(a))))


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _parameters(forward: Callable) -> list[inspect.Parameter]:
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters.values() if p.name != "self"]


def name_inputs(model: Callable, example_inputs: Any) -> NamedInputs:
    """Resolve ``example_inputs`` (tensor, tuple/list of tensors, or dict name -> tensor) against
    ``model.forward``'s parameters. Raises :class:`InputNamingError` for an unknown key, a tensor
    for a parameter past the end of the signature, or a non-tensor value."""
    params = _parameters(getattr(model, "forward", model))
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = next((p for p in params if p.kind == p.VAR_POSITIONAL), None)
    if _is_tensor(example_inputs):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        known = {p.name: p for p in positional}
        unknown = [k for k in example_inputs if k not in known]
        if unknown:
            hint = "".join(did_you_mean(k, list(known)) for k in unknown[:1])
            raise InputNamingError(f"example_inputs names {unknown}, which are not parameters of forward {[p.name for p in positional]}{hint}")
        last = max(i for i, p in enumerate(positional) if p.name in example_inputs) if example_inputs else -1
        args, names = [], []
        for p in positional[: last + 1]:
            if p.name in example_inputs:
                value = example_inputs[p.name]
                if not _is_tensor(value):
                    raise InputNamingError(f"example_inputs[{p.name!r}] is {type(value).__name__}, not a tensor")
                args.append(value)
                names.append(p.name)
            elif p.default is not inspect.Parameter.empty:
                args.append(p.default)
                if _is_tensor(p.default):
                    names.append(p.name)
            else:
                raise InputNamingError(f"example_inputs lack {p.name!r}, a required parameter of forward")
        return NamedInputs(tuple(names), tuple(args))
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        bad = [i for i, t in enumerate(example_inputs) if not _is_tensor(t)]
        if bad:
            raise InputNamingError(f"example_inputs[{bad[0]}] is {type(example_inputs[bad[0]]).__name__}, not a tensor")
        names = []
        for i in range(len(example_inputs)):
            if i < len(positional):
                names.append(positional[i].name)
            elif var_pos is not None:
                names.append(f"{var_pos.name}{OUTPUT_SEPARATOR}{i - len(positional)}")
            elif not params:  # no signature to read (a builtin or C++ module)
                names.append("input" if len(example_inputs) == 1 else f"input{OUTPUT_SEPARATOR}{i}")
            else:
                raise InputNamingError(f"{len(example_inputs)} example inputs for forward{tuple(p.name for p in positional)}")
        return NamedInputs(tuple(names), tuple(example_inputs))
    raise InputNamingError(f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(example_inputs).__name__}")


def flatten_outputs(value: Any) -> dict[str, Any]:
    """Output name -> tensor for whatever forward returned (see the module docstring)."""
    out: dict[str, Any] = {}

    def walk(v: Any, path: tuple[str, ...]) -> None:
        if v is None:
            return
        if _is_tensor(v):
            out[OUTPUT_SEPARATOR.join(path) if path else _SINGLE_OUTPUT] = v
        elif isinstance(v, Mapping):
            for k, item in v.items():
                walk(item, path + (str(k),))
        elif isinstance(v, tuple) and hasattr(v, "_fields"):  # namedtuple: its field names
            for k, item in zip(v._fields, v):
                walk(item, path + (k,))
        elif isinstance(v, (tuple, list)):
            for i, item in enumerate(v):
                walk(item, (path or (_SINGLE_OUTPUT,)) + (str(i),))
        else:
            raise TypeError(f"forward returned {type(v).__name__} at {OUTPUT_SEPARATOR.join(path) or 'the top'}; expected tensors")

    walk(value, ())
    return out


def call_with(model: Callable, names: tuple[str, ...] | list[str], tensors: list[Any]) -> Any:
    """Call ``model`` on tensors named after its forward parameters (by keyword when every name is a
    parameter, else positionally, for graphs whose inputs were named otherwise)."""
    params = {p.name for p in _parameters(getattr(model, "forward", model))}
    if names and all(n in params for n in names):
        return model(**dict(zip(names, tensors)))
    return model(*tensors)
