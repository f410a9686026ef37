"""speedup on the issue's torchvision subset: smaller models with the masked model's outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import SwinTransformer

from deploycompress.speedup import masked_model, speedup_with_report
from test_speedup_cases import group_masks, max_rel_error, randomize_norms, single_thread  # noqa: F401

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


@pytest.mark.parametrize("name", SUBSET + ["vit", "swin"])
def test_speedup_matches_masked_model(name: str) -> None:
    model, x = build(name)
    masks = group_masks(model, x, ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = speedup_with_report(model, masks, x)
    # speedup compares against the masked model it traced; check that claim independently on two models
    if name in ("resnet18", "efficientnet_b0"):
        with torch.no_grad():
            assert max_rel_error(masked_model(model, masks, x)(x), small(x)) < 1e-4
    assert report.relative_error is not None and report.relative_error < 1e-4
    # LayerNorm-spanned widths stay in transformers (see test_speedup.py); CNNs lose most of what was masked
    assert report.params_after < (0.9 if name in ("vit", "swin") else 0.8) * report.params_before, report.to_markdown()
    assert sum(p.numel() for p in small.parameters()) == report.params_after
