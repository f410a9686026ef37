"""speedup on hand-built hard cases, checked against an independent masked-model oracle."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploycompress.speedup import MaskError, SpeedupWarning, masked_model, speedup, speedup_with_report
from test_speedup_cases import channel_mask, hand_oracle, max_rel_error, randomize_norms, single_thread, user_masked  # noqa: F401

TOL = 1e-5


def keep_of(n: int, drop: list[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[drop] = False
    return keep


def run_case(model: nn.Module, x: torch.Tensor, keeps: dict, norms: dict, **kw):
    model = randomize_norms(model)
    modules = dict(model.named_modules())
    masks = {name: channel_mask(modules[name], keep) for name, keep in keeps.items()}
    masks.update({bn: {"weight": keeps[name].clone(), "bias": keeps[name].clone()} for name, bn in norms.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = speedup_with_report(model, masks, x, **kw)
    expected = hand_oracle(model, keeps, norms)(x)
    assert max_rel_error(expected, small(x)) < TOL
    return small, report


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))


def test_residual_with_different_masks_removes_only_the_common_channels() -> None:
    small, report = run_case(
        Residual(), torch.randn(2, 3, 10, 10),
        {"a": keep_of(8, [0, 1, 6, 7]), "b": keep_of(8, [2, 3, 6, 7])}, {"a": "bn_a", "b": "bn_b"},
    )  # fmt: skip
    assert small.a.out_channels == small.b.out_channels == small.c.in_channels == 6
    layer = {r.name: r for r in report.layers}
    assert (layer["a"].masked_out, layer["a"].kept_masked) == (4, 2)
    assert layer["a"].kept_reasons == {"coupled with unmasked channels of 'b'": 2}  # the residual partner
    assert small.bn_a.num_features == 6 and small.bn_a.running_mean.numel() == 6


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(torch.cat([self.a(x), self.b(x)], 1)))


def test_concat_feeding_a_conv() -> None:
    small, _ = run_case(Concat(), torch.randn(2, 3, 9, 9), {"a": keep_of(4, [1, 2]), "b": keep_of(6, [0, 3, 5])}, {})
    assert (small.a.out_channels, small.b.out_channels, small.c.in_channels) == (2, 3, 5)


class Grouped(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.g(F.relu(self.bn(self.a(x))))))


def test_grouped_conv_keeps_equal_counts_per_group() -> None:
    # group 0 loses channels 0 and 1, group 1 only channel 4: one of group 0's stays (zeroed)
    small, report = run_case(Grouped(2), torch.randn(2, 3, 8, 8), {"a": keep_of(8, [0, 1, 4])}, {"a": "bn"})
    assert (small.a.out_channels, small.g.in_channels, small.g.groups) == (6, 6, 2)
    assert any("groups:g" in n for n in report.notes)


def test_depthwise_conv_shrinks_its_groups() -> None:
    small, _ = run_case(Grouped(8), torch.randn(2, 3, 8, 8), {"a": keep_of(8, [0, 3, 5])}, {"a": "bn"})
    assert (small.a.out_channels, small.g.in_channels, small.g.out_channels, small.g.groups) == (5, 5, 5, 5)
    assert small.c.in_channels == 5


class Shuffle(nn.Module):
    """ShuffleNetV2's unit: chunk, branch, concat, channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat([x1, F.relu(self.branch(x2))], 1)
        n, c, h, w = out.shape
        out = out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(out)


def test_channel_shuffle_removes_matching_positions() -> None:
    # stem channel 1 (x1[1]) and branch channel 1 land side by side after the shuffle; stem 5 feeds the branch
    small, _ = run_case(
        Shuffle(), torch.randn(2, 3, 6, 6), {"stem": keep_of(8, [1, 5]), "branch": keep_of(4, [1])}, {}
    )
    assert small.stem.out_channels == 6 and small.branch.in_channels == 3 and small.head.in_channels == 6


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn(self.a(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.c(x * s)


def test_squeeze_excitation_couples_the_scale_with_the_features() -> None:
    small, _ = run_case(SqueezeExcite(), torch.randn(2, 3, 7, 7), {"a": keep_of(8, [2, 6]), "fc1": keep_of(4, [0])}, {"a": "bn"})
    assert (small.a.out_channels, small.fc1.in_channels, small.fc2.out_channels, small.c.in_channels) == (6, 6, 6, 6)
    assert (small.fc1.out_channels, small.fc2.in_channels) == (3, 3)


def test_masked_se_scale_alone_is_kept_because_sigmoid_of_zero_is_not_zero() -> None:
    small, report = run_case(SqueezeExcite(), torch.randn(2, 3, 7, 7), {"fc2": keep_of(8, [1])}, {})
    assert small.fc2.out_channels == 8
    assert {r.name: r.kept_masked for r in report.layers}["fc2"] == 1


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(torch.flatten(F.relu(self.conv(x)), 1))))


def test_flatten_into_linear_drops_whole_channel_blocks() -> None:
    small, _ = run_case(FlattenLinear(), torch.randn(2, 3, 6, 6), {"conv": keep_of(6, [0, 4]), "fc": keep_of(10, [3])}, {})
    assert (small.conv.out_channels, small.fc.in_features, small.fc.out_features, small.out.in_features) == (4, 64, 9, 9)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        return self.head(F.relu(self.shared(F.relu(self.shared(x)))))


def test_module_called_twice_removes_a_channel_only_when_both_calls_allow_it() -> None:
    small, _ = run_case(CalledTwice(), torch.randn(2, 3, 6, 6), {"a": keep_of(6, [0, 2]), "shared": keep_of(6, [2, 4])}, {})
    # channel 2 is dead on both of shared's inputs; channel 0 is live on the second call, channel 4 on the first
    assert (small.a.out_channels, small.shared.in_channels, small.shared.out_channels) == (5, 5, 5)


def test_layer_with_every_channel_masked_keeps_one_and_says_so() -> None:
    small, report = run_case(Concat(), torch.randn(2, 3, 9, 9), {"a": keep_of(4, [0, 1, 2, 3])}, {})
    assert small.a.out_channels == 1 and small.c.in_channels == 7
    assert any("every output channel is masked" in n for n in report.notes)


def test_round_to_keeps_widths_multiples_of_n() -> None:
    small, _ = run_case(Residual(), torch.randn(2, 3, 10, 10), {"a": keep_of(8, [0, 1, 2]), "b": keep_of(8, [0, 1, 2])},
                        {"a": "bn_a", "b": "bn_b"}, round_to=4)  # fmt: skip
    assert small.a.out_channels == 8  # 5 kept rounds up to 8
    small, _ = run_case(Residual(), torch.randn(2, 3, 10, 10), {"a": keep_of(8, [0, 1, 2, 3, 4]), "b": keep_of(8, [0, 1, 2, 3, 4])},
                        {"a": "bn_a", "b": "bn_b"}, round_to=2)  # fmt: skip
    assert small.a.out_channels == 4 and small.c.in_channels == 4


def test_layernorm_over_the_pruned_dimension_keeps_it() -> None:
    """Removing channels a LayerNorm spans would change its statistics: speedup keeps them (zeroed)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.norm(self.fc1(x)))

    model = Block().eval()
    small, report = run_case(model, torch.randn(5, 4), {"fc1": keep_of(8, [1, 2])}, {})
    assert small.fc1.out_features == 8 and small.norm.normalized_shape == (8,)
    assert {r.name: r.kept_masked for r in report.layers}["fc1"] == 2


def test_masked_model_is_the_users_masked_model_and_caller_model_is_untouched() -> None:
    model = randomize_norms(Residual())
    before = copy.deepcopy(model.state_dict())
    keeps = {"a": keep_of(8, [0, 6]), "b": keep_of(8, [6])}
    masks = {n: channel_mask(getattr(model, n), k) for n, k in keeps.items()}
    x = torch.randn(2, 3, 10, 10)
    reference = masked_model(model, masks, x)
    assert max_rel_error(user_masked(model, masks)(x), reference(x)) == 0.0
    assert torch.equal(reference.bn_a.bias, model.bn_a.bias)  # nothing but the named tensors changes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = speedup_with_report(model, masks, x)
    assert max_rel_error(user_masked(model, masks)(x), small(x)) < TOL
    assert report.relative_error is not None and report.relative_error < TOL
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_float_masks_from_nni_are_accepted() -> None:
    model = randomize_norms(Residual())
    keep = keep_of(8, [3, 4])
    masks = {n: {k: v.float() for k, v in channel_mask(getattr(model, n), keep).items()} for n in ("a", "b")}
    masks |= {n: {"weight": keep.float(), "bias": keep.float()} for n in ("bn_a", "bn_b")}
    x = torch.randn(1, 3, 10, 10)
    small = speedup(model, masks, x)
    assert small.c.in_channels == 6
    assert max_rel_error(user_masked(model, masks)(x), small(x)) < TOL


def test_conv_only_masks_keep_channels_a_batchnorm_bias_makes_non_zero_and_name_why() -> None:
    """The issue's case: masks on the convs only; BatchNorm beta keeps the channels alive in the masked model."""
    model = randomize_norms(Residual())
    with torch.no_grad():
        model.bn_a.bias[[3, 4]] = 1.0  # beta after fine-tuning: the masked channels are 1.0 - gamma * mean / std
    keep = keep_of(8, [3, 4])
    masks = {n: channel_mask(getattr(model, n), keep) for n in ("a", "b")}
    x = torch.randn(2, 3, 10, 10)
    expected = user_masked(model, masks)(x)
    with pytest.warns(SpeedupWarning, match=r"a keeps 2 \(not zero in the masked model \(bn_a\.\w+ is non-zero"):
        small, report = speedup_with_report(model, masks, x)
    assert small.c.in_channels == 8 and max_rel_error(expected, small(x)) < TOL
    layer = {r.name: r for r in report.layers}
    assert layer["a"].kept_masked == 2 and sum(layer["a"].kept_reasons.values()) == 2
    assert "why kept" in report.to_markdown() and "bn_a" in report.to_markdown()
    # the option that trades exactness for size: removed, and the change measured and noted
    small, report = speedup_with_report(model, masks, x, masked_constants="prune")
    assert small.c.in_channels == 6
    measured = max_rel_error(expected, small(x))
    assert measured > 1e-3 and report.relative_error == pytest.approx(measured, rel=1e-3)
    assert set(report.constants_dropped) == {"bn_a.bias", "bn_a.weight", "bn_b.bias", "bn_b.weight"}
    assert any("masked_constants='prune'" in n for n in report.notes)
    with pytest.raises(ValueError, match="masked_constants"):
        speedup(model, masks, x, masked_constants="drop")


class Exploding(Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("traced before the masks were checked")


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({"nope": {"weight": torch.ones(8, 3, 3, 3)}}, "'nope'"),
        ({"a": {"weight": torch.ones(8, 3, 1, 1)}}, "shape"),
        ({"a": {"weight": torch.full((8, 3, 3, 3), 0.5)}}, "only 0 and 1"),
        ({"a": {"kernel": torch.ones(8, 3, 3, 3)}}, "no tensor 'kernel'"),
        ({"a": [1, 2]}, "must be a dict"),
        ({"a": {"weight": [[1.0]]}}, "must be a tensor"),
    ],
)
def test_bad_masks_fail_before_tracing(masks: dict, message: str) -> None:
    with pytest.raises(MaskError, match=message):
        speedup(Exploding(), masks, torch.randn(1, 3, 10, 10))


def test_bad_round_to_is_rejected() -> None:
    with pytest.raises(ValueError, match="round_to"):
        speedup(Residual(), {}, torch.randn(1, 3, 8, 8), round_to=0)


def test_masks_from_our_l1_pruner_on_a_still_wrapped_model() -> None:
    from deploycompress.pruning import L1NormPruner

    model = randomize_norms(Residual())
    x = torch.randn(2, 3, 10, 10)
    pruner = L1NormPruner(model, [{"op_types": ["Conv2d"], "sparsity": 0.5}], dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()  # the model now computes its weights through mask parametrizations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = speedup_with_report(model, masks, x)
    assert small.a.out_channels == small.b.out_channels == small.c.in_channels == 4
    assert small.c.out_channels == 5 and {r.name: r.kept_masked for r in report.layers}["c"] == 2  # the model output
    assert max_rel_error(user_masked(pruner.unwrap_model(), masks)(x), small(x)) < TOL
