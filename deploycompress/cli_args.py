"""The command line's strict value grammar and the recipe schema, written once.

* shapes: ``1x3x224x224`` or ``1,3,224,224`` (one separator kind, positive integers without sign or
  leading zeros, nothing else); in a recipe also a YAML list of such integers;
* numbers: argparse ``type=`` callables that range-check (``positive_int``, ``non_negative_int``,
  ``positive_float``, ``fraction`` ...), so ``--iterations 0`` or ``--duration -1`` never reach a step;
* recipes: :data:`RECIPE_SCHEMA` lists every section's keys with the check of each value; an unknown
  key is named with its close matches (``build: {precison: int8}`` -> did you mean 'precision'?).

Every error names the option or recipe key (argparse prefixes ``argument --option:``; recipe errors
carry ``recipe build.precision``). Errors are :class:`~deploycompress.errors.InputError` (exit 2).
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Callable, Mapping

from .errors import InputError
from .suggest import did_you_mean

__all__ = [
    "RecipeError",
    "RECIPE_SCHEMA",
    "parse_shape",
    "shape_arg",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "fraction",
    "cosine",
    "close_matches",
    "SuggestingParser",
    "check_recipe",
]

_SHAPE = re.compile(r"[1-9][0-9]*(?:(?P<sep>[x,])[1-9][0-9]*(?:(?P=sep)[1-9][0-9]*)*)?")
_MAX_DIM = 1 << 31


class RecipeError(InputError, ValueError):
    """A recipe value or key that cannot be used; the message names ``recipe <section>.<key>``."""


close_matches = did_you_mean  # the project's one suggestion helper (deploycompress.suggest)


class SuggestingParser(argparse.ArgumentParser):
    """argparse with close matches: an invalid choice (a subcommand, ``--precision int9``) and an
    unrecognized option (``--precison``) are named with :func:`~deploycompress.suggest.did_you_mean`.
    Subcommand parsers made by :meth:`add_subparsers` are of this class too. Exit code 2, as argparse."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            if action.choices is None:
                raise
            raise argparse.ArgumentError(action, f"{exc.message}{did_you_mean(value, action.choices)}") from None

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            options = list(self._option_string_actions)
            for action in self._subparsers._group_actions if self._subparsers else ():
                chosen = action.choices.get(getattr(parsed, action.dest, None) or "") if isinstance(action.choices, dict) else None
                if chosen is not None:
                    options += list(chosen._option_string_actions)
            named = [f"{e!s}{did_you_mean(e.partition('=')[0], options)}" if e.startswith("-") else str(e) for e in extras]
            self.error(f"unrecognized arguments: {' '.join(named)}")
        return parsed


def parse_shape(value: Any, what: str = "shape") -> list[int]:
    """A shape in the one grammar: ``"1x3x224x224"``, ``"1,3,224,224"`` or a list of positive ints.

    Raises ValueError naming ``what`` (the option or recipe key) and the grammar.
    """
    if isinstance(value, (list, tuple)):
        if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 or v >= _MAX_DIM for v in value):
            raise ValueError(f"{what}: expected a list of positive integers, got {value!r}")
        return [int(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{what}: expected a shape like 1x3x224x224 or 1,3,224,224, got {type(value).__name__} {value!r}")
    text = str(value).strip()
    if not _SHAPE.fullmatch(text):
        raise ValueError(f"{what}: {str(value)!r} is not a shape; write positive integers joined by 'x' or by ',' "
                         "(e.g. 1x3x224x224 or 1,3,224,224)")
    dims = [int(v) for v in re.split(r"[x,]", text)]
    if any(d >= _MAX_DIM for d in dims):
        raise ValueError(f"{what}: {str(value)!r} has a dimension of 2**31 or more")
    return dims


def _arg_type(check: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse shows it in "invalid <name> value"
    return convert


#: argparse type for shapes and lists of sizes (``--input-shape``, ``--batch-sizes``)
shape_arg = _arg_type(lambda t: parse_shape(t, "value"), "shape")


def _int(text: Any, low: int, what: str) -> int:
    if isinstance(text, bool) or isinstance(text, float):
        raise ValueError(f"{what}: expected an integer >= {low}, got {text!r}")
    try:
        value = int(str(text).strip(), 10)
    except ValueError:
        raise ValueError(f"{what}: expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise ValueError(f"{what}: expected an integer >= {low}, got {value}")
    return value


def _float(text: Any, low: float, high: float, what: str, *, open_low: bool = False) -> float:
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a number, got {text!r}")
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"{what}: expected a number, got {text!r}") from None
    bracket = "(" if open_low else "["
    if not math.isfinite(value) or value < low or (open_low and value == low) or value > high:
        raise ValueError(f"{what}: expected a number in {bracket}{low}, {high}], got {text!r}")
    return value


positive_int = _arg_type(lambda t: _int(t, 1, "value"), "positive_int")
non_negative_int = _arg_type(lambda t: _int(t, 0, "value"), "non_negative_int")
positive_float = _arg_type(lambda t: _float(t, 0.0, math.inf, "value", open_low=True), "positive_float")
non_negative_float = _arg_type(lambda t: _float(t, 0.0, math.inf, "value"), "non_negative_float")
fraction = _arg_type(lambda t: _float(t, 0.0, 1.0, "value"), "fraction")
cosine = _arg_type(lambda t: _float(t, -1.0, 1.0, "value"), "cosine")


# -- recipes ---------------------------------------------------------------------------------------
Check = Callable[[Any, str], Any]


def _any(value: Any, where: str) -> Any:
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _list_of_dicts(value: Any, where: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise RecipeError(f"{where}: expected a list of mappings (a config_list), got {value!r}")
    return value


def _choice(*choices: str) -> Check:
    def check(value: Any, where: str) -> str:
        if value not in choices:
            raise RecipeError(f"{where}: {value!r} is not one of {list(choices)}{close_matches(value, choices)}")
        return value

    return check


def _recipe_int(low: int) -> Check:
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer >= {low}, got {value!r}")
        try:
            return _int(value, low, where)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None

    return check


def _recipe_shape(value: Any, where: str) -> list[int]:
    try:
        return parse_shape(value, where)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


#: section -> key -> check; ``None`` as a section means a top-level scalar key
RECIPE_SCHEMA: dict[str, dict[str, Check] | Check] = {
    "model": {"factory": _str, "torchvision": _str, "weights": _str, "kwargs": _mapping, "name": _str},
    "input_shape": _any,  # one shape or one per input ("name=dims[:dtype]"): parsed by the CLI with parse_shape
    "prune": {"pruner": _str, "config_list": _list_of_dicts, "options": _mapping, "finetune": _str, "report": _str, "round_to": _recipe_int(1),
              "norm_spans": _choice("keep", "prune")},
    "quantize": {"calibration": _str, "data": _str, "batch_size": _recipe_int(1), "batches": _recipe_int(1),
                 "config_list": _list_of_dicts, "calibrator": _choice("minmax", "percentile", "entropy", "mse"),
                 "bias_correction": _bool},
    "build": {"precision": _choice("int8", "fp32"), "backend": _choice("onnxruntime", "tensorrt"), "batch_sizes": _recipe_shape,
              "iterations": _recipe_int(1), "name": _str},
    "eval": {"data": _str},
}


def check_recipe(recipe: Any, source: str = "recipe") -> dict:
    """Validate a loaded recipe against :data:`RECIPE_SCHEMA`; return it with values normalised.

    Every unknown key (top level or inside a section) is named with close matches; every value is
    checked by its key's rule. Raises :class:`RecipeError`.
    """
    if not isinstance(recipe, Mapping):
        raise RecipeError(f"{source} must be a mapping with keys {sorted(RECIPE_SCHEMA)}, got {type(recipe).__name__}")
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        if key not in RECIPE_SCHEMA:
            raise RecipeError(f"{source}: unknown key {key!r}{close_matches(key, RECIPE_SCHEMA)}; valid keys are {sorted(RECIPE_SCHEMA)}")
        rule = RECIPE_SCHEMA[key]
        if callable(rule):
            out[key] = rule(value, f"{source} {key}")
            continue
        if value is None:
            out[key] = {}
            continue
        section = _mapping(value, f"{source} section {key!r}")
        checked = {}
        for sub, sub_value in section.items():
            if sub not in rule:
                raise RecipeError(f"{source} {key}: unknown key {sub!r}{close_matches(sub, rule)}; "
                                  f"section {key!r} takes {sorted(rule)}")
            checked[sub] = rule[sub](sub_value, f"{source} {key}.{sub}")
        out[key] = checked
    return out
