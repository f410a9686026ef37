"""One call that says how fast a deployed model runs and how close it stays to PyTorch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..backends.base import Runner
from ..errors import InputError
from ..tensor_io import call_with, flatten_outputs
from .accuracy import AccuracyStats, MetricFn, MetricResult, compare_outputs, top1_accuracy
from .latency import LatencyStats, measure_latency

__all__ = ["LabelError", "ValidationResult", "input_arrays", "primary_output", "run_batched", "validate"]

log = logging.getLogger(__name__)


@dataclass
class ValidationResult:
    """``accuracy``: the primary output (the first classification head, else the first output);
    ``outputs``: every output by name; ``metric``: on ``metric_output`` (the primary output by default)."""

    backend: str
    accuracy: AccuracyStats
    latency: list[LatencyStats] = field(default_factory=list)
    metric: MetricResult | None = None
    outputs: dict[str, AccuracyStats] = field(default_factory=dict)
    primary_output: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "accuracy": self.accuracy.to_dict(),
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "primary_output": self.primary_output,
            "latency": [s.to_dict() for s in self.latency],
            "metric": self.metric.to_dict() if self.metric else None,
        }


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def input_arrays(runner: Runner, inputs) -> dict[str, np.ndarray]:
    """``inputs`` as name -> array in the runner's input order: one array (a one-input model), a
    tuple/list in input order, or a mapping keyed by input name. ValueError names what is missing."""
    names = [s.name for s in runner.inputs]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"validate: no data for input(s) {missing}; given {sorted(inputs)}")
        arrays = {n: _numpy(inputs[n]) for n in names}
    elif isinstance(inputs, (tuple, list)):
        if len(inputs) != len(names):
            raise ValueError(f"validate: {len(inputs)} input arrays for the model's inputs {names}")
        arrays = {n: _numpy(a) for n, a in zip(names, inputs)}
    else:
        if len(names) != 1:
            raise ValueError(f"validate: the model has inputs {names}: pass a dict (or tuple) of arrays")
        arrays = {names[0]: _numpy(inputs)}
    dtypes = {s.name: np.dtype(s.dtype) for s in runner.inputs}
    arrays = {n: np.ascontiguousarray(a, dtype=dtypes[n] if a.dtype != dtypes[n] else None) for n, a in arrays.items()}
    sizes = {n: len(a) if a.ndim else 0 for n, a in arrays.items()}
    if len(set(sizes.values())) != 1 or not next(iter(sizes.values())):
        raise ValueError(f"validate: inputs are empty or differ in length: {sizes}")
    return arrays


def run_batched(runner: Runner, inputs, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every output of the runner (name -> array) over ``inputs`` (see :func:`input_arrays`),
    ``batch_size`` rows at a time."""
    arrays = input_arrays(runner, inputs)
    n = len(next(iter(arrays.values())))
    chunks = [runner.run({k: v[i : i + batch_size] for k, v in arrays.items()}) for i in range(0, n, batch_size)]
    return {o.name: np.concatenate([c[o.name] for c in chunks]) for o in runner.outputs}


def _reference_outputs(reference_model: Callable, arrays: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    import torch

    is_module = isinstance(reference_model, torch.nn.Module)
    if is_module:
        reference_model.eval()
    names = list(arrays)
    n = len(arrays[names[0]])
    outs: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(0, n, batch_size):
            chunk = {k: v[i : i + batch_size] for k, v in arrays.items()}
            if is_module:
                y = call_with(reference_model, names, [torch.from_numpy(chunk[k]) for k in names])
            else:
                y = reference_model(chunk[names[0]] if len(names) == 1 else chunk)
            flat = y if isinstance(y, Mapping) else flatten_outputs(y)
            for k, v in flat.items():
                outs.setdefault(k, []).append(_numpy(v))
    return {k: np.concatenate(v) for k, v in outs.items()}


def _match_outputs(runner: Runner, reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference outputs keyed by the runner's output names: by name, else by position."""
    names = [o.name for o in runner.outputs]
    if len(reference) != len(names):
        raise ValueError(f"validate: the reference gives {len(reference)} outputs {list(reference)}, the model {len(names)} {names}")
    if set(reference) == set(names):
        return reference
    return dict(zip(names, reference.values()))


def primary_output(stats: Mapping[str, AccuracyStats]) -> str:
    """The first output that is a classification head ((N, classes) with top-1 agreement), else the first."""
    return next((k for k, v in stats.items() if v.top1_agreement is not None), next(iter(stats)))


class LabelError(InputError, ValueError):
    """Labels that cannot score the outputs (count, shape, values); the message says what to give."""


def _labels(labels: Any, n: int, *, classes_needed: bool) -> np.ndarray:
    """``labels`` checked before any work: ``n`` of them; for top-1 accuracy integer class indices, shape
    ``(n,)`` (exact one-hot rows ``(n, classes)`` are read as their index)."""
    y = _numpy(labels)
    if len(y) != n:
        raise LabelError(f"validate: {len(y)} labels for {n} inputs")
    if not classes_needed:
        return y
    if y.ndim == 2 and y.shape[1] == 1:  # a column of indices
        y = y.reshape(-1)
    if y.ndim == 2 and y.size and np.isin(y, (0, 1)).all() and (y.sum(1) == 1).all():
        log.info("validate: one-hot labels %s read as class indices", y.shape)
        y = y.argmax(1)
    if y.ndim != 1:
        raise LabelError(f"validate: labels of shape {tuple(y.shape)}; give one class index per input, shape ({n},) "
                         "(one-hot rows are read as their index)")
    if y.size and (not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y))):
        raise LabelError(f"validate: labels must be integer class indices, got {y.dtype} values such as {y[:3].tolist()}")
    return y.astype(np.int64)


def validate(
    runner: Runner,
    reference_model: Callable,
    inputs,
    *,
    labels=None,
    metric: MetricFn | None = None,
    metric_name: str | None = None,
    metric_output: str | None = None,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 10,
    iterations: int = 50,
    duration_s: float | None = None,
    eval_batch_size: int = 256,
) -> ValidationResult:
    """Compare every output of ``runner`` with ``reference_model`` on ``inputs``, score the primary
    output (or ``metric_output``) with ``metric`` (default top-1 accuracy) when ``labels`` are given,
    and time it per batch size.

    ``reference_model``: a torch module (called with tensors named after its forward's parameters,
    outputs flattened by :func:`deploycompress.tensor_io.flatten_outputs`) or a callable on numpy
    (one array, or name -> array for several inputs). ``inputs``: see :func:`input_arrays`.
    """
    arrays = input_arrays(runner, inputs)
    if metric is not None and labels is None:
        raise ValueError("validate: a metric needs labels")
    y = None if labels is None else _labels(labels, len(next(iter(arrays.values()))), classes_needed=metric is None)
    deployed = run_batched(runner, arrays, eval_batch_size)
    reference = _match_outputs(runner, _reference_outputs(reference_model, arrays, eval_batch_size))
    per_output = {k: compare_outputs(deployed[k], reference[k]) for k in deployed}
    primary = metric_output or primary_output(per_output)
    if primary not in per_output:
        raise ValueError(f"validate: metric_output {primary!r} is not an output; outputs are {list(per_output)}")
    result = ValidationResult(runner.backend, per_output[primary], outputs=per_output, primary_output=primary)
    if y is not None:
        if metric is None:  # top-1 accuracy: every label must name one of the primary output's classes
            out = deployed[primary]
            classes = out.shape[-1] if out.ndim == 2 else None
            if classes is not None and y.size and (int(y.min()) < 0 or int(y.max()) >= classes):
                raise LabelError(f"validate: the labels run from {int(y.min())} to {int(y.max())}, but output {primary!r} "
                                 f"has {classes} classes (0 to {classes - 1}): give class indices of this model's outputs")
        fn = metric or top1_accuracy
        value, ref_value = float(fn(deployed[primary], y)), float(fn(reference[primary], y))
        result.metric = MetricResult(metric_name or getattr(fn, "__name__", "metric"), value, ref_value, value - ref_value)
    if batch_sizes:
        result.latency = measure_latency(runner, arrays, batch_sizes=batch_sizes, warmup=warmup, iterations=iterations, duration_s=duration_s)
    for k, a in per_output.items():
        log.info("validated %s output %s: max abs error %.4g, top-1 agreement %s", runner.backend, k, a.max_abs_error, a.top1_agreement)
    return result
