"""Pruner base: masks in the forward pass, export, mask files, unwrapping (with L1NormPruner)."""

from __future__ import annotations

import torch
import pytest
from torch import nn

from deploycompress.config import ConfigError
from deploycompress.pruning import L1NormPruner, LevelPruner, apply_masks, load_masks, save_masks
from deploycompress.zoo.digits import DigitsNet

CONFIG = [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}, {"exclude": True, "op_names": ["fc2"]}]


def _net(seed: int = 0) -> DigitsNet:
    torch.manual_seed(seed)
    return DigitsNet(width=8)


def _kept_channels(mask: torch.Tensor) -> int:
    return int(mask.reshape(mask.shape[0], -1).all(1).sum())


def test_l1_prunes_half_the_filters_of_smallest_l1_norm():
    model = _net()
    norms = model.conv2.weight.detach().abs().sum((1, 2, 3))
    _, masks = L1NormPruner(model, CONFIG).compress()
    assert set(masks) == {"conv1", "conv2", "conv3", "fc1"}
    assert {n: _kept_channels(m["weight"]) for n, m in masks.items()} == {"conv1": 4, "conv2": 8, "conv3": 8, "fc1": 8}
    kept = masks["conv2"]["weight"][:, 0, 0, 0]
    assert set(kept.nonzero().flatten().tolist()) == set(norms.argsort(descending=True)[:8].tolist())
    # whole filters: every element of a filter shares its channel's mask; the bias follows the channel
    assert all(bool((m["weight"].reshape(m["weight"].shape[0], -1).all(1) == m["weight"].reshape(m["weight"].shape[0], -1).any(1)).all()) for m in masks.values())
    assert torch.equal(masks["fc1"]["bias"], masks["fc1"]["weight"][:, 0])
    assert masks["conv1"]["weight"].dtype == torch.bool


def test_masked_model_computes_with_zeroed_weights():
    model = _net()
    reference = _net()
    _, masks = L1NormPruner(model, CONFIG).compress()
    apply_masks(reference, masks)
    x = torch.rand(5, 1, 8, 8)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert float(reference(x).detach().abs().sum()) > 0


def test_pruned_weights_stay_zero_while_fine_tuning_with_an_optimizer_made_before_compress():
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    pruner = L1NormPruner(model, CONFIG)
    _, masks = pruner.compress()
    before = model.conv3.weight.detach().clone()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for epoch in range(2):
        pruner.update_epoch(epoch)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            pruner.step()
    for name in masks:
        module = dict(model.named_modules())[name]
        assert float(module.weight.detach()[~masks[name]["weight"]].abs().max()) == 0.0
    assert not torch.equal(before, model.conv3.weight.detach()), "the kept weights were trained"
    plain = pruner._unwrap_model()  # NNI 2.x spelling of unwrap_model()
    assert isinstance(plain.conv3.weight, nn.Parameter)
    assert float(plain.conv3.weight.detach()[~masks["conv3"]["weight"]].abs().max()) == 0.0


def test_export_writes_zeroed_state_dict_and_masks_that_load_back_equal(tmp_path):
    model = _net()
    pruner = L1NormPruner(model, CONFIG)
    _, masks = pruner.compress()
    pruner.export_model(tmp_path / "model.pt", tmp_path / "masks.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "conv2.weight" in state and not any("parametrizations" in k for k in state)
    for name, entry in masks.items():
        for pname, mask in entry.items():
            assert float(state[f"{name}.{pname}"][~mask].abs().sum()) == 0.0
            assert float(state[f"{name}.{pname}"][mask].abs().min()) > 0.0
    loaded = load_masks(tmp_path / "masks.pt", _net())
    assert loaded.keys() == masks.keys()
    assert all(torch.equal(loaded[n][p], masks[n][p]) for n in masks for p in masks[n])
    fresh = _net(seed=1)
    fresh.load_state_dict(state)
    x = torch.rand(3, 1, 8, 8)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _net()
    pruner = L1NormPruner(model, CONFIG)
    _, masks = pruner.compress()
    pruner.export_model(tmp_path / "m.pt", onnx_path=tmp_path / "m.onnx", input_shape=(1, 1, 8, 8))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    conv_weights = [w for w in weights.values() if w.shape == (8, 1, 3, 3)]
    assert len(conv_weights) == 1
    assert int((abs(conv_weights[0]).reshape(8, -1).sum(1) == 0).sum()) == 4
    assert model.conv1.weight is not model.conv1.parametrizations.weight.original  # still wrapped


def test_export_needs_compress_and_an_input_shape_for_onnx(tmp_path):
    pruner = L1NormPruner(_net(), CONFIG)
    with pytest.raises(RuntimeError, match="call compress"):
        pruner.export_model(tmp_path / "m.pt")
    pruner.compress()
    with pytest.raises(ValueError, match="input_shape"):
        pruner.export_model(tmp_path / "m.pt", onnx_path=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_nni_float_masks_load_and_bad_masks_name_the_module(tmp_path):
    model = _net()
    nni_masks = {"conv1": {"weight": torch.ones(8, 1, 3, 3)}}
    nni_masks["conv1"]["weight"][3] = 0.0
    torch.save(nni_masks, tmp_path / "nni.pt")
    loaded = load_masks(tmp_path / "nni.pt", model)
    assert loaded["conv1"]["weight"].dtype == torch.bool
    assert int(loaded["conv1"]["weight"].sum()) == 63
    bad_value = {"conv1": {"weight": torch.full((8, 1, 3, 3), 0.5)}}
    with pytest.raises(ValueError, match=r"conv1\.weight holds values other than 0 and 1"):
        apply_masks(model, bad_value)
    with pytest.raises(ValueError, match=r"conv1\.weight has shape \(8, 1\), but the parameter has \(8, 1, 3, 3\)"):
        apply_masks(model, {"conv1": {"weight": torch.ones(8, 1, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="'convX', which is not a module"):
        apply_masks(model, {"convX": {"weight": torch.ones(8, dtype=torch.bool)}})
    with pytest.raises(ValueError, match=r"conv1\.bias: module 'conv1' \(Conv2d\) has no tensor 'bias'"):
        apply_masks(model, {"conv1": {"bias": torch.ones(8, dtype=torch.bool)}})
    save_masks(loaded, tmp_path / "ours.pt")
    assert torch.equal(load_masks(tmp_path / "ours.pt")["conv1"]["weight"], loaded["conv1"]["weight"])


def test_compress_twice_recomputes_on_the_masked_weights():
    model = _net()
    pruner = LevelPruner(model, [{"sparsity": 0.5, "op_types": ["Linear"]}])
    _, first = pruner.compress()
    _, second = pruner.compress()
    assert torch.equal(first["fc1"]["weight"], second["fc1"]["weight"])
    assert len(model.fc1.parametrizations.weight) == 1


def test_bad_configs_are_rejected_before_any_work():
    model = _net()
    with pytest.raises(ConfigError, match="'fc9', which is not a module of the model; closest module names"):
        L1NormPruner(model, [{"sparsity": 0.5, "op_names": ["fc9"]}])
    with pytest.raises(ConfigError, match="selects module 'bn1' of type BatchNorm2d, which L1NormPruner cannot handle"):
        L1NormPruner(model, [{"sparsity": 0.5, "op_names": ["bn1"]}])
    with pytest.raises(ConfigError, match="has no 'sparsity' or 'total_sparsity'"):
        L1NormPruner(model, [{"op_types": ["Conv2d"]}])
    with pytest.raises(ConfigError, match=r"'sparsity' must lie in \[0, 1\), got 1.0"):
        L1NormPruner(model, [{"sparsity": 1.0, "op_types": ["Conv2d"]}])
    with pytest.raises(ConfigError, match="matches no module of the model"):
        L1NormPruner(model, [{"sparsity": 0.5, "op_types": ["Conv3d"]}])
    with pytest.raises(ConfigError, match="unknown key 'sparsty'"):
        L1NormPruner(model, [{"sparsty": 0.5, "op_types": ["Conv2d"]}])
    with pytest.raises(ConfigError, match="which has no weight to prune"):
        LevelPruner(model, [{"sparsity": 0.5, "op_names": ["relu"]}])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        L1NormPruner("model", CONFIG)  # type: ignore[arg-type]
    assert not any("parametrizations" in k for k in model.state_dict())


def test_a_new_pruner_is_one_scoring_method():
    from deploycompress.pruning import ChannelPruner, ElementPruner

    class LastChannelsPruner(ChannelPruner):
        def channel_score(self, name, module, config):
            return -torch.arange(module.weight.shape[0], dtype=torch.float32)  # later channels score lower

    class SmallRowsPruner(ElementPruner):
        def weight_score(self, weight, config, **kw):
            return torch.arange(weight.shape[0], dtype=torch.float32)[:, None].expand_as(weight).clone()

    _, masks = LastChannelsPruner(_net(), [{"sparsity": 0.25, "op_types": ["Conv2d"]}]).compress()
    assert [int(m["weight"].reshape(m["weight"].shape[0], -1).all(1).sum()) for m in masks.values()] == [6, 12, 12]
    assert bool(masks["conv2"]["weight"][:12].all()) and not bool(masks["conv2"]["weight"][12:].any())
    pruner = SmallRowsPruner(_net(), [{"total_sparsity": 0.5, "op_names": ["fc1", "fc2"]}])
    _, masks = pruner.compress()
    assert int((~masks["fc1"]["weight"]).sum()) + int((~masks["fc2"]["weight"]).sum()) == (256 + 160) // 2
    assert not bool(masks["fc1"]["weight"][0].any()) and bool(masks["fc1"]["weight"][-1].all())
    assert torch.equal(pruner.calc_mask(torch.randn(4, 3), pruner.module_configs["fc1"], sparsity=0.5)[:2], torch.zeros(2, 3, dtype=torch.bool))
