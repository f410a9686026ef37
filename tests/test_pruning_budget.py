"""A total_sparsity budget on residual models, one-shot and over scheduled rounds with speedup between them.

The oracle is NNI's count, computed here from the masks or the widths alone: the fraction of the selected
layers' original weight elements whose output channel is removed (a removed channel of layer l costs the
weight elements of one original filter of l; the inputs speedup also drops downstream are not counted).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from deploycompress import pruning
from deploycompress.pruning.allocate import CoupledUnits, global_prune_counts
from deploycompress.pruning.channel import PruningWarning
from deploycompress.speedup import speedup
from scheduled_helpers import ResBlockNet


def _convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _removed_by_widths(origin: nn.Module, pruned: nn.Module, names: list[str]) -> float:
    """Original weight elements of the output channels ``pruned`` no longer has / all original weight elements."""
    total = sum(origin.get_submodule(n).weight.numel() for n in names)
    gone = 0
    for n in names:
        w0, w1 = origin.get_submodule(n).weight, pruned.get_submodule(n).weight
        gone += (w0.shape[0] - w1.shape[0]) * w0[0].numel()
    return gone / total


def _removed_by_masks(origin: nn.Module, masks: dict, names: list[str]) -> float:
    """Original weight elements of the output channels whose weight mask row is all zero / all of them."""
    total = sum(origin.get_submodule(n).weight.numel() for n in names)
    gone = 0
    for n in names:
        if n in masks:
            m = masks[n]["weight"]
            gone += int((~m.reshape(m.shape[0], -1).any(1)).sum()) * m[0].numel()
    return gone / total


def _largest_slot(model: nn.Module, names: list[str]) -> float:
    """resnet18's coarsest unit: a channel of layer4's residual group (both blocks' conv2 and the downsample)."""
    members = ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"]
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    return sum(model.get_submodule(n).weight[0].numel() for n in members) / total


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("cls, algorithm", [("AGPPruner", "fpgm"), ("LinearPruner", "l1")])
def test_scheduled_rounds_with_speedup_end_at_the_budget_on_resnet18(resnet18, cls, algorithm):
    """Three rounds, speedup after each, total_sparsity 0.5 over every conv: the end point (counted from the widths)
    lies at most one layer4 residual channel (0.00085 of the weights) below 0.5, never above; each round's
    history figure is that count. Before group-level allocation: AGP fpgm 0.508, Linear l1 0.515."""
    model, x = resnet18
    names = _convs(model)
    p = getattr(pruning, cls)(model, [{"total_sparsity": 0.5, "op_types": ["Conv2d"]}], algorithm, total_iteration=3,
                              speedup=True, dummy_input=x)  # fmt: skip
    out, _ = p.compress()
    got = _removed_by_widths(model, out, names)
    assert 0.5 - _largest_slot(model, names) - 1e-9 <= got <= 0.5, got
    assert p.history[-1].sparsity == pytest.approx(got, abs=1e-12)
    asked = [0.5 * (1 - (1 - t / 3) ** 3) if cls == "AGPPruner" else 0.5 * t / 3 for t in (1, 2, 3)]
    for h, s in zip(p.history, asked):  # every round lands on its own schedule point too
        assert s - _largest_slot(model, names) - 1e-9 <= h.sparsity <= s + 1e-9, (h.sparsity, s)


def test_speedup_rounds_keep_the_per_layer_cap_against_the_original_widths(resnet18):
    """max_sparsity_per_layer 0.7 caps every layer (a residual slot: each of its members) at floor(0.7 * n_original)
    removed channels over all rounds, and the budget is still met."""
    model, x = resnet18
    names = _convs(model)
    p = pruning.AGPPruner(model, [{"total_sparsity": 0.5, "max_sparsity_per_layer": 0.7, "op_types": ["Conv2d"]}], "l1",
                          total_iteration=3, speedup=True, dummy_input=x)  # fmt: skip
    out, _ = p.compress()
    for n in names:
        n0 = model.get_submodule(n).weight.shape[0]
        assert out.get_submodule(n).weight.shape[0] >= n0 - int(0.7 * n0), n
    assert 0.5 - _largest_slot(model, names) <= _removed_by_widths(model, out, names) <= 0.5


def test_a_residual_group_selected_in_part_is_left_out_of_the_budget(resnet18):
    """Downsample convs excluded: layerN's conv2s add their channels to the downsample conv's, so speedup cannot remove
    them; the budget skips them with a PruningWarning naming the partner and ends at 0.3 (before: 0.256, spent on
    channels speedup kept)."""
    model, x = resnet18
    ds = ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    names = [n for n in _convs(model) if n not in ds]
    config = [{"total_sparsity": 0.3, "op_types": ["Conv2d"]}, {"exclude": True, "op_names": ds}]
    with pytest.warns(PruningWarning, match=r"'layer2.0.conv2', 'layer2.1.conv2'\] \(they are added to the outputs of \['layer2.0.downsample.0'\]"):
        p = pruning.AGPPruner(model, config, "l1", total_iteration=2, speedup=True, dummy_input=x)
        out, _ = p.compress()
    for n in ("layer2.0.conv2", "layer3.1.conv2", "layer4.0.conv2"):
        assert out.get_submodule(n).weight.shape[0] == model.get_submodule(n).weight.shape[0]
    channel = max(model.get_submodule(n).weight[0].numel() for n in names) / sum(model.get_submodule(n).weight.numel() for n in names)
    assert 0.3 - channel <= _removed_by_widths(model, out, names) <= 0.3


def test_one_shot_total_sparsity_masks_only_what_speedup_removes_on_resnet18(resnet18):
    """One-shot L1, dependency-aware, total_sparsity 0.5: the masks zero whole residual channel classes, so the count
    from the masks and the count from speedup's widths agree, and both land on the budget (before: masks 0.5,
    removed 0.487: channels masked in one member of a residual group stayed)."""
    model, x = resnet18
    names = _convs(model)
    p = pruning.L1NormPruner(model, [{"total_sparsity": 0.5, "op_types": ["Conv2d"]}], dependency_aware=True, dummy_input=x)
    _, masks = p.compress()
    by_masks = _removed_by_masks(model, masks, names)
    out = speedup(p.unwrap_model(), masks, x)
    by_widths = _removed_by_widths(model, out, names)
    assert by_masks == pytest.approx(by_widths, abs=1e-12)
    assert 0.5 - _largest_slot(model, names) - 1e-9 <= by_widths <= 0.5, by_widths


def test_speedup_rounds_prune_dependency_aware_unless_told_otherwise():
    """With speedup between rounds a name-given channel pruner prunes coupled channels together by default (no
    pruning_params needed to reach the budget); dependency_aware=False is honoured with a PruningWarning."""
    torch.manual_seed(0)
    model, x, names = ResBlockNet().eval(), torch.randn(2, 3, 8, 8), ["stem", "c1", "c2", "c3"]
    p = pruning.AGPPruner(model, [{"total_sparsity": 0.5, "op_types": ["Conv2d"]}], "l1", total_iteration=3, speedup=True, dummy_input=x)
    out, _ = p.compress()
    slot = (model.stem.weight[0].numel() + model.c2.weight[0].numel()) / sum(model.get_submodule(n).weight.numel() for n in names)
    assert 0.5 - slot <= _removed_by_widths(model, out, names) <= 0.5
    assert p.scheduler.pruning_params == {"dependency_aware": True}
    with pytest.warns(PruningWarning, match="dependency_aware=False"):
        pruning.AGPPruner(model, [{"total_sparsity": 0.5, "op_types": ["Conv2d"]}], "l1", total_iteration=3, speedup=True,
                          dummy_input=x, pruning_params={"dependency_aware": False})  # fmt: skip


def test_total_sparsity_leaves_model_outputs_alone_and_says_so():
    """op_types default selects the classifier, whose output channels are the model's outputs: speedup keeps them, so
    the budget is spent on the convs (the classifier still counts in its total), with a PruningWarning naming it."""
    torch.manual_seed(0)
    model, x = ResBlockNet().eval(), torch.randn(2, 3, 8, 8)
    names = ["stem", "c1", "c2", "c3", "fc"]
    with pytest.warns(PruningWarning, match=r"\[.fc.\] \(they reach the model output"):
        p = pruning.L1NormPruner(model, [{"total_sparsity": 0.4, "op_types": ["default"]}], dependency_aware=True, dummy_input=x)
        _, masks = p.compress()
    assert bool(masks["fc"]["weight"].all())
    by_masks = _removed_by_masks(model, masks, names)
    out = speedup(p.unwrap_model(), masks, x)
    assert by_masks == pytest.approx(_removed_by_widths(model, out, names), abs=1e-12)
    slot = (model.stem.weight[0].numel() + model.c2.weight[0].numel()) / sum(model.get_submodule(n).weight.numel() for n in names)
    assert 0.4 - slot <= by_masks <= 0.4


class _TwoInputs(nn.Module):
    """Two inputs added into one residual stream (a, b and c2 coupled), a concat, a dict output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(1, 16, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 16, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(32, 24, 3, padding=1), nn.Linear(24, 5)

    def forward(self, img, depth):
        h = torch.relu(self.a(img) + self.b(depth))
        h = torch.relu(h + self.c2(torch.relu(self.c1(h))))
        return {"logits": self.fc(torch.relu(self.c3(torch.cat([h, 0.5 * h], 1))).mean((2, 3)))}


@pytest.mark.parametrize("algorithm", ["l1", "fpgm"])
def test_total_sparsity_over_speedup_rounds_on_a_two_input_model(algorithm):
    torch.manual_seed(0)
    model, names = _TwoInputs().eval(), ["a", "b", "c1", "c2", "c3"]
    x = (torch.randn(2, 3, 16, 16), torch.randn(2, 1, 16, 16))
    p = pruning.LinearPruner(model, [{"total_sparsity": 0.5, "op_types": ["Conv2d"]}], algorithm, total_iteration=3,
                             speedup=True, dummy_input=x)  # fmt: skip
    out, _ = p.compress()
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    slot = sum(model.get_submodule(n).weight[0].numel() for n in ("a", "b", "c2")) / total  # one residual channel
    got = _removed_by_widths(model, out, names)
    assert 0.5 - slot <= got <= 0.5, got
    assert out(*x)["logits"].shape == (2, 5)


def test_one_shot_total_sparsity_on_grouped_and_shuffled_channels():
    """ShuffleNetV2's chunks and channel shuffle: coupled channels must drop evenly per piece. The budget ranks balanced
    moves, so the masks zero only what speedup removes (before: masks 0.499, removed 0.423)."""
    torch.manual_seed(0)
    model, x = torchvision.models.shufflenet_v2_x0_5().eval(), torch.randn(1, 3, 64, 64)
    names = _convs(model)
    p = pruning.L1NormPruner(model, [{"total_sparsity": 0.5, "op_types": ["Conv2d"]}], dependency_aware=True, dummy_input=x)
    _, masks = p.compress()
    by_masks = _removed_by_masks(model, masks, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = speedup(p.unwrap_model(), masks, x)
    assert by_masks == pytest.approx(_removed_by_widths(model, out, names), abs=1e-12)
    assert 0.49 <= by_masks <= 0.5, by_masks


def test_global_counts_rank_a_coupled_slot_as_one_unit_at_its_summed_cost():
    """By hand: layers p (cost 2/channel) and q (cost 3/channel) share 3 slots scored [1, 5, 9]; r (cost 4/channel) has
    channels scored [2, 3, 8]. Total 3*2 + 3*3 + 3*4 = 27; 0.5 of it = 13 elements. In score order: slot 0 (1, cost 5),
    r0 (2, cost 4), r1 (3, cost 4): 13 spent; next is slot 1 (5, cost 5), over the budget."""
    scores = {"p": torch.tensor([1.0, 5.0, 9.0]), "q": torch.tensor([0.0, 0.0, 0.0]), "r": torch.tensor([2.0, 3.0, 8.0])}
    coupled = [CoupledUnits(["p", "q"], torch.tensor([1.0, 5.0, 9.0]), torch.ones(2, 3, dtype=torch.long))]
    counts = global_prune_counts(scores, {"p": 2, "q": 3, "r": 4}, 0.5, coupled=coupled)
    assert counts == {"p": 1, "q": 1, "r": 2}
    # uncoupled, q's zero scores go first one channel at a time (each layer keeps one): q0, q1 (6), p0 (8), r0 (12)
    assert global_prune_counts(scores, {"p": 2, "q": 3, "r": 4}, 0.5) == {"p": 1, "q": 2, "r": 1}


class _NormedStream(nn.Module):
    """inp and mlp2 add into a stream a LayerNorm normalises: speedup keeps it under norm_spans='keep' only."""

    def __init__(self):
        super().__init__()
        self.inp, self.mlp1, self.mlp2, self.head = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.norm(h + self.mlp2(torch.relu(self.mlp1(h)))))


def test_a_stream_under_a_layernorm_stays_in_the_budget_for_norm_spans_prune():
    """A norm pins the stream only under speedup's default norm_spans='keep'; the budget still ranks its channels (one
    unit: inp's and mlp2's rows, 8 + 32 elements), and speedup(norm_spans='prune') removes exactly what the masks zero."""
    torch.manual_seed(0)
    model, x, names = _NormedStream().eval(), torch.randn(4, 8), ["inp", "mlp2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)  # no layer is skipped
        p = pruning.L1NormPruner(model, [{"total_sparsity": 0.4, "op_names": names}], dependency_aware=True, dummy_input=x)
        _, masks = p.compress()
    by_masks = _removed_by_masks(model, masks, names)
    assert 0.4 - 40 / 640 <= by_masks <= 0.4
    out = speedup(p.unwrap_model(), masks, x, norm_spans="prune")
    assert _removed_by_widths(model, out, names) == pytest.approx(by_masks, abs=1e-12)
