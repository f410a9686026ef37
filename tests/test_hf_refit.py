"""Closed-form recovery of head/FFN-pruned encoders: least-squares refit and reconstruction-aware selection."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deploycompress.hf import Encoder  # noqa: E402
from deploycompress.hf.refit import obs_remove, output_linears, reconstruction_masks, refit_encoder  # noqa: E402
from deploycompress.speedup import speedup  # noqa: E402

HIDDEN, HEADS, HEAD, FFN = 32, 4, 8, 16


def duplicated_bert() -> Encoder:
    """A tiny random BertModel whose heads 2, 3 copy heads 0, 1 (same query/key/value rows: the same context)
    and whose FFN channels 8..15 copy channels 0..7 (same rows of intermediate.dense: the same GELU output), in
    every layer; their output-projection columns stay random, so removing them changes the output unless the
    kept columns take them over."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                                  intermediate_size=FFN, max_position_embeddings=32, attn_implementation="eager",
                                  initializer_range=0.3)  # fmt: skip  (large enough that units matter)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                lin.weight[2 * HEAD :] = lin.weight[: 2 * HEAD]
                lin.bias[2 * HEAD :] = lin.bias[: 2 * HEAD]
            inter = layer.intermediate.dense
            inter.weight[FFN // 2 :] = inter.weight[: FFN // 2]
            inter.bias[FFN // 2 :] = inter.bias[: FFN // 2]
    return Encoder(model, pooling="none")


def batches(n: int = 6, seq: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(1, 100, (4, seq), generator=g), torch.ones(4, seq, dtype=torch.long)) for _ in range(n)]


def masks_dropping_copies(model: Encoder) -> dict:
    """Masks written here (not by the code under test): heads 2, 3 and FFN channels 8..15 of every layer go."""
    rows = torch.ones(HEADS * HEAD)
    rows[2 * HEAD :] = 0
    ffn = torch.ones(FFN)
    ffn[FFN // 2 :] = 0
    masks = {}
    for i in range(2):
        for p in ("query", "key", "value"):
            masks[f"model.encoder.layer.{i}.attention.self.{p}"] = {"weight": rows.view(-1, 1).expand(HEADS * HEAD, HIDDEN).clone(), "bias": rows.clone()}
        masks[f"model.encoder.layer.{i}.intermediate.dense"] = {"weight": ffn.view(-1, 1).expand(FFN, HIDDEN).clone(), "bias": ffn.clone()}
    return masks


def state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_refit_rebuilds_removed_heads_and_channels_that_copy_kept_ones() -> None:
    dense = duplicated_bert()
    data = batches()
    pruned = speedup(copy.deepcopy(dense), masks_dropping_copies(dense), data[0])
    before_d, before_p = state(dense), state(pruned)
    with torch.no_grad():
        ref = torch.cat([dense(*b) for b in data])
        cut = torch.cat([pruned(*b) for b in data])
    assert max_rel(cut, ref) > 0.1  # removing them matters
    fit = refit_encoder(dense, pruned, data, ridge=0.0)
    with torch.no_grad():
        got = torch.cat([fit.model(*b) for b in data])
    assert max_rel(got, ref) < 1e-5
    # the expected weights: each kept column takes over its copy's column (W[:, k] + W[:, copy of k])
    for i in range(2):
        w_o = dense.model.encoder.layer[i].attention.output.dense.weight
        expect = w_o[:, : 2 * HEAD] + w_o[:, 2 * HEAD :]
        torch.testing.assert_close(fit.model.model.encoder.layer[i].attention.output.dense.weight, expect, atol=1e-4, rtol=1e-4)
        w_2 = dense.model.encoder.layer[i].output.dense.weight
        torch.testing.assert_close(fit.model.model.encoder.layer[i].output.dense.weight, w_2[:, : FFN // 2] + w_2[:, FFN // 2 :], atol=1e-4, rtol=1e-4)
    assert [f.pruned for f in fit.layers] == output_linears(pruned)
    assert all(f.error_after < 1e-5 < f.error_before for f in fit.layers)
    for m, s in ((dense, before_d), (pruned, before_p)):  # the caller's models are not modified
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())


def test_refit_refuses_models_of_other_depth_before_work() -> None:
    dense = duplicated_bert()
    other = copy.deepcopy(dense)
    del other.model.encoder.layer[1]
    with pytest.raises(ValueError, match="2 layers and the pruned one 1"):
        refit_encoder(dense, other, batches())


def lstsq_residual(x: torch.Tensor, y: torch.Tensor, cols: list[int]) -> float:
    sol = torch.linalg.lstsq(x[:, cols], y).solution
    return float((x[:, cols] @ sol - y).pow(2).sum())


def test_obs_remove_costs_are_the_least_squares_residual_increase() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64)
    x[:, 6] = 1.0  # intercept, in no group
    y = x[:, :6] @ torch.randn(6, 3, generator=g, dtype=torch.float64) + 0.3 * torch.randn(300, 3, generator=g, dtype=torch.float64)
    groups = [[0, 1], [2], [3, 4], [5]]
    removed, costs = obs_remove(x.T @ x, x.T @ y, groups, 2, damp=0.0)
    # brute force in the test: the best first group, then the best second given the first
    full = lstsq_residual(x, y, list(range(7)))
    keep = lambda gone: [c for gi, gr in enumerate(groups) if gi not in gone for c in gr] + [6]  # noqa: E731
    first = min(range(4), key=lambda gi: lstsq_residual(x, y, keep({gi})))
    assert removed[0] == first
    assert costs[0] == pytest.approx(lstsq_residual(x, y, keep({first})) - full, rel=1e-6)
    second = min((gi for gi in range(4) if gi != first), key=lambda gi: lstsq_residual(x, y, keep({first, gi})))
    assert removed[1] == second
    assert costs[1] == pytest.approx(lstsq_residual(x, y, keep({first, second})) - lstsq_residual(x, y, keep({first})), rel=1e-6)
    with pytest.raises(ValueError, match="at least one group stays"):
        obs_remove(x.T @ x, x.T @ y, groups, 4)
    with pytest.raises(ValueError, match="disjoint"):
        obs_remove(x.T @ x, x.T @ y, [[0, 1], [1]], 1)


def test_reconstruction_masks_drop_one_of_each_copy_and_rebuild_the_output() -> None:
    dense = duplicated_bert()
    before = state(dense)
    data = batches()
    res = reconstruction_masks(dense, data, 0.5, 0.5, ridge=0.0)
    for heads, ffn in zip(res.kept_heads, res.kept_ffn):
        assert len(heads) == 2 and {h % 2 for h in heads} == {0, 1}  # one of heads {0, 2} and one of {1, 3}
        assert len(ffn) == FFN // 2 and sorted(c % (FFN // 2) for c in ffn) == list(range(FFN // 2))
    with torch.no_grad():
        ref = torch.cat([dense(*b) for b in data])
        got = torch.cat([res.model(*b) for b in data])
    assert max_rel(got, ref) < 1e-4
    assert all(e < 1e-4 for e in res.errors.values()) and len(res.errors) == 4
    # the masks are the dense model's and speedup takes them: the kept units only
    pruned = speedup(copy.deepcopy(dense), res.masks, data[0])
    assert [int(l.attention.self.num_attention_heads) for l in pruned.model.encoder.layer] == [2, 2]
    assert [l.intermediate.dense.out_features for l in pruned.model.encoder.layer] == [FFN // 2] * 2
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    with pytest.raises(ValueError, match="head_sparsity must be in"):
        reconstruction_masks(dense, data, 1.0, 0.5)
    with pytest.raises(ValueError, match="no batches"):
        reconstruction_masks(dense, [], 0.5, 0.5)


def test_obs_remove_single_columns_match_brute_force() -> None:
    # groups of one column take the vectorised path: the same picks as brute force, step after step
    g = torch.Generator().manual_seed(3)
    x = torch.randn(80, 6, generator=g, dtype=torch.float64)
    y = torch.randn(80, 2, generator=g, dtype=torch.float64)
    removed, costs = obs_remove(x.T @ x, x.T @ y, [[j] for j in range(6)], 3, damp=0.0)
    gone: list[int] = []
    for step in range(3):
        rest = lambda j: [c for c in range(6) if c not in gone and c != j]  # noqa: E731
        best = min((j for j in range(6) if j not in gone), key=lambda j: lstsq_residual(x, y, rest(j)))
        before = lstsq_residual(x, y, [c for c in range(6) if c not in gone])
        assert removed[step] == best
        assert costs[step] == pytest.approx(lstsq_residual(x, y, rest(best)) - before, rel=1e-6)
        gone.append(best)


def test_layer_masks_rows_of_the_kept_heads_and_channels() -> None:
    from deploycompress.hf.importance import layer_masks

    model = duplicated_bert()
    keep_h = torch.tensor([True, False, True, False])
    keep_f = torch.arange(FFN) % 3 == 0
    masks = layer_masks(model, "model.encoder.layer", 1, keep_h, keep_f)
    rows = torch.zeros(HEADS * HEAD)
    rows[0:HEAD] = 1
    rows[2 * HEAD : 3 * HEAD] = 1
    for p in ("query", "key", "value"):
        m = masks[f"model.encoder.layer.1.attention.self.{p}"]
        assert torch.equal(m["bias"], rows) and torch.equal(m["weight"], rows.view(-1, 1).expand(HEADS * HEAD, HIDDEN))
    assert torch.equal(masks["model.encoder.layer.1.intermediate.dense"]["bias"], keep_f.float())
    with pytest.raises(ValueError, match="keep_heads must be"):
        layer_masks(model, "model.encoder.layer", 1, keep_h[:3], keep_f)


def test_refit_towards_the_dense_pre_layernorm_sum() -> None:
    """absorb_residual=True: each output Linear is the least-squares fit to Y_dense + r_dense - r_student (checked
    here on the last one, whose inputs the refit does not change, by torch.linalg.lstsq on hooks set by the test)."""
    dense = duplicated_bert()
    with torch.no_grad():  # break the copies: removing units now loses something no refit rebuilds exactly
        g = torch.Generator().manual_seed(3)
        for p in dense.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    data = batches()
    pruned = speedup(copy.deepcopy(dense), masks_dropping_copies(dense), data[0])
    fit = refit_encoder(dense, pruned, data, ridge=0.0, absorb_residual=True)
    plain = refit_encoder(dense, pruned, data, ridge=0.0)

    def grab(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = model.model.encoder.layer[1]
        got: dict = {}
        def keep_x_y(m, inp, out) -> None:  # noqa: ANN001
            got.setdefault("x", []).append(inp[0].reshape(-1, inp[0].shape[-1]))
            got.setdefault("y", []).append(out.reshape(-1, HIDDEN))

        h1 = layer.output.register_forward_pre_hook(lambda m, inp: got.setdefault("r", []).append(inp[1].reshape(-1, HIDDEN)))
        h2 = layer.output.dense.register_forward_hook(keep_x_y)
        with torch.no_grad():
            for b in data:
                model(*b)
        h1.remove(), h2.remove()
        return torch.cat(got["x"]), torch.cat(got["y"]), torch.cat(got["r"])

    x_s, _, r_s = grab(fit.model)
    _, y_d, r_d = grab(dense)
    x1 = torch.cat([x_s, torch.ones(len(x_s), 1)], 1).double()
    sol = torch.linalg.lstsq(x1, (y_d + r_d - r_s).double()).solution
    last = fit.model.model.encoder.layer[1].output.dense
    torch.testing.assert_close(last.weight.double(), sol[:-1].T, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(last.bias.double(), sol[-1], atol=1e-4, rtol=1e-3)
    assert not torch.allclose(last.weight, plain.model.model.encoder.layer[1].output.dense.weight, atol=1e-3)  # the target differs
    with pytest.raises(ValueError, match="not one of the layers refitted"):
        from deploycompress.pruning.reconstruct import reconstruct

        reconstruct(dense, pruned, ["model.encoder.layer.0.output.dense"], data, residuals={"model.encoder.layer.1.output.dense": ("model.encoder.layer.1.output", 1)})


def test_allocate_takes_the_cheapest_next_removals() -> None:
    from deploycompress.hf.refit import allocate

    curves = [[0.1, 0.2, 5.0], [0.15, 0.3], [1.0]]
    # cheapest four steps: 0.1 (l0), 0.15 (l1), 0.2 (l0), 0.3 (l1)
    assert allocate(curves, 4) == [2, 2, 0]
    assert allocate(curves, 5) == [2, 2, 1]
    assert allocate(curves, 0) == [0, 0, 0]
    with pytest.raises(ValueError, match="allow 0..6"):
        allocate(curves, 7)


def test_global_allocation_takes_more_from_the_layer_of_copies() -> None:
    """Layer 0: heads 1-3 copy head 0 (three removals are free); layer 1: four distinct heads. At 50% (4 of 8 heads)
    the uniform rule takes 2 + 2, the global one 3 + 1 (layer 0 down to its one distinct head, cap 0.75)."""
    dense = duplicated_bert()
    with torch.no_grad():
        att0 = dense.model.encoder.layer[0].attention.self
        for lin in (att0.query, att0.key, att0.value):
            for h in (1, 2, 3):
                lin.weight[h * HEAD : (h + 1) * HEAD] = lin.weight[:HEAD]
                lin.bias[h * HEAD : (h + 1) * HEAD] = lin.bias[:HEAD]
        att1 = dense.model.encoder.layer[1].attention.self
        g = torch.Generator().manual_seed(5)
        for lin in (att1.query, att1.key, att1.value):
            lin.weight[2 * HEAD :] = torch.randn(2 * HEAD, HIDDEN, generator=g) * 0.3
    data = batches()
    uni = reconstruction_masks(dense, data, 0.5, 0.5, ridge=1e-6)  # (two kept copies: singular without a ridge)
    glo = reconstruction_masks(dense, data, 0.5, 0.5, ridge=1e-6, allocation="global")
    assert [len(h) for h in uni.kept_heads] == [2, 2]
    assert [len(h) for h in glo.kept_heads] == [1, 3]
    assert sum(len(f) for f in glo.kept_ffn) == FFN  # the FFN total is kept too (half of 2 x 16)
    assert glo.errors["model.encoder.layer.0.attention.output.dense"] < 1e-4
    with pytest.raises(ValueError, match="allocation must be one of"):
        reconstruction_masks(dense, data, 0.5, 0.5, allocation="layerwise")
