"""NetAdapt (Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
Applications", ECCV 2018): each round lowers the resource by a step by pruning the single layer
whose short fine-tune loses least, until a budget measured on the target is met."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Mapping, Sequence

from torch import nn
from tqdm.auto import tqdm

from .executor import Executor, get_executor
from .io import Masks
from .resources import LookupTable, ResourceMeter, build_lookup_table
from .scheduler import CompressResult, PrunerSpec, _as_evaluate, _as_finetune, plain_copy, wrap_masks
from .search import Trajectory, layer_masks, selected_layers, train_and_score

__all__ = ["NetAdaptPruner", "BudgetNotReached", "make_meter"]

log = logging.getLogger(__name__)


class BudgetNotReached(UserWarning):
    """A search stopped before its resource budget was met (no layer could give up more)."""


def make_meter(resource: str | ResourceMeter, dummy_input: Any) -> ResourceMeter:
    if isinstance(resource, ResourceMeter):
        return resource
    return ResourceMeter(resource, dummy_input)


def _budget(config_list: Sequence[Mapping[str, Any]], budget: float | None, name: str) -> float:
    if budget is None:
        totals = [c["total_sparsity"] for c in config_list if "total_sparsity" in c]
        if not totals:
            raise ValueError(f"{name}: give budget= (target resource as a fraction of the dense model's) or a total_sparsity in config_list")
        budget = 1.0 - float(totals[0])
    if not 0.0 < budget < 1.0:
        raise ValueError(f"{name}: budget must lie in (0, 1) (a fraction of the dense model's resource), got {budget!r}")
    return float(budget)


class _Candidate:
    """One layer's proposal pruned, fine-tuned and scored (a plain object, so Ray can ship it)."""

    def __init__(self, model: nn.Module, masks: Masks, algo: PrunerSpec, params: dict, finetune: Any, evaluate: Any, dummy_input: Any) -> None:
        self.model, self.masks, self.algo, self.params, self.finetune, self.evaluate = model, masks, algo, params, finetune, evaluate
        self.dummy_input = dummy_input

    def __call__(self, job: tuple[str, dict[str, float]]) -> tuple[nn.Module, float | None, Masks]:
        m = layer_masks(self.algo, self.params, self.model, job[1], self.masks, self.dummy_input)
        trained, score = train_and_score(self.model, m, self.finetune, self.evaluate)
        return trained, score, m


class NetAdaptPruner(CompressResult):
    """``NetAdaptPruner(model, config_list, short_term_fine_tuner, evaluator, optimize_mode='maximize',
    base_algo='l1', sparsity_per_iteration=0.05)`` (NNI 1.x's arguments) with a measured resource.

    ``resource`` is ``'flops'``, ``'params'``, ``'latency'`` (onnxruntime CPU, see
    :class:`ResourceMeter`) or a ResourceMeter; ``budget`` is the target as a fraction of the dense
    model's resource (default ``1 - total_sparsity`` of the config_list). Each round asks for
    ``sparsity_per_iteration`` of the dense resource less: for every selected layer the lookup table
    (each layer pruned alone at ``grid``, measured once) gives the fewest channels to remove for that
    step; each such candidate is pruned with ``base_algo``, fine-tuned with
    ``short_term_fine_tuner`` and scored by ``evaluator``; the best is kept and measured for real.
    Rounds stop once the measurement is within the budget (``meter.tolerance`` allowed for noise).
    ``fine_tuner`` (long-term) trains the final model. The caller's model is not changed.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        short_term_fine_tuner: Any = None,
        evaluator: Any = None,
        optimize_mode: str = "maximize",
        base_algo: PrunerSpec = "l1",
        sparsity_per_iteration: float = 0.05,
        experiment_data_dir: str = "./",
        *,
        resource: str | ResourceMeter = "flops",
        budget: float | None = None,
        dummy_input: Any = None,
        pruning_params: Mapping[str, Any] | None = None,
        fine_tuner: Any = None,
        grid: Sequence[float] = (0.25, 0.5, 0.75),
        max_sparsity_per_layer: float = 0.9,
        max_iterations: int = 100,
        executor: Executor | str | None = None,
        seed: int = 0,
    ) -> None:
        if optimize_mode not in ("maximize", "minimize"):
            raise ValueError(f"optimize_mode must be 'maximize' or 'minimize', got {optimize_mode!r}")
        if not 0.0 < sparsity_per_iteration < 1.0:
            raise ValueError(f"sparsity_per_iteration must lie in (0, 1), got {sparsity_per_iteration!r}")
        if evaluator is None:
            raise ValueError("NetAdaptPruner needs an evaluator (model -> score) to choose between layers")
        self.model = model
        self.config_list = config_list
        self.meter = make_meter(resource, dummy_input)
        self.budget = _budget(config_list, budget, "NetAdaptPruner")
        self.layers = selected_layers(model, config_list, base_algo)
        self.short_term = _as_finetune(short_term_fine_tuner, None, None)
        self.long_term = _as_finetune(fine_tuner, None, None)
        self.evaluate = _as_evaluate(evaluator)
        self.sign = 1.0 if optimize_mode == "maximize" else -1.0
        self.base_algo, self.pruning_params = base_algo, dict(pruning_params or {})
        self.step_ratio = sparsity_per_iteration
        self.grid = tuple(grid)
        self.max_sparsity_per_layer = max_sparsity_per_layer
        self.max_iterations = max_iterations
        self.executor = get_executor(executor, seed)
        self.experiment_data_dir = experiment_data_dir
        self.lookup_table: LookupTable | None = None
        self.trajectory: Trajectory | None = None
        self._result: tuple[nn.Module, Masks] | None = None

    def _masks(self, model: nn.Module, sparsities: dict[str, float], pinned: Masks | None = None) -> Masks:
        return layer_masks(self.base_algo, self.pruning_params, model, sparsities, pinned, self.meter.dummy_input)

    def _next_count(self, layer: str, counts: dict[str, int], current_est: float, step: float) -> int | None:
        """Fewest pruned channels of ``layer`` that the table says lower the resource by ``step``."""
        assert self.lookup_table is not None
        n = self.layers[layer]
        cap = min(n - 1, math.floor(self.max_sparsity_per_layer * n))
        base = self.lookup_table.layer_delta(layer, counts[layer] / n)
        for k in range(counts[layer] + 1, cap + 1):
            if base - self.lookup_table.layer_delta(layer, k / n) >= step:
                return k
        return None

    def compress(self) -> tuple[nn.Module, Masks]:
        """Run the rounds; return the model (masks in its forward pass) and the masks."""
        origin = plain_copy(self.model)
        meter = self.meter
        self.lookup_table = table = build_lookup_table(origin, list(self.layers), self._masks, meter, self.grid, self.executor)
        dense = table.dense
        target = self.budget * dense
        dense_score = self.evaluate(origin) if self.evaluate else None
        traj = self.trajectory = Trajectory(meter.metric, dense, dense_score, target)
        counts = {name: 0 for name in self.layers}
        current, masks, measured = origin, {}, dense
        step = self.step_ratio * dense
        bar = tqdm(total=None, desc="NetAdapt rounds", unit="round", leave=False, disable=None)
        try:
            for _ in range(self.max_iterations):
                if meter.within(measured, target):
                    break
                cur_est = table.estimate({n: counts[n] / self.layers[n] for n in counts})
                proposals = {}
                for layer in self.layers:
                    k = self._next_count(layer, counts, cur_est, step)
                    if k is not None:
                        proposals[layer] = k
                if not proposals:
                    if step > 1e-3 * dense:
                        step /= 2  # smaller steps may still fit where a whole one does not
                        continue
                    warnings.warn(
                        f"NetAdapt stopped at {measured:.4g} {meter.metric}, above the budget {target:.4g}: no layer can give up "
                        f"more (max_sparsity_per_layer={self.max_sparsity_per_layer})", BudgetNotReached, stacklevel=2,
                    )  # fmt: skip
                    break
                jobs = []
                for layer, k in proposals.items():
                    sp = {n: counts[n] / self.layers[n] for n in self.layers}
                    sp[layer] = k / self.layers[layer]
                    jobs.append((layer, sp))
                run = _Candidate(current, masks, self.base_algo, self.pruning_params, self.short_term, self.evaluate, self.meter.dummy_input)

                results = self.executor.map(run, jobs, desc="NetAdapt layers")
                best_i = max(range(len(jobs)), key=lambda i: self.sign * float(results[i][1]))
                for i, ((layer, sp), (_, score, m)) in enumerate(zip(jobs, results)):
                    if i != best_i:
                        est = measured + table.estimate(sp) - cur_est
                        traj.add(origin, m, sparsities=sp, score=score, resource=est, measured=False)
                layer, sp = jobs[best_i]
                current, score, masks = results[best_i]
                counts[layer] = proposals[layer]
                measured = meter.relative(current, masks, origin) * dense  # timed interleaved with the dense model
                traj.add(origin, masks, sparsities=sp, score=score, resource=measured, measured=True, accepted=True)
                log.info(
                    "NetAdapt: %s -> %d/%d channels pruned; score %s, %s %.4g (budget %.4g)", layer, counts[layer],
                    self.layers[layer], None if score is None else round(score, 4), meter.metric, measured, target,
                )  # fmt: skip
                bar.update(1)
        finally:
            bar.close()
        final = wrap_masks(plain_copy(current), masks)
        if self.long_term is not None:
            self.long_term(final)
        self._result = (final, masks)
        return final, masks
