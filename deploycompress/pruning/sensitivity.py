"""Sensitivity analysis (NNI's compression utility): each layer pruned alone at a range of
sparsities, the model evaluated each time, giving per-layer score-vs-sparsity curves; and the
config_list they imply under an accuracy-drop bound."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from .executor import Executor, get_executor
from .scheduler import PrunerSpec, _as_evaluate, plain_copy
from .search import figure_png, layer_masks, selected_layers, train_and_score

__all__ = ["SensitivityAnalysis", "SensitivityResult", "sensitivity_analysis"]

log = logging.getLogger(__name__)

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class SensitivityResult:
    """``curves[layer][sparsity] = score``; ``baseline`` is the unpruned model's score."""

    baseline: float
    curves: dict[str, dict[float, float]] = field(default_factory=dict)

    def max_sparsity(self, layer: str, max_drop: float) -> float:
        """The largest analysed sparsity up to which every point of ``layer``'s curve stays within
        ``max_drop`` of the baseline (0 if even the first point drops more)."""
        best = 0.0
        for s in sorted(self.curves[layer]):
            if self.curves[layer][s] < self.baseline - max_drop:
                break
            best = s
        return best

    def to_config_list(self, max_drop: float) -> list[dict[str, Any]]:
        """One ``{'op_names': [layer], 'sparsity': s}`` per layer that tolerates some pruning,
        ``s`` from :meth:`max_sparsity`. Layers are pruned alone here: pruned together the drops add
        up, so check the combined model (or give a smaller ``max_drop``)."""
        if max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {max_drop}")
        out = []
        for layer in self.curves:
            s = self.max_sparsity(layer, max_drop)
            if s > 0:
                out.append({"op_names": [layer], "sparsity": s})
        return out

    def plot(self, path: Any = None) -> bytes:
        """Score vs sparsity, one line per layer; PNG bytes, also written to ``path`` when given."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.5, 4), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        for layer, curve in self.curves.items():
            xs = sorted(curve)
            ax.plot([0.0, *xs], [self.baseline, *(curve[x] for x in xs)], "-o", ms=3, label=layer)
        ax.axhline(self.baseline, color="black", lw=0.8, ls=":")
        ax.set_xlabel("sparsity of the layer (pruned alone)")
        return figure_png(fig, ax, path, legend_size=7, legend_columns=2)


def sensitivity_analysis(
    model: nn.Module,
    evaluator: Any,
    config_list: Sequence[dict[str, Any]] | None = None,
    *,
    pruning_algorithm: PrunerSpec = "l1",
    pruning_params: Mapping[str, Any] | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    finetuner: Callable[[nn.Module], Any] | None = None,
    executor: Executor | str | None = None,
    seed: int = 0,
    dummy_input: Any = None,
) -> SensitivityResult:
    """Curves for every layer ``config_list`` selects (default: every layer the pruner's default
    op types select). ``evaluator`` is ``model -> float`` or a TorchEvaluator; ``finetuner``
    (optional) runs on each pruned copy before evaluation. Costs ``layers * len(sparsities)``
    evaluations, spread over ``executor``. The caller's model is not changed."""
    evaluate = _as_evaluate(evaluator)
    if evaluate is None:
        raise ValueError("sensitivity_analysis needs an evaluator")
    if not sparsities or not all(0.0 < s < 1.0 for s in sparsities):
        raise ValueError(f"sparsities must be values in (0, 1), got {list(sparsities)}")
    origin = plain_copy(model)
    layers = list(selected_layers(origin, list(config_list) if config_list else [{"op_types": ["default"]}], pruning_algorithm))
    baseline = evaluate(origin)
    jobs = [(layer, float(s)) for layer in layers for s in sorted(sparsities)]

    def run(job: tuple[str, float]) -> float:
        layer, s = job
        masks = layer_masks(pruning_algorithm, pruning_params, origin, {layer: s}, None, dummy_input)
        _, score = train_and_score(origin, masks, finetuner, evaluate)
        assert score is not None
        return score

    scores = get_executor(executor, seed).map(run, jobs, desc="sensitivity")
    result = SensitivityResult(baseline)
    for (layer, s), score in zip(jobs, scores):
        result.curves.setdefault(layer, {})[s] = score
    for layer in layers:
        log.info("sensitivity %s: %s", layer, {s: round(v, 4) for s, v in result.curves[layer].items()})
    return result


class SensitivityAnalysis:
    """NNI's ``SensitivityAnalysis(model, val_func, sparsities, prune_type, early_stop_mode,
    early_stop_value)``; ``analysis(specified_layers=...)`` returns ``{layer: {sparsity: score}}``.
    ``early_stop_mode`` ``'dropped'`` stops a layer's curve once the score fell by more than
    ``early_stop_value`` (``'minimize'``/``'maximize'`` stop below/above that value)."""

    _PRUNE_TYPES = {"l1": "l1", "l2": "l2", "fine-grained": "level", "level": "level", "fpgm": "fpgm"}

    def __init__(
        self, model: nn.Module, val_func: Callable[..., float], sparsities: Sequence[float] | None = None,
        prune_type: str = "l1", early_stop_mode: str | None = None, early_stop_value: float | None = None,
    ) -> None:  # fmt: skip
        if prune_type not in self._PRUNE_TYPES:
            raise ValueError(f"prune_type must be one of {sorted(self._PRUNE_TYPES)}, got {prune_type!r}")
        if early_stop_mode not in (None, "dropped", "minimize", "maximize"):
            raise ValueError(f"early_stop_mode must be None, 'dropped', 'minimize' or 'maximize', got {early_stop_mode!r}")
        if early_stop_mode is not None and early_stop_value is None:
            raise ValueError("early_stop_mode needs early_stop_value")
        self.model, self.val_func = model, val_func
        self.sparsities = tuple(sparsities) if sparsities else DEFAULT_SPARSITIES
        self.pruning_algorithm = self._PRUNE_TYPES[prune_type]
        self.early_stop_mode, self.early_stop_value = early_stop_mode, early_stop_value
        self.sensitivities: dict[str, dict[float, float]] = {}

    def _stop(self, baseline: float, score: float) -> bool:
        v = self.early_stop_value
        assert v is not None or self.early_stop_mode is None
        return {
            None: False,
            "dropped": baseline - score > (v or 0.0),
            "minimize": score < (v or 0.0),
            "maximize": score > (v or 0.0),
        }[self.early_stop_mode]

    def analysis(self, val_args: Sequence[Any] | None = None, val_kwargs: Mapping[str, Any] | None = None,
                 specified_layers: Sequence[str] | None = None) -> dict[str, dict[float, float]]:  # fmt: skip
        args, kwargs = list(val_args or []), dict(val_kwargs or {})
        evaluate = lambda m: float(self.val_func(m, *args, **kwargs))  # noqa: E731
        config = [{"op_names": list(specified_layers)}] if specified_layers else [{"op_types": ["default"]}]
        origin = plain_copy(self.model)
        baseline = evaluate(origin)
        layers = list(selected_layers(origin, config, self.pruning_algorithm))
        for layer in layers:
            curve: dict[float, float] = {}
            for s in sorted(self.sparsities):
                masks = layer_masks(self.pruning_algorithm, None, origin, {layer: s})
                _, score = train_and_score(origin, masks, None, evaluate)
                assert score is not None
                curve[s] = score
                if self._stop(baseline, score):
                    log.info("sensitivity %s: stopped at sparsity %.2f (score %.4f)", layer, s, score)
                    break
            self.sensitivities[layer] = curve
        return self.sensitivities
