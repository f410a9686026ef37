"""Dependency-aware channel pruning: coupled layers (residual adds) lose the same channels, and the
channels a grouped conv reads are pruned evenly per filter group."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from deploycompress.graph import build_channel_groups
from deploycompress.pruning import (
    ActivationAPoZRankPruner,
    ActivationMeanRankPruner,
    FPGMPruner,
    L1NormPruner,
    L2NormPruner,
    TaylorFOWeightPruner,
    TorchEvaluator,
)


def _pruned(mask: torch.Tensor) -> set[int]:
    rows = mask.reshape(mask.shape[0], -1)
    return set((~rows.all(1)).nonzero().flatten().tolist())


class TinyResNet(nn.Module):
    """stem -> residual block (identity skip) -> residual block (1x1 conv skip) -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.skip = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(self.skip(x) + self.b2(torch.relu(self.b1(x))))
        return self.fc(x.mean((2, 3)))


def _tiny(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet()


INPUTS = [torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
CONFIG = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]


def _evaluator(model: nn.Module) -> TorchEvaluator:
    def training_func(model, optimizer, training_step, lr_schedulers, max_steps, max_epochs):
        for x in INPUTS:
            optimizer.zero_grad()
            training_step(x, model).backward()
            optimizer.step()

    return TorchEvaluator(training_func, torch.optim.SGD(model.parameters(), lr=0.1), lambda x, m: m(x).pow(2).mean(), dummy_input=INPUTS[0])


PRUNERS = {
    "L1": lambda m: L1NormPruner(m, CONFIG, dependency_aware=True, dummy_input=INPUTS[0]),
    "L2": lambda m: L2NormPruner(m, CONFIG, dependency_aware=True, dummy_input=INPUTS[0]),
    "FPGM": lambda m: FPGMPruner(m, CONFIG, dependency_aware=True, dummy_input=INPUTS[0]),
    "APoZ": lambda m: ActivationAPoZRankPruner(m, CONFIG, INPUTS, dependency_aware=True, dummy_input=INPUTS[0]),
    "MeanRank": lambda m: ActivationMeanRankPruner(m, CONFIG, INPUTS, dependency_aware=True, dummy_input=INPUTS[0]),
    "TaylorFO": lambda m: TaylorFOWeightPruner(m, CONFIG, _evaluator(m), training_steps=3, dependency_aware=True),
}


def test_tiny_resnet_groups_as_expected():
    groups = {tuple(g.modules) for g in build_channel_groups(_tiny(), INPUTS[0])}
    assert ("stem", "a2") in groups and ("b2", "skip") in groups or ("skip", "b2") in groups


@pytest.mark.parametrize("kind", list(PRUNERS))
def test_coupled_layers_share_their_pruned_channels(kind):
    model = _tiny()
    _, masks = PRUNERS[kind](model).compress()
    assert {n: len(_pruned(m["weight"])) for n, m in masks.items()} == {"stem": 4, "a1": 4, "a2": 4, "b1": 8, "b2": 8, "skip": 8}
    assert _pruned(masks["stem"]["weight"]) == _pruned(masks["a2"]["weight"])
    assert _pruned(masks["b2"]["weight"]) == _pruned(masks["skip"]["weight"])
    assert _pruned(masks["stem"]["weight"]) == _pruned(masks["stem"]["bias"].reshape(-1, 1))


def test_without_dependency_awareness_coupled_layers_disagree():
    _, masks = L1NormPruner(_tiny(), CONFIG).compress()
    assert _pruned(masks["b2"]["weight"]) != _pruned(masks["skip"]["weight"])
    _, masks = L1NormPruner(_tiny(), CONFIG, mode="dependency_aware", dummy_input=INPUTS[0]).compress()  # NNI 2.x spelling
    assert _pruned(masks["b2"]["weight"]) == _pruned(masks["skip"]["weight"])
    with pytest.raises(ValueError, match="mode must be 'normal' or 'dependency_aware', got 'global'"):
        L1NormPruner(_tiny(), CONFIG, mode="global")


def test_shared_channels_follow_the_summed_score_then_each_layer_prunes_its_extra():
    model = _tiny()
    l1 = {n: m.weight.detach().abs().sum((1, 2, 3)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    config = [*CONFIG, {"sparsity": 0.75, "op_names": ["b2"]}]
    _, masks = L1NormPruner(model, config, dependency_aware=True, dummy_input=INPUTS[0]).compress()
    shared = set((l1["b2"] + l1["skip"]).argsort(stable=True)[:8].tolist())
    assert _pruned(masks["skip"]["weight"]) == shared
    b2 = _pruned(masks["b2"]["weight"])
    assert len(b2) == 12 and shared < b2
    rest = l1["b2"].clone()
    rest[list(shared)] = float("inf")
    assert b2 - shared == set(rest.argsort(stable=True)[:4].tolist())


def test_resnet18_every_residual_group_shares_its_pruned_channels():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.rand(1, 3, 32, 32)
    groups = [g for g in build_channel_groups(model, x) if len(g.modules) > 1]
    assert len(groups) == 4
    _, masks = L1NormPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], dependency_aware=True, dummy_input=x).compress()
    for g in groups:
        sets = [_pruned(masks[n]["weight"]) for n in g.modules]
        assert all(s == sets[0] for s in sets), g.modules
        assert len(sets[0]) == g.num_channels // 2


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.conv3(x).mean((2, 3)))


def _grouped() -> GroupedNet:
    torch.manual_seed(0)
    model = GroupedNet()
    with torch.no_grad():  # the four weakest filters of conv1 fill two of conv2's four groups
        model.conv1.weight[:4] *= 1e-3
    return model


def test_channels_read_by_a_grouped_conv_are_pruned_evenly_per_group():
    x = torch.rand(1, 3, 8, 8)
    plain = L1NormPruner(_grouped(), [{"sparsity": 0.5, "op_names": ["conv1"]}]).compress()[1]
    assert _pruned(plain["conv1"]["weight"]) == {0, 1, 2, 3}
    config = [{"sparsity": 0.5, "op_names": ["conv1", "conv2"]}]
    _, masks = L1NormPruner(_grouped(), config, dependency_aware=True, dummy_input=x).compress()
    for name in ("conv1", "conv2"):
        pruned = _pruned(masks[name]["weight"])
        assert [len(pruned & {2 * g, 2 * g + 1}) for g in range(4)] == [1, 1, 1, 1], (name, pruned)
    assert len(_pruned(masks["conv1"]["weight"]) & {0, 1, 2, 3}) == 2


def test_speedup_removes_every_channel_dependency_aware_masks_prune():
    from deploycompress.speedup import speedup_with_report

    model = _tiny().eval()
    pruner = L1NormPruner(model, CONFIG, dependency_aware=True, dummy_input=INPUTS[0])
    _, masks = pruner.compress()
    reference = model(INPUTS[1]).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # speedup warns when it must keep masked channels
        small, _ = speedup_with_report(pruner.unwrap_model(), masks, INPUTS[0])
    widths = {n: m.out_channels for n, m in small.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths == {"stem": 4, "a1": 4, "a2": 4, "b1": 8, "b2": 8, "skip": 8}
    torch.testing.assert_close(small(INPUTS[1]), reference, rtol=1e-4, atol=1e-5)
