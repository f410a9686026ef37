"""config_list: every rejection with its message, both NNI spellings, and properties of matching
and override order checked against a small independent oracle."""

from __future__ import annotations

import re
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from deploycompress.config import ConfigConventionWarning, ConfigError, VALID_KEYS, op_type_of, select_modules, validate_config_list
from deploycompress.pruning import L1NormPruner
from deploycompress.zoo.digits import DigitsNet

MODEL = DigitsNet(width=4)


def _select(config_list, **kw):
    return select_modules(MODEL, config_list, **kw)


# ---------------------------------------------------------------- rejections, each with its message
BAD = [
    ({"sparsity": 0.5}, "config_list", r"config_list\[0\] selects no modules: give at least one of"),
    ([], "config_list", "config_list is empty"),
    ({"a": 1}, "raw", "config_list must be a list of dicts, got dict"),
    (["conv1"], "raw", r"config_list\[0\] must be a dict, got str"),
    ({"sparsity": 0.5, "op_type": ["Conv2d"]}, "config_list", r"unknown key 'op_type' \(did you mean 'op_types'.*valid keys are \["),
    ({"sparsity": 0.5, "sparse_ratio": 0.5, "op_types": ["Conv2d"]}, "config_list", "'sparse_ratio' repeats key 'sparsity'"),
    ({"sparsity": 1.2, "op_types": ["Conv2d"]}, "config_list", r"'sparsity' must lie in \[0, 1\), got 1.2"),
    ({"sparsity": -0.1, "op_types": ["Conv2d"]}, "config_list", r"'sparsity' must lie in \[0, 1\)"),
    ({"sparsity": "half", "op_types": ["Conv2d"]}, "config_list", "'sparsity' must be a number, got 'half'"),
    ({"sparsity": True, "op_types": ["Conv2d"]}, "config_list", "'sparsity' must be a number, got True"),
    ({"sparsity": float("nan"), "op_types": ["Conv2d"]}, "config_list", "'sparsity' must be a number"),
    ({"total_sparsity": 1.0, "op_types": ["Conv2d"]}, "config_list", r"'total_sparsity' must lie in \[0, 1\)"),
    ({"total_sparsity": 0.5, "max_sparsity_per_layer": 1.5, "op_types": ["Conv2d"]}, "config_list", r"'max_sparsity_per_layer' must lie in \[0, 1\]"),
    ({"total_sparsity": 0.5, "max_sparsity_per_layer": 0.4, "op_types": ["Conv2d"]}, "config_list", "is below total_sparsity 0.5: the budget could never be met"),
    ({"sparsity": 0.5, "max_sparsity_per_layer": 0.7, "op_types": ["Conv2d"]}, "config_list", "'max_sparsity_per_layer' only applies with 'total_sparsity'"),
    ({"sparsity": 0.5, "total_sparsity": 0.5, "op_types": ["Conv2d"]}, "config_list", "give 'sparsity' or 'total_sparsity', not both"),
    ({"sparsity": 0.5, "op_types": "Conv2d", "exclude": "yes"}, "config_list", "'exclude' must be true or false, got 'yes'"),
    ({"sparsity": 0.5, "op_types": [1]}, "config_list", r"'op_types' must be a list of strings, got \[1\]"),
    ({"sparsity": 0.5, "op_names": []}, "config_list", "'op_names' is empty"),
    ({"sparsity": 0.5, "op_names_re": ["conv("]}, "config_list", r"op_names_re 'conv\(' is not a valid regex"),
    ({"sparsity": 0.5, "op_names": ["conv9"]}, "config_list", r"op_names names 'conv9', which is not a module of the model; closest module names: \['conv\d', 'conv\d', 'conv\d'\]"),
    ({"sparsity": 0.5, "op_types": ["Conv2d"], "exclude_op_names": ["fc3"]}, "config_list", r"exclude_op_names names 'fc3'.*closest module names: \['fc2', 'fc1'"),
    ({"sparsity": 0.5, "op_types": ["Conv3d"]}, "config_list", r"config_list\[0\] matches no module of the model; module types present: \['AdaptiveAvgPool2d', 'BatchNorm2d'"),
    ({"sparsity": 0.5, "op_types": ["default"]}, "config_list", "op_types 'default' given, but this algorithm has no default types"),
    ({"op_types": ["Conv2d"]}, "pruning", r"config_list\[0\] has no 'sparsity' or 'total_sparsity' \(and is not an 'exclude' entry\)"),
    ({"sparsity": 0.5, "op_types": ["Conv2d"]}, "quantization", r"config_list\[0\] has no 'quant_types'"),
    ({"quant_types": ["weights"], "op_types": ["Conv2d"]}, "config_list", r"unknown quant_type 'weights'; valid quant_types are \['weight', 'input', 'output'\]"),
    ({"quant_bits": 8, "op_types": ["Conv2d"]}, "config_list", "quantization keys given without 'quant_types'"),
    ({"global_group_id": 1, "op_types": ["Conv2d"]}, "config_list", "'global_group_id' needs 'sparse_ratio', the group's total sparsity"),
    ({"sparse_ratio": 0.5, "global_group_id": 1.5, "op_types": ["Conv2d"]}, "config_list", "'global_group_id' must be a string or an integer, got 1.5"),
    (
        [{"sparse_ratio": 0.5, "global_group_id": "g", "op_types": ["Conv2d"]}, {"sparse_ratio": 0.4, "global_group_id": "g", "op_types": ["Linear"]}],
        "config_list",
        r"config_list\[1\]: global_group_id 'g' has sparse_ratio 0.4, but config_list\[0\] gives the same group 0.5",
    ),
    ({"quant_types": ["weight"], "quant_bits": 32, "op_types": ["Conv2d"]}, "config_list", "'quant_bits' must be an integer from 1 to 16, got 32"),
    ({"quant_types": ["weight"], "quant_bits": {"input": 8}, "op_types": ["Conv2d"]}, "config_list", r"quant_bits names 'input', which is not in quant_types \['weight'\]"),
    ({"quant_types": ["weight"], "quant_dtype": "float", "op_types": ["Conv2d"]}, "config_list", "quant_dtype must be one of"),
    ({"quant_types": ["weight"], "quant_scheme": "asym", "op_types": ["Conv2d"]}, "config_list", "quant_scheme must be one of"),
    ({"quant_types": ["weight"], "granularity": "per_row", "op_types": ["Conv2d"]}, "config_list", "granularity must be one of"),
]


@pytest.mark.parametrize("config, kind, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_config_is_rejected_with_its_message(config, kind, message):
    config_list = config if kind == "raw" else ([config] if isinstance(config, dict) else config)
    k = kind if kind in ("pruning", "quantization") else None
    with pytest.raises(ConfigError, match=message):
        _select(config_list, kind=k)


def test_unknown_key_message_lists_every_valid_key():
    with pytest.raises(ConfigError) as info:
        validate_config_list([{"sparsity": 0.5, "op_types": ["Conv2d"], "bogus": 1}])
    assert all(repr(k) in str(info.value) for k in VALID_KEYS)
    assert str(info.value).startswith("config_list[0]: unknown key 'bogus'")


def test_a_config_list_that_excludes_everything_is_rejected():
    with pytest.raises(ConfigError, match="selects no module once 'exclude' entries are applied"):
        _select([{"sparsity": 0.5, "op_names": ["fc2"]}, {"exclude": True, "op_types": ["Linear"]}])


def test_unsupported_module_named_with_algorithm_and_supported_types():
    with pytest.raises(ConfigError, match=r"config_list\[1\] selects module 'bn1' of type BatchNorm2d, which Foo cannot handle; supported types: \['Conv2d'\]"):
        _select([{"sparsity": 0.1, "op_types": ["Conv2d"]}, {"sparsity": 0.2, "op_names": ["bn1"]}], supported_op_types=["Conv2d"], algorithm="Foo")


# ---------------------------------------------------------------- spellings and parsed values
def test_nni3_spellings_mean_the_same_as_nni2():
    nni2 = _select([{"total_sparsity": 0.5, "max_sparsity_per_layer": 0.8, "op_types": ["Conv2d"]}, {"sparsity": 0.3, "op_names": ["fc1"]}])
    nni3 = _select([{"total_sparsity": 0.5, "max_sparse_ratio": 0.8, "op_names_re": ["conv.*"]}, {"sparse_ratio": 0.3, "op_names": ["fc1"]}])
    assert nni2 == nni3
    excl = _select([{"sparse_ratio": 0.3, "op_types": ["Conv2d", "Linear"], "exclude_op_names": ["conv1"], "exclude_op_types": ["Linear"]}])
    assert list(excl) == ["conv2", "conv3"]


def test_nni3_global_group_is_one_total_sparsity_budget_across_configs():
    cfg = _select(
        [
            {"sparse_ratio": 0.5, "max_sparse_ratio": 0.7, "global_group_id": "g", "op_types": ["Conv2d"]},
            {"sparse_ratio": 0.5, "global_group_id": "g", "op_names": ["fc1"]},
            {"sparse_ratio": 0.2, "op_names": ["fc2"]},
        ]
    )
    assert {n: (c.total_sparsity, c.max_sparsity_per_layer, c.global_group_id) for n, c in cfg.items()} == {
        "conv1": (0.5, 0.7, "g"), "conv2": (0.5, 0.7, "g"), "conv3": (0.5, 0.7, "g"), "fc1": (0.5, None, "g"), "fc2": (None, None, None),
    }
    assert cfg["fc2"].sparsity == 0.2 and cfg["fc1"].sparsity is None


def test_quantization_values_are_normalised():
    cfg = _select(
        [
            {"quant_types": ["weight", "input"], "quant_dtype": "uint8", "quant_scheme": "per_channel_affine", "op_types": ["Conv2d"]},
            {"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_names": ["conv2"], "granularity": "out_channel"},
        ],
        kind="quantization",
    )
    assert (cfg["conv1"].quant_dtype, cfg["conv1"].quant_scheme, cfg["conv1"].granularity) == ("uint", "affine", "per_channel")
    assert cfg["conv1"].quant_bits == {"weight": 8, "input": 8}
    assert cfg["conv2"].quant_bits == {"weight": 4} and cfg["conv2"].quant_types == ("weight",)
    assert cfg["conv2"].granularity == "per_channel" and cfg["conv2"].config_index == 1


def test_masked_modules_keep_their_type_and_their_parametrizations_are_never_selected():
    model = DigitsNet(width=4)
    L1NormPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}]).compress()
    assert type(model.conv1).__name__ == "ParametrizedConv2d" and op_type_of(model.conv1) == "Conv2d"
    selected = select_modules(model, [{"sparsity": 0.2, "op_partial_names": ["conv"]}])
    assert list(selected) == ["conv1", "conv2", "conv3"]
    assert {c.op_type for c in selected.values()} == {"Conv2d"}


# ---------------------------------------------------------------- properties: matching and override order
TYPES = {"Conv2d": lambda: nn.Conv2d(1, 1, 1), "Linear": lambda: nn.Linear(1, 1), "ReLU": nn.ReLU, "BatchNorm2d": lambda: nn.BatchNorm2d(1)}


@st.composite
def model_and_configs(draw):
    types = draw(st.lists(st.sampled_from(sorted(TYPES)), min_size=1, max_size=6))
    names = [f"{t.lower()}_{i}" for i, t in enumerate(types)]
    model = nn.ModuleDict({n: TYPES[t]() for n, t in zip(names, types)})
    configs = []
    for _ in range(draw(st.integers(1, 5))):
        cfg: dict = {}
        how = draw(st.sampled_from(["op_types", "op_names", "op_partial_names", "op_names_re", "types_and_names"]))
        if how in ("op_types", "types_and_names"):
            cfg["op_types"] = draw(st.lists(st.sampled_from(sorted(TYPES)), min_size=1, max_size=2, unique=True))
        if how in ("op_names", "types_and_names"):
            cfg["op_names"] = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        if how == "op_partial_names":
            cfg["op_partial_names"] = draw(st.lists(st.sampled_from(["conv", "lin", "_1", "_2", "batch"]), min_size=1, max_size=2))
        if how == "op_names_re":
            cfg["op_names_re"] = [draw(st.sampled_from([r"conv2d_\d", r".*_[02]", r"relu_.*", r"linear_1"]))]
        if draw(st.booleans()) and draw(st.booleans()):
            cfg["exclude"] = True
        else:
            cfg[draw(st.sampled_from(["sparsity", "sparse_ratio"]))] = draw(st.floats(0, 0.99))
        configs.append(cfg)
    return model, names, types, configs


def _oracle(names, types, configs):
    """Module -> index of the config that decides it, written from NNI's rules:

    - a config selects a module when its op_types accept the type and, if it has name keys, one of
      them accepts the name (a union; op_names_re from the start of the name, Python's re.match,
      as nni/compression/base/config.py select_modules_by_config does);
    - an exclude entry removes its modules whatever its position (NNI 3.0 trans_legacy_config_list);
    - several configs: the last wins in a list with any NNI 2.x-only key (sparsity, exclude,
      op_partial_names; NNI 2.x Compressor.select_config), the first in a pure NNI 3.0 list
      (sparse_ratio; NNI 3.0 ModuleWrapper.extend_target_spaces ignores later configs)."""

    def accepts(cfg, name, typ):
        named = [k for k in ("op_names", "op_partial_names", "op_names_re") if k in cfg]
        by_name = (
            name in cfg.get("op_names", [])
            or any(p in name for p in cfg.get("op_partial_names", []))
            or any(re.match(p, name) for p in cfg.get("op_names_re", []))
        )
        return ("op_types" not in cfg or typ in cfg["op_types"]) and (not named or by_name)

    keys = {k for cfg in configs for k in cfg}
    first_wins = "sparse_ratio" in keys and not keys & {"sparsity", "exclude", "op_partial_names"}
    dead = [i for i, cfg in enumerate(configs) if not any(accepts(cfg, n, t) for n, t in zip(names, types))]
    decided = {}
    for name, typ in zip(names, types):
        hits = [i for i, cfg in enumerate(configs) if accepts(cfg, name, typ)]
        if any(configs[i].get("exclude") for i in hits):
            continue
        if hits:
            decided[name] = hits[0] if first_wins else hits[-1]
    return dead, decided


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_and_configs())
def test_matching_and_the_deciding_config(case):
    model, names, types, configs = case
    dead, decided = _oracle(names, types, configs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigConventionWarning)
        if dead:
            with pytest.raises(ConfigError, match=rf"config_list\[{dead[0]}\] matches no module"):
                select_modules(model, configs)
            return
        if not decided:
            with pytest.raises(ConfigError, match="selects no module once 'exclude' entries are applied"):
                select_modules(model, configs)
            return
        result = select_modules(model, configs)
    assert list(result) == [n for n in names if n in decided]  # model order
    for name, mc in result.items():
        cfg = configs[decided[name]]
        assert mc.config_index == decided[name]
        assert mc.sparsity == pytest.approx(cfg.get("sparsity", cfg.get("sparse_ratio")))
        assert mc.op_type == types[names.index(name)]


@settings(max_examples=100, deadline=None)
@given(model_and_configs(), st.floats(0, 0.99), st.booleans())
def test_appending_a_config_changes_exactly_the_modules_it_selects(case, sparsity, exclude):
    """An appended 2.x dict (last wins) overrides or excludes exactly its modules; excluded ones stay out."""
    model, names, types, configs = case
    dead, decided = _oracle(names, types, configs)
    if dead or not decided:
        return
    target = [names[0]]
    extra = {"op_names": target, **({"exclude": True} if exclude else {"sparsity": sparsity})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigConventionWarning)
        before = select_modules(model, configs)
        if exclude and set(before) <= set(target):
            with pytest.raises(ConfigError, match="selects no module once 'exclude'"):
                select_modules(model, [*configs, extra])
            return
        after = select_modules(model, [*configs, extra])
    _, after_oracle = _oracle(names, types, [*configs, extra])
    for name in names:
        if name in target:
            assert (name in after) == (not exclude and name in after_oracle)
            if name in after:
                assert after[name].sparsity == pytest.approx(sparsity) and after[name].config_index == len(configs)
        else:  # the appended 2.x dict may switch a pure NNI 3.0 list to 2.x order: the oracle says how
            assert (name in after) == (name in after_oracle)
            if name in after:
                assert after[name].config_index == after_oracle[name]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(sorted(VALID_KEYS)), min_size=1, max_size=3, unique=True), st.text(min_size=1, max_size=12))
def test_any_key_outside_the_spec_is_named_in_the_error(keys, key):
    if key in VALID_KEYS:
        return
    with pytest.raises(ConfigError, match=re.escape(f"unknown key {key!r}")):
        validate_config_list([{"op_types": ["Conv2d"], key: 1}])


def test_linear_selects_multihead_attention_out_proj() -> None:
    """``nn.MultiheadAttention.out_proj`` is a ``NonDynamicallyQuantizableLinear``: ``Linear`` selects it,
    its own name too; a subclass of a supported type passes the pruner's type check."""
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    for op_type in ("Linear", "NonDynamicallyQuantizableLinear"):
        pruner = L1NormPruner(model, [{"op_types": [op_type], "sparsity": 0.5}])
        assert ("1.out_proj" in pruner.module_configs) and (("0" in pruner.module_configs) == (op_type == "Linear"))
