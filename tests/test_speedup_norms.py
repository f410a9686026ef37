"""norm_spans="prune": channels a LayerNorm/RMSNorm/GroupNorm normalises over are removed and the norm narrowed.

The shrunk model is then no longer the masked model, so each case is checked against an oracle
built by hand from the dense weights: slice the kept channels, normalise over them alone with the
sliced affine tensors, read them with the sliced consumer.
"""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt, LayerNorm2d

from deploycompress.graph import trace_channels
from deploycompress.pruning import L1NormPruner
from deploycompress.speedup import joined_masks, masked_model, speedup, speedup_with_report
from test_speedup_cases import channel_mask, max_rel_error, single_thread, user_masked  # noqa: F401
from test_speedup_zoo import small_transformer

TOL = 1e-5


def keep_of(n: int, drop: list[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[drop] = False
    return keep


def randomize_affine(model: nn.Module) -> nn.Module:
    """Norm affine tensors away from (1, 0), so a wrongly sliced gamma or beta shows in the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def run(model: nn.Module, x: torch.Tensor, masks: dict, mode: str, constants: str = "keep"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, report = speedup_with_report(model, masks, x, norm_spans=mode, masked_constants=constants)
    return small, report, [str(w.message) for w in caught]


class LinearNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.a, self.norm, self.c = nn.Linear(8, 16), norm, nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.norm(self.a(x)))


class ConvNorm(nn.Module):
    def __init__(self, norm: nn.Module, width: int) -> None:
        super().__init__()
        self.a, self.norm, self.c = nn.Conv2d(3, width, 3, padding=1), norm, nn.Conv2d(width, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.norm(self.a(x))))


def oracle(model: nn.Module, x: torch.Tensor, masked: torch.Tensor, kept: torch.Tensor, norm: Callable) -> torch.Tensor:
    """Producer rows ``~masked`` zeroed, channels ``kept`` sliced, ``norm(h, weight, bias)`` over them, consumer sliced."""
    a, n, c = model.a, model.norm, model.c
    with torch.no_grad():
        w, b = a.weight * masked.view([-1] + [1] * (a.weight.dim() - 1)), a.bias * masked
        bias = n.bias[kept] if getattr(n, "bias", None) is not None else None
        if isinstance(a, nn.Linear):
            h = norm(F.linear(x, w[kept], b[kept]), n.weight[kept], bias)
            return F.linear(h, c.weight[:, kept], c.bias)
        h = norm(F.conv2d(x, w[kept], b[kept], padding=1), n.weight[kept], bias)
        return F.conv2d(F.relu(h), c.weight[:, kept], c.bias)


def masks_for(model: nn.Module, keep: torch.Tensor) -> dict:
    return {"a": channel_mask(model.a, keep)}


LINEAR_NORMS = {
    "layer_norm": (lambda: nn.LayerNorm(16), lambda h, w, b: F.layer_norm(h, (w.numel(),), w, b)),
    "rms_norm": (lambda: nn.RMSNorm(16, eps=1e-6), lambda h, w, b: F.rms_norm(h, (w.numel(),), w, 1e-6)),
}


@pytest.mark.parametrize("kind", sorted(LINEAR_NORMS))
def test_linear_norm_linear(kind: str) -> None:
    make, norm = LINEAR_NORMS[kind]
    torch.manual_seed(0)
    model, x = randomize_affine(LinearNorm(make())), torch.randn(5, 8)
    keep = keep_of(16, [0, 3, 5, 8, 9, 15])
    small, report, warned = run(model, x, masks_for(model, keep), "prune")
    assert small.norm.normalized_shape == (10,) and small.norm.weight.shape == (10,)
    assert (small.a.out_features, small.c.in_features) == (10, 10)
    if kind == "layer_norm":
        assert small.norm.bias.shape == (10,)
    assert max_rel_error(oracle(model, x, keep, keep, norm), small(x)) < TOL
    assert report.norms_changed == ["norm"]
    assert any("1 norms now normalise over fewer channels (norm)" in n for n in report.notes), report.notes
    # the generic error warning stays off; the narrowed norms' own NormsChangedWarning carries the measured error
    assert not any("outputs differ" in w and "normalise over fewer channels" not in w for w in warned)
    assert any("1 norms now normalise over fewer channels (norm)" in w for w in warned), warned
    # the masked model's LN statistics include the six zero channels: the shrunk model is measurably different
    assert report.relative_error is not None and report.relative_error > 1e-3

    small, report, _ = run(model, x, masks_for(model, keep), "keep")
    assert small.norm.normalized_shape == (16,) and small.a.out_features == 16 and report.norms_changed == []
    assert max_rel_error(oracle(model, x, keep, torch.ones(16, dtype=torch.bool), norm), small(x)) < TOL


def test_conv_layernorm2d_conv() -> None:
    torch.manual_seed(0)
    model, x = randomize_affine(ConvNorm(LayerNorm2d(12), 12)), torch.randn(2, 3, 8, 8)
    keep = keep_of(12, [1, 2, 7, 11])

    def ln2d(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h.permute(0, 2, 3, 1), (w.numel(),), w, b, model.norm.eps).permute(0, 3, 1, 2)

    small, report, _ = run(model, x, masks_for(model, keep), "prune")
    assert small.norm.normalized_shape == (8,) and small.norm.weight.shape == small.norm.bias.shape == (8,)
    assert (small.a.out_channels, small.c.in_channels) == (8, 8)
    assert max_rel_error(oracle(model, x, keep, keep, ln2d), small(x)) < TOL
    assert report.norms_changed == ["norm"]
    _, unverified = speedup_with_report(model, masks_for(model, keep), x, norm_spans="prune", verify=False)
    assert unverified.max_abs_error is None and unverified.norms_changed == ["norm"]
    assert "(not measured: verify=False)" in unverified.notes[-1]

    small, report, _ = run(model, x, masks_for(model, keep), "keep")
    assert small.norm.normalized_shape == (12,) and small.a.out_channels == 12
    assert max_rel_error(oracle(model, x, keep, torch.ones(12, dtype=torch.bool), ln2d), small(x)) < TOL


def group_norm_model() -> ConvNorm:
    torch.manual_seed(0)
    return randomize_affine(ConvNorm(nn.GroupNorm(3, 12), 12))


def gn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.group_norm(h, 3, w, b)


def test_group_norm_balanced_per_group() -> None:
    model, x = group_norm_model(), torch.randn(2, 3, 8, 8)
    keep = keep_of(12, [0, 5, 6, 9])  # groups of 4: one from the first, two from the second, one from the third
    small, report, _ = run(model, x, masks_for(model, keep), "prune")
    # equal counts per group: the second group keeps its first masked channel (5) back, zeroed
    kept = keep_of(12, [0, 6, 9])
    assert (small.norm.num_channels, small.norm.num_groups, small.norm.weight.shape[0]) == (9, 3, 9)
    assert (small.a.out_channels, small.c.in_channels) == (9, 9)
    assert max_rel_error(oracle(model, x, keep, kept, gn), small(x)) < TOL
    assert report.norms_changed == ["norm"] and any("groups:norm" in n for n in report.notes)


def test_group_norm_unequal_counts_keep_everything() -> None:
    """A group that loses nothing holds every group at full width: prune mode equals keep mode exactly."""
    model, x = group_norm_model(), torch.randn(2, 3, 8, 8)
    masks = masks_for(model, keep_of(12, [0, 1, 5]))
    pruned, report, warned = run(model, x, masks, "prune")
    kept, _, _ = run(model, x, masks, "keep")
    assert pruned.norm.num_channels == 12 and report.norms_changed == []
    assert report.max_abs_error == 0.0
    assert_same_model(pruned, kept)


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def tiny_convnext() -> ConvNeXt:
    torch.manual_seed(0)
    return randomize_affine(ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10))


@pytest.fixture(scope="module")
def convnext_l1() -> tuple[nn.Module, dict, torch.Tensor]:
    """Dependency-aware L1 at 0.5 on every Conv2d and hidden Linear, the classifier excluded (as in the zoo bench)."""
    model, x = tiny_convnext(), torch.randn(1, 3, 32, 32)
    config = [{"op_types": ["Conv2d", "Linear"], "sparsity": 0.5}, {"exclude": True, "op_names": ["classifier.2"]}]
    pruner = L1NormPruner(model, config, dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    return pruner.unwrap_model(), masks, x


def next_layer_widths(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Per LayerNorm: (its width, the input width of the Conv/Linear that runs next)."""
    order: list[tuple[str, nn.Module]] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: order.append((n, m)))
        for n, m in model.named_modules()
        if isinstance(m, (nn.LayerNorm, nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    widths = {}
    for i, (name, m) in enumerate(order):
        if isinstance(m, nn.LayerNorm):
            nxt = next(m2 for _, m2 in order[i + 1 :] if not isinstance(m2, nn.LayerNorm))
            widths[name] = (m.normalized_shape[0], nxt.in_features if isinstance(nxt, nn.Linear) else nxt.in_channels)
            assert m.weight.numel() == m.bias.numel() == m.normalized_shape[0], name
    return widths


def test_convnext_prune_norm_spans(convnext_l1) -> None:  # noqa: ANN001
    model, masks, x = convnext_l1
    small, report, warned = run(model, x, masks, "prune")
    with torch.no_grad():
        assert small(x).shape == model(x).shape == (1, 10)
    # measured: 0.312 (keep: 0.681); every residual-stream width and hidden MLP width halves
    assert report.params_ratio < 0.40, report.to_markdown()
    assert sum(p.numel() for p in small.parameters()) == report.params_after
    norms = sorted(n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm))
    assert sorted(report.norms_changed) == norms and len(norms) == 5
    widths = next_layer_widths(small, x)
    assert sorted(widths) == norms
    assert all(w == nxt for w, nxt in widths.values()), widths
    assert widths["features.0.1"][0] == 8 and widths["classifier.0"][0] == 16
    assert report.relative_error is not None
    assert not any(("outputs differ" in w and "normalise over fewer channels" not in w) or "kept" in w for w in warned)


def test_convnext_keep_norm_spans(convnext_l1) -> None:  # noqa: ANN001
    model, masks, x = convnext_l1
    small, report, _ = run(model, x, masks, "keep")
    assert report.params_ratio > 0.45 and report.norms_changed == []
    assert report.relative_error is not None and report.relative_error < 1e-4
    assert all(w == nxt for w, nxt in next_layer_widths(small, x).values())


def test_prune_without_norm_widths_equals_keep(convnext_l1) -> None:  # noqa: ANN001
    """Masks on the hidden MLP widths only: no norm narrows, so prune mode must build the keep model exactly."""
    _, masks, x = convnext_l1
    model = tiny_convnext()  # the pruner's model has every masked weight zeroed already
    hidden = {n: m for n, m in masks.items() if n.endswith("block.3")}
    assert len(hidden) == 2
    pruned, report, _ = run(model, x, hidden, "prune")
    kept, keep_report, _ = run(model, x, hidden, "keep")
    assert report.norms_changed == [] and report.params_after == keep_report.params_after < report.params_before
    assert report.max_abs_error == keep_report.max_abs_error
    assert_same_model(pruned, kept)


def test_swin_attention_follows_a_narrower_stream() -> None:
    """Swin's attention derives ``C // num_heads`` from its input; speedup gives it ``head_dim`` instead,
    so with "prune" the normalised stream after the patch merging shrinks and the model still runs."""
    torch.manual_seed(0)
    model, x = small_transformer("swin").eval(), torch.randn(1, 3, 32, 32)
    config = [{"op_types": ["Linear"], "sparsity": 0.5}, {"exclude": True, "op_names": ["head"]}]
    pruner = L1NormPruner(model, config, dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    model = pruner.unwrap_model()
    pruned, report, _ = run(model, x, masks, "prune")
    kept, keep_report, _ = run(model, x, masks, "keep")
    assert "features.3.0.norm1" in report.norms_changed and report.params_after < keep_report.params_after
    attn = pruned.features[3][0].attn
    assert attn.head_dim == 16 and attn.qkv.out_features == 3 * 16 * attn.num_heads  # whole heads, whatever the masks removed
    assert attn.qkv.in_features == pruned.features[3][0].norm1.weight.numel() < 32
    assert report.max_abs_error is not None  # it ran on the example input; LayerNorm statistics changed, so no bound


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model ran")


@pytest.mark.parametrize("call", [speedup, speedup_with_report, masked_model, trace_channels])
def test_bad_norm_spans_fails_before_tracing(call: Callable) -> None:
    args = (Exploding(), torch.randn(1, 4)) if call is trace_channels else (Exploding(), {}, torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"norm_spans must be one of 'keep', 'prune', got 'drop'"):
        call(*args, norm_spans="drop")


def test_vit_prune_norm_spans_narrows_the_residual_stream() -> None:
    """With the stream's producers masked together (conv_proj, out_proj, mlp.3), "prune" narrows every
    LayerNorm, the class token, the position embedding, each attention's embed dim and ``hidden_dim``."""
    torch.manual_seed(0)
    model, x = small_transformer("vit"), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)  # torchvision zero-initialises it: outputs would hide every error
    model.eval()
    config = [
        {"op_types": ["Conv2d", "Linear"], "sparsity": 0.5},  # Linear selects out_proj too
        {"exclude": True, "op_names": ["heads.head"]},
    ]
    pruner = L1NormPruner(model, config, dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    model = pruner.unwrap_model()
    # the pruner's joined masks follow norm_spans="keep" (the stream is pinned there): dropping the class
    # token's and position embedding's entries of the stream is the second explicit trade
    pruned, report, _ = run(model, x, masks, "prune", "prune")
    assert report.constants_dropped and any("masked_constants='prune'" in n for n in report.notes)
    kept, keep_report, _ = run(model, x, masks, "keep")
    assert keep_report.norms_changed == [] and kept.hidden_dim == 32
    assert pruned.hidden_dim == 16 and pruned.conv_proj.out_channels == 16
    assert pruned.class_token.shape == (1, 1, 16) and pruned.encoder.pos_embedding.shape == (1, 17, 16)
    assert len(report.norms_changed) == 5  # ln_1, ln_2 of two layers and the final ln
    attn = pruned.encoder.layers[0].self_attention
    assert attn.in_proj_weight.shape[1] == 16 and attn.out_proj.out_features == 16
    # measured 0.420 (keep: 0.828): MLP hidden widths and the stream both halve
    assert report.params_ratio < 0.5 < 0.8 < keep_report.params_ratio
    assert pruned(x).shape == (2, 10)


class HardCodedWidth(nn.Module):
    """A forward that turns the normalised width into a shape: narrowing it would break the reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.c = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.a(x))
        return self.c(y.reshape(y.shape[0], 16, 1).squeeze(-1))


class ReadsWidth(HardCodedWidth):
    """Reads the width but computes a shape that follows it: narrowing is harmless."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.a(x))
        return self.c(y.reshape(y.shape[0], y.shape[-1], 1).squeeze(-1))


def test_width_read_by_code_is_kept_only_when_narrowing_breaks_the_model() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    masks = {"a": channel_mask(HardCodedWidth().a, keep_of(16, [0, 1, 2, 3, 4, 5]))}
    broken = HardCodedWidth().eval()
    small, report, _ = run(broken, x, masks, "prune")
    assert small.norm.normalized_shape == (16,) and report.norms_changed == []
    assert any("read by the model's Python code" in n for n in report.notes)
    assert report.relative_error is not None and report.relative_error < 1e-5  # nothing narrowed: the masked model


def test_position_embedding_keeps_channels_unless_masked_too() -> None:
    """conv -> + per-channel position parameter -> conv: with the conv masked alone, the channels are the
    position parameter in the user's masked model, so they stay (exact); with the joined masks
    (``joined_masks``: the parameter's entries masked too) they go, exactly."""

    class PosNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
            self.pos = nn.Parameter(torch.randn(1, 8, 6, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x) + self.pos))

    torch.manual_seed(0)
    model, x = PosNet().eval(), torch.randn(2, 3, 6, 6)
    drop = [1, 4, 6]
    masks = {"a": channel_mask(model.a, keep_of(8, drop))}
    small, report, _ = run(model, x, masks, "keep")
    assert small.a.out_channels == 8 and max_rel_error(user_masked(model, masks)(x), small(x)) < TOL
    assert {r.name: r.kept_masked for r in report.layers}["a"] == 3
    assert "pos is non-zero" in next(iter({r.name: r for r in report.layers}["a"].kept_reasons))
    masks = joined_masks(model, masks, x)
    assert set(masks) == {"a", ""} and torch.equal(masks[""]["pos"][0, :, 0, 0], keep_of(8, drop))
    small, report, _ = run(model, x, masks, "keep")
    assert small.a.out_channels == 5 and small.pos.shape == (1, 5, 6, 6) and small.b.in_channels == 5
    oracle = PosNet().eval()
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        for t in (oracle.a.weight, oracle.a.bias, oracle.pos[0]):
            t[drop] = 0
    assert max_rel_error(oracle(x), small(x)) < TOL
    assert model.pos.abs().min() > 0  # the caller's model is untouched


def test_width_read_that_follows_the_narrowing_is_harmless() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    model = ReadsWidth().eval()
    masks = {"a": channel_mask(model.a, keep_of(16, [0, 1, 2, 3, 4, 5]))}
    small, report, _ = run(model, x, masks, "prune")
    assert small.norm.normalized_shape == (10,) and report.norms_changed == ["norm"]
    assert not any("read by the model's Python code" in n for n in report.notes)
