"""Shared helpers for the graph and speedup tests: hand-built masks and an independent oracle."""

from __future__ import annotations

import copy
from typing import Iterator

import pytest
import torch
from torch import nn

from deploycompress.pruning import random_group_masks
from deploycompress.pruning.channel import channel_masks


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tracing runs many tiny ops: on a shared 2-core machine, intra-op threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so that outputs are O(1) and zero channels matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if isinstance(m, nn.Linear) and bool((m.weight == 0).all()):
                nn.init.normal_(m.weight, std=0.1)  # zero-initialised heads (ViT) would hide every error
    return model.eval()


def channel_mask(module: nn.Module, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weight/bias masks that keep output channels ``keep`` (bool) of a Conv/Linear (or an attention's in_proj)."""
    return channel_masks(module, keep)


def group_masks(model: nn.Module, x: torch.Tensor, ratio: float = 0.5, seed: int = 0) -> dict:
    """Random channel masks that respect build_channel_groups (whole slots, balanced pieces)."""
    return random_group_masks(model, x, ratio, seed)


def hand_oracle(model: nn.Module, keeps: dict[str, torch.Tensor], norms: dict[str, str]) -> nn.Module:
    """The issue's oracle: in a copy, zero each masked producer's weight rows, bias and its BatchNorm's gamma/beta."""
    ref = copy.deepcopy(model).eval()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, keep in keeps.items():
            m = modules[name]
            m.weight[~keep] = 0
            if m.bias is not None:
                m.bias[~keep] = 0
            if name in norms:
                bn = modules[norms[name]]
                bn.weight[~keep] = 0
                bn.bias[~keep] = 0
    return ref


def user_masked(model: nn.Module, masks: dict) -> nn.Module:
    """The independent oracle: an eval-mode copy with each mask multiplied into exactly the tensor it names."""
    ref = copy.deepcopy(model).eval()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, per in masks.items():
            for attr, mask in per.items():
                t = getattr(modules[name], attr)
                t.mul_(mask.to(t.dtype))
    return ref


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-6)
