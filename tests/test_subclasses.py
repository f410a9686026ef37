"""Models built from conv/linear subclasses: selected, pruned, sped up, quantized and built like their bases.

The subclasses are the kinds real libraries ship: EfficientNet-Lite's ``Conv2dStaticSamePadding`` (a pad
module, then the conv), timm's ``Conv2dSame`` (padding computed in forward), timm's ``StdConv2d`` (weight
standardised in forward), and a conv whose forward scales its output (not its base's computation).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploycompress.config import ConfigError, register_op_type, select_modules


# ---------------------------------------------------------------------------------------------- subclasses
class StaticSamePadConv2d(nn.Conv2d):
    """EfficientNet-Lite's Conv2dStaticSamePadding: TensorFlow 'SAME' padding, a ZeroPad2d child fixed at build."""

    def __init__(self, cin, cout, k, stride=1, image_size=8, **kw):
        super().__init__(cin, cout, k, stride, **kw)
        pad = max((math.ceil(image_size / stride) - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad else nn.Identity()

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DynamicSameConv2d(nn.Conv2d):
    """timm's Conv2dSame: the 'SAME' padding computed from the input in forward (no child module)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: weight standardisation (per output channel, eps 1e-6) in forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledConv2d(nn.Conv2d):
    """Not its base's computation: the output is multiplied by a learned scale."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.scale = nn.Parameter(torch.tensor(1.7))

    def forward(self, x):
        return super().forward(x) * self.scale


class MyLinear(nn.Linear):
    """A subclass that only renames its base."""


class SubclassNet(nn.Module):
    """Every kind above in one small CNN (8x8 input, 10 classes)."""

    def __init__(self, *, std: bool = True, scaled: bool = False) -> None:
        super().__init__()
        self.stem = StaticSamePadConv2d(3, 8, 3, stride=2, image_size=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = StaticSamePadConv2d(8, 8, 3, image_size=4, groups=8, bias=False)
        self.pw = DynamicSameConv2d(8, 12, 1)
        self.conv3 = StdConv2d(12, 12, 3, padding=1) if std else nn.Conv2d(12, 12, 3, padding=1)
        self.extra = ScaledConv2d(12, 12, 1) if scaled else nn.Conv2d(12, 12, 1)
        self.fc = MyLinear(12, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.dw(x))
        x = F.relu(self.pw(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.extra(x))
        return self.fc(x.mean((2, 3)))


def _net(**kw) -> SubclassNet:
    torch.manual_seed(0)
    net = SubclassNet(**kw).eval()
    with torch.no_grad():  # a BatchNorm with real statistics, so folding it matters
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
    return net


WEIGHTED = ["stem", "dw", "pw", "conv3", "extra", "fc"]


# ---------------------------------------------------------------------------------------------- selection
def test_op_types_select_subclasses_by_isinstance():
    net = _net(scaled=True)
    sel = select_modules(net, [{"op_types": ["Conv2d", "Linear"], "sparsity": 0.5}])
    assert list(sel) == WEIGHTED
    assert sel["stem"].op_type == "StaticSamePadConv2d"  # the class name is still reported


def test_exact_matching_is_nni_rule_and_must_be_asked_for():
    net = _net(std=False)
    sel = select_modules(net, [{"op_types": ["Conv2d", "Linear"], "op_types_match": "exact", "sparsity": 0.5}])
    assert list(sel) == ["conv3", "extra"]  # the two plain Conv2d; MyLinear and the padded convs are other classes
    with pytest.raises(ConfigError, match="op_types_match"):
        select_modules(net, [{"op_types": ["Conv2d"], "op_types_match": "subclass", "sparsity": 0.5}])


def test_model_classes_qualnames_and_registered_types_resolve():
    net = _net()
    assert list(select_modules(net, [{"op_types": ["StaticSamePadConv2d"], "sparsity": 0.5}])) == ["stem", "dw"]
    qual = f"{StdConv2d.__module__}.{StdConv2d.__qualname__}"
    assert list(select_modules(net, [{"op_types": [qual], "sparsity": 0.5}])) == ["conv3"]

    class PaddedBase(nn.Conv2d):  # a base the model's classes do not derive from: selects nothing until registered
        pass

    with pytest.raises(ConfigError, match="matches no module"):
        select_modules(net, [{"op_types": ["PaddedBase"], "sparsity": 0.5}])
    register_op_type(nn.modules.conv._ConvNd, "AnyConv")
    assert list(select_modules(net, [{"op_types": ["AnyConv"], "sparsity": 0.5}])) == WEIGHTED[:-1]


def test_exclude_op_types_excludes_subclasses_too():
    net = _net()
    sel = select_modules(net, [{"op_types": ["Conv2d", "Linear"], "exclude_op_types": ["StaticSamePadConv2d"], "sparsity": 0.5}])
    assert list(sel) == ["pw", "conv3", "extra", "fc"]


def test_defaults_cover_every_weighted_subclass():
    from deploycompress.engine import default_quant_config
    from deploycompress.pruning import L1NormPruner
    from deploycompress.quantization import PTQQuantizer

    net = _net()
    pruner = L1NormPruner(net, [{"op_types": ["default"], "sparsity": 0.5}])
    assert list(pruner.module_configs) == WEIGHTED
    q = PTQQuantizer(_net(), default_quant_config(_net()))
    assert [n for n in q.wrappers if "weight" in q.wrappers[n].quant_types] == WEIGHTED
