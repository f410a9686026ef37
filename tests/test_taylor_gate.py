"""TaylorGatePruner against an independent oracle: the same network written with an explicit gate parameter
z (ones) multiplied into the channels where the consumer reads them; importance = mean over steps of
(dL/dz)^2 (Molchanov et al., 2019), computed here with plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deploycompress as dc
from deploycompress.pruning import TaylorGatePruner, TorchEvaluator


class Block(nn.Module):
    """An inverted residual: expand (1x1) -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project, plus a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)  # as in MobileNetV2/EfficientNet
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.project = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        h = torch.clamp(self.bn2(self.dw(torch.clamp(self.bn1(self.expand(s)), 0, 6))), 0, 6)
        if gate is not None:
            h = h * gate.view(1, -1, 1, 1)
        return self.fc((s + self.project(h)).mean((2, 3)))


def _model(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    m = Block()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.2, 1.0)
            bn.bias.uniform_(1.0, 2.0)  # inside ReLU6's linear range: every channel has a gradient
    return m.eval()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(3)]


def _evaluator(batches) -> TorchEvaluator:
    def training_func(model, optimizer, training_step, *_):
        model.eval()
        for b in batches:
            optimizer.zero_grad()
            training_step(b, model).backward()
            optimizer.step()

    return TorchEvaluator(training_func, lambda p: torch.optim.SGD(p, lr=0.1),
                          lambda b, m: nn.functional.cross_entropy(m(b[0]), b[1]), dummy_input=batches[0][0][:1])


def _oracle(batches) -> torch.Tensor:
    model = _model()
    total = torch.zeros(24)
    for x, y in batches:
        gate = torch.ones(24, requires_grad=True)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x, gate), y), gate)
        total += grad.pow(2)
    return total / len(batches)


@pytest.mark.parametrize("dependency_aware", [False, True])
def test_channels_with_the_smallest_gate_taylor_score_are_pruned_and_the_model_is_unchanged(dependency_aware):
    batches = _batches()
    importance = _oracle(batches)
    assert importance.unique().numel() == 24 and float(importance.min()) > 0  # no ties: one right answer
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = TaylorGatePruner(model, [{"op_names": ["expand"], "sparsity": 0.25}], _evaluator(batches), gates={"expand": "project"},
                              dependency_aware=dependency_aware, dummy_input=batches[0][0][:1])
    _, masks = pruner.compress()
    torch.testing.assert_close(pruner.channel_score("expand", model.expand, None), importance, rtol=1e-4, atol=1e-12)
    pruned = set(torch.nonzero(~masks["expand"]["weight"].flatten(1).all(1)).flatten().tolist())
    assert pruned == set(importance.argsort()[:6].tolist())
    state = model.state_dict()  # scoring ran the training code with optimizer steps off: nothing learnt
    for key, value in before.items():
        plain = key.replace(".weight", ".parametrizations.weight.original").replace(".bias", ".parametrizations.bias.original")
        assert torch.equal(state[key] if key in state else state[plain], value), key
    if dependency_aware:  # the depthwise conv loses the same channels: speedup makes the block narrower
        small = dc.speedup(pruner.unwrap_model(), masks, batches[0][0][:1])
        assert small.dw.out_channels == 18 and small.project.in_channels == 18


def test_without_a_gate_the_score_is_taken_at_the_module_output():
    batches = _batches()
    model = _model()
    reference = _model()
    total = torch.zeros(24)
    for x, y in batches:  # the oracle: a gate on the expand conv's own output
        gate = torch.ones(24, requires_grad=True)
        handle = reference.expand.register_forward_hook(lambda _m, _i, out: out * gate.view(1, -1, 1, 1))
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(reference(x), y), gate)
        handle.remove()
        total += grad.pow(2)
    pruner = TaylorGatePruner(model, [{"op_names": ["expand"], "sparsity": 0.5}], _evaluator(batches))
    pruner.compress()
    torch.testing.assert_close(pruner.channel_score("expand", model.expand, None), total / 3, rtol=1e-4, atol=1e-12)


def test_bad_gates_are_named_before_any_data_runs():
    batches = _batches()
    with pytest.raises(ValueError, match="reads 8 channels but 'expand' has 24"):
        TaylorGatePruner(_model(), [{"op_names": ["expand"], "sparsity": 0.25}], _evaluator(batches), gates={"expand": "fc"})
    with pytest.raises(ValueError, match="no submodule"):
        TaylorGatePruner(_model(), [{"op_names": ["expand"], "sparsity": 0.25}], _evaluator(batches), gates={"expand": "nope"})
    with pytest.raises(ValueError, match="does not select"):
        TaylorGatePruner(_model(), [{"op_names": ["expand"], "sparsity": 0.25}], _evaluator(batches), gates={"stem": "expand"})
    with pytest.raises(TypeError, match="needs gradients"):
        TaylorGatePruner(_model(), [{"op_names": ["expand"], "sparsity": 0.25}], [b[0] for b in batches])
