"""Channel groups that hold classes (slots): ShuffleNetV2 stages, depthwise multipliers, head-like
classes. Dependency-aware pruning takes whole slots, so speedup removes what it masks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.shufflenetv2 import InvertedResidual

from deploycompress.graph import build_channel_groups
from deploycompress.pruning import random_group_masks
from deploycompress.pruning import L1NormPruner
from deploycompress.pruning.allocate import lowest, lowest_slots
from deploycompress.speedup import speedup_with_report
from test_speedup_cases import randomize_norms, single_thread  # noqa: F401


def _pruned(mask: torch.Tensor) -> torch.Tensor:
    return ~mask.reshape(mask.shape[0], -1).all(1)


def _prune_and_speedup(model: nn.Module, x: torch.Tensor, config: list[dict]):
    pruner = L1NormPruner(model, config, dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = speedup_with_report(pruner.unwrap_model(), masks, x)
    kept = sum(r.kept_masked for r in report.layers) / sum(r.masked_out for r in report.layers)
    return masks, small, report, kept


# ---------------------------------------------------------------- selection arithmetic


def test_lowest_slots_takes_whole_slots_within_every_budget():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0])
    sizes = torch.tensor([[1, 1, 1, 1], [3, 1, 1, 2]])  # member 1: slot 0 holds three of its channels
    assert lowest_slots(scores, sizes, [2, 2]).tolist() == [False, True, True, False]
    assert lowest_slots(scores, sizes, [2, 3]).tolist() == [True, False, False, False]


def test_lowest_slots_balances_pieces_and_matches_chunked_lowest():
    scores = torch.tensor([5.0, 0.0, 1.0, 2.0, 9.0, 8.0, 7.0, 6.0])
    chunked = lowest(scores, 4, groups=2)  # two lowest per half, as for a grouped consumer
    assert chunked.nonzero().flatten().tolist() == [1, 2, 6, 7]
    # nested balances (a ShuffleNetV2 chunk inside a chunk): a slot comes with its cheapest partners
    outer = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])]
    inner = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    taken = lowest_slots(scores, torch.ones(1, 8, dtype=torch.long), [4], [outer, inner])
    assert taken.nonzero().flatten().tolist() == [1, 2, 6, 7]
    taken = lowest_slots(scores, torch.ones(1, 8, dtype=torch.long), [3], [outer, inner])
    assert taken.nonzero().flatten().tolist() == []  # any balanced move costs four


# ---------------------------------------------------------------- ShuffleNetV2


class ShuffleChain(nn.Module):
    """torchvision's InvertedResidual blocks: chunk, branch, cat and a view-based channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.down = InvertedResidual(8, 16, 2)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 16, 1))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.down(self.stem(x)))).mean((2, 3)))


def test_shuffle_chain_one_group_of_classes_and_speedup_removes_what_is_masked():
    torch.manual_seed(0)
    model, x = randomize_norms(ShuffleChain()), torch.randn(2, 3, 16, 16)
    groups = {g.modules[0]: g for g in build_channel_groups(model, x)}
    g = groups["down.branch1.2"]  # both branches of the down block and the last convs of both blocks
    assert g.modules == ["down.branch1.2", "down.branch2.5", "blocks.0.branch2.5", "blocks.1.branch2.5"]
    assert not g.aligned and len(g.balances) == 2 and g.num_slots == 8
    assert [int(torch.bincount(g.slots[n]).max()) for n in g.modules] == [1, 1, 2, 4]  # shuffles couple positions
    reference = model(x)
    masks, small, report, kept = _prune_and_speedup(model, x, [{"op_types": ["Conv2d"], "sparsity": 0.5}])
    assert all(int(_pruned(m["weight"]).sum()) == m["weight"].shape[0] // 2 for m in masks.values())
    # before slots each member chose its own channels: 16 of 64 masked channels kept, params ratio 0.510
    assert kept == 0.0
    assert report.params_ratio == pytest.approx(0.3854, abs=1e-3)
    assert report.relative_error is not None and report.relative_error < 1e-4
    with torch.no_grad():
        assert small(x).shape == reference.shape


def _shufflenet() -> tuple[nn.Module, torch.Tensor]:
    """A fresh copy per test: pruning zeroes the model's weights in place."""
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.shufflenet_v2_x0_5()), torch.randn(1, 3, 64, 64)


def test_shufflenet_v2_keeps_far_fewer_masked_channels():
    model, x = _shufflenet()
    _, _, report, kept = _prune_and_speedup(model, x, [{"op_types": ["Conv2d"], "sparsity": 0.5}])
    # Before slots: 588 of 1988 masked channels kept (29.6 %), params ratio 0.506. Now 292 (14.7 %),
    # 0.453. The rest is architectural: stage3's eight blocks shuffle every channel of the stage
    # output into one class (the view-based shuffle must see kept channels paired across halves), so
    # its layers cannot lose whole classes at 50 %; their masked channels stay zeroed.
    assert kept < 0.16
    assert report.params_ratio == pytest.approx(0.4527, abs=2e-3)
    assert report.relative_error is not None and report.relative_error < 1e-4


def test_random_group_masks_drop_whole_slots_that_speedup_removes():
    model, x = _shufflenet()
    masks = random_group_masks(model, x, ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = speedup_with_report(model, masks, x)
    assert sum(r.kept_masked for r in report.layers) == 0 and sum(r.masked_out for r in report.layers) > 500
    assert report.relative_error is not None and report.relative_error < 1e-4


# ---------------------------------------------------------------- depthwise multiplier, head-like classes


class DepthwiseTimesTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # multiplier 2
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pw(torch.relu(self.dw(torch.relu(self.conv(x))))).mean((2, 3)))


def test_depthwise_multiplier_slot_covers_both_outputs_of_an_input_channel():
    torch.manual_seed(0)
    model, x = DepthwiseTimesTwo().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():  # make channel 1 of conv weak but the dw pair of channel 3 weaker in sum
        model.conv.weight[1] *= 1e-3
        model.dw.weight[6:8] *= 1e-3
    g = next(g for g in build_channel_groups(model, x) if "dw" in g.modules)
    assert g.modules == ["conv", "dw"] and g.num_slots == 4
    assert g.slots["conv"].tolist() == [0, 1, 2, 3] and g.slots["dw"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    masks, small, report, kept = _prune_and_speedup(model, x, [{"op_names": ["conv", "dw"], "sparsity": 0.5}])
    assert _pruned(masks["conv"]["weight"]).nonzero().flatten().tolist() == [1, 3]
    assert _pruned(masks["dw"]["weight"]).nonzero().flatten().tolist() == [2, 3, 6, 7]
    assert kept == 0.0 and (small.conv.out_channels, small.dw.out_channels, small.dw.groups) == (2, 4, 2)
    assert report.relative_error is not None and report.relative_error < 1e-4


class Heads(nn.Module):
    """A Linear whose 24 outputs are viewed as 6 rows of 4 and scaled per row: each row is one class."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(5, 24)
        self.gate = nn.Linear(5, 6)
        self.out = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.qkv(x).view(x.shape[0], -1, 4) * torch.sigmoid(self.gate(x)).unsqueeze(-1)
        return self.out(rows.flatten(1))


def test_head_like_classes_are_pruned_whole():
    torch.manual_seed(0)
    model, x = Heads().eval(), torch.randn(3, 5)
    with torch.no_grad():  # the weakest single channels lie in rows 1, 2 and 4; rows 3 and 5 are weakest in sum
        model.qkv.weight.mul_(torch.linspace(1, 2, 24).view(-1, 1))
        model.qkv.weight[[5, 9, 17]] *= 1e-3
        model.qkv.weight[12:16] *= 0.2
        model.qkv.weight[20:24] *= 0.1
    g = next(g for g in build_channel_groups(model, x) if "qkv" in g.modules)
    assert g.modules == ["qkv", "gate"] and g.num_slots == 6
    assert g.slots["qkv"].tolist() == torch.arange(6).repeat_interleave(4).tolist()
    masks, small, report, kept = _prune_and_speedup(model, x, [{"op_names": ["qkv"], "sparsity": 0.4}])
    pruned = set(_pruned(masks["qkv"]["weight"]).nonzero().flatten().tolist())
    assert len(pruned) == 9 and set(range(12, 16)) | set(range(20, 24)) < pruned  # two rows whole, one extra
    # a gate channel only scales a removed row, so it goes too (and the pruner masks it: 9 + 2 masked
    # channels); the one extra channel stays zeroed
    assert (small.qkv.out_features, small.gate.out_features, small.out.in_features) == (16, 4, 16)
    assert int((~masks["gate"]["bias"]).sum()) == 2
    assert kept == pytest.approx(1 / 11)
    assert report.relative_error is not None and report.relative_error < 1e-4


# ---------------------------------------------------------------- aligned groups: unchanged


def test_aligned_groups_have_identity_slots_and_the_old_masks():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.rand(1, 3, 32, 32)
    groups = build_channel_groups(model, x)
    for g in groups:
        assert g.aligned and g.num_slots == g.num_channels and not g.balances, g.modules
    _, masks = L1NormPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], dependency_aware=True, dummy_input=x).compress()
    l1 = {n: m.weight.detach().abs().flatten(1).sum(1) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for g in groups:  # the rule before slots: the k lowest summed scores, k = the group's smallest count
        names = [n for n in g.modules if n in l1]
        if names:
            expected = lowest(torch.stack([l1[n] for n in names]).sum(0), g.num_channels // 2)
            for n in names:
                assert torch.equal(_pruned(masks[n]["weight"]), expected), n


def test_a_group_built_the_old_way_is_aligned():
    from deploycompress.graph import ChannelGroup

    g = ChannelGroup(["a", "b"], 4, groups=2)
    assert g.aligned and g.num_slots == 4 and g.slots["b"].tolist() == [0, 1, 2, 3]
    assert [p.tolist() for p in g.balances[0]] == [[0, 1], [2, 3]]
