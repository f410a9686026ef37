"""The ``config_list`` spec shared by every pruner and quantizer.

A config_list is a list of dicts. Each dict selects modules (``op_types``, ``op_names``,
``op_partial_names``, ``op_names_re``) and says what to do with them (a sparsity, or quantization
settings), or removes them from the selection (``exclude``). For a module that several dicts select,
the last one wins as a whole: this is NNI's rule, so configs written for NNI run unchanged.

Both NNI generations' spellings are accepted and normalised to one canonical key set before any
work starts, so every error names the key the user wrote.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from torch import nn
from torch.nn.utils import parametrize

from .errors import InputError

__all__ = [
    "ConfigError",
    "ModuleConfig",
    "validate_config_list",
    "select_modules",
    "op_type_of",
    "PRUNING_KEYS",
    "QUANT_KEYS",
    "SELECTION_KEYS",
    "VALID_KEYS",
]


class ConfigError(InputError, ValueError):
    """A config_list that cannot be used: the message names the offending key, value or module."""


#: canonical key -> accepted spellings (NNI 2.x first, then NNI 3.0)
_ALIASES: dict[str, tuple[str, ...]] = {
    "sparsity": ("sparsity", "sparse_ratio", "sparsity_per_layer"),
    "total_sparsity": ("total_sparsity",),
    "max_sparsity_per_layer": ("max_sparsity_per_layer", "max_sparse_ratio"),
    "global_group_id": ("global_group_id",),
    "op_types": ("op_types",),
    "op_names": ("op_names",),
    "op_partial_names": ("op_partial_names",),
    "op_names_re": ("op_names_re",),
    "exclude": ("exclude",),
    "exclude_op_names": ("exclude_op_names",),
    "exclude_op_types": ("exclude_op_types",),
    "quant_types": ("quant_types", "target_names"),
    "quant_bits": ("quant_bits",),
    "quant_dtype": ("quant_dtype",),
    "quant_scheme": ("quant_scheme",),
    "granularity": ("granularity",),
}
_SPELLING_TO_KEY = {spelling: key for key, spellings in _ALIASES.items() for spelling in spellings}
VALID_KEYS: tuple[str, ...] = tuple(sorted(_SPELLING_TO_KEY))

SELECTION_KEYS = ("op_types", "op_names", "op_partial_names", "op_names_re")
PRUNING_KEYS = ("sparsity", "total_sparsity", "max_sparsity_per_layer", "global_group_id")
QUANT_KEYS = ("quant_types", "quant_bits", "quant_dtype", "quant_scheme", "granularity")

QUANT_TYPES = ("weight", "input", "output")
QUANT_DTYPES = ("int", "uint")
QUANT_SCHEMES = ("symmetric", "affine")
GRANULARITIES = ("per_tensor", "per_channel")
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
    quant_types: tuple[str, ...] = ()
    quant_bits: dict[str, int] = field(default_factory=dict)
    quant_dtype: str = "int"
    quant_scheme: str = "symmetric"
    granularity: str = "per_tensor"

    @property
    def is_pruning(self) -> bool:
        return self.sparsity is not None or self.total_sparsity is not None

    @property
    def is_quantization(self) -> bool:
        return bool(self.quant_types)


def _closest(word: str, choices: Iterable[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.4)


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
        raise ConfigError(f"{_where(index)}: quantization keys given without 'quant_types'")
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

        for key in ("op_types", "op_names", "op_partial_names", "op_names_re", "exclude_op_names", "exclude_op_types"):
            if key in cfg:
                cfg[key] = _as_str_list(index, key, cfg[key])
        for pattern in cfg.get("op_names_re", []):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{_where(index)}: op_names_re {pattern!r} is not a valid regex: {exc}") from None
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
            cfg["sparsity"] = _ratio(index, "sparsity", cfg["sparsity"], upper_inclusive=False)
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
        if "max_sparsity_per_layer" in cfg:
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
    """Class names ``op_types`` may use: every ``torch.nn`` module class, the classes (and their
    bases) of the model's modules, and the aliases of :data:`OP_TYPE_ALIASES`."""
    names = {n for n, c in vars(nn).items() if isinstance(c, type) and issubclass(c, nn.Module)}
    for m in model.modules():
        names.update(c.__name__ for c in type(m).__mro__ if issubclass(c, nn.Module))
    return names | set(OP_TYPE_ALIASES) | {"default"}


def _check_op_types(index: int, cfg: Mapping[str, Any], known: set[str]) -> None:
    for key in ("op_types", "exclude_op_types"):
        for t in cfg.get(key, ()):
            if t not in known:
                hint = _closest(t, known, n=3)
                raise ConfigError(f"{_where(index)}: {key} names {t!r}, which is neither a torch.nn module class nor a class of "
                                  f"the model" + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else ""))


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
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


# torch classes that are their base under another name: ``Linear`` selects them too
OP_TYPE_ALIASES = {"NonDynamicallyQuantizableLinear": "Linear"}  # nn.MultiheadAttention.out_proj


def _matches(name: str, op_type: str, cfg: Mapping[str, Any], op_types: set[str] | None) -> bool:
    if op_types is not None and op_type not in op_types and OP_TYPE_ALIASES.get(op_type) not in op_types:
        return False
    if "op_names" in cfg and name not in cfg["op_names"]:
        return False
    if "op_partial_names" in cfg and not any(p in name for p in cfg["op_partial_names"]):
        return False
    if "op_names_re" in cfg and not any(re.fullmatch(p, name) for p in cfg["op_names_re"]):
        return False
    if name in cfg.get("exclude_op_names", ()) or op_type in cfg.get("exclude_op_types", ()):
        return False
    return True


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
    # the modules inside a parametrization (masks, fake-quant) are machinery, not model layers
    named = [(name, m) for name, m in model.named_modules() if name and ".parametrizations" not in f".{name}"]
    names = [n for n, _ in named]
    name_set = set(names)
    selected: dict[str, tuple[int, dict[str, Any]] | None] = {}
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
        op_types: set[str] | None = None
        if "op_types" in cfg:
            op_types = set()
            for t in cfg["op_types"]:
                if t == "default":
                    if not default_op_types:
                        raise ConfigError(f"{_where(index)}: op_types 'default' given, but {algorithm} has no default types")
                    op_types.update(default_op_types)
                else:
                    op_types.add(t)
        hit = False
        for name, module in named:
            if _matches(name, op_type_of(module), cfg, op_types):
                hit = True
                selected[name] = None if cfg.get("exclude") else (index, cfg)
        if not hit:
            present = sorted({op_type_of(m) for _, m in named})
            raise ConfigError(
                f"{_where(index)} matches no module of the model; module types present: {present}"
            )

    result: dict[str, ModuleConfig] = {}
    modules = dict(named)
    for name in names:
        entry = selected.get(name)
        if entry is None:
            continue
        index, cfg = entry
        op_type = op_type_of(modules[name])
        # a subclass (MultiheadAttention's NonDynamicallyQuantizableLinear) computes like its base
        lineage = {cls.__name__ for cls in type(modules[name]).__mro__}
        if supported_op_types is not None and not lineage & set(supported_op_types):
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
            max_sparsity_per_layer=cfg.get("max_sparsity_per_layer"),
            global_group_id=cfg.get("global_group_id"),
            quant_types=quant_types,
            quant_bits=bits,
            quant_dtype=cfg.get("quant_dtype", "int"),
            quant_scheme=cfg.get("quant_scheme", "symmetric"),
            granularity=cfg.get("granularity", "per_tensor"),
        )
    if not result:
        raise ConfigError("config_list selects no module once 'exclude' entries are applied")
    return result
