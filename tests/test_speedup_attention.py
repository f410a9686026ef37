"""Attention heads as channel classes: nn.MultiheadAttention, torchvision ViT and Swin V1/V2."""

from __future__ import annotations

import warnings

import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from deploycompress.config import ConfigError
from deploycompress.export import to_onnx
from deploycompress.graph import build_channel_groups
from deploycompress.pruning import ActivationMeanRankPruner, L1NormPruner
from deploycompress.speedup import joined_masks, speedup_with_report
from deploycompress.speedup.attention import PrunedMultiheadAttention
from test_speedup_cases import max_rel_error, randomize_norms, single_thread, user_masked  # noqa: F401

TOL = 1e-5


def head_rows(num_heads: int, head_dim: int, drop: list[int], parts: tuple[int, ...] = (0, 1, 2)) -> torch.Tensor:
    """Keep flags over the 3 * heads * head_dim rows of a packed q/k/v projection, dropping heads ``drop`` in ``parts``."""
    keep = torch.ones(3, num_heads, head_dim, dtype=torch.bool)
    for p in parts:
        keep[p, drop] = False
    return keep.reshape(-1)


def row_masks(weight: torch.Tensor, keep: torch.Tensor, w_attr: str = "weight", b_attr: str = "bias") -> dict:
    return {w_attr: keep.view(-1, 1).expand_as(weight).clone(), b_attr: keep.clone()}


def run(model: nn.Module, masks: dict, *inputs: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = speedup_with_report(model, masks, inputs)
        with torch.no_grad():
            expected, actual = user_masked(model, masks)(*inputs), small(*inputs)
    for e, a in zip(tree_flatten(expected)[0], tree_flatten(actual)[0]):
        assert max_rel_error(e, a) < TOL
    assert sum(p.numel() for p in small.parameters()) == report.params_after
    return small, report


class AttnNet(nn.Module):
    """Linear -> MultiheadAttention (E=16, 4 heads of 4) -> Linear, on (N, L, 6) inputs."""

    def __init__(self, batch_first: bool, weights: str = "none") -> None:
        super().__init__()
        self.batch_first, self.weights = batch_first, weights
        self.inp, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x if self.batch_first else x.transpose(0, 1))
        out, weights = self.attn(h, h, h, need_weights=self.weights != "none", average_attn_weights=self.weights != "per_head")
        out = self.head(out if self.batch_first else out.transpose(0, 1))
        return (out, weights) if self.weights == "per_head" else out


def attn_net(batch_first: bool = True, **kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return AttnNet(batch_first, **kw).eval(), torch.randn(2, 5, 6)


MHA_PARAMS = 3 * 16 * 17 + 16 * 17  # in_proj + out_proj


@pytest.mark.parametrize("batch_first", [True, False])
def test_zero_value_rows_remove_the_head(batch_first: bool) -> None:
    model, x = attn_net(batch_first)
    masks = {"attn": row_masks(model.attn.in_proj_weight, head_rows(4, 4, [1], parts=(2,)), "in_proj_weight", "in_proj_bias")}
    small, report = run(model, masks, x)
    attn = small.attn
    assert isinstance(attn, PrunedMultiheadAttention) and (attn.num_heads, attn.head_dim, attn.kept_heads) == (3, 4, [0, 2, 3])
    assert attn.in_proj_weight.shape == (36, 16) and attn.out_proj.in_features == 12
    assert report.params_before - report.params_after == 12 * 17 + 4 * 16  # a head's q/k/v rows and out_proj columns
    layer = {r.name: r for r in report.layers}["attn"]
    assert (layer.out_before, layer.out_after, layer.masked_out, layer.kept_masked) == (48, 36, 4, 0)
    # and again on the pruned model: the rule follows PrunedMultiheadAttention and maps heads to the first model's
    smaller, _ = run(small, {"attn.out_proj": {"weight": torch.arange(12).repeat(16, 1) >= 4}}, x)
    assert smaller.attn.kept_heads == [2, 3]


def test_zero_query_rows_keep_the_head() -> None:
    model, x = attn_net()
    masks = {"attn": row_masks(model.attn.in_proj_weight, head_rows(4, 4, [2], parts=(0,)), "in_proj_weight", "in_proj_bias")}
    small, report = run(model, masks, x)
    assert isinstance(small.attn, nn.MultiheadAttention) and report.params_after == report.params_before


def test_zero_out_proj_columns_remove_the_head() -> None:
    model, x = attn_net(weights="averaged")
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[:, 8:12] = False  # out_proj reads nothing of head 2
    small, report = run(model, {"attn.out_proj": {"weight": keep}}, x)
    assert small.attn.kept_heads == [0, 1, 3]
    assert report.params_before - report.params_after == 12 * 17 + 4 * 16


def test_per_head_weights_reaching_the_output_keep_the_heads() -> None:
    model, x = attn_net(weights="per_head")
    masks = {"attn": row_masks(model.attn.in_proj_weight, head_rows(4, 4, [1]), "in_proj_weight", "in_proj_bias")}
    small, report = run(model, masks, x)
    assert report.params_after == report.params_before


class CrossAttn(nn.Module):
    """Query and key/value from different Linears of one width: the in-projection's columns read both."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(6, 16), nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kv = self.kv(y)
        return self.attn(self.q(x), kv, kv, need_weights=False)[0]


@pytest.mark.parametrize("masked", [("q",), ("q", "kv")])
def test_cross_attention_columns_go_when_query_and_key_are_zero(masked: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model, x, y = CrossAttn().eval(), torch.randn(2, 5, 6), torch.randn(2, 7, 6)
    keep = torch.arange(16) != 5
    small, report = run(model, {n: row_masks(getattr(model, n).weight, keep) for n in masked}, x, y)
    width = 15 if len(masked) == 2 else 16
    assert small.q.out_features == small.kv.out_features == small.attn.in_proj_weight.shape[1] == width


def test_transformer_encoder_layer_loses_a_head() -> None:
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    masks = {"self_attn": row_masks(model.self_attn.in_proj_weight, head_rows(4, 4, [1, 3]), "in_proj_weight", "in_proj_bias")}
    small, _ = run(model, masks, x)  # an even head count: the layer would take its fused path if allowed
    assert small.self_attn.num_heads == 2


def test_separate_kv_widths_are_kept_whole() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.kv = nn.Linear(6, 8), nn.Linear(6, 5)
            self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=5, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kv = self.kv(x)
            return self.attn(self.q(x), kv, kv)[0]

    torch.manual_seed(0)
    model, x = Cross().eval(), torch.randn(2, 5, 6)
    drop = {"weight": torch.arange(8).view(-1, 1).expand(8, 6) != 3, "bias": torch.arange(8) != 3}
    small, report = run(model, {"q": drop}, x)
    assert small.q.out_features == 8 and isinstance(small.attn, nn.MultiheadAttention)


def small_vit() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    return randomize_norms(vit), torch.randn(2, 3, 32, 32)


def test_vit_groups_list_the_attention_projections() -> None:
    model, x = small_vit()
    groups = {name: g for g in build_channel_groups(model, x) for name in g.modules}
    out_proj = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    assert groups[out_proj].pinned and "conv_proj" in groups[out_proj].modules  # the residual stream
    qkv = groups["encoder.layers.encoder_layer_0.self_attention"]
    assert not qkv.pinned and qkv.num_channels == 3 * 64


def test_vit_heads_removed_and_onnx_matches() -> None:
    model, x = small_vit()
    keep = head_rows(4, 16, [1, 3])
    masks = {
        f"encoder.layers.encoder_layer_{i}.self_attention": row_masks(
            model.encoder.layers[i].self_attention.in_proj_weight, keep if i == 0 else head_rows(4, 16, [0]), "in_proj_weight", "in_proj_bias"
        )
        for i in range(2)
    }  # fmt: skip
    small, report = run(model, masks, x)
    heads = [small.encoder.layers[i].self_attention.num_heads for i in range(2)]
    assert heads == [2, 3]
    assert report.params_before - report.params_after == 3 * (3 * 16 * 65 + 16 * 64)
    exported = to_onnx(small, x)
    sess = ort.InferenceSession(exported.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        assert max_rel_error(small(x), got) < 1e-4


@pytest.mark.parametrize("version", [1, 2])
def test_swin_heads_removed(version: int) -> None:
    torch.manual_seed(0)
    kw = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if version == 2 else {}
    model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10, **kw)
    model, x = randomize_norms(model), torch.randn(1, 3, 32, 32)
    masks = {}
    for name, m in model.named_modules():
        if name.endswith("attn.qkv"):
            num_heads = m.out_features // 48
            masks[name] = row_masks(m.weight, head_rows(num_heads, 16, [num_heads - 1]))
        if name.endswith("cpb_mlp.0"):  # V2's position-bias MLP runs inside the attention; its hidden width prunes too
            masks[name] = row_masks(m.weight, torch.arange(512) >= 256)
    small, report = run(model, masks, x)
    attn = [m for n, m in small.named_modules() if n.endswith(".attn")]
    assert [a.num_heads for a in attn] == [1, 1, 3, 3] and all(a.head_dim == 16 for a in attn)
    assert type(attn[0]).__name__ == ("PrunedShiftedWindowAttentionV2" if version == 2 else "PrunedShiftedWindowAttention")
    if version == 2:
        assert attn[2].logit_scale.shape == (3, 1, 1) and attn[2].cpb_mlp[-1].weight.shape == (3, 256)
        assert attn[2].cpb_mlp[0].out_features == 256
    else:
        assert attn[2].relative_position_bias_table.shape[1] == 3
    per_stage = [3 * 16 * 33 + 16 * 32, 3 * 16 * 65 + 16 * 64]  # one head's q/k/v rows and proj columns
    extra = [512 + 1, 512 + 1] if version == 2 else [49, 49]  # per-head bias MLP row and logit scale, or table column
    hidden = 4 * 256 * 3 + 256 * (1 + 1 + 3 + 3) if version == 2 else 0  # cpb_mlp.0 rows, cpb_mlp.2 columns
    assert report.params_before - report.params_after == 2 * sum(per_stage) + 2 * sum(extra) + hidden


class TokenNet(nn.Module):
    """ViT's input path without its LayerNorms: patches, cat(class token), + position embedding, attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 16, 8, stride=8)
        self.class_token = nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embedding = nn.Parameter(torch.randn(1, 5, 16))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x[:, 0])


def test_token_stream_channels_removed_with_class_token_and_position_embedding() -> None:
    torch.manual_seed(0)
    model, x = TokenNet().eval(), torch.randn(2, 3, 16, 16)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[3, 7]] = False
    masks = {
        "conv_proj": {"weight": keep.view(-1, 1, 1, 1).expand(16, 3, 8, 8), "bias": keep},
        "": {"class_token": keep.view(1, 1, -1), "pos_embedding": keep.view(1, 1, -1).expand(1, 5, 16)},
        "attn.out_proj": row_masks(model.attn.out_proj.weight, keep),
    }
    small, report = run(model, masks, x)
    assert small.class_token.shape == (1, 1, 14) and small.pos_embedding.shape == (1, 5, 14)
    assert small.attn.in_proj_weight.shape == (48, 14) and small.attn.num_heads == 2 and small.head.in_features == 14
    assert report.params_before - report.params_after == 2 * (3 * 64 + 1) + 2 + 10 + 2 * 48 + 2 * 17 + 2 * 3
    # without the class token's and position embedding's masks the channels are not zero in the user's
    # masked model: they stay (exact); joined_masks adds those masks, masked_constants="prune" drops them
    del masks[""]
    _, again = run(model, masks, x)
    assert again.params_after == report.params_before and again.relative_error < 1e-5
    assert any("class_token" in why for r in again.layers for why in r.kept_reasons)
    joined = joined_masks(model, masks, x)
    assert torch.equal(joined[""]["class_token"], keep.view(1, 1, -1)) and torch.equal(joined[""]["pos_embedding"][0, 0], keep)
    _, with_joined = run(model, joined, x)
    assert with_joined.params_after == report.params_after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, dropped = speedup_with_report(model, masks, x, masked_constants="prune")
    assert dropped.params_after == report.params_after and set(dropped.constants_dropped) == {"class_token", "pos_embedding"}
    assert dropped.relative_error == pytest.approx(max_rel_error(user_masked(model, masks)(x), small(x)), rel=1e-3)
    assert dropped.relative_error > 1e-3


def test_vit_residual_stream_removed_and_hidden_dim_follows() -> None:
    """torchvision's ViT without LayerNorms (they would pin the stream): conv_proj, class token, position
    embedding, every block's out_proj and MLP output lose the same channels; ``hidden_dim`` follows."""
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                            num_classes=10, norm_layer=lambda width: nn.Identity())  # fmt: skip
    model, x = randomize_norms(vit), torch.randn(2, 3, 32, 32)
    keep = torch.ones(64, dtype=torch.bool)
    keep[[5, 9, 20, 33]] = False
    masks = {
        "conv_proj": {"weight": keep.view(-1, 1, 1, 1).expand(64, 3, 8, 8), "bias": keep},
        "": {"class_token": keep.view(1, 1, -1)},
        "encoder": {"pos_embedding": keep.view(1, 1, -1).expand_as(model.encoder.pos_embedding)},
    }
    for i, layer in enumerate(model.encoder.layers):
        masks[f"encoder.layers.encoder_layer_{i}.self_attention.out_proj"] = row_masks(layer.self_attention.out_proj.weight, keep)
        masks[f"encoder.layers.encoder_layer_{i}.mlp.3"] = row_masks(layer.mlp[3].weight, keep)
    small, report = run(model, masks, x)
    assert small.hidden_dim == 60 and small.conv_proj.out_channels == 60 and small.heads.head.in_features == 60
    assert small.encoder.pos_embedding.shape[-1] == 60 and small.class_token.shape[-1] == 60
    attn = small.encoder.layers[1].self_attention
    assert attn.in_proj_weight.shape == (192, 60) and attn.num_heads == 4 and attn.out_proj.out_features == 60


def test_l1_on_multihead_attention_prunes_whole_heads() -> None:
    """``op_types: ["MultiheadAttention"]`` scores rows of the packed q/k/v projection; dependency-aware
    selection takes whole heads (one channel class each), so speedup removes them."""
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    model, x = randomize_norms(vit), torch.randn(2, 3, 32, 32)
    pruner = L1NormPruner(model, [{"op_types": ["MultiheadAttention"], "sparsity": 0.5}], dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    model = pruner.unwrap_model()
    name = "encoder.layers.encoder_layer_0.self_attention"
    rows = ~masks[name]["in_proj_weight"].any(1)
    assert set(masks[name]) == {"in_proj_weight", "in_proj_bias"} and int(rows.sum()) == 96
    per_head = rows.view(3, 4, 16).all(0).all(1)  # q, k and v rows of a head go together
    assert int(per_head.sum()) == 2 and bool((rows.view(3, 4, 16).any(2) == per_head).all())
    small, report = run(model, masks, x)
    assert all(layer.self_attention.num_heads == 2 for layer in small.encoder.layers)
    assert report.params_before - report.params_after == 2 * (96 * 64 + 96 + 32 * 64)  # q/k/v rows, out_proj columns
    assert report.relative_error < 1e-5


def test_activation_pruners_refuse_multihead_attention() -> None:
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        ActivationMeanRankPruner(model, [{"op_types": ["MultiheadAttention"], "sparsity": 0.5}], [torch.randn(1, 3, 32, 32)])


def test_maxvit_heads_removed_by_dependency_aware_l1() -> None:
    """MaxViT's attention reshapes its output to the input width; speedup swaps in a forward that uses
    ``n_heads * head_dim`` and slices the per-head bias table."""
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    net = MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
                 head_dim=4, stochastic_depth_prob=0.0, num_classes=10)  # fmt: skip
    model, x = randomize_norms(net), torch.randn(2, 3, 32, 32)
    config = [{"op_types": ["Linear"], "sparsity": 0.5}, {"exclude": True, "op_names": ["classifier.5"]}]
    pruner = L1NormPruner(model, config, dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    small, report = run(pruner.unwrap_model(), masks, x)
    attn = [m for m in small.modules() if type(m).__name__ == "PrunedRelativePositionalMultiHeadAttention"]
    assert [m.n_heads for m in attn] == [2, 2, 4, 4]  # half of 4, 4, 8, 8 heads
    assert all(m.relative_position_bias_table.shape[1] == m.n_heads for m in attn)
    assert all(m.to_qkv.out_features == 3 * 4 * m.n_heads == 3 * m.merge.in_features for m in attn)
    assert report.relative_error < 1e-5 and report.params_ratio < 0.7  # measured 0.675
