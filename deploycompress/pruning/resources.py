"""Resources of a pruning candidate measured on the deployed model: FLOPs, parameters, or latency.

A candidate (model + masks) is first shrunk with ``deploycompress.speedup``: masks that speedup
cannot turn into smaller layers (a residual partner kept, fine-grained zeros) cost as much as the
dense layer, which is what the deployment backend sees. Latency is then measured on a registered
backend (onnxruntime on the CPU by default): exported to ONNX, built fp32, timed ``repeats`` times
``iterations`` runs each after ``warmup``; the value is the median over repeats of each repeat's
fastest run (``statistic='min'``, the default: on a shared CPU preemption only ever adds time, so the
fastest run is the model's own cost; ``'median'`` keeps the typical run, load included), and
``tolerance`` is the relative noise the searches allow when they compare against a budget.

:class:`LookupTable` is NetAdapt's per-layer table (Yang et al., "NetAdapt", ECCV 2018): each layer
pruned alone at a grid of ratios, measured once; a candidate's resource is estimated as the dense
value plus the per-layer changes, and the final candidate is measured for real.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .io import Masks

__all__ = ["RESOURCE_METRICS", "ResourceMeter", "LookupTable", "build_lookup_table"]

log = logging.getLogger(__name__)

RESOURCE_METRICS = ("flops", "params", "latency")
_STATISTICS = {"min": min, "median": statistics.median}


def _inputs(dummy_input: Any, model: nn.Module) -> tuple:
    if isinstance(dummy_input, Mapping):  # keyed by forward's parameter names, as build_engine takes them
        from ..graph.trace import as_input_tuple

        return as_input_tuple(dummy_input, model)
    return dummy_input if isinstance(dummy_input, tuple) else (dummy_input,)


@dataclass
class ResourceMeter:
    """``meter(model, masks) -> float``: the candidate's ``metric`` after speedup.

    ``metric``: ``'flops'`` (multiply-accumulates per sample, ``count_flops_params``),
    ``'params'`` (parameter count) or ``'latency'`` (milliseconds per batch of ``dummy_input`` on
    ``backend``, fp32, ``threads`` intra-op threads; ``statistic`` of each repeat's runs, ``'min'``
    or ``'median'``, then the median over repeats). ``tolerance`` is the relative measurement noise a
    budget check allows (0 for the exact counts).
    """

    metric: str
    dummy_input: Any
    backend: str = "onnxruntime"
    repeats: int = 5
    iterations: int = 20
    warmup: int = 5
    threads: int | None = 1
    tolerance: float | None = None
    statistic: str = "min"
    measurements: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.metric not in RESOURCE_METRICS:
            raise ValueError(f"resource metric must be one of {list(RESOURCE_METRICS)}, got {self.metric!r}")
        if self.dummy_input is None:
            raise ValueError("ResourceMeter needs dummy_input (an example input batch)")
        if self.repeats < 1 or self.iterations < 1 or self.warmup < 0:
            raise ValueError(f"repeats and iterations must be >= 1 and warmup >= 0, got {self.repeats}, {self.iterations}, {self.warmup}")
        if self.statistic not in _STATISTICS:
            raise ValueError(f"statistic must be one of {sorted(_STATISTICS)}, got {self.statistic!r}")
        if self.tolerance is None:
            self.tolerance = 0.05 if self.metric == "latency" else 0.0
        if self.metric == "latency":
            from ..backends import get_backend

            get_backend(self.backend)  # an unknown backend fails here, before any search

    def __call__(self, model: nn.Module, masks: Masks | None = None) -> float:
        compact = self.deployed(model, masks)
        self.measurements += 1
        if self.metric == "params":
            return float(sum(p.numel() for p in compact.parameters()))
        if self.metric == "flops":
            from ..counting import count_flops_params

            return float(count_flops_params(compact, self.dummy_input).flops)
        return self.latency_ms(compact)

    def deployed(self, model: nn.Module, masks: Masks | None) -> nn.Module:
        """The physically smaller model the backend would run (a copy; ``model`` is not changed)."""
        from ..speedup import speedup
        from .scheduler import plain_copy

        plain = plain_copy(model).eval()
        if not masks:
            return plain
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compact = speedup(plain, masks, self.dummy_input, inplace=True)
        for w in caught:
            log.debug("speedup while measuring: %s", w.message)
        return compact.eval()

    def latency_ms(self, model: nn.Module) -> float:
        """Latency (ms) of ``model`` on the backend: median over repeats of each repeat's ``statistic``."""
        return self.paired_latency_ms([model])[0]

    def paired_latency_ms(self, models: Sequence[nn.Module]) -> list[float]:
        """Latencies (ms) of several models measured interleaved: each timed run of one model is
        followed by one of the next, so load that comes and goes on a shared machine hits them alike."""
        from ..backends import get_backend

        backend = get_backend(self.backend)
        args = _inputs(self.dummy_input, models[0])
        names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        with tempfile.TemporaryDirectory(prefix="dc-measure-") as tmp:
            runners = []
            for i, model in enumerate(models):
                onnx_path = Path(tmp) / f"candidate{i}.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                    torch.onnx.export(model.eval(), args, str(onnx_path), dynamo=False, input_names=names, opset_version=17)
                artifact = backend.build(onnx_path, Path(tmp) / f"built{i}", precision="fp32")
                runners.append(backend.load(artifact, threads=self.threads) if self.threads else backend.load(artifact))
            for runner in runners:
                for _ in range(self.warmup):
                    runner.run(feeds)
            medians: list[list[float]] = [[] for _ in runners]
            for _ in range(self.repeats):
                times: list[list[float]] = [[] for _ in runners]
                for _ in range(self.iterations):  # run by run in turn: load that comes and goes hits all alike
                    for k, runner in enumerate(runners):
                        t0 = time.perf_counter()
                        runner.run(feeds)
                        times[k].append((time.perf_counter() - t0) * 1000.0)
                for k in range(len(runners)):
                    medians[k].append(_STATISTICS[self.statistic](times[k]))
        values = [statistics.median(m) for m in medians]
        log.debug("latency %s ms (repeat medians %s)", [round(v, 4) for v in values], medians)
        return values

    def relative(self, model: nn.Module, masks: Masks | None, reference: nn.Module) -> float:
        """The candidate's resource as a fraction of ``reference``'s (the dense model). Latency is
        measured interleaved with the reference (:meth:`paired_latency_ms`), so a budget given as a
        fraction holds even when the machine's speed drifts between measurements."""
        if self.metric != "latency":
            return self(model, masks) / self(reference, None)
        self.measurements += 1
        ms, ref = self.paired_latency_ms([self.deployed(model, masks), self.deployed(reference, None)])
        return ms / ref

    def within(self, value: float, budget: float) -> bool:
        """``value <= budget``, allowing the stated relative ``tolerance`` for noise."""
        return value <= budget * (1.0 + float(self.tolerance or 0.0))


@dataclass
class LookupTable:
    """Per-layer resource after pruning that layer alone: ``table[layer]`` maps a sparsity (fraction
    of output channels) to the measured resource; ``dense`` is the unpruned model's value.
    ``scale`` multiplies the summed per-layer changes (1: NetAdapt's plain additive estimate;
    :meth:`calibrate` sets it from one measured candidate)."""

    metric: str
    dense: float
    table: dict[str, dict[float, float]]
    scale: float = 1.0

    def layer_delta(self, layer: str, sparsity: float) -> float:
        """Change in resource from pruning ``layer`` to ``sparsity`` (linear between grid points)."""
        grid = self.table[layer]
        xs = np.array(sorted(grid))
        ys = np.array([grid[x] for x in xs])
        return float(np.interp(sparsity, xs, ys) - self.dense)

    def estimate(self, sparsities: Mapping[str, float]) -> float:
        """NetAdapt's additive estimate for per-layer sparsities."""
        return self.dense + self.scale * sum(self.layer_delta(n, s) for n, s in sparsities.items() if s > 0 and n in self.table)

    def calibrate(self, sparsities: Mapping[str, float], measured: float, bounds: tuple[float, float] = (0.25, 4.0)) -> float:
        """Set :attr:`scale` so the estimate for ``sparsities`` equals ``measured`` (the same
        candidate measured whole): the per-layer changes of a model pruned in many layers at once
        add up to more (or less) than their sum. Kept within ``bounds``; returns the scale."""
        saved, self.scale = self.scale, 1.0
        change = self.estimate(sparsities) - self.dense
        self.scale = saved
        if abs(change) < 1e-12 * max(abs(self.dense), 1.0):
            return self.scale
        self.scale = float(min(max((measured - self.dense) / change, bounds[0]), bounds[1]))
        log.info("%s lookup table calibrated: per-layer changes x%.3f (one candidate measured whole)", self.metric, self.scale)
        return self.scale


def build_lookup_table(
    model: nn.Module,
    layers: Sequence[str],
    make_masks: Callable[[nn.Module, dict[str, float]], Masks],
    meter: ResourceMeter,
    grid: Sequence[float] = (0.25, 0.5, 0.75),
    executor: Any = None,
) -> LookupTable:
    """Measure every layer of ``layers`` pruned alone at each sparsity of ``grid`` (once, up front).

    ``make_masks(model, {layer: sparsity})`` is the basic pruner. Costs ``len(layers) * len(grid) + 1``
    measurements.
    """
    from .executor import InProcessExecutor

    executor = executor or InProcessExecutor()
    dense = meter(model, None)
    jobs = [(name, float(s)) for name in layers for s in grid]

    def measure(job: tuple[str, float]) -> float:
        name, s = job  # latency: timed interleaved with the dense model, then scaled by its value
        return meter.relative(model, make_masks(model, {name: s}), model) * dense

    values = executor.map(measure, jobs, desc=f"{meter.metric} lookup table")
    table: dict[str, dict[float, float]] = {name: {0.0: dense} for name in layers}
    for (name, s), v in zip(jobs, values):
        table[name][s] = v
    log.info("%s lookup table: dense %.4g, %d layers x %d ratios", meter.metric, dense, len(layers), len(grid))
    return LookupTable(meter.metric, dense, table)

