"""Speedup is exact against the user's masked model; what a pruner masks is what speedup removes.

Every expected value here comes from ``user_masked``: an eval copy of the model with each mask
multiplied into exactly the tensor it names, built in the test (never ``masked_model``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from deploycompress.pruning import L1NormPruner, SlimPruner
from deploycompress.speedup import SpeedupWarning, joined_masks, speedup_with_report
from test_speedup_cases import channel_mask, max_rel_error, single_thread, user_masked  # noqa: F401

TOL = 1e-4  # the promise: max |diff| <= 1e-4 x max |output|


def shrink(model: nn.Module, masks: dict, x: torch.Tensor, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpeedupWarning)
        small, report = speedup_with_report(model, masks, x, **kw)
    with torch.no_grad():
        measured = max_rel_error(user_masked(model, masks)(x), small(x))
    return small, report, measured


def reasons(report) -> dict[str, dict[str, int]]:
    return {r.name: r.kept_reasons for r in report.layers if r.kept_reasons}


def keep_of(n: int, drop: list[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[drop] = False
    return keep


def conv_bn(affine: bool = True, track: bool = True, c: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3), nn.BatchNorm2d(c, affine=affine, track_running_stats=track), nn.ReLU(), nn.Conv2d(c, 8, 3))


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # zero-initialised: outputs would hide every error
    return vit.eval()


# ------------------------------------------------------------------ the four cases


@pytest.mark.parametrize("op_types", [["Conv2d"], ["Conv2d", "Linear"]])
def test_vit_l1_not_dependency_aware_is_exact(op_types) -> None:
    model, x = small_vit(), torch.randn(2, 3, 32, 32)
    pruner = L1NormPruner(model, [{"op_types": op_types, "sparsity": 0.37}, {"exclude": True, "op_names": ["heads.head"]}])
    with pytest.warns(UserWarning, match="no dummy_input"):
        _, masks = pruner.compress()
    model = pruner.unwrap_model()
    small, report, measured = shrink(model, masks, x)
    assert measured < TOL and report.relative_error == pytest.approx(measured, abs=1e-6)
    conv = {r.name: r for r in report.layers}["conv_proj"]
    assert conv.masked_out == 23 and conv.kept_masked == 23  # floor(0.37 * 64)  # the stream: class token, position embedding, LayerNorms
    assert sum(conv.kept_reasons.values()) == 23
    assert any("class_token" in why or "pos_embedding" in why or "layer_norm" in why for why in conv.kept_reasons)


def test_conv_bn_fine_tuned_with_masks_attached_is_exact_and_joined_masks_make_it_removable() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    for dummy in (None, x):
        model = conv_bn()
        with torch.no_grad():
            model[1].bias.uniform_(0.1, 0.3)  # a trained BatchNorm: beta is not zero
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = L1NormPruner(model, [{"op_names": ["0"], "sparsity": 0.5}], dummy_input=dummy)
            _, masks = pruner.compress()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.train()
        for _ in range(5):  # the BatchNorm beta of masked channels drifts away from 0 unless masked too
            loss = (model(torch.randn(8, 3, 16, 16)) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model = pruner.unwrap_model().eval()
        small, report, measured = shrink(model, masks, x)
        assert measured < TOL
        if dummy is None:
            assert set(masks) == {"0"} and float(model[1].bias.detach()[~masks["0"]["bias"]].abs().max()) > 1e-3
            assert small[0].out_channels == 16  # not zero in the masked model: kept, and said why
            assert any("1.bias is non-zero" in why for why in reasons(report)["0"])
        else:
            assert set(masks) == {"0", "1"} and torch.equal(masks["1"]["weight"], masks["0"]["bias"])
            assert small[0].out_channels == 8 and small[3].in_channels == 8 and report.layers[0].kept_masked == 0


def test_affine_free_batchnorm_with_non_zero_running_mean_keeps_the_channel() -> None:
    torch.manual_seed(0)
    model, x = conv_bn(affine=False).eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1.0, -0.5)  # (0 - mean) / std > 0 passes the ReLU
    masks = {"0": channel_mask(model[0], keep_of(16, [1, 5, 9]))}
    small, report, measured = shrink(model, masks, x)
    assert measured < TOL and small[0].out_channels == 16
    assert any("1.running_mean is non-zero" in why for why in reasons(report)["0"])
    # the option trading exactness for size: removed, and the change measured
    small, report, measured = shrink(model, masks, x, masked_constants="prune")
    assert small[0].out_channels == 13 and measured > 1e-3
    assert report.constants_dropped == ["1.running_mean"] and report.relative_error == pytest.approx(measured, rel=1e-3)


@pytest.mark.parametrize("dummy", [False, True])
def test_slim_pruner_norm_masks_are_realised(dummy) -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 3)).eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model[1].weight.uniform_(0.1, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = SlimPruner(model, [{"op_types": ["BatchNorm2d"], "sparsity": 0.5}], dummy_input=x if dummy else None)
        _, masks = pruner.compress()
    model = pruner.unwrap_model()
    small, report, measured = shrink(model, masks, x)
    assert measured < TOL
    assert small[0].out_channels == 4 and small[1].num_features == 4 and small[3].in_channels == 4
    assert report.params_before == 386 and report.params_after == 386 - 4 * (27 + 1) - 4 * 2 - 2 * 4 * 9
    if dummy:  # the filters feeding the pruned norm channels are masked too, and the report counts them
        assert set(masks) == {"0", "1"} and {r.name: r.masked_out for r in report.layers}["0"] == 4


# ------------------------------------------------------------------ norms, biases


@pytest.mark.parametrize(("affine", "track"), [(True, True), (True, False), (False, True), (False, False)])
def test_batchnorm_variants_exact_with_conv_masks_and_removed_with_joined_masks(affine, track) -> None:
    torch.manual_seed(0)
    model, x = conv_bn(affine, track).eval(), torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        if affine:
            model[1].bias.uniform_(0.2, 0.5)
        if track:
            model[1].running_mean.uniform_(-0.5, 0.5)
    masks = {"0": channel_mask(model[0], keep_of(16, [0, 3, 4, 10]))}
    small, _, measured = shrink(model, masks, x)
    assert measured < TOL
    joined = joined_masks(model, masks, x)
    assert ("1" in joined) == affine  # parameters are masked; running statistics never are
    small, _, measured = shrink(model, joined, x)
    assert measured < TOL
    # removable exactly when the masked model makes the channel zero: affine (masked weight and bias),
    # or batch statistics (a zero channel has mean 0), not an affine-free norm with a running mean
    assert small[0].out_channels == (16 if (not affine and track) else 12)


def test_groupnorm_keeps_the_channels_it_normalises_and_says_so() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 10, 10)
    masks = {"0": channel_mask(model[0], keep_of(8, [0, 1]))}
    small, report, measured = shrink(model, masks, x)
    assert measured < TOL and small[0].out_channels == 8
    assert any("group_norm normalises over them in '1'" in why for why in reasons(report)["0"])


def test_bias_only_mask_is_honoured_exactly() -> None:
    torch.manual_seed(0)
    model, x = conv_bn().eval(), torch.randn(2, 3, 12, 12)
    masks = {"0": {"bias": keep_of(16, [2, 7])}, "3": {"bias": keep_of(8, [0])}}
    with torch.no_grad():
        model[0].bias.uniform_(0.5, 1.0)
    small, report, measured = shrink(model, masks, x)
    assert measured < TOL and report.params_after == report.params_before
    assert max_rel_error(model(x), small(x)) > 1e-3  # the masks did change the function: the oracle is not the dense model


def test_swin_and_vit_with_conv_only_masks_are_exact() -> None:
    from test_speedup_zoo import build

    for name in ("vit", "swin"):
        model, x = build(name)
        conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        out = dict(model.named_modules())[conv].out_channels
        masks = {conv: channel_mask(dict(model.named_modules())[conv], keep_of(out, list(range(0, out, 3))))}
        _, report, measured = shrink(model, masks, x)
        assert measured < TOL, name
        assert sum(report.layers[0].kept_reasons.values()) == report.layers[0].kept_masked


def test_warning_names_layers_and_unknown_ops() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.logcumsumexp(self.a(x), dim=2))

    model, x = Odd().eval(), torch.randn(1, 3, 5, 5)
    masks = {"a": channel_mask(model.a, keep_of(6, [0, 1]))}
    with pytest.warns(SpeedupWarning) as caught:
        small, report = speedup_with_report(model, masks, x)
    text = " ".join(str(w.message) for w in caught)
    assert "a keeps 2" in text and "logcumsumexp" in text
    assert report.unknown_ops == ["logcumsumexp"]
    assert reasons(report)["a"] == {"op 'logcumsumexp' has no channel rule": 2}
    assert max_rel_error(user_masked(model, masks)(x), small(x)) < TOL


def test_pruner_masks_list_joined_tensors_in_saved_masks_and_warn_when_tracing_fails(tmp_path) -> None:
    from deploycompress.pruning import load_masks
    from deploycompress.pruning.channel import PruningWarning

    torch.manual_seed(0)
    model, x = conv_bn(), torch.randn(2, 3, 12, 12)
    pruner = L1NormPruner(model, [{"op_names": ["0"], "sparsity": 0.25}], dummy_input=x)
    _, masks = pruner.compress()
    pruner.export_model(tmp_path / "model.pt", tmp_path / "masks.pt")
    loaded = load_masks(tmp_path / "masks.pt", conv_bn())
    assert set(loaded) == {"0", "1"} and torch.equal(loaded["1"]["bias"], masks["0"]["bias"])
    pruner = L1NormPruner(conv_bn(), [{"op_names": ["0"], "sparsity": 0.25}], dummy_input=torch.randn(2, 5, 12, 12))
    with pytest.warns(PruningWarning, match="could not trace the model on dummy_input"):
        _, masks = pruner.compress()
    assert set(masks) == {"0"}
