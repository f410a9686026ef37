"""count_flops_params: hand-computed FLOPs per layer type, torchvision's known parameter count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deploycompress as dc
from deploycompress.counting import count_flops_params
from deploycompress.pruning import L1NormPruner
from deploycompress.zoo.digits import DigitsNet


def test_digits_net_per_layer_counts_by_hand():
    model = DigitsNet(width=32)
    result = dc.count_flops_params(model, torch.rand(2, 1, 8, 8))
    by_name = {l.name: l for l in result.layers}
    # per-sample multiply-accumulates: outputs x (in_channels * kernel) (+1 per output for a bias)
    assert by_name["conv1"].flops == 32 * 8 * 8 * (1 * 9)
    assert by_name["conv2"].flops == 64 * 8 * 8 * (32 * 9)
    assert by_name["conv3"].flops == 64 * 4 * 4 * (64 * 9)
    assert by_name["fc1"].flops == 64 * 64 + 64
    assert by_name["fc2"].flops == 10 * 64 + 10
    assert by_name["bn2"].flops == 2 * 64 * 8 * 8
    assert by_name["pool"].flops == 64 * 4 * 4 * 4
    assert by_name["relu"].calls == 4 and by_name["relu"].flops == 32 * 64 + 64 * 64 + 64 * 16 + 64
    assert by_name["conv2"].params == 32 * 64 * 9 and by_name["fc1"].params == 64 * 64 + 64
    assert by_name["conv3"].output_shape == (2, 64, 4, 4)
    assert result.params == sum(p.numel() for p in model.parameters()) == 60714
    assert result.flops == sum(l.flops for l in result.layers)
    flops, params, layers = result
    assert (flops, params, layers) == (result.flops, result.params, result.layers)
    text = str(result)
    assert "conv2" in text and "1,179,648" in text and text.splitlines()[-1].split()[:3] == ["total", f"{result.flops:,}", "60,714"]


def test_grouped_transposed_and_biased_layers():
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=4),  # 16*6*6 outputs x (8/4 * 9) + bias
        nn.ConvTranspose2d(16, 4, 2, stride=2),  # 16*6*6 inputs x (4 * 4) + bias on 4*12*12 outputs
        nn.Flatten(),
        nn.Linear(4 * 12 * 12, 3, bias=False),
    )
    layers = {l.name: l for l in dc.count_flops_params(model, torch.rand(5, 8, 6, 6)).layers}
    assert layers["0"].flops == 16 * 36 * 18 + 16 * 36
    assert layers["1"].flops == 16 * 36 * 16 + 4 * 144
    assert layers["3"].flops == 3 * 576
    assert layers["2"].flops == 0 and layers["2"].output_shape == (5, 576)


def test_resnet18_totals():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    result = dc.count_flops_params(model, (torch.rand(1, 3, 224, 224),))
    assert result.params == 11_689_512
    convs_and_fc = sum(l.flops for l in result.layers if l.op_type in ("Conv2d", "Linear"))
    # by hand: stem 112*112*64*3*49 = 118,013,952; layer1 4 x 56*56*64*64*9 = 462,422,016; layers 2-4 each
    # 57,802,752 + 3 x 115,605,504 + 6,422,528 (1x1 downsample) = 411,041,792; fc 512*1000 + 1000 bias
    assert convs_and_fc == 118_013_952 + 462_422_016 + 3 * 411_041_792 + 513_000 == 1_814_074_344


def test_a_masked_model_counts_like_the_dense_one():
    model = DigitsNet(width=8)
    dense = dc.count_flops_params(model, torch.rand(1, 1, 8, 8))
    L1NormPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}]).compress()
    masked = dc.count_flops_params(model, {"x": torch.rand(1, 1, 8, 8)})
    assert (masked.flops, masked.params) == (dense.flops, dense.params)
    assert [l.name for l in masked.layers] == [l.name for l in dense.layers]


class _SelfAttention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_counted_as_one_unit(batch_first: bool) -> None:
    """Projections (called functionally inside, invisible to leaf hooks) plus q.k and attn.v products."""
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    result = count_flops_params(_SelfAttention(batch_first), x)
    tokens, keys, inner = 5, 5, 16
    expected = tokens * (48 * 16 + 16 * 16 + 2 * keys * inner) + tokens * (48 + 16)
    assert [l.name for l in result.layers] == ["attn"] and result.flops == expected
    assert result.layers[0].params == 48 * 16 + 48 + 16 * 16 + 16


def test_pruned_swin_attention_counts_like_the_original() -> None:
    """The pruned Swin attention calls its projections as modules; counting must not change with that."""
    from torchvision.models.swin_transformer import SwinTransformer

    from deploycompress.speedup.attention import __getattr__ as pruned_class

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4], num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    dense = count_flops_params(model, x).flops
    for m in model.modules():
        if type(m).__name__ == "ShiftedWindowAttention":
            m.head_dim = m.qkv.in_features // m.num_heads
            m.__class__ = pruned_class("PrunedShiftedWindowAttention")
    assert count_flops_params(model, x).flops == dense
