"""Mask checking and application: ``{module_name: {param_name: mask}}``, True/1 = keep."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import MaskError
from ..suggest import did_you_mean

Masks = Mapping[str, Mapping[str, torch.Tensor]]


def validate_masks(model: nn.Module, masks: Masks) -> dict[str, dict[str, torch.Tensor]]:
    """Check every mask against ``model`` and return them as bool tensors.

    Accepts bool masks and NNI's float/int 0-1 masks; anything else raises :class:`MaskError`
    before any tracing starts.
    """
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a dict {{module_name: {{param_name: tensor}}}}, got {type(masks).__name__}")
    modules = dict(model.named_modules())
    result: dict[str, dict[str, torch.Tensor]] = {}
    for name, per_param in masks.items():
        if name not in modules:
            close = [n for n in modules if n and (n.endswith(str(name)) or str(name).endswith(n))][:3]
            hint = f" (did you mean {close}?)" if close else did_you_mean(name, [n for n in modules if n])
            raise MaskError(f"mask names module {name!r}, which the model does not have{hint}")
        if not isinstance(per_param, Mapping):
            raise MaskError(f"masks[{name!r}] must be a dict {{param_name: tensor}}, got {type(per_param).__name__}")
        module = modules[name]
        result[name] = {}
        for pname, mask in per_param.items():
            if mask is None:  # NNI's "no mask" ('bias': None for a layer without bias)
                continue
            param = getattr(module, pname, None)
            if not isinstance(param, torch.Tensor):
                raise MaskError(f"masks[{name!r}][{pname!r}]: module {name!r} ({type(module).__name__}) has no tensor {pname!r}")
            if not isinstance(mask, torch.Tensor):
                raise MaskError(f"masks[{name!r}][{pname!r}] must be a tensor, got {type(mask).__name__}")
            if tuple(mask.shape) != tuple(param.shape):
                raise MaskError(
                    f"masks[{name!r}][{pname!r}] has shape {tuple(mask.shape)}, but {name}.{pname} has shape {tuple(param.shape)}"
                )
            if mask.dtype != torch.bool:
                if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                    bad = mask[(mask != 0) & (mask != 1)].reshape(-1)[:3].tolist()
                    raise MaskError(f"masks[{name!r}][{pname!r}] must hold only 0 and 1 (or bool); found {bad}")
                mask = mask != 0
            result[name][pname] = mask.detach().to("cpu")
    return result


def apply_param_masks(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Zero the masked entries of ``model``'s tensors in place."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, per_param in masks.items():
            for pname, mask in per_param.items():
                t = getattr(modules[name], pname)
                t.mul_(mask.to(device=t.device, dtype=t.dtype))


def masked_out_channels(
    masks: Mapping[str, Mapping[str, torch.Tensor]], name: str, kind: str, weight_attr: str = "weight", bias_attr: str = "bias"
) -> torch.Tensor | None:
    """Output channels a mask removes whole (weight row and bias all zero); None when unmasked."""
    per = masks.get(name)
    if not per or weight_attr not in per:
        return None
    if kind == "conv_transpose":
        return None  # its output channels are the weight's second axis, split across groups
    w = per[weight_attr]
    rows = ~w.reshape(w.shape[0], -1).any(1)
    bias = per.get(bias_attr)
    return rows & ~bias if bias is not None else rows
