"""build_channel_groups: which producers share output channels, on hand-built and torchvision models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deploycompress.graph import ChannelGroup, build_channel_groups, trace_channels
from test_speedup_cases import single_thread  # noqa: F401


def by_module(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {name: g for g in groups for name in g.modules}


def test_resnet18_residual_groups_and_every_producer_once() -> None:
    model = torchvision.models.resnet18().eval()
    groups = build_channel_groups(model, torch.randn(1, 3, 32, 32))
    names = [n for g in groups for n in g.modules]
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(names) == sorted(convs) and len(names) == len(set(names))
    g = by_module(groups)
    assert g["conv1"].modules == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert set(g["layer2.0.downsample.0"].modules) == {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"}
    assert g["layer1.0.conv1"].modules == ["layer1.0.conv1"] and not g["layer1.0.conv1"].pinned
    assert g["fc"].pinned and g["fc"].num_channels == 1000  # the model output


def test_depthwise_joins_its_producer_and_grouped_conv_sets_groups() -> None:
    mobilenet = torchvision.models.mobilenet_v2().eval()
    g = by_module(build_channel_groups(mobilenet, torch.randn(1, 3, 32, 32)))
    assert g["features.1.conv.0.0"].modules == ["features.0.0", "features.1.conv.0.0"]  # depthwise, groups=32
    regnet = torchvision.models.regnet_x_400mf().eval()
    g = by_module(build_channel_groups(regnet, torch.randn(1, 3, 32, 32)))
    a, b = "trunk_output.block2.block2-0.f.a.0", "trunk_output.block2.block2-0.f.b.0"
    groups = dict(regnet.named_modules())[b].groups
    assert groups > 1 and g[a].groups == groups and g[b].groups == groups


class SharedAndSE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.attn = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        return self.norm(self.attn(tokens)).mean(1)


def test_se_scale_couples_and_layernorm_pins() -> None:
    g = by_module(build_channel_groups(SharedAndSE().eval(), torch.randn(2, 3, 4, 4)))
    assert g["stem"].modules == ["stem", "fc2"] and not g["stem"].pinned
    assert g["fc1"].modules == ["fc1"]
    assert g["attn"].pinned  # normalised by the LayerNorm


def test_trace_follows_python_control_flow_and_leaves_the_model_as_it_was() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.mean()) > -100:  # data-dependent: symbolic tracing cannot follow it
                return self.a(x) + self.b(x)
            return self.a(x)

    model = Branchy().train()
    trace = trace_channels(model, torch.randn(1, 3, 4, 4))
    assert model.training and set(trace.producers) == {"a", "b"}
    assert build_channel_groups(model, torch.randn(1, 3, 4, 4))[0].modules == ["a", "b"]


def test_rule_registry_names_every_op_once_and_graph_imports_no_higher_room():
    from deploycompress.graph import rules

    assert rules.lookup("add").__name__ == "binary" and rules.lookup("conv2d").__name__ == "producer"
    assert rules.lookup("no_such_op") is rules.unknown
    with pytest.raises(ValueError, match="already has the channel rule"):
        rules.rule("add")(lambda tracer, call: None)
    import ast
    from pathlib import Path

    root = Path(rules.__file__).parents[1]
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert not any(room in target for room in ("pruning", "speedup", "quantization", "export")), (path, target)
