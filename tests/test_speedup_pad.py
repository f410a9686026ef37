"""Spatial constant padding between convolutions (TensorFlow-style 'SAME' convs: EfficientNet-Lite's
Conv2dStaticSamePadding) does not pin the padded channels: speedup removes them, outputs equal the masked model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deploycompress as dc


class SamePadNet(nn.Module):
    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.pad = nn.ZeroPad2d((1, 0, 2, 1)) if value == 0 else None
        self.value = value
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.conv1(x)
        y = self.pad(y) if self.pad is not None else F.pad(y, (1, 0, 2, 1), value=self.value)
        return self.conv2(y)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_spatial_pad_keeps_channels_removable(value):
    torch.manual_seed(0)
    model = SamePadNet(value).eval()
    x = torch.randn(2, 3, 9, 9)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    masks = {"conv1": {"weight": keep.view(-1, 1, 1, 1).expand_as(model.conv1.weight).clone(), "bias": keep.clone()}}
    masked = SamePadNet(value).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():  # the oracle: each mask multiplied into exactly the tensor it names
        masked.conv1.weight.mul_(masks["conv1"]["weight"])
        masked.conv1.bias.mul_(masks["conv1"]["bias"])
        expected = masked(x)
    small = dc.speedup(model, masks, x[:1])
    with torch.no_grad():
        got = small(x)
    assert torch.allclose(got, expected, atol=1e-5)
    # zero padding: the masked channels stay zero and go; a non-zero pad value gives them a non-zero border (kept)
    assert small.conv1.out_channels == (5 if value == 0 else 8)
    assert small.conv2.in_channels == small.conv1.out_channels
