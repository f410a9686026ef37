"""Pruners that act during training (ADMM, Movement) on a residual CNN trained on the digits data."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from deploycompress.pruning import ADMMPruner, MovementPruner
from deploycompress.zoo import accuracy
from scheduled_helpers import finetuner, torch_evaluator, trained_res_digits

ACC_DROP = 0.05


@pytest.fixture(scope="module")
def _dense(digits_data):
    return trained_res_digits(digits_data)


@pytest.fixture
def dense(_dense):
    """A fresh copy: these pruners train the model they are given, by design."""
    return copy.deepcopy(_dense[0]), _dense[1]


@pytest.mark.parametrize("granularity", ["fine-grained", "coarse-grained"])
def test_admm_reaches_the_sparsity_and_keeps_accuracy(dense, digits_data, granularity):
    model, acc = dense
    layers = ["conv_a", "conv3", "fc1"]
    pruner = ADMMPruner(model, [{"sparsity": 0.5, "op_names": layers, "rho": 1e-3}], torch_evaluator(digits_data), iterations=2,
                        training_epochs=1, granularity=granularity)  # fmt: skip
    pruned, masks = pruner.compress()
    for n in layers:
        w = masks[n]["weight"]
        if granularity == "fine-grained":
            assert int((~w).sum()) == math.floor(0.5 * w.numel())
        else:
            rows = w.reshape(w.shape[0], -1)
            assert bool((rows.all(1) | ~rows.any(1)).all())  # whole filters
            assert int((~rows.any(1)).sum()) == w.shape[0] // 2
    finetuner(digits_data, 2)(pruned)
    assert accuracy(pruned, digits_data.test_x, digits_data.test_y) >= acc - ACC_DROP


@pytest.mark.parametrize(("granularity", "sparsity"), [("finegrained", 0.75), ((8, 32), 0.5)])
def test_movement_pruning_reaches_the_sparsity(dense, digits_data, granularity, sparsity):
    model, acc = dense
    pruner = MovementPruner(model, [{"sparsity": sparsity, "op_names": ["fc1"]}], torch_evaluator(digits_data), warm_up_step=5,
                            cool_down_beginning_step=40, training_epochs=3, sparse_granularity=granularity)  # fmt: skip
    assert pruner.sparsity_at(5, sparsity) == 0.0 and pruner.sparsity_at(40, sparsity) == pytest.approx(sparsity)
    assert pruner.sparsity_at(22, sparsity) == pytest.approx(sparsity * (1 - (1 - 17 / 35) ** 3))
    pruned, masks = pruner.compress()
    w = masks["fc1"]["weight"]
    assert int((~w).sum()) == int(sparsity * w.numel())
    if granularity != "finegrained":  # whole 8x32 blocks: rows of 8 output features
        blocks = w.reshape(4, 8, 1, 32)
        assert bool((blocks.all((1, 3)) | ~blocks.any((1, 3))).all())
    finetuner(digits_data, 2)(pruned)
    assert accuracy(pruned, digits_data.test_x, digits_data.test_y) >= acc - ACC_DROP


def test_autocompress_meets_the_total_budget(dense, digits_data):
    from deploycompress.pruning import AutoCompressPruner

    from scheduled_helpers import evaluator

    model, acc = dense
    layers = ["conv_a", "conv3", "fc1"]
    total = 0.6
    pruner = AutoCompressPruner(
        model, [{"total_sparsity": total, "op_names": layers}], 2,
        admm_params={"evaluator": torch_evaluator(digits_data), "iterations": 1, "training_epochs": 1},
        sa_params={"cool_down_rate": 0.5, "pruning_algorithm": "level"}, evaluator=evaluator(digits_data),
        finetuner=finetuner(digits_data, 1),
    )  # fmt: skip
    pruned, masks = pruner.compress()
    weights = sum(getattr(model, n).weight.numel() for n in layers)
    gone = sum(int((~masks[n]["weight"]).sum()) for n in layers)
    assert math.floor(total * weights) <= gone <= total * weights + len(layers)
    first = pruner.history[0].masks  # round 2 keeps everything round 1 pruned
    assert all(not bool((~first[n]["weight"] & masks[n]["weight"]).any()) for n in layers)
    finetuner(digits_data, 2)(pruned)
    assert accuracy(pruned, digits_data.test_x, digits_data.test_y) >= acc - ACC_DROP


def test_movement_soft_mode_sparsity_emerges_from_the_regularisation(dense, digits_data):
    """Soft movement pruning: no sparsity given; the final masks are exactly sigmoid(S) > threshold on
    the learned scores, and a stronger regulariser prunes more."""
    model, acc = dense
    sparsities = {}
    for scale in (0.0, 50.0):
        m = copy.deepcopy(model)
        pruner = MovementPruner(m, [{"op_names": ["fc1", "conv3"]}], torch_evaluator(digits_data), warm_up_step=5,
                                cool_down_beginning_step=60, training_steps=80, regular_scale=scale, movement_mode="soft",
                                sparse_threshold=0.3, score_lr=0.05)  # fmt: skip
        pruned, masks = pruner.compress()
        assert pruner.steps_run == 80
        for n in ("fc1", "conv3"):
            keep = torch.sigmoid(pruner.scores[n]) > 0.3  # the rule, applied here to the learned scores
            assert torch.equal(masks[n]["weight"], keep)
            w = getattr(pruned, n).weight.detach()
            assert float(w[~keep].abs().sum()) == 0.0
        sparsities[scale] = sum(int((~masks[n]["weight"]).sum()) for n in masks) / sum(masks[n]["weight"].numel() for n in masks)
        if scale:
            assert accuracy(pruned, digits_data.test_x, digits_data.test_y) >= acc - 2 * ACC_DROP
    assert sparsities[50.0] > sparsities[0.0] + 0.1 and sparsities[50.0] > 0.2, sparsities
    from deploycompress.pruning.channel import PruningWarning

    blocks = MovementPruner(copy.deepcopy(model), [{"op_names": ["fc1"]}], torch_evaluator(digits_data), 5, 40, training_steps=60,
                            regular_scale=50.0, movement_mode="soft", sparse_granularity=(8, 32), sparse_threshold=0.3, score_lr=0.05)  # fmt: skip
    with pytest.warns(PruningWarning, match="every unit of \\['fc1'\\]"):  # four blocks only: the regulariser empties the layer
        _, masks = blocks.compress()
    assert not bool(masks["fc1"]["weight"].any())
    with pytest.raises(ValueError, match="soft"):
        MovementPruner(model, [{"sparsity": 0.5, "op_names": ["fc1"]}], torch_evaluator(digits_data), 1, 5, training_steps=5,
                       movement_mode="soft")  # fmt: skip


def test_autocompress_meets_a_measured_resource_budget(dense, digits_data):
    """AutoCompress with a measured budget: the sped-up result's parameters (counted here) lie within
    the meter's 5 % of the budget (coarse ADMM masks carry the joined BatchNorm entries, so speedup
    removes the channels the search counted on)."""
    from deploycompress.pruning import AutoCompressPruner, ResourceMeter

    from scheduled_helpers import evaluator

    model, _ = dense
    x = digits_data.test_x[:2]
    budget, tol = 0.6, 0.05
    pruner = AutoCompressPruner(
        model, [{"op_names": ["stem", "conv_a", "conv3", "fc1"]}], 2,
        admm_params={"evaluator": torch_evaluator(digits_data), "iterations": 1, "training_steps": 5, "granularity": "coarse-grained"},
        sa_params={"cool_down_rate": 0.5, "pruning_algorithm": "l1", "resource": ResourceMeter("params", x, tolerance=tol),
                   "budget": budget},
        evaluator=evaluator(digits_data),
    )  # fmt: skip
    _, masks = pruner.compress()
    from deploycompress.speedup import speedup

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = speedup(pruner.unwrap_model(), masks, x)
    ratio = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    assert budget * (1 - tol) <= ratio <= budget * (1 + tol), ratio
