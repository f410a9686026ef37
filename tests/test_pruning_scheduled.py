"""Scheduled pruners (Linear, AGP, Lottery Ticket) on a residual CNN trained on the digits data."""

from __future__ import annotations

import math

import pytest
import torch

from deploycompress.pruning import AGPPruner, LinearPruner, LotteryTicketPruner
from deploycompress.zoo import accuracy
from scheduled_helpers import evaluator, finetuner, trained_res_digits

ACC_DROP = 0.05  # stated bound: fine-tuned pruned accuracy within 5 points of the dense model


@pytest.fixture(scope="module")
def dense(digits_data):
    return trained_res_digits(digits_data)


def _pruned_channels(mask: torch.Tensor) -> int:
    return int((~mask.reshape(mask.shape[0], -1).any(1)).sum())


def test_agp_schedule_is_the_formula_and_counts_are_exact(dense, digits_data):
    model, acc = dense
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n, final = 4, 0.5
    pruner = AGPPruner(
        model, [{"sparsity": final, "op_types": ["Conv2d"]}], "l1", n,
        finetuner=finetuner(digits_data), evaluator=evaluator(digits_data),
    )  # fmt: skip
    pruned_model, masks = pruner.compress()
    assert len(pruner.history) == n
    for t, result in enumerate(pruner.history, start=1):
        s_t = final + (0.0 - final) * (1 - t / n) ** 3  # the paper's formula, written here
        assert result.config_list[0]["sparsity"] == pytest.approx(s_t, abs=1e-12)
        for name in ("stem", "conv_a", "conv_b", "conv3"):
            channels = getattr(model, name).out_channels
            assert _pruned_channels(result.masks[name]["weight"]) == math.floor(s_t * channels + 1e-6)
    # masks only grow: every channel pruned in round t stays pruned in round t+1
    for a, b in zip(pruner.history, pruner.history[1:]):
        for name, entry in a.masks.items():
            assert not bool((~entry["weight"] & b.masks[name]["weight"]).any())
    # the returned model computes with exactly these masks, and the caller's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert float(pruned_model.conv_a.weight.detach()[~masks["conv_a"]["weight"]].abs().sum()) == 0.0
    assert accuracy(pruned_model, digits_data.test_x, digits_data.test_y) >= acc - ACC_DROP
    task_id, best_model, best_masks, score, cfg = pruner.get_best_result()
    assert task_id == n and score == pytest.approx(accuracy(best_model, digits_data.test_x, digits_data.test_y))


def test_lottery_ticket_rewinds_kept_weights_exactly(dense, digits_data):
    model, acc = dense
    torch.manual_seed(1)
    early = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    seen: list[bool] = []
    train_one = finetuner(digits_data)

    def check_then_train(m: torch.nn.Module) -> None:
        # right after rewinding: every kept weight equals the recorded checkpoint exactly
        ok = True
        for name in ("stem", "conv_a", "fc1"):
            mod = getattr(m, name)
            mask = mod.parametrizations.weight[0].mask
            ok &= torch.equal(mod.weight[mask], early[f"{name}.weight"][mask])
            ok &= float(mod.weight[~mask].abs().sum()) == 0.0
        ok &= torch.equal(m.bn_a.running_mean, early["bn_a.running_mean"])
        seen.append(bool(ok))
        train_one(m)

    final = 0.8
    pruner = LotteryTicketPruner(
        model, [{"sparsity": final, "op_types": ["Conv2d", "Linear"]}], "level", 3,
        finetuner=check_then_train, evaluator=evaluator(digits_data), rewind_state=early,
    )  # fmt: skip
    pruned_model, masks = pruner.compress()
    assert seen == [True, True, True]
    for t, result in enumerate(pruner.history, start=1):
        assert result.config_list[0]["sparsity"] == pytest.approx(1 - (1 - final) ** (t / 3))
    for name in ("stem", "conv_a", "conv_b", "conv3", "fc1", "fc2"):
        w = masks[name]["weight"]
        assert int((~w).sum()) == math.floor(final * w.numel() + 1e-6)
    assert accuracy(pruned_model, digits_data.test_x, digits_data.test_y) >= acc - 2 * ACC_DROP


def test_linear_with_speedup_between_rounds(dense, digits_data):
    model, acc = dense
    pruner = LinearPruner(
        model, [{"sparsity": 0.5, "op_names": ["conv_a", "fc1"]}], "l2", 2,
        finetuner=finetuner(digits_data), evaluator=evaluator(digits_data), speedup=True, dummy_input=digits_data.test_x[:2],
    )  # fmt: skip
    pruned_model, masks = pruner.compress()
    # physically smaller: half the channels gone from conv_a and fc1 over two rounds
    assert pruned_model.conv_a.out_channels == 8 and pruned_model.conv_b.in_channels == 8
    assert pruned_model.fc1.out_features == 16 and pruned_model.fc2.in_features == 16
    assert [r.config_list for r in pruner.history][0] == [{"sparsity": 0.25, "op_names": ["conv_a", "fc1"]}]
    assert accuracy(pruned_model, digits_data.test_x, digits_data.test_y) >= acc - ACC_DROP


def test_bad_arguments_fail_before_work(dense):
    model, _ = dense
    with pytest.raises(ValueError, match="total_iteration"):
        AGPPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "l1", 0)
    with pytest.raises(ValueError, match="pruning_algorithm"):
        AGPPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "nope", 2).compress()
    with pytest.raises(ValueError, match="dummy_input"):
        LinearPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "l1", 2, speedup=True)


def test_agp_driven_by_step_in_the_users_training_loop(dense, digits_data):
    """NNI 1.x's use: the user's own loop calls ``pruner.step()`` after each optimizer step; the
    masks in the user's model follow the cubic schedule at every step (formula written here)."""
    import copy

    trained, acc = dense
    model = copy.deepcopy(trained)
    n, s_i, s_f = 6, 0.1, 0.6
    layers = ("conv_a", "fc1")
    pruner = AGPPruner(model, [{"sparsity": s_f, "op_names": list(layers)}], "level", n, initial_sparsity=s_i)
    params = {name: getattr(model, name).weight for name in layers}  # the optimizer's objects
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner.update_epoch(0)
    prev = None
    g = torch.Generator().manual_seed(0)
    for t in range(0, n + 3):
        if t > 0:
            idx = torch.randint(len(digits_data.train_x), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(digits_data.train_x[idx]), digits_data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()
        s_t = s_f + (s_i - s_f) * (1 - min(t, n) / n) ** 3
        assert pruner.schedule_point == min(t, n)
        for name in layers:
            mod = getattr(model, name)
            mask = pruner.masks[name]["weight"]
            assert int((~mask).sum()) == math.floor(s_t * mask.numel() + 1e-6), (t, name)
            # the model's forward pass uses exactly these masks, on the parameter the optimizer holds
            assert mod.parametrizations.weight.original is params[name]
            assert float(mod.weight.detach()[~mask].abs().sum()) == 0.0
            assert torch.equal(mod.weight.detach()[mask], params[name].detach()[mask])
            if prev is not None:  # masks only grow
                assert not bool((~prev[name] & mask).any())
        prev = {name: pruner.masks[name]["weight"].clone() for name in layers}
    assert accuracy(pruner.unwrap_model(), digits_data.test_x, digits_data.test_y) >= acc - 2 * ACC_DROP
    with pytest.raises(RuntimeError, match="training loop"):
        pruner.compress()


def test_linear_and_lottery_ticket_by_update_epoch(dense, digits_data):
    import copy

    trained, _ = dense
    model = copy.deepcopy(trained)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    lin = LinearPruner(copy.deepcopy(trained), [{"sparsity": 0.5, "op_names": ["conv3"]}], "l1", 4, dummy_input=digits_data.test_x[:2])
    lt = LotteryTicketPruner(model, [{"sparsity": 0.75, "op_names": ["fc1"]}], "level", 3)
    for epoch in range(4):
        lin.update_epoch(epoch)
        assert _pruned_channels(lin.masks["conv3"]["weight"]) == math.floor(epoch / 4 * 0.5 * 32 + 1e-6)
        with torch.no_grad():  # stands for an epoch of training
            model.fc1.parametrizations.weight.original.add_(0.05) if epoch else model.fc1.weight.add_(0.05)
        lt.update_epoch(epoch + 1)
        mask = lt.masks["fc1"]["weight"]
        t = min(epoch + 1, 3)
        assert int((~mask).sum()) == math.floor((1 - 0.25 ** (t / 3)) * mask.numel() + 1e-6)
        if epoch + 1 <= 3:  # a new schedule point: every kept weight is rewound to its recorded value
            assert torch.equal(model.fc1.weight.detach()[mask], start["fc1.weight"][mask])
        else:  # past the schedule's end nothing changes: the training's update stays
            assert torch.allclose(model.fc1.weight.detach()[mask], start["fc1.weight"][mask] + 0.05)


def _channel_sparsity(origin, pruned, layers):
    """NNI's total_sparsity count, from the widths: each removed output channel at its original weight elements."""
    w0 = sum(getattr(origin, n).weight.numel() for n in layers)
    return sum(
        (getattr(origin, n).weight.shape[0] - getattr(pruned, n).weight.shape[0]) * getattr(origin, n).weight[0].numel()
        for n in layers
    ) / w0


def test_total_sparsity_with_speedup_between_rounds(dense, digits_data):
    """A global budget carried over speedups: after the last round the selected layers have lost output channels
    holding half their original weight elements, as one-shot masks count it (counted here from the widths)."""
    model, acc = dense
    layers = ("conv_a", "conv3", "fc1")
    total = 0.5
    pruner = LinearPruner(
        model, [{"total_sparsity": total, "op_names": list(layers), "max_sparsity_per_layer": 0.8}], "l1", 2,
        finetuner=finetuner(digits_data, 1), evaluator=evaluator(digits_data), speedup=True, dummy_input=digits_data.test_x[:2],
    )  # fmt: skip
    pruned_model, masks = pruner.compress()
    w0 = sum(getattr(model, n).weight.numel() for n in layers)
    # one output channel of the widest-costing layer is the allocation's granularity
    channel_cost = max(getattr(model, n).weight[0].numel() for n in layers)
    got = _channel_sparsity(model, pruned_model, layers)
    assert abs(got - total) <= channel_cost / w0, got
    assert pruned_model.conv_b.in_channels == pruned_model.conv_a.out_channels < 16 or pruned_model.conv3.out_channels < 32
    for n in layers:  # the cap holds against the original widths
        dim0 = getattr(model, n).weight.shape[0]
        assert getattr(pruned_model, n).weight.shape[0] >= dim0 - math.floor(0.8 * dim0)
    assert "total_sparsity" in pruner.history[1].config_list[0]
    assert pruner.history[1].sparsity == pytest.approx(got)
    finetuner(digits_data, 2)(pruned_model)  # fc1 keeps 7 of 32 features: a stated, wider bound
    assert accuracy(pruned_model, digits_data.test_x, digits_data.test_y) >= acc - 2 * ACC_DROP


def test_total_sparsity_over_speedups_does_not_count_the_inputs_a_chain_loses():
    """Conv chain: pruning conv1's outputs also removes conv2's inputs at speedup. The budget counts output
    channels only (as one-shot masks do), so three AGP rounds with speedup end at the asked 0.5, not beyond it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 10, 1),
    ).eval()
    layers = ("0", "2", "4")
    x = torch.randn(2, 3, 8, 8)
    pruner = AGPPruner(model, [{"total_sparsity": 0.5, "op_names": list(layers)}], "l1", 3, speedup=True, dummy_input=x)
    pruned_model, _ = pruner.compress()
    w0 = sum(model[int(n)].weight.numel() for n in layers)
    channel_cost = max(model[int(n)].weight[0].numel() for n in layers)
    got = sum((model[int(n)].weight.shape[0] - pruned_model[int(n)].weight.shape[0]) * model[int(n)].weight[0].numel() for n in layers) / w0
    assert abs(got - 0.5) <= 2 * channel_cost / w0, got
    physical = 1 - sum(pruned_model[int(n)].weight.numel() for n in layers) / w0
    assert physical > 0.6  # what speedup removes beyond the masks: the inputs of the next layer
