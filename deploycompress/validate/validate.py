"""One call that says how fast a deployed model runs and how close it stays to PyTorch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..backends.base import Runner
from .accuracy import AccuracyStats, MetricFn, MetricResult, compare_outputs, top1_accuracy
from .latency import LatencyStats, measure_latency

__all__ = ["ValidationResult", "run_batched", "validate"]

log = logging.getLogger(__name__)


@dataclass
class ValidationResult:
    backend: str
    accuracy: AccuracyStats
    latency: list[LatencyStats] = field(default_factory=list)
    metric: MetricResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "accuracy": self.accuracy.to_dict(),
            "latency": [s.to_dict() for s in self.latency],
            "metric": self.metric.to_dict() if self.metric else None,
        }


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def run_batched(runner: Runner, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The runner's first output over ``inputs``, ``batch_size`` rows at a time."""
    name = runner.inputs[0].name
    out = runner.outputs[0].name
    return np.concatenate([runner.run({name: inputs[i : i + batch_size]})[out] for i in range(0, len(inputs), batch_size)])


def _reference_outputs(reference_model: Callable, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    is_module = isinstance(reference_model, torch.nn.Module)
    if is_module:
        reference_model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            chunk = inputs[i : i + batch_size]
            y = reference_model(torch.from_numpy(chunk) if is_module else chunk)
            outs.append(_numpy(y[0] if isinstance(y, (tuple, list)) else y))
    return np.concatenate(outs)


def validate(
    runner: Runner,
    reference_model: Callable,
    inputs,
    *,
    labels=None,
    metric: MetricFn | None = None,
    metric_name: str | None = None,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 10,
    iterations: int = 50,
    duration_s: float | None = None,
    eval_batch_size: int = 256,
) -> ValidationResult:
    """Compare ``runner`` with ``reference_model`` (a torch module or a callable on numpy) on ``inputs``,
    score both with ``metric`` (default top-1 accuracy) when ``labels`` are given, and time it per batch size."""
    x = np.ascontiguousarray(_numpy(inputs), dtype=np.float32)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError("validate: inputs are empty")
    if metric is not None and labels is None:
        raise ValueError("validate: a metric needs labels")
    deployed = run_batched(runner, x, eval_batch_size)
    reference = _reference_outputs(reference_model, x, eval_batch_size)
    accuracy = compare_outputs(deployed, reference)
    result = ValidationResult(runner.backend, accuracy)
    if labels is not None:
        y = _numpy(labels)
        if len(y) != len(x):
            raise ValueError(f"validate: {len(y)} labels for {len(x)} inputs")
        fn = metric or top1_accuracy
        value, ref_value = float(fn(deployed, y)), float(fn(reference, y))
        result.metric = MetricResult(metric_name or getattr(fn, "__name__", "metric"), value, ref_value, value - ref_value)
    if batch_sizes:
        result.latency = measure_latency(runner, x, batch_sizes=batch_sizes, warmup=warmup, iterations=iterations, duration_s=duration_s)
    log.info("validated %s: max abs error %.4g, top-1 agreement %s", runner.backend, accuracy.max_abs_error, accuracy.top1_agreement)
    return result
