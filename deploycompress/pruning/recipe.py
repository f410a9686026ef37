"""The recipe's ``prune`` section: any pruner by its class name, its options, and a search report.

``options`` go to the pruner's constructor. Options that take a function (``finetuner``,
``evaluator``, ``short_term_fine_tuner``, ``fine_tuner``) are given as ``module:function`` strings
and imported; ``dummy_input`` defaults to the recipe's example input where the pruner takes one.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from .base import Pruner
from .io import Masks

__all__ = ["CALLABLE_OPTIONS", "make_recipe_pruner", "run_prune_section", "write_search_report"]

log = logging.getLogger(__name__)

CALLABLE_OPTIONS = ("finetuner", "evaluator", "short_term_fine_tuner", "fine_tuner")


def _pruner_classes() -> dict[str, type]:
    from .. import pruning

    return {n: getattr(pruning, n) for n in pruning.__all__ if n.endswith("Pruner") and isinstance(getattr(pruning, n), type)}


def _arguments(cls: type) -> list[str]:
    """Named arguments of ``cls``, following ``**kw`` up to the base classes' constructors."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self" and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def make_recipe_pruner(model: nn.Module, section: Mapping[str, Any], example_inputs: Any, import_object: Callable[[str, str], Any]) -> Any:
    """The pruner a recipe's ``prune`` section describes; raises ValueError naming the key to change."""
    classes = _pruner_classes()
    name = section.get("pruner", "L1NormPruner")
    cls = classes.get(name)
    if cls is None:
        raise ValueError(f"recipe prune.pruner {name!r} is not a pruner; known: {sorted(classes)}")
    if "config_list" not in section:
        raise ValueError("recipe section 'prune' needs a config_list")
    options = dict(section.get("options") or {})
    for key in CALLABLE_OPTIONS:
        if isinstance(options.get(key), str):
            options[key] = import_object(options[key], f"recipe prune.options.{key}")
    accepted = _arguments(cls)
    if "dummy_input" in accepted and options.get("dummy_input") is None:
        options["dummy_input"] = example_inputs
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ValueError(f"recipe prune.options {unknown} are not arguments of {name}; it takes {[k for k in accepted if k not in ('model', 'config_list')]}")
    log.info("recipe: %s with options %s", name, sorted(options))
    return cls(model, section["config_list"], **options)


def write_search_report(pruner: Any, out_dir: str | Path) -> list[Path]:
    """Write what a pruner recorded: ``pruning_history.json`` (a scheduled pruner's rounds, a search's
    candidates, or a one-shot pruner's one round with each layer's sparsity) and, for searches,
    ``pruning_trajectory.png`` (score vs resource). Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    trajectory = getattr(pruner, "trajectory", None)
    history = getattr(pruner, "history", None)
    if trajectory is not None:
        from .search import trajectory_plot

        (out / "pruning_history.json").write_text(json.dumps(trajectory.to_dict(), indent=2))
        trajectory_plot(trajectory, out / "pruning_trajectory.png")
        written += [out / "pruning_history.json", out / "pruning_trajectory.png"]
    elif history:
        from .scheduler import iter_history

        (out / "pruning_history.json").write_text(json.dumps(list(iter_history(history)), indent=2))
        written.append(out / "pruning_history.json")
    elif isinstance(pruner, Pruner) and pruner.masks:
        # a one-shot pruner has one round: its masks, as the scheduled pruners' rows count them (pruned weight
        # elements / weight elements of the configured layers), with each layer's share
        layers = {n: e["weight"] for n, e in pruner.masks.items() if n in pruner.module_configs and "weight" in e}
        total = sum(m.numel() for m in layers.values())
        row = {"task_id": 0, "pruner": type(pruner).__name__,
               "sparsity": sum(int((~m).sum()) for m in layers.values()) / total if total else 0.0, "score": None,
               "layers": {n: round(int((~m).sum()) / m.numel(), 6) for n, m in layers.items()}}
        (out / "pruning_history.json").write_text(json.dumps([row], indent=2))
        written.append(out / "pruning_history.json")
    else:
        log.warning("recipe prune.report: %s recorded nothing to write to %s", type(pruner).__name__, out)
    return written


def run_prune_section(pruner: Any, section: Mapping[str, Any], import_object: Callable[[str, str], Any]) -> tuple[nn.Module, Masks]:
    """``compress()``, then the section's ``finetune`` (``module:function``, run on the pruned model
    while the masks apply), then the plain pruned model and its masks."""
    pruned, masks = pruner.compress()
    if section.get("report"):
        write_search_report(pruner, section["report"])
    if section.get("finetune"):
        import_object(str(section["finetune"]), "recipe prune.finetune")(pruned)
    if isinstance(pruner, Pruner):
        return pruner.unwrap_model(), masks
    from ..model_copy import plain_copy  # scheduled pruners hand back a new model, fine-tuned above

    return plain_copy(pruned, eval_mode=False), masks
