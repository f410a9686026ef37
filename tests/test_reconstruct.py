"""deploycompress.pruning.reconstruct: the least-squares refit of consumers of pruned channels.

Oracle: the removed expansion channels are exact linear combinations ``A`` of the kept ones (no nonlinearity
between expansion and projection), so the dense projection equals ``(P_kept + P_removed A) h_kept + b`` — a weight
the test computes by hand; the refit must find it and reproduce the dense output to ~1e-5."""

import copy

import pytest
import torch
from torch import nn

from deploycompress.pruning.reconstruct import reconstruct


class Block(nn.Module):
    def __init__(self, cin=4, mid=8, cout=5, stride=1):
        super().__init__()
        self.expand = nn.Conv2d(cin, mid, 1, bias=False)
        self.dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.project = nn.Conv2d(mid, cout, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.head = nn.Linear(cout, 3)

    def forward(self, x):
        y = self.bn(self.project(self.expand(x)))
        return self.head(y.mean((2, 3)))


def _models(kept, stride=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = Block(stride=stride).eval()
    removed = [i for i in range(8) if i not in kept]
    a = torch.randn(len(removed), len(kept), generator=g)
    with torch.no_grad():
        for m in dense.modules():
            for p in m.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g))
        w = dense.expand.weight[:, :, 0, 0]
        w[removed] = a @ w[kept]  # removed channels: exact linear combinations of the kept ones
        dense.bn.running_mean.copy_(torch.randn(5, generator=g))
        dense.bn.running_var.copy_(torch.rand(5, generator=g) + 0.5)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():  # what speedup leaves: the kept rows / columns, in order
        pruned.expand = nn.Conv2d(4, len(kept), 1, bias=False)
        pruned.expand.weight.copy_(dense.expand.weight[kept])
        pruned.dw = nn.Identity()  # keep the oracle linear: no depthwise in between
        pruned.project = nn.Conv2d(len(kept), 5, 1, stride=stride, bias=False)
        pruned.project.weight.copy_(dense.project.weight[:, kept])
    dense.dw = nn.Identity()
    p = dense.project.weight[:, :, 0, 0]
    want = p[:, kept] + p[:, removed] @ a  # the hand-computed exact refit
    return dense, pruned, want


@pytest.mark.parametrize("stride", [1, 2])
def test_refit_recovers_exact_linear_combination(stride):
    kept = [1, 3, 4, 6]  # not a prefix: the column mapping matters
    dense, pruned, want = _models(kept, stride)
    before = {k: v.clone() for k, v in dense.state_dict().items()}, {k: v.clone() for k, v in pruned.state_dict().items()}
    batches = [torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    res = reconstruct(dense, pruned, ["project"], batches, ridge=0.0)
    got = res.model.project.weight[:, :, 0, 0]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert res.model.project.bias.abs().max() < 1e-4  # no intercept needed here
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(res.model(x), dense(x), atol=1e-4)
        assert not torch.allclose(pruned(x), dense(x), atol=1e-2)  # the oracle is not trivial
    fit = res.layers[0]
    assert fit.kept == kept and fit.error_before > 0.1 and fit.error_after < 1e-5
    assert fit.rows == 3 * 2 * (6 // stride) ** 2
    # the caller's models are untouched
    for model, saved in zip((dense, pruned), before):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert pruned.project.bias is None and res.model is not pruned


def test_refit_with_intercept_and_ridge_and_linear():
    """Removed channels = linear combination + constant (ReLU-free offset via a bias on the expansion): the intercept
    goes into the new bias; a small ridge still reproduces the output; Linear consumers too."""
    kept = [0, 2, 5, 7]
    dense, pruned, _ = _models(kept, seed=1)
    with torch.no_grad():
        dense.expand.bias = nn.Parameter(torch.zeros(8))
        dense.expand.bias[[1, 3]] = torch.tensor([2.0, -1.0])  # removed channels carry a constant
    batches = [torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    res = reconstruct(dense, pruned, [("project", "project"), "head"], batches, ridge=1e-9)
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(res.model(x), dense(x), atol=1e-3)
    assert [f.pruned for f in res.layers] == ["project", "head"] and res.layers[1].error_before < 1e-3


def test_refuses_non_pointwise_consumers_before_work():
    dense, pruned, _ = _models([0, 1, 2, 3])
    dense.dw = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    pruned.dw = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    with pytest.raises(ValueError, match="'dw.*only 1x1"):
        reconstruct(dense, pruned, ["dw"], [torch.randn(1, 4, 6, 6)])
    with pytest.raises(ValueError, match="BatchNorm2d"):
        reconstruct(dense, pruned, ["bn"], [torch.randn(1, 4, 6, 6)])
    with pytest.raises(ValueError, match="no module 'nope'"):
        reconstruct(dense, pruned, ["nope"], [torch.randn(1, 4, 6, 6)])
    with pytest.raises(ValueError, match="no batches"):
        reconstruct(dense, pruned, ["project"], [])
    with torch.no_grad():
        pruned.project.weight.add_(1.0)  # no longer columns of the dense weights
    with pytest.raises(ValueError, match="matches no remaining input channel"):
        reconstruct(dense, pruned, ["project"], [torch.randn(1, 4, 6, 6)])
