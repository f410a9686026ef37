"""Masks on disk and masks on a plain model.

The format is NNI's: ``{module_name: {"weight": mask, "bias": mask}}`` saved with ``torch.save``;
True (or 1.0) keeps a weight. NNI writes float 0/1 masks, so loading converts those to bool after
checking every value is 0 or 1.

Files NNI writes load unchanged:

- NNI 2.x ``pruner.export_model(mask_path=...)`` and NNI 3.0 ``torch.save(pruner.compress()[1], ...)``
  both write ``'bias': None`` for a layer without bias: a ``None`` entry means "no mask" and is dropped.
- NNI 3.0's ``compress()`` returns a ``collections.defaultdict(dict)``
  (nni/compression/pruning/tools/sparse_gen.py, ``generate_sparsity``). The weights-only unpickler
  refuses it, and cannot fill one even when allow-listed, so :func:`load_masks` allows exactly that
  one global, scoped to the load, as a constructor of a plain ``dict`` (its ``dict`` default factory
  is accepted only as that argument; nothing else is widened): see :mod:`deploycompress.nni_files`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import MaskError
from ..nni_files import NNIFileError, load_nni_file

__all__ = ["Masks", "save_masks", "load_masks", "apply_masks", "check_masks", "atomic_torch_save"]

Masks = dict[str, dict[str, torch.Tensor]]


def weight_attrs(module: nn.Module) -> tuple[str, str]:
    """The weight and bias whose rows a pruner scores: ``weight``/``bias``, or the packed q/k/v
    projection of an ``nn.MultiheadAttention`` (``in_proj_weight``/``in_proj_bias``)."""
    from ..graph.attention import projection_attrs

    return projection_attrs(module)


def _weight(module: nn.Module) -> torch.Tensor | None:
    return _param(module, weight_attrs(module)[0])


def _bias(module: nn.Module) -> torch.Tensor | None:
    return _param(module, weight_attrs(module)[1])


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored (unmasked) tensor, also when the module is parametrized."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original  # type: ignore[index,union-attr]
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def check_masks(masks: Any, model: nn.Module | None = None) -> Masks:
    """Validate a mask dict (and its fit to ``model`` when given); return it with bool tensors."""
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a dict {{module_name: {{'weight': mask, ...}}}}, got {type(masks).__name__}")
    modules = dict(model.named_modules()) if model is not None else {}
    out: Masks = {}
    for name, entry in masks.items():
        if not isinstance(entry, Mapping):
            raise MaskError(f"masks[{name!r}] must be a dict of parameter name -> mask, got {type(entry).__name__}")
        if model is not None and name not in modules:
            raise MaskError(f"masks name module {name!r}, which is not a module of the model")
        out[name] = {}
        for pname, mask in entry.items():
            where = f"mask {name}.{pname}"
            if mask is None:  # NNI's "no mask" (e.g. 'bias': None for a conv without bias)
                continue
            if not isinstance(mask, torch.Tensor):
                raise MaskError(f"{where} must be a tensor, got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                if mask.is_floating_point() or mask.dtype in (torch.uint8, torch.int8, torch.int32, torch.int64):
                    if not bool(((mask == 0) | (mask == 1)).all()):
                        bad = mask[(mask != 0) & (mask != 1)].reshape(-1)[:3].tolist()
                        raise MaskError(f"{where} holds values other than 0 and 1 (e.g. {bad})")
                    mask = mask != 0
                else:
                    raise MaskError(f"{where} has dtype {mask.dtype}; expected bool or float 0/1")
            if model is not None:
                param = _param(modules[name], pname)
                if param is None:
                    raise MaskError(f"{where}: module {name!r} ({type(modules[name]).__name__}) has no tensor {pname!r}")
                if tuple(param.shape) != tuple(mask.shape):
                    raise MaskError(f"{where} has shape {tuple(mask.shape)}, but the parameter has {tuple(param.shape)}")
            out[name][pname] = mask
        if not out[name]:  # every entry was None: nothing to mask
            del out[name]
    return out


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temp file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_masks(masks: Mapping[str, Mapping[str, torch.Tensor]], path: str | os.PathLike[str]) -> Path:
    """Write masks (bool tensors on CPU) with ``torch.save``; atomic."""
    checked = check_masks(masks)
    return atomic_torch_save({n: {p: m.detach().cpu() for p, m in e.items()} for n, e in checked.items()}, path)


def load_masks(path: str | os.PathLike[str], model: nn.Module | None = None) -> Masks:
    """Read masks (ours, NNI 2.x's or NNI 3.0's) with ``weights_only=True``; with ``model``, check
    every module exists and every mask matches its parameter's shape.

    Float 0/1 masks become bool; ``None`` entries (NNI's ``'bias': None``) are dropped.
    Raises :class:`MaskError` for anything else, naming the module and parameter.
    """
    try:
        masks = load_nni_file(path)  # never unpickles anything but tensors and containers
    except NNIFileError as exc:
        raise MaskError(f"masks file {exc}") from None
    try:
        return check_masks(masks, model)
    except MaskError as exc:
        raise MaskError(f"masks file {str(path)!r}: {exc}") from None


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Zero ``model``'s pruned weights in place (a plain, unwrapped model); returns the model."""
    checked = check_masks(masks, model)
    modules = dict(model.named_modules())
    for name, entry in checked.items():
        for pname, mask in entry.items():
            param = _param(modules[name], pname)
            assert param is not None  # check_masks guarantees it
            param.mul_(mask.to(device=param.device, dtype=param.dtype))
    return model
