"""deploycompress.pruning.reconstruction_select: channels chosen by what the least-squares refit can rebuild.

Oracles: (1) the greedy order is recomputed in the test by brute force, refitting every candidate subset with
numpy's ``lstsq``; (2) a model whose expansion conv has two channels that are exact linear combinations of others
(through an affine BatchNorm): the pruner must remove one channel of each dependent set, after which speedup +
refit reproduce the dense model to ~1e-5, and a budget over two blocks must go where removal costs nothing."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from deploycompress.pruning.reconstruct import reconstruct
from deploycompress.pruning.reconstruction_select import ReconstructionPruner, backward_elimination
from deploycompress.speedup import speedup


def _residual(x, y, cols):
    x1 = np.concatenate([x[:, cols], np.ones((len(x), 1))], 1)
    beta = np.linalg.lstsq(x1, y, rcond=None)[0]
    return float(((x1 @ beta - y) ** 2).sum())


def test_backward_elimination_matches_brute_force_greedy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7)) @ rng.normal(size=(7, 7))
    y = x @ rng.normal(size=(7, 3)) + 0.3 * rng.normal(size=(200, 3)) + 1.5
    x1 = np.concatenate([x, np.ones((200, 1))], 1)
    order, curve = backward_elimination(torch.tensor(x1.T @ x1), torch.tensor(x1.T @ y), float((y**2).sum()), steps=4)
    kept, want, want_curve = list(range(7)), [], []
    for _ in range(4):  # the greedy step, by refitting every candidate explicitly
        cost = {j: _residual(x, y, [k for k in kept if k != j]) for j in kept}
        j = min(cost, key=cost.get)
        want.append(j)
        want_curve.append(cost[j])
        kept.remove(j)
    assert order == want
    np.testing.assert_allclose(curve, want_curve, rtol=1e-8)
    assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:]))
    # output weights: the greedy step on the weighted residual, by brute force again
    w = np.array([4.0, 0.25, 1.0])
    from deploycompress.pruning.reconstruction_select import _eliminate
    a_inv = torch.linalg.inv(torch.tensor(x1.T @ x1))
    got, _ = _eliminate(a_inv, a_inv @ torch.tensor(x1.T @ y), 0.0, 3, 7, torch.tensor(w))
    kept, want = list(range(7)), []
    for _ in range(3):
        cost = {j: _residual(x, y * np.sqrt(w), [k for k in kept if k != j]) for j in kept}
        want.append(min(cost, key=cost.get))
        kept.remove(want[-1])
    assert got == want
    with pytest.raises(ValueError, match="cannot remove 8 of 7"):
        backward_elimination(torch.tensor(x1.T @ x1), torch.tensor(x1.T @ y), 0.0, steps=8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1, self.bn1, self.p1 = nn.Conv2d(10, 8, 1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1, bias=False)
        self.e2, self.bn2, self.p2 = nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6), nn.Conv2d(6, 6, 1, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.p1(self.bn1(self.e1(x)))
        h = self.p2(self.bn2(self.e2(h)))
        return self.fc(h.mean((2, 3)))


def _net():
    g = torch.Generator().manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for m in net.modules():
            for p in m.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g))
        for bn in (net.bn1, net.bn2):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        w = net.e1.weight[:, :, 0, 0]
        w[5] = 0.7 * w[0] - 1.3 * w[1]  # channel 5: a combination of 0 and 1 (before an affine BatchNorm)
        w[6] = 0.5 * w[2] + 2.0 * w[3]  # channel 6: of 2 and 3
        w[[5, 6]] *= 3.0  # the largest filters: a norm criterion keeps them
    return net


def _batches(n=4):
    return [torch.randn(4, 10, 5, 5, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


def test_removes_the_rebuildable_channels_and_the_refit_restores_the_dense_model():
    dense = _net()
    saved = {k: v.clone() for k, v in dense.state_dict().items()}
    example = torch.randn(1, 10, 5, 5)
    model = copy.deepcopy(dense)
    pruner = ReconstructionPruner(model, [{"op_names": ["e1"], "sparsity": 0.25}], _batches(), consumers={"e1": "p1"}, ridge=0.0,
                                  dependency_aware=True, dummy_input=example)
    _, masks = pruner.compress()
    removed = set(torch.nonzero(~masks["e1"]["weight"][:, 0, 0, 0]).flatten().tolist())
    assert len(removed) == 2 and len(removed & {0, 1, 5}) == 1 and len(removed & {2, 3, 6}) == 1
    fit = pruner.layer_fits[0]
    assert fit.pruned == "p1" and fit.error_before == pytest.approx(0.0, abs=1e-6) and fit.error_after < 1e-5
    small = speedup(pruner.unwrap_model(), masks, example)
    assert small.e1.out_channels == 6
    x = torch.randn(3, 10, 5, 5)
    with torch.no_grad():
        assert not torch.allclose(small(x), dense(x), atol=1e-2)  # removing them changes the output
        refit = reconstruct(dense, small, ["p1"], _batches(), ridge=0.0).model
        assert torch.allclose(refit(x), dense(x), atol=1e-4, rtol=1e-5), (refit(x) - dense(x)).abs().max()
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in saved.items())  # the caller's model untouched
    assert torch.equal(pruner.unwrap_model().p1.weight, dense.p1.weight)  # the selection's refit is not written into it
    one_step = speedup(pruner.refitted_model, masks, example)  # the pruner's own refit, sped up
    with torch.no_grad():
        assert torch.allclose(one_step(x), dense(x), atol=1e-4, rtol=1e-5)
    uncached = ReconstructionPruner(copy.deepcopy(dense), [{"op_names": ["e1"], "sparsity": 0.25}], _batches(), consumers={"e1": "p1"},
                                    ridge=0.0, cache_mb=0, dependency_aware=True, dummy_input=example)  # dense outputs re-run per layer
    _, masks2 = uncached.compress()
    assert torch.equal(masks2["e1"]["weight"], masks["e1"]["weight"])
    assert torch.allclose(uncached.refitted_model.p1.weight, pruner.refitted_model.p1.weight, atol=1e-6)


@pytest.mark.filterwarnings("ignore::deploycompress.pruning.channel.PruningWarning")  # no dummy_input: masks only
def test_total_budget_goes_where_the_refit_loses_nothing_and_round_to():
    dense = _net()
    total = 8 * 10 + 6 * 6  # weights of e1 and e2; two e1 channels cost 20
    cfg = [{"op_names": ["e1", "e2"], "total_sparsity": 20.5 / total}]
    pruner = ReconstructionPruner(copy.deepcopy(dense), cfg, _batches(), consumers={"e1": "p1", "e2": "p2"}, ridge=0.0, refit=["fc"])
    _, masks = pruner.compress()
    assert int((~masks["e1"]["weight"][:, 0, 0, 0]).sum()) == 2 and bool(masks["e2"]["weight"].all())
    assert [f.pruned for f in pruner.layer_fits] == ["p1", "p2", "fc"] and pruner.layer_fits[0].error_after < 1e-4
    assert pruner.layer_fits[2].error_after < 1e-4 and pruner.layer_fits[2].kept == list(range(6))
    # round_to: kept widths a multiple of 4 (8 - 3 -> 4 kept would remove more: 5 kept rounds up to 8, nothing removed)
    p = ReconstructionPruner(copy.deepcopy(dense), [{"op_names": ["e1"], "sparsity": 0.5}], _batches(2), consumers={"e1": "p1"}, round_to=4)
    _, m = p.compress()
    assert int(m["e1"]["weight"][:, 0, 0, 0].sum()) == 4
    p = ReconstructionPruner(copy.deepcopy(dense), [{"op_names": ["e1"], "sparsity": 0.375}], _batches(2), consumers={"e1": "p1"}, round_to=4)
    _, m = p.compress()
    assert bool(m["e1"]["weight"].all())


def test_refuses_bad_consumers_before_work():
    dense = _net()
    cfg = [{"op_names": ["e1"], "sparsity": 0.25}]
    with pytest.raises(ValueError, match="no consumer given for 'e1'"):
        ReconstructionPruner(dense, cfg, _batches(1), consumers={})
    with pytest.raises(ValueError, match="reads 6 channels but 'e1' has 8"):
        ReconstructionPruner(dense, cfg, _batches(1), consumers={"e1": "p2"})
    with pytest.raises(ValueError, match="BatchNorm2d"):
        ReconstructionPruner(dense, cfg, _batches(1), consumers={"e1": "bn1"})
    with pytest.raises(ValueError, match="no submodule"):
        ReconstructionPruner(dense, cfg, _batches(1), consumers={"e1": "nope"})
    with pytest.raises(ValueError, match="no batches"):
        ReconstructionPruner(dense, cfg, [], consumers={"e1": "p1"})
    with pytest.raises(ValueError, match="refit names 'nope'"):
        ReconstructionPruner(dense, cfg, _batches(1), consumers={"e1": "p1"}, refit=["nope"])
    with pytest.raises(ValueError, match="output_weights"):
        ReconstructionPruner(dense, cfg, _batches(1), consumers={"e1": "p1"}, output_weights={"p1": torch.ones(5)})
    with pytest.raises(ValueError, match="round_to"):
        ReconstructionPruner(dense, cfg, _batches(1), consumers={"e1": "p1"}, round_to=0)


def test_reconstruct_refits_a_layer_that_lost_output_channels():
    """An expansion conv whose outputs were pruned and whose inputs are perturbed: each kept row is fitted to its
    dense channel (the oracle: inputs perturbed by an invertible linear map M, so W_dense M^-1 is exact)."""
    g = torch.Generator().manual_seed(3)
    dense = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 6, 1, bias=False)).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    pruned = copy.deepcopy(dense)
    kept = [0, 2, 3, 5]
    mix = torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)
    with torch.no_grad():
        pruned[0].weight.copy_((mix @ dense[0].weight[:, :, 0, 0])[:, :, None, None])  # perturbed inputs of layer 1
        pruned[1] = nn.Conv2d(4, 4, 1, bias=False)
        pruned[1].weight.copy_(dense[1].weight[kept])
    want = (dense[1].weight[kept, :, 0, 0] @ torch.linalg.inv(mix))
    res = reconstruct(dense, pruned, [("1", "1")], [torch.randn(3, 4, 5, 5, generator=g)], ridge=0.0)
    assert res.layers[0].kept_outputs == kept and res.layers[0].kept == [0, 1, 2, 3]
    assert torch.allclose(res.model[1].weight[:, :, 0, 0], want, atol=1e-4)
    assert res.layers[0].error_before > 0.1 and res.layers[0].error_after < 1e-5
    # a masked row speedup(round_to=N) kept back (zero weights) at full width: left zero, the others refitted
    held = copy.deepcopy(pruned)
    with torch.no_grad():
        held[1] = nn.Conv2d(4, 6, 1, bias=False)
        held[1].weight.copy_(dense[1].weight)
        held[1].weight[1] = 0
    res = reconstruct(dense, held, [("1", "1")], [torch.randn(3, 4, 5, 5, generator=g)], ridge=0.0)
    assert res.layers[0].kept_outputs == [0, -1, 2, 3, 4, 5] and res.layers[0].kept == [0, 1, 2, 3]
    assert not res.model[1].weight[1].any() and res.model[1].bias[1] == 0
    want = dense[1].weight[:, :, 0, 0] @ torch.linalg.inv(mix)
    assert torch.allclose(res.model[1].weight[[0, 2, 3, 4, 5], :, 0, 0], want[[0, 2, 3, 4, 5]], atol=1e-4)
