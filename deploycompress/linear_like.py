"""Linear-like layers that are not ``nn.Linear``: selected by ``op_types: ["Linear"]``, quantized, and lowered to an
exactly equivalent ``nn.Linear`` where the pipeline needs one.

Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...) computes ``y = x @ W + b`` with its weight
stored ``(in_features, out_features)``, the transpose of ``nn.Linear``'s ``(out, in)``, and does not derive from
``nn.Linear``. Its one description here, :data:`LINEAR_LIKE` (class path -> weight layout), is what every step
reads:

* selection (:func:`deploycompress.config.resolve_op_types`): ``"Linear"`` selects these layers too (not under
  ``"op_types_match": "exact"``, NNI's class-name rule);
* quantizers wrap them as they are, with per-channel weight scales on the output axis (1:
  :func:`output_axis`);
* ``build_engine`` replaces them, in its own copy, by ``nn.Linear`` holding ``W.T`` (:func:`lower_linear_like`):
  speedup, ONNX export (Gemm/MatMul), QDQ and the precision audit then see a Linear; masks and calibrations
  taken on the original layer are transposed / re-axed to match (:func:`transpose_masks`);
* pruners refuse them by name (their channel tracer follows ``F.linear``, not ``torch.addmm`` on a view):
  prune the lowered model, ``to_linear(model)`` (a copy, same module names, exact).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["LINEAR_LIKE", "as_linear", "is_linear_like", "lower_linear_like", "output_axis", "to_linear", "transpose_masks"]

log = logging.getLogger(__name__)

#: class path (``module.qualname``) -> layout of its ``weight``: ``"in_out"`` means ``y = x @ weight + bias``
LINEAR_LIKE: dict[str, str] = {"transformers.pytorch_utils.Conv1D": "in_out"}


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a :data:`LINEAR_LIKE` class (or of a subclass of one)."""
    return any(_path(c) in LINEAR_LIKE for c in type(module).__mro__)


def linear_like_classes(model: nn.Module) -> list[type]:
    """The :data:`LINEAR_LIKE` classes the model is built from."""
    seen: dict[type, None] = {}
    for m in model.modules():
        for c in type(m).__mro__:
            if _path(c) in LINEAR_LIKE:
                seen.setdefault(c, None)
    return list(seen)


def output_axis(module: nn.Module) -> int | None:
    """Axis of the output features in a linear-like layer's weight (1 for ``(in, out)``); None for other modules."""
    return 1 if is_linear_like(module) else None


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing exactly what ``module`` (a linear-like layer) computes: weight ``W.T``, same bias."""
    weight = module.weight.detach()
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias.detach())
    linear.train(module.training)
    return linear


def lower_linear_like(model: nn.Module) -> list[str]:
    """Replace, in place, every linear-like layer of ``model`` by :func:`as_linear`; returns their names.
    Shared layers (one module under several names) stay shared."""
    made: dict[int, nn.Linear] = {}
    names = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not is_linear_like(module):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, made.setdefault(id(module), as_linear(module)))
        names.append(name)
    if names:
        log.info("lowered %d linear-like layers to nn.Linear: %s", len(names), names[:8])
    return names


def to_linear(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every linear-like layer replaced by the equivalent ``nn.Linear`` (same module names,
    same outputs): what the pruners take. ``model`` itself is not modified."""
    out = copy.deepcopy(model)
    lower_linear_like(out)
    return out


def transpose_masks(masks: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Masks keyed as ``{module: {"weight": mask, ...}}`` on ``model``'s linear-like layers, made to fit their
    lowered ``nn.Linear`` (the weight mask transposed; other masks unchanged)."""
    modules = dict(model.named_modules())
    out: dict[str, Any] = {}
    for name, entry in masks.items():
        module = modules.get(name)
        if module is not None and is_linear_like(module) and isinstance(entry, Mapping) and isinstance(entry.get("weight"), torch.Tensor):
            entry = {**entry, "weight": entry["weight"].t()}
        out[name] = entry
    return out
