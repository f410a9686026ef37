"""Every one-shot pruner on the digits CNN: exact counts, its scoring rule against an independent
computation, masks surviving export and fine-tuning; total_sparsity budgets."""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
from torch import nn

import deploycompress as dc
from deploycompress.pruning import (
    ActivationAPoZRankPruner,
    ActivationMeanRankPruner,
    FPGMPruner,
    L1NormPruner,
    L2NormPruner,
    LevelPruner,
    SlimPruner,
    TaylorFOWeightPruner,
    TorchEvaluator,
    load_masks,
)
from deploycompress.zoo.digits import DigitsNet, load_digits_data

CHANNEL_CONFIG = [{"sparsity": 0.3, "op_types": ["Conv2d", "Linear"]}, {"exclude": True, "op_names": ["fc2"]}]
# floor(0.3 * channels): conv1 8 -> 2, conv2 16 -> 4, conv3 16 -> 4, fc1 16 -> 4
CHANNELS_PRUNED = {"conv1": 2, "conv2": 4, "conv3": 4, "fc1": 4}


@pytest.fixture(scope="module")
def data():
    return load_digits_data()


def _net(seed: int = 0) -> DigitsNet:
    torch.manual_seed(seed)
    return DigitsNet(width=8)


def _evaluator(model: nn.Module, data, batches: int = 4, factory: bool = False) -> TorchEvaluator:
    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        model.train()
        for epoch in range(max_epochs or 1):
            for i in range(batches):
                sl = slice(32 * i, 32 * (i + 1))
                optimizers.zero_grad()
                training_step((data.train_x[sl], data.train_y[sl]), model).backward()
                optimizers.step()

    def training_step(batch, model):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    optimizer = (lambda params: torch.optim.SGD(params, lr=0.5)) if factory else torch.optim.SGD(model.parameters(), lr=0.5)
    return TorchEvaluator(training_func, optimizer, training_step, dummy_input=data.train_x[:2])


def _input_batches(data, n: int = 4) -> list[torch.Tensor]:
    return [data.train_x[32 * i : 32 * (i + 1)] for i in range(n)]


Factory = Callable[[nn.Module, Any], dc.Pruner]
PRUNERS: dict[str, Factory] = {
    "L1": lambda m, d: L1NormPruner(m, CHANNEL_CONFIG),
    "L2": lambda m, d: L2NormPruner(m, CHANNEL_CONFIG),
    "FPGM": lambda m, d: FPGMPruner(m, CHANNEL_CONFIG),
    "APoZ-batches": lambda m, d: ActivationAPoZRankPruner(m, CHANNEL_CONFIG, _input_batches(d)),
    "APoZ-evaluator": lambda m, d: ActivationAPoZRankPruner(m, CHANNEL_CONFIG, _evaluator(m, d), training_steps=3),
    "MeanRank": lambda m, d: ActivationMeanRankPruner(m, CHANNEL_CONFIG, _input_batches(d)),
    "TaylorFO": lambda m, d: TaylorFOWeightPruner(m, CHANNEL_CONFIG, _evaluator(m, d), training_steps=3),
}
# the two pruners whose unit is not a Conv/Linear output channel, with their exact counts
OTHER_PRUNERS: dict[str, tuple[Factory, dict[str, int]]] = {
    # floor(0.3 * weights): 72 -> 21, 1152 -> 345, 2304 -> 691, 256 -> 76
    "Level": (lambda m, d: LevelPruner(m, CHANNEL_CONFIG), {"conv1": 21, "conv2": 345, "conv3": 691, "fc1": 76}),
    # BatchNorm channels: floor(0.3 * 8) = 2, floor(0.3 * 16) = 4
    "Slim": (lambda m, d: SlimPruner(m, [{"sparsity": 0.3, "op_types": ["BatchNorm2d"]}], _evaluator(m, d), training_steps=2), {"bn1": 2, "bn2": 4, "bn3": 4}),
}


def _pruned_channels(mask: torch.Tensor, dim: int = 0) -> set[int]:
    rows = mask.transpose(0, dim).reshape(mask.shape[dim], -1)
    assert bool((rows.all(1) | ~rows.any(1)).all()), "a channel is partly masked"
    return set((~rows.all(1)).nonzero().flatten().tolist())


def _lowest(scores: torch.Tensor, k: int) -> set[int]:
    return set(scores.argsort(stable=True)[:k].tolist())


@pytest.mark.parametrize("kind", [*PRUNERS, *OTHER_PRUNERS])
def test_pruner_counts_export_and_fine_tuning(kind, data, tmp_path):
    model = _net()
    if kind in PRUNERS:
        pruner = PRUNERS[kind](model, data)
        _, masks = pruner.compress()
        assert {n: len(_pruned_channels(m["weight"])) for n, m in masks.items() if n in CHANNELS_PRUNED} == CHANNELS_PRUNED
        # pruners that know an example input (an evaluator's) also mask the BatchNorms joined to the channels
        assert set(masks) - set(CHANNELS_PRUNED) <= {"bn1", "bn2", "bn3"}
        assert _pruned_channels(masks["fc1"]["weight"]) == set((~masks["fc1"]["bias"]).nonzero().flatten().tolist())
    else:
        factory, expected = OTHER_PRUNERS[kind]
        pruner = factory(model, data)
        _, masks = pruner.compress()
        assert {n: int((~m["weight"]).sum()) for n, m in masks.items() if n in expected} == expected
        # the filters feeding the pruned norm channels are masked too: speedup removes them
        if kind == "Slim":
            assert len(_pruned_channels(masks["conv1"]["weight"])) == expected["bn1"]

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.train_x[:64]), data.train_y[:64]).backward()
        opt.step()
    pruner.export_model(tmp_path / "model.pt", tmp_path / "masks.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    for name, entry in masks.items():
        for pname, mask in entry.items():
            assert float(state[f"{name}.{pname}"][~mask].abs().sum()) == 0.0, f"{name}.{pname}"
            assert bool((state[f"{name}.{pname}"][mask] != 0).all())
    loaded = load_masks(tmp_path / "masks.pt", _net())
    assert all(torch.equal(loaded[n][p], masks[n][p]) for n in masks for p in masks[n])


def test_norm_and_fpgm_scores_match_a_direct_computation():
    for cls, score in [
        (L1NormPruner, lambda w: w.abs().sum((1, 2, 3))),
        (L2NormPruner, lambda w: w.pow(2).sum((1, 2, 3)).sqrt()),
        (FPGMPruner, lambda w: torch.stack([(w - w[i]).pow(2).sum((1, 2, 3)).sqrt().sum() for i in range(len(w))])),
    ]:
        model = _net(seed=3)
        w = model.conv2.weight.detach().clone()
        _, masks = cls(model, CHANNEL_CONFIG).compress()
        assert _pruned_channels(masks["conv2"]["weight"]) == _lowest(score(w), 4), cls.__name__


def test_activation_scores_match_a_direct_computation(data):
    batches = _input_batches(data)
    model = _net(seed=1)
    model.eval()
    with torch.no_grad():
        acts = torch.cat([torch.relu(model.conv2(torch.relu(model.bn1(model.conv1(x))))) for x in batches])
    apoz = (acts == 0).float().mean((0, 2, 3))
    mean = acts.mean((0, 2, 3))
    _, masks = ActivationAPoZRankPruner(_net(seed=1), CHANNEL_CONFIG, batches).compress()
    assert _pruned_channels(masks["conv2"]["weight"]) == _lowest(-apoz, 4)
    _, masks = ActivationMeanRankPruner(_net(seed=1), CHANNEL_CONFIG, iter(batches), training_steps=4).compress()
    assert _pruned_channels(masks["conv2"]["weight"]) == _lowest(mean, 4)


@pytest.mark.parametrize("factory", [False, True], ids=["optimizer", "optimizer-factory"])
def test_taylor_scores_match_a_direct_computation_and_leave_the_model_unchanged(data, factory):
    model = _net(seed=2)
    reference = _net(seed=2)
    evaluator = _evaluator(model, data, factory=factory)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    contribution = torch.zeros(16)
    reference.train()
    for i in range(3):
        reference.zero_grad()
        sl = slice(32 * i, 32 * (i + 1))
        nn.functional.cross_entropy(reference(data.train_x[sl]), data.train_y[sl]).backward()
        contribution += (reference.conv3.weight * reference.conv3.weight.grad).detach().pow(2).sum((1, 2, 3))
    _, masks = TaylorFOWeightPruner(model, CHANNEL_CONFIG, evaluator, training_steps=3).compress()
    assert _pruned_channels(masks["conv3"]["weight"]) == _lowest(contribution, 4)
    after = model.state_dict()
    for key, value in state_before.items():
        plain = key.replace(".weight", ".parametrizations.weight.original").replace(".bias", ".parametrizations.bias.original")
        now = after[key] if key in after else after[plain]
        assert torch.equal(now, value), f"statistics collection changed {key}"


def test_slim_masks_batchnorm_channels_of_smallest_gamma():
    model = _net()
    with torch.no_grad():
        model.bn2.weight.copy_(torch.linspace(-1.0, 1.0, 16))
    _, masks = SlimPruner(model, [{"sparsity": 0.5, "op_types": ["BatchNorm2d"]}]).compress()
    assert set(masks) == {"bn1", "bn2", "bn3"}
    assert {n: int((~m["weight"]).sum()) for n, m in masks.items()} == {"bn1": 4, "bn2": 8, "bn3": 8}
    assert _pruned_channels(masks["bn2"]["weight"]) == set(range(4, 12))  # |linspace| smallest in the middle
    assert torch.equal(masks["bn2"]["bias"], masks["bn2"]["weight"])
    x = torch.rand(2, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        model(x)
        assert float(model.bn2.weight[4:12].abs().max()) == 0.0 and float(model.bn2.bias[4:12].abs().max()) == 0.0


def test_slim_sparsity_regularisation_runs_through_the_user_training_function(data):
    sums = {}
    for scale in (0.0, 0.05):
        model = _net()
        evaluator = _evaluator(model, data, batches=8)
        SlimPruner(model, [{"total_sparsity": 0.5, "op_types": ["BatchNorm2d"]}], evaluator, training_epochs=2, regular_scale=scale).compress()
        sums[scale] = float(sum(m.parametrizations.weight.original.detach().abs().sum() for m in (model.bn1, model.bn2, model.bn3)))
    assert sums[0.05] < sums[0.0] - 0.5, sums
    with pytest.raises(ValueError, match="give training_steps or training_epochs"):
        SlimPruner(_net(), [{"sparsity": 0.5, "op_types": ["BatchNorm2d"]}], evaluator)


def test_level_prunes_exact_counts_of_smallest_magnitude():
    model = _net()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    _, masks = LevelPruner(model, [{"sparsity": 0.3, "op_types": ["default"]}]).compress()
    for name, w in weights.items():
        k = math.floor(0.3 * w.numel() + 1e-9)
        assert int((~masks[name]["weight"]).sum()) == k, name
        assert float(w[~masks[name]["weight"]].abs().max()) <= float(w[masks[name]["weight"]].abs().min())
    assert bool(masks["fc1"]["bias"].all())


def _two_linears(rows_a: list[float], rows_b: list[float]) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        for layer, rows in zip(model, (rows_a, rows_b)):
            layer.weight.copy_(torch.tensor(rows).unsqueeze(1).expand(4, 4) / 4)
    return model


@pytest.mark.parametrize(
    "max_per_layer, expected",
    [(None, {"0": {0, 1, 2}, "1": {0}}), (0.5, {"0": {0, 1}, "1": {0, 1}})],
)
def test_total_sparsity_ranks_channels_globally(max_per_layer, expected):
    model = _two_linears([0.1, 0.2, 0.3, 4.0], [5.0, 6.0, 7.0, 8.0])
    config: dict[str, Any] = {"total_sparsity": 0.5, "op_types": ["Linear"]}
    if max_per_layer is not None:
        config["max_sparsity_per_layer"] = max_per_layer
    _, masks = L1NormPruner(model, [config]).compress()
    assert {n: _pruned_channels(m["weight"]) for n, m in masks.items()} == expected


def test_nni3_global_group_shares_one_budget_across_configs():
    model = _two_linears([0.1, 0.2, 0.3, 4.0], [5.0, 6.0, 7.0, 8.0])
    config = [
        {"sparse_ratio": 0.5, "max_sparse_ratio": 0.5, "global_group_id": 7, "op_names": ["0"]},
        {"sparse_ratio": 0.5, "global_group_id": 7, "op_names": ["1"]},
    ]
    _, masks = L1NormPruner(model, config).compress()
    # layer 0 offers at most 2 channels; the rest of the 4-channel budget comes from layer 1
    assert {n: _pruned_channels(m["weight"]) for n, m in masks.items()} == {"0": {0, 1}, "1": {0, 1}}


def test_total_sparsity_for_level_meets_the_budget_and_the_cap():
    model = _net()
    config = [{"total_sparsity": 0.6, "max_sparsity_per_layer": 0.7, "op_types": ["Conv2d", "Linear"]}]
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    _, masks = LevelPruner(model, config).compress()
    total = sum(w.numel() for w in weights.values())
    pruned = {n: int((~m["weight"]).sum()) for n, m in masks.items()}
    assert sum(pruned.values()) == math.floor(0.6 * total)
    assert all(pruned[n] <= math.floor(0.7 * weights[n].numel()) for n in weights)
    assert pruned["conv3"] == math.floor(0.7 * 2304)  # the largest layer has the smallest weights: capped
    # below the cap, one global threshold: every pruned weight is no larger than any kept weight of an uncapped layer
    uncapped = [n for n in weights if pruned[n] < math.floor(0.7 * weights[n].numel())]
    threshold = max(float(weights[n][~masks[n]["weight"]].abs().max()) for n in uncapped)
    assert all(float(weights[n][masks[n]["weight"]].abs().min()) >= threshold for n in uncapped)


def test_statistics_pruners_reject_bad_arguments(data):
    model = _net()
    with pytest.raises(TypeError, match="TaylorFOWeightPruner needs gradients: pass a TorchEvaluator"):
        TaylorFOWeightPruner(model, CHANNEL_CONFIG, _input_batches(data))
    with pytest.raises(ValueError, match="training_steps must be a positive integer, got 0"):
        ActivationAPoZRankPruner(model, CHANNEL_CONFIG, _input_batches(data), training_steps=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        ActivationMeanRankPruner(model, CHANNEL_CONFIG, _input_batches(data), activation="gelu")
    with pytest.raises(RuntimeError, match="no batch reached the model"):
        ActivationMeanRankPruner(model, CHANNEL_CONFIG, []).compress()
    pairs = [(data.train_x[:8], data.train_y[:8])]
    with pytest.raises(TypeError, match=r"for \(input, target\) pairs pass \(x for x, _ in loader\)"):
        ActivationMeanRankPruner(model, CHANNEL_CONFIG, pairs).compress()
    with pytest.raises(ValueError, match="dependency_aware=True needs dummy_input"):
        L1NormPruner(model, CHANNEL_CONFIG, dependency_aware=True)
    with pytest.raises(dc.ConfigError, match="selects module 'conv1' of type Conv2d, which SlimPruner cannot handle"):
        SlimPruner(model, [{"sparsity": 0.5, "op_names": ["conv1"]}])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pruners_on_cuda(data, tmp_path):
    for kind in ("L1", "APoZ-batches", "TaylorFO"):
        model = _net().cuda()
        cuda_data = type(data)(*(t.cuda() for t in (data.train_x, data.train_y, data.test_x, data.test_y)))
        pruner = PRUNERS[kind](model, cuda_data)
        _, masks = pruner.compress()
        assert {n: len(_pruned_channels(m["weight"].cpu())) for n, m in masks.items()} == CHANNELS_PRUNED, kind
        out = model(cuda_data.test_x[:8])
        assert out.is_cuda
        pruner.export_model(tmp_path / "m.pt", tmp_path / "masks.pt")
        state = torch.load(tmp_path / "m.pt", weights_only=True, map_location="cpu")
        assert float(state["conv2.weight"][~masks["conv2"]["weight"].cpu()].abs().max()) == 0.0
        assert all(m.device.type == "cpu" for e in load_masks(tmp_path / "masks.pt").values() for m in e.values())
