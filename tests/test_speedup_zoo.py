"""speedup on the issue's torchvision subset: smaller models with the masked model's outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import SwinTransformer

from deploycompress.pruning import random_layer_masks
from deploycompress.speedup import speedup_with_report
from test_speedup_cases import group_masks, max_rel_error, randomize_norms, single_thread, user_masked  # noqa: F401

SUBSET = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5",
          "squeezenet1_0", "efficientnet_b0", "regnet_x_400mf", "googlenet"]  # fmt: skip


def small_transformer(name: str) -> torch.nn.Module:
    if name == "vit":
        return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=10)


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name in ("vit", "swin"):
        return randomize_norms(small_transformer(name)), torch.randn(1, 3, 32, 32)
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return randomize_norms(torchvision.models.get_model(name, **kwargs)), torch.randn(1, 3, 32, 32)


def independent_masks(model: torch.nn.Module, op_types: tuple = (torch.nn.Conv2d, torch.nn.Linear)) -> dict:
    """What NNI users bring: every Conv/Linear masked on its own (random output channels, weight and bias),
    no dependency awareness and nothing joined; the classifier's outputs are left alone."""
    layers = [n for n, m in model.named_modules() if isinstance(m, op_types)]
    classifier = layers[-1:] if isinstance(dict(model.named_modules())[layers[-1]], torch.nn.Linear) else []
    return random_layer_masks(model, 0.5, op_types=op_types, exclude=classifier)


def check_exact(model: torch.nn.Module, masks: dict, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = speedup_with_report(model, masks, x)
    with torch.no_grad():
        measured = max_rel_error(user_masked(model, masks)(x), small(x))
    assert measured < 1e-4, (measured, report.to_markdown())
    assert report.relative_error is not None and report.relative_error < 1e-4
    assert sum(p.numel() for p in small.parameters()) == report.params_after
    return small, report


@pytest.mark.parametrize("name", SUBSET + ["vit", "swin"])
def test_speedup_matches_masked_model(name: str) -> None:
    model, x = build(name)
    masks = group_masks(model, x, ratio=0.5)  # dependency-aware, with the joined parameters masked
    _, report = check_exact(model, masks, x)
    # LayerNorm-spanned widths stay in transformers (see test_speedup.py); CNNs lose most of what was masked
    assert report.params_after < (0.9 if name in ("vit", "swin") else 0.8) * report.params_before, report.to_markdown()


@pytest.mark.parametrize("name", SUBSET + ["vit", "swin"])
def test_speedup_is_exact_with_independent_masks(name: str) -> None:
    """Every layer masked on its own (ViT and Swin: the convs only): exact against the user's masked model."""
    model, x = build(name)
    masks = independent_masks(model, op_types=(torch.nn.Conv2d,) if name in ("vit", "swin") else (torch.nn.Conv2d, torch.nn.Linear))
    assert masks
    _, report = check_exact(model, masks, x)
    assert report.params_after <= report.params_before
