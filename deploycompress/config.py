"""The ``config_list`` spec shared by every pruner and quantizer.

A config_list is a list of dicts. Each dict selects modules (``op_types``, ``op_names``,
``op_partial_names``, ``op_names_re``, less ``exclude_op_names``/``exclude_op_types``/``exclude_op_names_re``)
and says what to do with them (a sparsity, or quantization settings), or removes them from the
selection (``exclude``).

``op_types`` names layer types. A module matches when it is an instance of the named type, subclasses
included (EfficientNet's ``Conv2dStaticSamePadding`` and timm's ``StdConv2d`` are ``Conv2d``); a name
is resolved against ``torch.nn``, the classes the model's modules are built from (by class name or
``module.qualname``) and types registered with :func:`register_op_type`. NNI matches the class name
exactly; ``"op_types_match": "exact"`` in a dict asks for that rule.

Both NNI generations' spellings are accepted (NNI 2.x ``sparsity``/``quant_types``/``exclude``;
NNI 3.0 ``sparse_ratio``/``target_names``/``target_settings``/...) and normalised to one canonical key
set before any work starts, so every error names the key the user wrote. NNI's conventions are
followed (docs/migrating-from-nni.md lists each):

- name selectors (``op_names``, ``op_partial_names``, ``op_names_re``) are a union, then intersected
  with ``op_types``; ``op_names_re`` matches from the start of the name (``re.match``), as in NNI
  (nni/compression/base/config.py ``select_modules_by_config``);
- a module several dicts select: in a list written in NNI 2.x keys the last dict wins (NNI 2.x
  ``Compressor.select_config``), in one written in NNI 3.0 keys the first dict wins and later ones
  may only add quantization targets it left unset (NNI 3.0 ``ModuleWrapper.extend_target_spaces``);
- an ``exclude`` dict excludes its modules whatever its position (NNI 3.0's
  ``trans_legacy_config_list``); where NNI 2.x would have let a later dict re-select them, a
  :class:`ConfigConventionWarning` says so.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from torch import nn
from torch.nn.utils import parametrize

from .errors import InputError
from .suggest import closest

__all__ = [
    "ConfigConventionWarning",
    "ConfigError",
    "config_style",
    "ModuleConfig",
    "validate_config_list",
    "select_modules",
    "op_type_of",
    "OP_TYPES_MATCH",
    "module_matches_types",
    "register_op_type",
    "resolve_op_types",
    "PRUNING_KEYS",
    "QUANT_KEYS",
    "SELECTION_KEYS",
    "VALID_KEYS",
]


log = logging.getLogger(__name__)


class ConfigError(InputError, ValueError):
    """A config_list that cannot be used: the message names the offending key, value or module."""


class ConfigConventionWarning(UserWarning):
    """A config_list whose result here differs from what one NNI generation gave for it."""


#: canonical key -> accepted spellings (NNI 2.x first, then NNI 3.0)
_ALIASES: dict[str, tuple[str, ...]] = {
    "sparsity": ("sparsity", "sparse_ratio", "sparsity_per_layer"),
    "total_sparsity": ("total_sparsity",),
    "max_sparsity_per_layer": ("max_sparsity_per_layer", "max_sparse_ratio"),
    "min_sparsity_per_layer": ("min_sparse_ratio",),
    "sparse_threshold": ("sparse_threshold",),
    "global_group_id": ("global_group_id",),
    "dependency_group_id": ("dependency_group_id",),
    "internal_metric_block": ("internal_metric_block",),
    "sparse_rounding": ("sparse_rounding",),
    "op_types": ("op_types",),
    "op_names": ("op_names",),
    "op_partial_names": ("op_partial_names",),
    "op_names_re": ("op_names_re",),
    "op_types_match": ("op_types_match",),
    "exclude": ("exclude",),
    "exclude_op_names": ("exclude_op_names",),
    "exclude_op_types": ("exclude_op_types",),
    "exclude_op_names_re": ("exclude_op_names_re",),
    "target_names": ("target_names",),
    "target_settings": ("target_settings",),
    "apply_method": ("apply_method",),
    "align": ("align",),
    "fuse_names": ("fuse_names",),
    "quant_types": ("quant_types",),
    "quant_bits": ("quant_bits",),
    "quant_dtype": ("quant_dtype",),
    "quant_scheme": ("quant_scheme",),
    "quant_start_step": ("quant_start_step",),
    "granularity": ("granularity",),
}
#: spellings only NNI 2.x wrote / only NNI 3.0 writes: they decide which precedence rule a list follows
NNI2_ONLY = frozenset({"sparsity", "sparsity_per_layer", "total_sparsity", "max_sparsity_per_layer", "quant_types",
                       "quant_bits", "exclude", "op_partial_names", "quant_start_step"})
NNI3_ONLY = frozenset({"sparse_ratio", "max_sparse_ratio", "min_sparse_ratio", "sparse_threshold", "target_names",
                       "target_settings", "exclude_op_names", "exclude_op_types", "exclude_op_names_re",
                       "global_group_id", "dependency_group_id", "internal_metric_block", "apply_method", "align",
                       "fuse_names"})
_SPELLING_TO_KEY = {spelling: key for key, spellings in _ALIASES.items() for spelling in spellings}
#: every spelling of a pruning amount (what a dict removes to keep only its selection)
AMOUNT_SPELLINGS = frozenset(
    s for k in ("sparsity", "total_sparsity", "max_sparsity_per_layer", "min_sparsity_per_layer", "global_group_id",
                "sparse_threshold", "sparse_rounding") for s in _ALIASES[k]
)
VALID_KEYS: tuple[str, ...] = tuple(sorted(_SPELLING_TO_KEY))

SELECTION_KEYS = ("op_types", "op_names", "op_partial_names", "op_names_re")
NAME_KEYS = ("op_names", "op_partial_names", "op_names_re")
PRUNING_KEYS = ("sparsity", "total_sparsity", "max_sparsity_per_layer", "global_group_id")
SPARSE_ROUNDINGS = ("floor", "nni")
QUANT_KEYS = ("quant_types", "quant_bits", "quant_dtype", "quant_scheme", "granularity", "quant_start_step")

QUANT_TYPES = ("weight", "input", "output")
QUANT_DTYPES = ("int", "uint")
QUANT_SCHEMES = ("symmetric", "affine")
GRANULARITIES = ("per_tensor", "per_channel")
#: how ``op_types`` match: ``isinstance`` (subclasses included; the default) or ``exact`` (NNI: the class name)
OP_TYPES_MATCH = ("isinstance", "exact")
_MIN_BITS, _MAX_BITS = 1, 16


@dataclass
class ModuleConfig:
    """The resolved settings for one selected module (the last config that selected it)."""

    name: str
    op_type: str
    config_index: int
    sparsity: float | None = None
    total_sparsity: float | None = None
    max_sparsity_per_layer: float | None = None
    #: modules sharing one ``total_sparsity`` budget: NNI 3.0's ``global_group_id``, else the config's index
    global_group_id: str | int | None = None
    #: NNI 3.0's channel-coupling keys (written by its ``auto_set_denpendency_group_ids``); here the
    #: coupled channels come from the traced graph (``dependency_aware=True``), which these must agree with
    dependency_group_id: str | int | None = None
    internal_metric_block: int | None = None
    #: how ``sparsity x units`` becomes a count: ``"floor"`` (float noise tolerated) or ``"nni"`` (``int()``)
    sparse_rounding: str = "floor"
    quant_types: tuple[str, ...] = ()
    quant_bits: dict[str, int] = field(default_factory=dict)
    quant_dtype: str = "int"
    quant_scheme: str = "symmetric"
    granularity: str = "per_tensor"
    #: NNI 2.x QAT's per-dict ``quant_start_step`` (QATQuantizer takes one for all modules)
    quant_start_step: int | None = None

    @property
    def is_pruning(self) -> bool:
        return self.sparsity is not None or self.total_sparsity is not None

    @property
    def is_quantization(self) -> bool:
        return bool(self.quant_types)


def _closest(word: str, choices: Iterable[str], n: int = 5) -> list[str]:
    return closest(word, choices, n=n, cutoff=0.4)


def _where(index: int) -> str:
    return f"config_list[{index}]"


def _as_str_list(index: int, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{_where(index)}: '{key}' must be a list of strings, got {value!r}")
    if not value:
        raise ConfigError(f"{_where(index)}: '{key}' is empty")
    return list(value)


def _ratio(index: int, key: str, value: Any, *, upper_inclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ConfigError(f"{_where(index)}: '{key}' must be a number, got {value!r}")
    value = float(value)
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ConfigError(f"{_where(index)}: '{key}' must lie in {bound}, got {value}")
    return value


def _bits(index: int, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not _MIN_BITS <= value <= _MAX_BITS:
        raise ConfigError(
            f"{_where(index)}: '{key}' must be an integer from {_MIN_BITS} to {_MAX_BITS}, got {value!r}"
        )
    return value


def _normalise_quant(index: int, cfg: dict[str, Any]) -> None:
    if "quant_types" in cfg:
        types = _as_str_list(index, "quant_types", cfg["quant_types"])
        for t in types:
            if t not in QUANT_TYPES:
                raise ConfigError(
                    f"{_where(index)}: unknown quant_type {t!r}; valid quant_types are {list(QUANT_TYPES)}"
                )
        cfg["quant_types"] = tuple(dict.fromkeys(types))
    elif any(k in cfg for k in QUANT_KEYS):
        raise ConfigError(
            f"{_where(index)}: quantization keys given without 'quant_types' (NNI 2.x) or 'target_names' (NNI 3.0)"
        )
    if "apply_method" in cfg and "quant_types" in cfg:
        if cfg["apply_method"] not in ("clamp_round", "qat_clamp_round"):
            raise ConfigError(f"{_where(index)}: apply_method {cfg['apply_method']!r} is not supported (the quantizer decides: clamp_round)")
        del cfg["apply_method"]
    if "quant_bits" in cfg:
        bits = cfg["quant_bits"]
        types = cfg.get("quant_types", ())
        if isinstance(bits, Mapping):
            out = {}
            for t, b in bits.items():
                if t not in types:
                    raise ConfigError(
                        f"{_where(index)}: quant_bits names {t!r}, which is not in quant_types {list(types)}"
                    )
                out[t] = _bits(index, f"quant_bits[{t!r}]", b)
            cfg["quant_bits"] = out
        else:
            b = _bits(index, "quant_bits", bits)
            cfg["quant_bits"] = {t: b for t in types}
    for key in ("quant_dtype", "quant_scheme"):  # NNI 2.x: one value per kind, {"input": "uint", ...}
        if isinstance(cfg.get(key), Mapping):
            per_kind = dict(cfg[key])
            for t in per_kind:
                if t not in cfg.get("quant_types", ()):
                    raise ConfigError(f"{_where(index)}: {key} names {t!r}, which is not in quant_types {list(cfg.get('quant_types', ()))}")
            if len({str(v) for v in per_kind.values()}) > 1:
                raise ConfigError(
                    f"{_where(index)}: {key} differs between kinds ({per_kind}); one {key} per module here: "
                    "give one value"
                )
            if not per_kind:
                raise ConfigError(f"{_where(index)}: {key} is an empty dict")
            cfg[key] = next(iter(per_kind.values()))
    if "quant_start_step" in cfg:
        step = cfg["quant_start_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"{_where(index)}: 'quant_start_step' must be a non-negative integer, got {step!r}")
    if "quant_dtype" in cfg:
        dtype = cfg["quant_dtype"]
        # NNI 3.0 writes "int8"/"uint8": the bit width then also comes from the dtype.
        m = re.fullmatch(r"(u?int)(\d+)?", str(dtype))
        if not m:
            raise ConfigError(
                f"{_where(index)}: quant_dtype must be one of {list(QUANT_DTYPES)} (or 'int8', 'uint8', ...), "
                f"got {dtype!r}"
            )
        cfg["quant_dtype"] = m.group(1)
        if m.group(2) is not None:
            b = _bits(index, "quant_dtype", int(m.group(2)))
            cfg.setdefault("quant_bits", {t: b for t in cfg.get("quant_types", ())})
    if "quant_scheme" in cfg:
        scheme = cfg["quant_scheme"]
        # NNI 2.x: per_tensor_affine, per_channel_symmetric, ...; the granularity part is split off.
        m = re.fullmatch(r"(?:(per_tensor|per_channel)_)?(symmetric|affine)", str(scheme))
        if not m:
            raise ConfigError(
                f"{_where(index)}: quant_scheme must be one of {list(QUANT_SCHEMES)} "
                f"(or NNI's per_tensor_affine, per_channel_symmetric, ...), got {scheme!r}"
            )
        cfg["quant_scheme"] = m.group(2)
        if m.group(1):
            cfg.setdefault("granularity", m.group(1))
    if "granularity" in cfg:
        g = cfg["granularity"]
        g = {"default": "per_tensor", "out_channel": "per_channel"}.get(g, g) if isinstance(g, str) else g
        if g not in GRANULARITIES:
            raise ConfigError(
                f"{_where(index)}: granularity must be one of {list(GRANULARITIES)}, got {cfg['granularity']!r}"
            )
        cfg["granularity"] = g

#: NNI 3.0 target names -> the tensor kinds quantized here (nni/compression/base/setting.py: a bare
#: ``_input_``/``_output_`` means the first one)
_QUANT_TARGETS = {"weight": "weight", "_input_": "input", "_input_0": "input", "_output_": "output", "_output_0": "output"}
_PRUNE_SETTING_KEYS = {"sparse_ratio", "max_sparse_ratio", "min_sparse_ratio", "sparse_threshold", "global_group_id",
                       "dependency_group_id", "internal_metric_block", "granularity", "apply_method", "align"}
_QUANT_SETTING_KEYS = {"quant_dtype", "quant_scheme", "granularity", "apply_method", "fuse_names"}
#: NNI 3.0's default bias setting (PruningSetting.default_setting): the bias follows the weight's rows
_NNI_BIAS_ALIGN = {"module_name": None, "target_name": "weight", "dims": [0]}


def _is_quant_config(cfg: Mapping[str, Any], kind: str | None) -> bool:
    if kind is not None:
        return kind == "quantization"
    if any(k in cfg for k in ("quant_types", "quant_bits", "quant_dtype", "quant_scheme", "fuse_names")):
        return True
    names = cfg.get("target_names") or []
    settings = cfg.get("target_settings") or {}
    return any(str(t).startswith(("_input_", "_output_")) for t in [*names, *settings]) or any(
        isinstance(v, Mapping) and "quant_dtype" in v for v in settings.values()
    )


def _expand_targets(index: int, cfg: dict[str, Any], kind: str | None) -> None:
    """NNI 3.0's ``target_names``/``target_settings`` -> this project's per-config keys.

    Pruning: the targets are ``weight`` (scored and masked) and ``bias`` (follows the weight's rows);
    ``target_settings['weight']`` overrides the dict's own keys, as in NNI's ``ModuleSetting.get``.
    Quantization: ``weight``, ``_input_0``, ``_output_0`` become ``quant_types``; each target's
    ``quant_dtype`` ("int8", "uint4", ...) gives its bits; dtype, scheme and granularity must agree
    across the targets of one dict (one setting per module here).
    """
    names = cfg.pop("target_names", None)
    settings = cfg.pop("target_settings", None)
    if names is None and settings is None:
        return
    where = _where(index)
    if names is not None:
        names = _as_str_list(index, "target_names", names)
    if settings is not None and (not isinstance(settings, Mapping) or not all(isinstance(v, Mapping) for v in settings.values())):
        raise ConfigError(f"{where}: 'target_settings' must map target names to dicts of settings, got {settings!r}")
    settings = {str(k): dict(v) for k, v in (settings or {}).items()}
    if not _is_quant_config(cfg, kind):
        targets = names or ["weight", "bias"]
        bad = [t for t in [*targets, *settings] if t not in ("weight", "bias")]
        if bad:
            raise ConfigError(f"{where}: pruning targets {bad} are not supported; prune 'weight' (its 'bias' follows)")
        if "weight" not in targets:
            raise ConfigError(f"{where}: target_names {targets} has no 'weight': pruning here scores and masks weights")
        if "bias" not in targets:
            warnings.warn(
                f"{where}: target_names omits 'bias'; NNI 3.0 then leaves the bias of pruned channels, here it is "
                "masked with its channel (speedup removes the channel either way)",
                ConfigConventionWarning,
                stacklevel=4,
            )
        for key, value in settings.get("bias", {}).items():
            if key == "align" and value == _NNI_BIAS_ALIGN or key == "apply_method" and value == "mul":
                continue
            raise ConfigError(f"{where}: target_settings['bias'][{key!r}] = {value!r}: the bias here always follows the weight's rows")
        for key, value in settings.get("weight", {}).items():
            if key not in _PRUNE_SETTING_KEYS:
                raise ConfigError(f"{where}: target_settings['weight'] has unknown key {key!r}; valid: {sorted(_PRUNE_SETTING_KEYS)}")
            cfg[_SPELLING_TO_KEY.get(key, key)] = value  # the target's own setting wins over the dict's shortcut key
        return
    targets = names or list(settings)
    if not targets:
        raise ConfigError(f"{where}: target_names is empty")
    kinds: list[str] = []
    for t in targets:
        k = _QUANT_TARGETS.get(t)
        if k is None:
            raise ConfigError(
                f"{where}: quantization target {t!r} is not supported; valid: 'weight', '_input_' (or '_input_0'), "
                "'_output_' (or '_output_0') (a module's bias is quantized by the backend from its input and weight scales)"
            )
        kinds.append(k)
    for t in settings:
        if t not in targets:
            raise ConfigError(f"{where}: target_settings names {t!r}, which is not in target_names {targets}")
    per_target: dict[str, dict[str, Any]] = {}
    for t, k in zip(targets, kinds):
        merged = {key: cfg[key] for key in ("quant_dtype", "quant_scheme", "granularity", "apply_method") if key in cfg}
        for key, value in settings.get(t, {}).items():
            if key not in _QUANT_SETTING_KEYS:
                raise ConfigError(f"{where}: target_settings[{t!r}] has unknown key {key!r}; valid: {sorted(_QUANT_SETTING_KEYS)}")
            merged[key] = value
        per_target[k] = merged
    bits: dict[str, int] = {}
    agreed: dict[str, Any] = {}
    for k, merged in per_target.items():
        dtype = merged.get("quant_dtype", "int8")  # NNI 3.0: an unset dtype is int8
        m = re.fullmatch(r"(u?int)(\d+)", str(dtype))
        if not m:
            raise ConfigError(f"{where}: quant_dtype of {k} must be NNI's 'int8', 'uint8', 'int4', ..., got {dtype!r}")
        bits[k] = _bits(index, f"quant_dtype of {k}", int(m.group(2)))
        gran = merged.get("granularity")  # unset: the quantizer's default (NNI 3.0's is per tensor)
        if k != "weight" and gran not in (None, "default", "per_tensor"):
            raise ConfigError(f"{where}: granularity {gran!r} for {k}: activations are quantized per tensor here")
        for key, value in (("quant_dtype", m.group(1)), ("quant_scheme", merged.get("quant_scheme")),
                           ("granularity", gran if k == "weight" else None), ("apply_method", merged.get("apply_method"))):
            if value is None:
                continue
            if key in agreed and agreed[key] != value:
                raise ConfigError(
                    f"{where}: {key} differs between targets ({agreed[key]!r} vs {value!r}); one {key} per module "
                    "here: give those targets in separate dicts for separate modules, or one value"
                )
            agreed[key] = value
    method = agreed.pop("apply_method", None)
    if method not in (None, "clamp_round", "qat_clamp_round"):
        raise ConfigError(f"{where}: apply_method {method!r} is not supported (the quantizer decides: clamp_round)")
    cfg.pop("apply_method", None)
    cfg.update(agreed)
    cfg["quant_types"] = kinds
    cfg["quant_bits"] = bits


def config_style(config_list: Sequence[Mapping[str, Any]]) -> str:
    """``"nni3"`` when the dicts use NNI 3.0-only keys and no 2.x-only one, ``"mixed"`` when both,
    else ``"nni2"``: it decides which dict wins for a module several select."""
    keys = {str(k) for cfg in config_list if isinstance(cfg, Mapping) for k in cfg}
    v2, v3 = bool(keys & NNI2_ONLY), bool(keys & NNI3_ONLY)
    return "mixed" if v2 and v3 else "nni3" if v3 else "nni2"


def validate_config_list(config_list: Any, kind: str | None = None) -> list[dict[str, Any]]:
    """Check a config_list and return normalised copies (canonical keys, parsed values).

    ``kind`` is ``"pruning"`` or ``"quantization"`` to require the keys that kind of algorithm
    needs; ``None`` checks only that the dicts are well formed.
    """
    if kind not in (None, "pruning", "quantization"):
        raise ValueError(f"kind must be 'pruning', 'quantization' or None, got {kind!r}")
    if isinstance(config_list, Mapping) or not isinstance(config_list, Sequence) or isinstance(config_list, str):
        raise ConfigError(f"config_list must be a list of dicts, got {type(config_list).__name__}")
    if not config_list:
        raise ConfigError("config_list is empty: give at least one dict that selects modules")
    out: list[dict[str, Any]] = []
    for index, raw in enumerate(config_list):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{_where(index)} must be a dict, got {type(raw).__name__}")
        cfg: dict[str, Any] = {}
        for spelling, value in raw.items():
            key = _SPELLING_TO_KEY.get(spelling)
            if key is None:
                hint = _closest(str(spelling), VALID_KEYS, n=3)
                did_you_mean = f" (did you mean {', '.join(map(repr, hint))}?)" if hint else ""
                raise ConfigError(
                    f"{_where(index)}: unknown key {spelling!r}{did_you_mean}; valid keys are {list(VALID_KEYS)}"
                )
            if key in cfg:
                raise ConfigError(f"{_where(index)}: {spelling!r} repeats key {key!r} under another spelling")
            cfg[key] = value
        weight_settings = raw.get("target_settings") or {}
        weight_settings = weight_settings.get("weight", {}) if isinstance(weight_settings, Mapping) else {}
        nni3_ratio = "sparse_ratio" in raw or "sparse_ratio" in weight_settings
        nni3_cap = "max_sparse_ratio" in raw or "max_sparse_ratio" in weight_settings
        _expand_targets(index, cfg, kind)

        for key in ("op_types", "op_names", "op_partial_names", "op_names_re"):
            if key in cfg:
                cfg[key] = _as_str_list(index, key, cfg[key])
        for key in ("exclude_op_names", "exclude_op_types", "exclude_op_names_re"):
            if key in cfg:  # NNI writes empty exclusion lists itself (trans_legacy_config_list)
                cfg[key] = _as_str_list(index, key, cfg[key]) if cfg[key] != [] else []
        for key in ("op_names_re", "exclude_op_names_re"):
            for pattern in cfg.get(key, []):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{_where(index)}: {key} {pattern!r} is not a valid regex: {exc}") from None
        for key, hint in (("sparse_threshold", "give 'sparse_ratio'"), ("fuse_names", "BatchNorm after a conv is folded at export")):
            if key in cfg:
                raise ConfigError(f"{_where(index)}: NNI 3.0's {key!r} is not supported here ({hint})")
        _check_pruning_extras(index, cfg)
        if "op_types_match" in cfg and cfg["op_types_match"] not in OP_TYPES_MATCH:
            raise ConfigError(
                f"{_where(index)}: 'op_types_match' must be one of {list(OP_TYPES_MATCH)}, got {cfg['op_types_match']!r}"
            )
        if not any(k in cfg for k in SELECTION_KEYS):
            raise ConfigError(
                f"{_where(index)} selects no modules: give at least one of {list(SELECTION_KEYS)}"
            )
        if "exclude" in cfg:
            if not isinstance(cfg["exclude"], bool):
                raise ConfigError(f"{_where(index)}: 'exclude' must be true or false, got {cfg['exclude']!r}")
            if not cfg["exclude"]:
                del cfg["exclude"]

        if "sparsity" in cfg:
            # NNI 3.0 allows sparse_ratio 1.0 (its mask then zeroes the layer); 2.x's sparsity stays below 1
            cfg["sparsity"] = _ratio(index, "sparsity", cfg["sparsity"], upper_inclusive=nni3_ratio)
            if cfg["sparsity"] == 1.0:
                warnings.warn(
                    f"{_where(index)}: sparse_ratio 1.0 zeroes whole layers in NNI 3.0; here one unit (weight or "
                    "channel) of each layer is kept, so the layer still exists after speedup",
                    ConfigConventionWarning,
                    stacklevel=2,
                )
            if "global_group_id" not in cfg:  # NNI 3.0 _generate_ratio_sparsity: min(max, max(min, ratio))
                lo = cfg.pop("min_sparsity_per_layer", None)
                hi = cfg.pop("max_sparsity_per_layer", None) if nni3_cap else None
                if lo is not None:
                    cfg["sparsity"] = max(cfg["sparsity"], _ratio(index, "min_sparse_ratio", lo, upper_inclusive=False))
                if hi is not None:
                    cfg["sparsity"] = min(cfg["sparsity"], _ratio(index, "max_sparse_ratio", hi, upper_inclusive=True))
        if "min_sparsity_per_layer" in cfg:
            raise ConfigError(f"{_where(index)}: 'min_sparse_ratio' is supported with a per-layer 'sparse_ratio' only, not a global budget")
        if "global_group_id" in cfg:
            # NNI 3.0: sparse_ratio is then the total of every module whose config has this id
            gid = cfg["global_group_id"]
            if isinstance(gid, bool) or not isinstance(gid, (str, int)):
                raise ConfigError(f"{_where(index)}: 'global_group_id' must be a string or an integer, got {gid!r}")
            if "sparsity" not in cfg:
                raise ConfigError(f"{_where(index)}: 'global_group_id' needs 'sparse_ratio', the group's total sparsity")
            cfg["total_sparsity"] = cfg.pop("sparsity")
        if "total_sparsity" in cfg:
            cfg["total_sparsity"] = _ratio(index, "total_sparsity", cfg["total_sparsity"], upper_inclusive=False)
        if ("dependency_group_id" in cfg or "internal_metric_block" in cfg) and "sparsity" not in cfg and "total_sparsity" not in cfg:
            raise ConfigError(f"{_where(index)}: 'dependency_group_id'/'internal_metric_block' need 'sparse_ratio'")
        if isinstance(cfg.get("max_sparsity_per_layer"), Mapping):  # NNI 2.x: {module_name: cap}
            caps = {str(n): _ratio(index, f"max_sparsity_per_layer[{n!r}]", v, upper_inclusive=True)
                    for n, v in cfg["max_sparsity_per_layer"].items()}
            if "total_sparsity" not in cfg:
                raise ConfigError(f"{_where(index)}: 'max_sparsity_per_layer' only applies with 'total_sparsity'")
            cfg["max_sparsity_per_layer"] = caps
        elif "max_sparsity_per_layer" in cfg:
            cfg["max_sparsity_per_layer"] = _ratio(
                index, "max_sparsity_per_layer", cfg["max_sparsity_per_layer"], upper_inclusive=True
            )
            if "total_sparsity" not in cfg:
                raise ConfigError(f"{_where(index)}: 'max_sparsity_per_layer' only applies with 'total_sparsity'")
            if cfg["max_sparsity_per_layer"] < cfg["total_sparsity"]:
                raise ConfigError(
                    f"{_where(index)}: max_sparsity_per_layer {cfg['max_sparsity_per_layer']} is below "
                    f"total_sparsity {cfg['total_sparsity']}: the budget could never be met"
                )
        if "sparsity" in cfg and "total_sparsity" in cfg:
            raise ConfigError(f"{_where(index)}: give 'sparsity' or 'total_sparsity', not both")
        _normalise_quant(index, cfg)

        if not cfg.get("exclude"):
            has_pruning = "sparsity" in cfg or "total_sparsity" in cfg
            has_quant = "quant_types" in cfg
            if kind == "pruning" and not has_pruning:
                raise ConfigError(
                    f"{_where(index)} has no 'sparsity' or 'total_sparsity' (and is not an 'exclude' entry)"
                )
            if kind == "quantization" and not has_quant:
                raise ConfigError(f"{_where(index)} has no 'quant_types' (and is not an 'exclude' entry)")
        _check_kind(index, cfg, kind)
        out.append(cfg)
    _check_global_groups(out)
    return out


def _check_kind(index: int, cfg: Mapping[str, Any], kind: str | None) -> None:
    """Keys of the other kind of algorithm would be ignored: refuse them by name."""
    other = {"pruning": (QUANT_KEYS, "quantization", "a quantizer"), "quantization": (PRUNING_KEYS, "pruning", "a pruner")}.get(kind or "")
    if other is None:
        return
    keys, what, where = other
    given = [k for k in keys if k in cfg]
    if given:
        raise ConfigError(f"{_where(index)}: {what} key(s) {given} given to a {kind} algorithm, which would ignore them; "
                          f"put them in the config_list of {where}")


def known_op_types(model: nn.Module) -> set[str]:
    """Names ``op_types`` may use (what :func:`resolve_op_types` answers to): every ``torch.nn`` module
    class, the model's classes and their bases (name or ``module.qualname``), registered types, and
    the aliases of :data:`OP_TYPE_ALIASES`."""
    names = {n for n, c in vars(nn).items() if isinstance(c, type) and issubclass(c, nn.Module)}
    for cls in _model_classes(model):
        names.update((cls.__name__, f"{cls.__module__}.{cls.__qualname__}"))
    return names | set(_REGISTERED_OP_TYPES) | set(OP_TYPE_ALIASES) | {"default"}


def _check_op_types(index: int, cfg: Mapping[str, Any], known: set[str]) -> None:
    """A name nothing answers to would silently select nothing: refuse it with close matches."""
    for key in ("op_types", "exclude_op_types"):
        for t in cfg.get(key, ()):
            if t not in known:
                hint = _closest(t, known, n=3)
                raise ConfigError(f"{_where(index)}: {key} names {t!r}, which matches no module: it is neither a torch.nn module "
                                  f"class, a class of the model nor a registered type (register_op_type)"
                                  + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else ""))


def _check_pruning_extras(index: int, cfg: dict[str, Any]) -> None:
    where = _where(index)
    if "dependency_group_id" in cfg:
        gid = cfg["dependency_group_id"]
        if isinstance(gid, bool) or not isinstance(gid, (str, int)):
            raise ConfigError(f"{where}: 'dependency_group_id' must be a string or an integer, got {gid!r}")
    if "internal_metric_block" in cfg:
        block = cfg["internal_metric_block"]
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ConfigError(f"{where}: 'internal_metric_block' must be a positive integer (NNI: filter groups), got {block!r}")
    if "sparse_rounding" in cfg and cfg["sparse_rounding"] not in SPARSE_ROUNDINGS:
        raise ConfigError(f"{where}: 'sparse_rounding' must be one of {list(SPARSE_ROUNDINGS)}, got {cfg['sparse_rounding']!r}")
    if "apply_method" in cfg and "quant_types" not in cfg and cfg["apply_method"] != "mul":
        raise ConfigError(f"{where}: apply_method {cfg['apply_method']!r} is not supported for pruning (masks multiply: 'mul')")
    if "align" in cfg:
        raise ConfigError(f"{where}: 'align' belongs in target_settings['bias'] (the bias follows the weight here)")
    if "granularity" in cfg and "quant_types" not in cfg and not any(k in cfg for k in ("quant_dtype", "quant_scheme", "quant_bits")):
        g = cfg.pop("granularity")
        if g not in ("default", "out_channel", "per_channel"):
            raise ConfigError(
                f"{where}: pruning granularity {g!r} is not supported; the pruner decides its unit "
                "('default': weights for LevelPruner, output channels for the channel pruners)"
            )


def _check_global_groups(configs: list[dict[str, Any]]) -> None:
    first: dict[Any, int] = {}
    for index, cfg in enumerate(configs):
        gid = cfg.get("global_group_id")
        if gid is None:
            continue
        j = first.setdefault(gid, index)
        if configs[j]["total_sparsity"] != cfg["total_sparsity"]:
            raise ConfigError(
                f"{_where(index)}: global_group_id {gid!r} has sparse_ratio {cfg['total_sparsity']}, but "
                f"{_where(j)} gives the same group {configs[j]['total_sparsity']}: one group, one budget"
            )


def op_type_of(module: nn.Module) -> str:
    """The class name a config's ``op_types`` means: a module with masks or fake-quant attached
    through ``torch.nn.utils.parametrize`` (class ``ParametrizedConv2d``) still counts as ``Conv2d``."""
    return op_class_of(module).__name__


# torch classes that are their base under another name: under exact matching ``Linear`` selects them too
OP_TYPE_ALIASES = {"NonDynamicallyQuantizableLinear": "Linear"}  # nn.MultiheadAttention.out_proj

#: op type name -> classes registered under it (:func:`register_op_type`)
_REGISTERED_OP_TYPES: dict[str, list[type]] = {}


def register_op_type(cls: type, name: str | None = None) -> type:
    """Make ``name`` (default: the class name) in ``op_types`` select instances of ``cls`` and its subclasses,
    for a class the model does not build itself from (e.g. a base class of a library's layers).
    Usable as a class decorator; returns ``cls``."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_op_type needs a torch.nn.Module subclass, got {cls!r}")
    entry = _REGISTERED_OP_TYPES.setdefault(name or cls.__name__, [])
    if cls not in entry:
        entry.append(cls)
    return cls


def _model_classes(model: nn.Module | None) -> list[type]:
    if model is None:
        return []
    seen: dict[type, None] = {}
    for m in model.modules():
        for cls in op_class_of(m).__mro__:
            if issubclass(cls, nn.Module):
                seen.setdefault(cls, None)
    return list(seen)


def resolve_op_types(names: Iterable[str], model: nn.Module | None = None) -> tuple[type, ...]:
    """The classes ``names`` stand for: ``torch.nn.<name>``, the model's classes (and their bases) whose
    ``__name__`` or ``module.qualname`` is the name, and registered types. A name nothing answers to
    resolves to no class (it then selects nothing)."""
    classes = _model_classes(model)
    out: dict[type, None] = {}
    for name in names:
        found = getattr(nn, name, None)
        if isinstance(found, type) and issubclass(found, nn.Module):
            out.setdefault(found, None)
        for cls in classes:
            if name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
                out.setdefault(cls, None)
        for cls in _REGISTERED_OP_TYPES.get(name, ()):
            out.setdefault(cls, None)
        if name == "Linear" and model is not None:  # transformers' Conv1D and the other linear-like layers
            from .linear_like import linear_like_classes

            for cls in linear_like_classes(model):
                out.setdefault(cls, None)
    return tuple(out)


def op_class_of(module: nn.Module) -> type:
    """The module's own class, seen through ``torch.nn.utils.parametrize``'s ``Parametrized<Name>`` class."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls


def module_matches_types(module: nn.Module, names: Iterable[str], classes: tuple[type, ...], match: str = "isinstance") -> bool:
    """Whether ``module`` is one of the op types: an instance of ``classes`` (``match="isinstance"``), or
    of a class named exactly one of ``names`` (``match="exact"``, NNI's rule)."""
    if match == "exact":
        names = set(names)
        op_type = op_type_of(module)
        return op_type in names or OP_TYPE_ALIASES.get(op_type) in names
    return isinstance(module, classes)


@dataclass(frozen=True)
class _TypeSpec:
    names: tuple[str, ...]
    classes: tuple[type, ...]
    match: str

    def __contains__(self, module: nn.Module) -> bool:
        return module_matches_types(module, self.names, self.classes, self.match)


def _matches(name: str, module: nn.Module, cfg: Mapping[str, Any], op_types: _TypeSpec | None, excluded: _TypeSpec | None) -> bool:
    if op_types is not None and module not in op_types:
        return False
    # the name selectors are one union (NNI 3.0 select_modules_by_config; NNI 2.x folded
    # op_partial_names into op_names); op_names_re matches from the start of the name (re.match)
    if any(k in cfg for k in NAME_KEYS) and not (
        name in cfg.get("op_names", ())
        or any(p in name for p in cfg.get("op_partial_names", ()))
        or any(re.match(p, name) for p in cfg.get("op_names_re", ()))
    ):
        return False
    if name in cfg.get("exclude_op_names", ()) or (excluded is not None and module in excluded):
        return False
    if any(re.match(p, name) for p in cfg.get("exclude_op_names_re", ())):
        return False
    return True


def _merge_nni3_targets(index: int, first: dict[str, Any], later: dict[str, Any], name: str) -> dict[str, Any]:
    """NNI 3.0: a later dict adds only the quantization targets the first left unset."""
    new = [t for t in later.get("quant_types", ()) if t not in first.get("quant_types", ())]
    if not new:
        log.info("%s: module %r is already configured by an earlier dict; NNI 3.0 ignores this one too", _where(index), name)
        return first
    for key in ("quant_dtype", "quant_scheme", "granularity"):
        if key in later and key in first and later[key] != first[key]:
            raise ConfigError(
                f"{_where(index)} adds {new} to module {name!r} with {key} {later[key]!r}, but an earlier dict "
                f"gave it {first[key]!r}: one {key} per module here"
            )
    merged = dict(first)
    merged["quant_types"] = (*first.get("quant_types", ()), *new)
    merged["quant_bits"] = {**first.get("quant_bits", {}), **{t: b for t, b in later.get("quant_bits", {}).items() if t in new}}
    for key in ("quant_dtype", "quant_scheme", "granularity"):
        if key in later:
            merged.setdefault(key, later[key])
    return merged


def select_modules(
    model: nn.Module,
    config_list: Any,
    *,
    kind: str | None = None,
    default_op_types: Sequence[str] = (),
    supported_op_types: Sequence[str] | None = None,
    algorithm: str = "this algorithm",
) -> dict[str, ModuleConfig]:
    """Resolve a config_list against a model: ``{module_name: ModuleConfig}`` in model order.

    Raises :class:`ConfigError` before any work for names that match no module (with the closest
    names), a config that selects nothing, or a selected module the algorithm cannot handle.
    """
    configs = validate_config_list(config_list, kind=kind)
    style = config_style(config_list)
    # the modules inside a parametrization (masks, fake-quant) are machinery, not model layers
    named = [(name, m) for name, m in model.named_modules() if name and ".parametrizations" not in f".{name}"]
    names = [n for n, _ in named]
    name_set = set(names)
    selected: dict[str, tuple[int, dict[str, Any]]] = {}
    excluded: dict[str, int] = {}  # module -> the exclude dict that removed it (global, any position)
    chosen_by: dict[str, list[int]] = {}
    known_types = known_op_types(model)

    for index, cfg in enumerate(configs):
        _check_op_types(index, cfg, known_types)
        for key in ("op_names", "exclude_op_names"):
            for op_name in cfg.get(key, []):
                if op_name not in name_set:
                    hint = _closest(op_name, names)
                    raise ConfigError(
                        f"{_where(index)}: {key} names {op_name!r}, which is not a module of the model"
                        + (f"; closest module names: {hint}" if hint else "")
                    )
        match = cfg.get("op_types_match", "isinstance")
        op_types: _TypeSpec | None = None
        if "op_types" in cfg:
            wanted: list[str] = []
            for t in cfg["op_types"]:
                if t == "default":
                    if not default_op_types:
                        raise ConfigError(f"{_where(index)}: op_types 'default' given, but {algorithm} has no default types")
                    wanted.extend(default_op_types)
                else:
                    wanted.append(t)
            op_types = _TypeSpec(tuple(wanted), resolve_op_types(wanted, model), match)
        excluded_types = None
        if cfg.get("exclude_op_types"):
            excluded_types = _TypeSpec(tuple(cfg["exclude_op_types"]), resolve_op_types(cfg["exclude_op_types"], model), match)
        hit = False
        for name, module in named:
            if _matches(name, module, cfg, op_types, excluded_types):
                hit = True
                if cfg.get("exclude"):
                    excluded.setdefault(name, index)
                    continue
                chosen_by.setdefault(name, []).append(index)
                if name not in selected or style != "nni3":
                    selected[name] = (index, cfg)  # NNI 2.x: the last dict wins
                elif "quant_types" in cfg:
                    selected[name] = (selected[name][0], _merge_nni3_targets(index, selected[name][1], cfg, name))
        if not hit:
            present = sorted({op_type_of(m) for _, m in named})
            raise ConfigError(
                f"{_where(index)} matches no module of the model; module types present: {present}"
            )

    _warn_conventions(style, excluded, chosen_by, configs)
    for index, cfg in enumerate(configs):
        caps = cfg.get("max_sparsity_per_layer")
        if isinstance(caps, Mapping):
            stray = sorted(n for n in caps if selected.get(n, (None,))[0] != index)
            if stray:
                raise ConfigError(f"{_where(index)}: max_sparsity_per_layer names {stray}, which this dict does not decide")
    result: dict[str, ModuleConfig] = {}
    modules = dict(named)
    supported = None if supported_op_types is None else resolve_op_types(supported_op_types, model)
    for name in names:
        entry = selected.get(name)
        if entry is None or name in excluded:
            continue
        index, cfg = entry
        op_type = op_type_of(modules[name])
        # a subclass is handled as its base (what its forward computes is checked where it is run)
        if supported is not None and not isinstance(modules[name], supported):
            raise ConfigError(
                f"{_where(index)} selects module {name!r} of type {op_type}, which {algorithm} cannot handle; "
                f"supported types: {list(supported_op_types)}"
            )
        quant_types = tuple(cfg.get("quant_types", ()))
        bits = dict(cfg.get("quant_bits", {}))
        for t in quant_types:
            bits.setdefault(t, 8)
        result[name] = ModuleConfig(
            name=name,
            op_type=op_type,
            config_index=index,
            sparsity=cfg.get("sparsity"),
            total_sparsity=cfg.get("total_sparsity"),
            max_sparsity_per_layer=_cap_of(cfg.get("max_sparsity_per_layer"), name),
            global_group_id=cfg.get("global_group_id"),
            dependency_group_id=cfg.get("dependency_group_id"),
            internal_metric_block=cfg.get("internal_metric_block"),
            sparse_rounding=cfg.get("sparse_rounding", "floor"),
            quant_types=quant_types,
            quant_bits=bits,
            quant_dtype=cfg.get("quant_dtype", "int"),
            quant_scheme=cfg.get("quant_scheme", "symmetric"),
            granularity=cfg.get("granularity", "per_tensor"),
            quant_start_step=cfg.get("quant_start_step"),
        )
    if not result:
        raise ConfigError("config_list selects no module once 'exclude' entries are applied")
    return result


def _warn_conventions(style: str, excluded: Mapping[str, int], chosen_by: Mapping[str, list[int]], configs: list[dict[str, Any]]) -> None:
    """Name the modules whose result here differs from one NNI generation's."""
    reselected = sorted(n for n, ex in excluded.items() if any(i > ex for i in chosen_by.get(n, ())))
    if reselected:
        warnings.warn(
            f"modules {reselected[:8]} are excluded by an 'exclude' dict and selected again by a later dict: they "
            "stay excluded (NNI 3.0's rule); NNI 2.x let the later dict win. Remove the exclude dict to compress them",
            ConfigConventionWarning,
            stacklevel=3,
        )
    if style == "mixed":
        overlap = sorted(n for n, ix in chosen_by.items() if len(set(ix)) > 1 and n not in excluded)
        if overlap:
            warnings.warn(
                f"the config_list mixes NNI 2.x and NNI 3.0 keys and several dicts select {overlap[:8]}: the last one "
                "wins (NNI 2.x's rule; NNI 3.0 keeps the first). Write the list in one generation's keys",
                ConfigConventionWarning,
                stacklevel=3,
            )


def _cap_of(caps: Any, name: str) -> float | None:
    """A module's ``max_sparsity_per_layer``: one value, or NNI 2.x's ``{module_name: cap}`` (others uncapped)."""
    return caps.get(name) if isinstance(caps, Mapping) else caps
