"""Random channel masks that respect channel groups: test and benchmark input for speedup."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..graph import ChannelGroup, build_channel_groups
from ..speedup.joined import joined_masks
from .allocate import lowest_slots
from .channel import channel_masks

__all__ = ["group_keep", "random_group_masks", "random_layer_masks"]


def group_keep(group: ChannelGroup, ratio: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Keep flags per member: about ``ratio`` of every member's channels dropped, as whole slots.

    Slots get random scores and go through the pruners' own selection (whole slots, member budgets,
    balances), so a speedup of these masks should remove everything they mask.
    """
    sizes = torch.stack([torch.bincount(group.slots[m], minlength=group.num_slots) for m in group.modules])
    budgets = [math.floor(ratio * group.slots[m].numel()) for m in group.modules]
    drop = lowest_slots(torch.rand(group.num_slots, generator=generator), sizes, budgets, group.balances)
    return {m: ~drop[group.slots[m]] for m in group.modules}


def random_group_masks(
    model: nn.Module, example_inputs: object, ratio: float = 0.5, seed: int = 0, *, joined: bool = True
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"weight": keep, "bias": keep}}`` dropping about ``ratio`` of each unpinned group's channels.

    With ``joined`` (the default) the masks also cover the parameters speedup removes with those
    channels (BatchNorm affine, biases, class token ...; see ``speedup.joined_masks``), as a channel
    pruner given ``dummy_input`` returns them.
    """
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for group in build_channel_groups(model, example_inputs):
        if group.pinned:
            continue
        for name, keep in group_keep(group, ratio, g).items():
            masks[name] = channel_masks(modules[name], keep)
    return joined_masks(model, masks, example_inputs) if joined and masks else masks


def random_layer_masks(
    model: nn.Module, ratio: float = 0.5, seed: int = 0, *, op_types: tuple[type, ...] = (nn.Conv2d, nn.Linear), exclude: Sequence[str] = ()
) -> dict[str, dict[str, torch.Tensor]]:
    """Independent masks, what NNI users bring: every module of ``op_types`` (not in ``exclude``) loses
    ``floor(ratio * channels)`` random output channels (weight rows and bias), with no dependency
    awareness and no joined parameters. Test and benchmark input for speedup's exactness."""
    g = torch.Generator().manual_seed(seed)
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if not isinstance(m, op_types) or name in exclude or not isinstance(weight, torch.Tensor):
            continue
        n = weight.shape[0]
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=g)[: int(ratio * n)]] = False
        masks[name] = channel_masks(m, keep)
    return masks
