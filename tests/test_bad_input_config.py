"""Bad config_lists: unknown op_types named with close matches, keys of the other kind refused, an
unreachable total_sparsity warned with the reachable figure; a property test over op_types names."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deploycompress as dc
from deploycompress.config import ConfigError, known_op_types, select_modules
from deploycompress.pruning.allocate import UnreachableSparsityWarning


class Block(nn.Conv2d):  # a user subclass: its own name and its bases' are valid op_types
    pass


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), Block(4, 4, 1), nn.Flatten(), nn.LazyLinear(2))


def test_misspelt_op_type_is_named_with_its_close_match():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    weights = [p.clone() for p in m.parameters()]
    with pytest.raises(ConfigError, match=r"config_list\[0\]: op_types names 'Linaer'.*did you mean 'Linear'"):
        dc.L1NormPruner(m, [{"op_types": ["Conv2d", "Linaer"], "sparsity": 0.5}])
    assert all(torch.equal(a, b) for a, b in zip(weights, m.parameters()))  # nothing touched


def test_exclude_op_types_are_checked_too():
    with pytest.raises(ConfigError, match=r"exclude_op_types names 'Conv2D'.*'Conv2d'"):
        select_modules(model(), [{"op_types": ["Conv2d"], "exclude_op_types": ["Conv2D"], "sparsity": 0.5}])


def test_model_classes_and_their_bases_are_known():
    selected = select_modules(model(), [{"op_types": ["Block"], "sparsity": 0.5}], kind="pruning")
    assert list(selected) == ["1"]
    assert {"Block", "Conv2d", "BatchNorm2d", "NonDynamicallyQuantizableLinear"} <= known_op_types(model())


@pytest.mark.parametrize("cfg, culprit", [
    ({"op_types": ["Conv2d"], "sparsity": 0.5, "quant_types": ["weight"], "quant_bits": 8}, "['quant_types', 'quant_bits']"),
])
def test_quantization_keys_given_to_a_pruner_are_refused(cfg, culprit):
    with pytest.raises(ConfigError, match="given to a pruning algorithm") as info:
        dc.L1NormPruner(model(), [cfg])
    assert culprit in str(info.value) and "config_list[0]" in str(info.value)


def test_sparsity_given_to_a_quantizer_is_refused():
    with pytest.raises(ConfigError, match=r"pruning key\(s\) \['sparsity'\] given to a quantization algorithm"):
        dc.PTQQuantizer(model(), [{"op_types": ["Conv2d"], "quant_types": ["weight"], "sparsity": 0.5}])


def test_unreachable_total_sparsity_warns_with_the_reachable_figure():
    m = nn.Sequential(nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 2))
    # by hand: channel pruning keeps one of the two rows of each layer: at most 16 + 2 of 32 + 4 weights
    reachable = (16 + 2) / (32 + 4)
    with pytest.warns(UnreachableSparsityWarning, match=f"at most {reachable:.4f} of the 36 weights"):
        _, masks = dc.L1NormPruner(m, [{"op_types": ["Linear"], "total_sparsity": 0.9}]).compress()
    removed = sum((~masks[n]["weight"]).sum().item() for n in ("0", "2"))
    assert removed / 36 == pytest.approx(reachable)


def test_reachable_total_sparsity_does_not_warn(recwarn):
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    dc.L1NormPruner(m, [{"op_types": ["Linear"], "total_sparsity": 0.5}]).compress()
    assert not [w for w in recwarn if issubclass(w.category, UnreachableSparsityWarning)]


NN_TYPES = sorted(n for n, c in vars(nn).items() if isinstance(c, type) and issubclass(c, nn.Module))


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.sampled_from(NN_TYPES), st.text(alphabet="ABCDLinearConvdx2", min_size=1, max_size=10)))
def test_any_op_type_is_either_known_or_refused_by_name(op_type):
    m = model()
    try:
        select_modules(m, [{"op_types": [op_type], "sparsity": 0.5}])
    except ConfigError as exc:
        if op_type not in known_op_types(m):
            assert repr(op_type) in str(exc) and "neither a torch.nn module class" in str(exc)
        else:  # a real class the model lacks: "matches no module", listing the types present
            assert "matches no module" in str(exc) and "Conv2d" in str(exc)
    else:
        assert op_type in known_op_types(m)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["quant_types", "quant_bits", "quant_dtype", "quant_scheme", "granularity"]))
def test_every_quant_key_is_refused_for_a_pruner(key):
    values = {"quant_types": ["weight"], "quant_bits": 8, "quant_dtype": "int", "quant_scheme": "symmetric", "granularity": "per_tensor"}
    cfg = {"op_types": ["Conv2d"], "sparsity": 0.5, "quant_types": ["weight"], key: values[key]}
    with pytest.raises(ConfigError, match=key):
        dc.config.validate_config_list([cfg], kind="pruning")
