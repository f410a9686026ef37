"""The check layer: everything a long step needs from its input, checked before the step starts.

Used by :func:`deploycompress.build_engine`, :func:`deploycompress.speedup.speedup`, the pruners and
the command line. Every check raises an :class:`~deploycompress.errors.InputError` subclass whose
message names the argument (``example_inputs``, ``calib_data batch 3``, ``eval_labels``, a mask's
``module.weight``) and says what to change; a doubtful but usable input is a named warning
(:class:`InputWarning`). Nothing here modifies the caller's model, masks or data.

Imports only torch and the error hierarchy, so every room may use it.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .batches import batch_list
from .errors import InputError, MaskError
from .suggest import closest, did_you_mean

__all__ = [
    "CheckError",
    "InputWarning",
    "check_example_inputs",
    "check_batches",
    "check_eval_data",
    "check_count",
    "check_masks_usable",
    "check_backend_options",
    "read_json_file",
    "load_tensor_file",
    "describe_load_failure",
]

log = logging.getLogger(__name__)


class CheckError(InputError, ValueError):
    """An input that a long step could not use; the message names the argument and what to change."""


class InputWarning(UserWarning):
    """An input that is usable but probably not what was meant (e.g. empty masks)."""


def _as_tuple(value: Any, what: str) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in value) \
            and all(t is None or isinstance(t, torch.Tensor) for t in value):  # None: a default passed through
        return tuple(value)
    kinds = [type(v).__name__ for v in value] if isinstance(value, (tuple, list)) else type(value).__name__
    raise CheckError(f"{what} must be a tensor or a tuple of tensors, got {kinds}")


def _describe(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if t is not None else "None" for t in inputs)


def _eval_forward(model: nn.Module, inputs: Any):
    """One forward pass in eval mode under no_grad, restoring every module's training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                return model(**inputs)
            return model(*inputs)
    finally:
        for m, flag in flags:
            m.training = flag


def check_example_inputs(model: nn.Module, example_inputs: Any, what: str = "example_inputs") -> Any:
    """Run ``example_inputs`` (a tensor, a tuple of tensors, one per ``forward`` argument, or a dict of
    keyword inputs) once
    through ``model`` (eval mode, no grad; the model's training flags are restored) and return them
    as a tuple (a dict stays a dict). A failure (wrong shape, dtype, count) is a :class:`CheckError` naming ``what``, the
    shapes given and the model's own message."""
    if isinstance(example_inputs, Mapping) and example_inputs and all(isinstance(k, str) for k in example_inputs):
        inputs: Any = dict(example_inputs)  # keyword inputs: forward(**example_inputs)
        shown = ", ".join(f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}" for k, v in inputs.items())
    else:
        inputs = _as_tuple(example_inputs, what)
        shown = _describe(inputs)
    tensors = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    if any(isinstance(t, torch.Tensor) and t.numel() == 0 for t in tensors):  # noqa: SIM102
        raise CheckError(f"{what} holds an empty tensor ({shown}); give at least one sample")
    try:
        _eval_forward(model, inputs)
    except Exception as exc:  # the model's own error, re-raised naming the argument
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckError(f"{what} ({shown}) do not run through {type(model).__name__}: {type(exc).__name__}: {detail}. "
                         f"Give {what} with the shape and dtype forward() expects") from exc
    return inputs


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    return a.is_floating_point == b.is_floating_point and (a == torch.bool) == (b == torch.bool)


def _batch_tensors(batch: Any, names: list[str], where: str) -> list[tuple[str, Any]]:
    """(input name, tensor) pairs of one batch: a tensor, a tuple (positional) or a dict (by name)."""
    if isinstance(batch, Mapping):
        unknown = [k for k in batch if k not in names]
        if unknown:
            raise CheckError(f"{where} names input(s) {unknown}{did_you_mean(unknown[0], names)}; the model's inputs are {names}")
        missing = [n for n in names if n not in batch]
        if missing:
            raise CheckError(f"{where} lacks input(s) {missing}")
        return [(n, batch[n]) for n in names]
    tensors = _as_tuple(batch, where)
    if len(tensors) != len(names):
        hint = " (batches of (inputs, labels)? yield the inputs only)" if len(tensors) == len(names) + 1 else ""
        raise CheckError(f"{where} has {len(tensors)} tensor(s), the model takes {len(names)} input(s) {names}{hint}")
    return list(zip(names, tensors))


def check_batches(batches: Any, reference: Any, what: str = "calib_data", dynamic_axes: Mapping[str, Any] | None = None) -> list:
    """Check input batches (an iterable of tensors, of tuples with one tensor per model input, or of
    dicts keyed by input name) against the model's example inputs ``reference`` (a sequence of tensors,
    or a dict name -> tensor): count and names of tensors, every axis after the batch axis except the
    axes ``dynamic_axes`` names for that input (``{"input_ids": {1: "sequence"}}``, keys of a dict
    ``reference``), dtype kind (float/int/bool) and finite values, batch by batch. Returns the batches
    as a list, unchanged.

    A single tensor instead of a list of batches is refused (iterating it would feed one sample at a
    time with the batch axis dropped).
    """
    if isinstance(reference, Mapping):
        names, refs = list(reference), list(reference.values())
    else:
        refs = list(reference)
        names = [f"input {k}" for k in range(len(refs))] if len(refs) > 1 else ["input"]
    try:
        batches = batch_list(batches, what)  # the rule for a single tensor or dict, shared with the pruning steps
    except ValueError as exc:
        raise CheckError(str(exc)) from None
    free = {name: {int(a) % max(ref.dim(), 1) for a in (dynamic_axes or {}).get(name, {})} for name, ref in zip(names, refs)}
    out = []
    for i, batch in enumerate(batches):
        where = f"{what} batch {i}"
        for (name, t), ref in zip(_batch_tensors(batch, names, where), refs):
            label = where if len(refs) == 1 else f"{where} {name!r}"
            if not isinstance(t, torch.Tensor):
                raise CheckError(f"{label} is {type(t).__name__}, not a tensor")
            fixed = [a for a in range(1, ref.dim()) if a not in free[name]]
            if t.dim() != ref.dim():
                raise CheckError(f"{label} has shape {tuple(t.shape)}; the example input is {tuple(ref.shape)} (a different rank)")
            differ = [a for a in fixed if t.shape[a] != ref.shape[a]]
            if differ:
                free_ = f" besides the dynamic axes {sorted(free[name])}" if free[name] else ""
                axis_name = "sequence" if ref.dim() == 2 else f"dim{differ[0]}"  # (batch, tokens): a sequence axis
                hint = (f"; to let it vary, name it in dynamic_axes, e.g. dynamic_axes={{{name!r}: {{{differ[0]}: {axis_name!r}}}}} "
                        f"(command line: --dynamic-axis {name}={differ[0]}:{axis_name})"
                        if isinstance(reference, Mapping) else "")
                raise CheckError(f"{label} has shape {tuple(t.shape)}; the example input is {tuple(ref.shape)}: axis "
                                 f"{', '.join(map(str, differ))} differs (every axis after the batch axis{free_} must match){hint}")
            if t.dim() and t.shape[0] == 0:
                raise CheckError(f"{label} is empty (batch axis 0)")
            if not _same_kind(t.dtype, ref.dtype):
                raise CheckError(f"{label} has dtype {t.dtype}; the example input has {ref.dtype}")
            if not _finite(t):
                raise CheckError(f"{label} holds NaN or infinite values")
        out.append(batch)
    if not out:
        raise CheckError(f"{what} is empty: give at least one batch")
    return out


def check_eval_data(
    inputs: Any, labels: Any, reference: Any, what: str = "eval_inputs", dynamic_axes: Mapping[str, Any] | None = None
) -> None:
    """Evaluation inputs against the example inputs (see :func:`check_batches`), and labels:
    integers, one per sample."""
    if inputs is not None:
        check_batches([inputs], reference, what, dynamic_axes)
    if labels is None:
        return
    labels = torch.as_tensor(labels)
    first = inputs if inputs is not None else reference
    first = next(iter(first.values())) if isinstance(first, Mapping) else (first if isinstance(first, torch.Tensor) else first[0])
    n = len(first)
    if labels.dim() != 1 or len(labels) != n:
        raise CheckError(f"eval_labels has shape {tuple(labels.shape)}; expected one label per sample ({n},)")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise CheckError(f"eval_labels has dtype {labels.dtype}; expected integer class indices")


def check_count(value: Any, name: str, low: int = 1, high: float = math.inf) -> int:
    """An integer in ``[low, high]`` (bools refused); the error names ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f"in [{low}, {high}]" if high != math.inf else f">= {low}"
        raise CheckError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def check_masks_usable(masks: Mapping[str, Mapping[str, torch.Tensor]], what: str = "masks") -> None:
    """Masks that would build a degenerate model: empty masks warn (:class:`InputWarning`); a mask that
    removes every weight of a layer (a constant output) is a :class:`MaskError` naming the layer."""
    if not masks:
        warnings.warn(f"{what} is empty ({{}}): nothing will be pruned; pass masks=None to skip speedup deliberately",
                      InputWarning, stacklevel=3)
        return
    for name, entry in masks.items():
        for pname, mask in entry.items():
            if isinstance(mask, torch.Tensor) and mask.numel() and not bool(mask.bool().any()):
                raise MaskError(f"{what}: mask {name}.{pname} removes every weight of {name!r}, so the layer's output would be "
                                "constant; keep at least one channel (or drop the layer from the masks)")


def check_backend_options(backend: Any, options: Mapping[str, Any]) -> None:
    """Option names the backend's ``build`` declares (keyword-only parameters), checked before any
    work with close matches named; a backend with a ``check_options`` checks names and values itself."""
    import inspect

    checker = getattr(backend, "check_options", None)
    if callable(checker):  # the backend knows its own option names and values
        try:
            checker(**options)
        except (TypeError, ValueError) as exc:
            raise CheckError(f"backend_options of backend {getattr(backend, 'name', backend)!r}: {exc}") from None
        return
    params = inspect.signature(backend.build).parameters
    known = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "precision"]
    unknown = [k for k in options if k not in known]
    if unknown and known:  # a build taking only **options names none: the backend checks them itself
        hints = {k: closest(k, known, n=2) for k in unknown}
        raise CheckError(f"backend_options {unknown} are not options of backend {getattr(backend, 'name', backend)!r} "
                         f"(close matches: {hints}); known: {known}")


# -- files users hand us ---------------------------------------------------------------------------
MAX_JSON_BYTES = 64 << 20  #: a calibration or report JSON larger than this is refused unread
MAX_JSON_DEPTH = 32  #: nesting deeper than this is refused (our layouts nest 5 levels)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def read_json_file(path: Any, what: str, error: type[Exception] = CheckError, *, max_bytes: int = MAX_JSON_BYTES,
                   max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a JSON file with limits: at most ``max_bytes`` (checked before reading), UTF-8 text,
    valid JSON, nested at most ``max_depth`` levels. Every refusal is ``error`` naming ``what`` and the file."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    name = f"{what} {str(path)!r}"
    if not path.is_file():
        raise error(f"{name} does not exist")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise error(f"{name} is {size} bytes, more than the {max_bytes}-byte limit for this kind of file")
    if size == 0:
        raise error(f"{name} is empty")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{name} is not UTF-8 text (a binary file?): byte {exc.start}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise error(f"{name} is nested too deeply to be a calibration (limit {max_depth} levels)") from None
    except json.JSONDecodeError as exc:
        raise error(f"{name} is not valid JSON: {exc}") from None
    depth = _depth(data)
    if depth > max_depth:
        raise error(f"{name} is nested {depth} levels deep; the limit is {max_depth}")
    return data


def describe_load_failure(path: Any, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words naming the file: a pickle holding
    other objects was refused without unpickling them; a raw pickle or foreign file is not a torch.save
    file; a zip that fails to read is truncated or damaged."""
    import os
    import pickle
    import zipfile

    name = repr(os.fspath(path))
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return f"{name} is empty"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "WeightsUnpickler error" in ln or ln.startswith(("Unsupported", "Can only", "Trying to"))),
                  lines[0] if lines else type(exc).__name__)[:300]
    if isinstance(exc, pickle.UnpicklingError):
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
            return (f"{name} is not a torch.save file (a raw pickle or another format); it was refused without unpickling it. "
                    "Write it with torch.save (deploycompress.save_masks for masks)")
        return (f"{name} was refused without unpickling it: it holds objects other than tensors, dicts, lists and numbers "
                f"(torch.load weights_only=True): {detail}")
    return f"{name} is not a complete torch.save file (truncated, or another format): {detail}"


def load_tensor_file(path: Any, what: str, error: type[Exception] = CheckError, safe_globals: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` (within the ``safe_globals`` context when given) whose
    every failure is ``error`` naming ``what`` and the file (see :func:`describe_load_failure`)."""
    import contextlib
    import os

    if not os.path.isfile(path):
        raise error(f"{what} {os.fspath(path)!r} does not exist".lstrip())
    try:
        with safe_globals if safe_globals is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError (not a zip), EOFError, ...
        raise error(f"{what} {describe_load_failure(path, exc)}".lstrip()) from None
