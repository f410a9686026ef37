"""Simulated annealing over per-layer sparsities under one total budget (NNI 2.x's
SimulatedAnnealingPruner; the AutoCompress paper's outer search, Liu et al., AAAI 2020).

The budget is either NNI's ``total_sparsity`` (pruned weight elements of the selected layers) or a
measured resource (``resource='flops' | 'params' | 'latency'`` and ``budget`` as a fraction of
the dense value, estimated from the per-layer lookup table and measured for the final candidate).
Every candidate is rescaled onto the budget before it is evaluated, so each one meets it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from .allocate import prune_count
from .channel import ChannelPruner
from .executor import Executor, get_executor
from .io import Masks, _weight
from .netadapt import make_meter
from .resources import LookupTable, ResourceMeter, build_lookup_table
from .scheduler import CompressResult, PrunerSpec, _as_evaluate, _pruned_units, _as_finetune, _pruner_class, plain_copy, wrap_masks
from .search import Trajectory, fit_measured, layer_masks, selected_layers, train_and_score

__all__ = ["SimulatedAnnealingPruner"]

log = logging.getLogger(__name__)


def _already_pruned(module: nn.Module, entry: Mapping[str, Any] | None, units: int) -> float:
    """Fraction of ``units`` that ``entry`` (a module's masks) prunes already."""
    if not entry:
        return 0.0
    w = next((m for p, m in entry.items() if p.endswith("weight")), None)
    return 0.0 if w is None else float(_pruned_units(module, w, units).sum()) / units


class SimulatedAnnealingPruner(CompressResult):
    """``SimulatedAnnealingPruner(model, config_list, evaluator, start_temperature=100,
    stop_temperature=20, cool_down_rate=0.9, perturbation_magnitude=0.35, pruning_algorithm='level',
    pruning_params={}, log_dir='.', keep_intermediate_result=False, finetuner=None, speedup=False,
    dummy_input=None)`` as in NNI 2.x.

    Each temperature perturbs the current per-layer sparsities by up to
    ``perturbation_magnitude * T / T_start``, rescales them onto the budget, prunes with the basic
    pruner, fine-tunes (``finetuner``, optional) and scores; a worse candidate is accepted with
    probability ``exp(-|delta score| / T)`` (NNI's rule). The best candidate is returned.
    ``config_list`` gives ``total_sparsity`` (the budget) and selects the layers; with ``resource``
    the budget is that resource at ``budget`` times the dense value instead. ``seed`` fixes the walk.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Any,
        start_temperature: float = 100,
        stop_temperature: float = 20,
        cool_down_rate: float = 0.9,
        perturbation_magnitude: float = 0.35,
        pruning_algorithm: PrunerSpec = "level",
        pruning_params: Mapping[str, Any] | None = None,
        log_dir: str | os.PathLike[str] = ".",
        keep_intermediate_result: bool = False,
        finetuner: Any = None,
        speedup: bool = False,
        dummy_input: Any = None,
        *,
        resource: str | ResourceMeter | None = None,
        budget: float | None = None,
        max_sparsity_per_layer: float = 0.95,
        grid: Sequence[float] = (0.25, 0.5, 0.75),
        executor: Executor | str | None = None,
        seed: int = 0,
        origin_masks: Masks | None = None,
    ) -> None:
        """``origin_masks``: units already pruned (kept pruned; every layer's sparsity stays at least
        what they remove), as NNI's task generator takes them. With ``resource`` and no
        ``dummy_input``, the meter's example batch is the basic pruner's too."""
        if not (start_temperature > stop_temperature > 0 and 0 < cool_down_rate < 1):
            raise ValueError("need start_temperature > stop_temperature > 0 and 0 < cool_down_rate < 1")
        if evaluator is None:
            raise ValueError("SimulatedAnnealingPruner needs an evaluator (model -> score)")
        if speedup and dummy_input is None:
            raise ValueError("SimulatedAnnealingPruner: speedup=True needs dummy_input (an example input batch)")
        self.log_dir, self.keep_intermediate_result = Path(log_dir), keep_intermediate_result
        self.model, self.config_list = model, config_list
        self.evaluate = _as_evaluate(evaluator)
        self.finetune = _as_finetune(finetuner, None, None)
        self.t0, self.t_stop, self.cool, self.magnitude = start_temperature, stop_temperature, cool_down_rate, perturbation_magnitude
        self.algo, self.params = pruning_algorithm, dict(pruning_params or {})
        self.speedup, self.dummy_input = speedup, dummy_input
        self.cap = max_sparsity_per_layer
        self.grid = tuple(grid)
        self.seed = seed
        self.executor = get_executor(executor, seed)
        self.structured = issubclass(_pruner_class(pruning_algorithm), ChannelPruner)
        self.layers = selected_layers(model, config_list, pruning_algorithm)
        modules = dict(model.named_modules())
        self.weights = {n: int(_weight(modules[n]).numel()) for n in self.layers}  # type: ignore[union-attr]
        self.units = self.layers if self.structured else dict(self.weights)
        self.origin_masks = origin_masks or {}
        self.floor = {n: _already_pruned(modules[n], self.origin_masks.get(n), self.units[n]) for n in self.layers}
        self.meter: ResourceMeter | None = None
        if resource is not None:
            self.meter = make_meter(resource, dummy_input)
            if self.dummy_input is None:  # the basic pruner masks joined parameters with it, so speedup removes them
                self.dummy_input = self.meter.dummy_input
            if budget is None or not 0 < budget < 1:
                raise ValueError(f"SimulatedAnnealingPruner: with resource= give budget in (0, 1), got {budget!r}")
            self.budget = float(budget)
        else:
            totals = [c["total_sparsity"] for c in config_list if "total_sparsity" in c]
            if not totals:
                raise ValueError("SimulatedAnnealingPruner: the config_list needs total_sparsity (or pass resource= and budget=)")
            self.budget = float(totals[0])
        self.lookup_table: LookupTable | None = None
        self.trajectory: Trajectory | None = None
        self._result: tuple[nn.Module, Masks] | None = None
        self.best_sparsities: dict[str, float] = {}

    # ------------------------------------------------------------------ the budget
    def pruned_fraction(self, sparsities: Mapping[str, float]) -> float:
        """Pruned weight elements / weight elements of the selected layers, counted as the pruner counts."""
        gone = sum(prune_count(sparsities[n], self.units[n]) * self.weights[n] / self.units[n] for n in self.layers)
        return gone / sum(self.weights.values())

    def _fits(self, sparsities: Mapping[str, float]) -> bool:
        if self.meter is None:
            return self.pruned_fraction(sparsities) >= self.budget - 1e-12
        assert self.lookup_table is not None
        return self.lookup_table.estimate(sparsities) <= self.budget * self.lookup_table.dense

    def _onto_budget(self, raw: Mapping[str, float]) -> dict[str, float] | None:
        """Scale ``raw`` by the smallest factor that meets the budget (bisection); None if even the cap fails."""
        capped = lambda c: {n: float(min(max(self.cap, self.floor[n]), max(self.floor[n], c * raw[n]))) for n in self.layers}  # noqa: E731
        hi = 1.0
        while not self._fits(capped(hi)):
            hi *= 2
            if hi > 1e4:
                return None
        lo = 0.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self._fits(capped(mid)) else (mid, hi)
        return capped(hi)

    def _initial(self, rng: np.random.Generator) -> dict[str, float]:
        for _ in range(100):
            s = self._onto_budget({n: float(rng.uniform(0.05, 1.0)) for n in self.layers})
            if s is not None:
                return s
        raise ValueError(f"no per-layer sparsities below max_sparsity_per_layer={self.cap} meet the budget {self.budget}")

    # ------------------------------------------------------------------ the walk
    def compress(self) -> tuple[nn.Module, Masks]:
        origin = plain_copy(self.model)
        rng = np.random.default_rng(self.seed)
        make = lambda m, sp: layer_masks(self.algo, self.params, m, sp, self.origin_masks, self.dummy_input)  # noqa: E731
        dense_value = 0.0
        if self.meter is not None:
            self.lookup_table = build_lookup_table(origin, list(self.layers), make, self.meter, self.grid, self.executor)
            dense_value = self.lookup_table.dense
        metric = self.meter.metric if self.meter else "sparsity"
        traj = self.trajectory = Trajectory(metric, dense_value, self.evaluate(origin) if self.evaluate else None,
                                            self.budget * dense_value if self.meter else None)  # fmt: skip
        current = self._initial(rng)
        if self.meter is not None and self.lookup_table is not None:
            # one whole-model measurement puts the additive estimate onto the measured scale, so the
            # walk explores candidates near the real budget (fit_measured closes what remains)
            probe = make(origin, current)
            self.lookup_table.calibrate(current, self.meter.relative(origin, probe, origin) * dense_value)
            rescaled = self._onto_budget(current)
            if rescaled is None:  # the calibrated table says the cap cannot meet the budget: trust the plain table
                log.info("annealing: the calibrated table puts the budget out of reach; the plain additive estimate is kept")
                self.lookup_table.scale = 1.0
                rescaled = self._onto_budget(current)
            current = rescaled or current
        current_score: float | None = None
        best: tuple[float, dict[str, float], nn.Module, Masks] | None = None
        temperature = self.t0
        steps = math.ceil(math.log(self.t_stop / self.t0) / math.log(self.cool))
        bar = tqdm(total=steps, desc="annealing", unit="temperature", leave=False, disable=None)
        try:
            while temperature > self.t_stop:
                if current_score is None:
                    candidate = current
                else:
                    mag = temperature / self.t0 * self.magnitude
                    raw = {n: current[n] + float(rng.uniform(-mag, mag)) for n in self.layers}
                    candidate = self._onto_budget(raw) or current
                masks = make(origin, candidate)
                trained, score = train_and_score(origin, masks, self.finetune, self.evaluate)
                assert score is not None
                resource = self.lookup_table.estimate(candidate) if self.lookup_table else self.pruned_fraction(candidate)
                accept = current_score is None or score > current_score or rng.random() < math.exp(-abs(score - current_score) / temperature)
                traj.add(origin, masks, sparsities=candidate, score=score, resource=resource, measured=False, accepted=accept)
                if accept:
                    current, current_score = candidate, score
                if best is None or score > best[0]:
                    best = (score, candidate, trained, masks)
                log.info("annealing T=%.2f: score %.4f, %s %.4g, %s", temperature, score, metric, resource, "accepted" if accept else "rejected")
                temperature *= self.cool
                bar.update(1)
        finally:
            bar.close()
        assert best is not None
        score, sparsities, trained, masks = best
        if self.meter is not None:
            fitted, fit_masks, measured = fit_measured(
                origin, sparsities, make, self.meter, self.budget * dense_value, self.cap, dense_value=dense_value, floor=self.floor
            )
            if fitted != sparsities:  # the table's estimate was off: the candidate on the measured budget
                sparsities, masks = fitted, fit_masks
                trained, score = train_and_score(origin, masks, self.finetune, self.evaluate)  # type: ignore[assignment]
            traj.add(origin, masks, sparsities=sparsities, score=score, resource=measured, measured=True, accepted=True)
            log.info("annealing best: %s measured %.4g (budget %.4g)", metric, measured, self.budget * dense_value)
        self.best_sparsities = sparsities
        if self.keep_intermediate_result:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / "annealing_trajectory.json").write_text(json.dumps(traj.to_dict(), indent=2))
        model = plain_copy(trained)
        if self.speedup:
            from ..speedup import speedup as _speedup

            model = _speedup(model, masks, self.dummy_input)
            self._result = (model, {})
        else:
            self._result = (wrap_masks(model, masks), masks)
        return self._result
