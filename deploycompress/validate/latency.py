"""Latency the way trtexec reports it: warm-up, then iterations or a duration, percentiles, throughput."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from ..backends.base import Runner

__all__ = ["LatencyStats", "batch_feeds", "measure_latency"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyStats:
    batch_size: int
    iterations: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # samples per second
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)  # every timed run, for distribution plots

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_times(cls, batch_size: int, times_ms: Sequence[float]) -> "LatencyStats":
        t = np.asarray(times_ms, dtype=np.float64)
        p50, p90, p95, p99 = np.percentile(t, [50, 90, 95, 99])
        mean = float(t.mean())
        return cls(batch_size, int(t.size), mean, float(p50), float(p90), float(p95), float(p99), float(t.min()),
                   float(t.max()), batch_size * 1000.0 / mean if mean > 0 else float("inf"), tuple(float(v) for v in t))


def batch_feeds(runner: Runner, inputs: np.ndarray | Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Feeds of ``batch_size`` rows from ``inputs`` (an array for a one-input model, or name -> array),
    repeating rows when fewer are given."""
    if not isinstance(inputs, Mapping):
        if len(runner.inputs) != 1:
            raise ValueError(f"the model has inputs {[i.name for i in runner.inputs]}: pass a dict of arrays")
        inputs = {runner.inputs[0].name: inputs}
    feeds = {}
    for spec in runner.inputs:
        if spec.name not in inputs:
            raise ValueError(f"no data for input {spec.name!r}; given {sorted(inputs)}")
        arr = np.asarray(inputs[spec.name])
        reps = -(-batch_size // len(arr))
        feeds[spec.name] = np.ascontiguousarray(np.concatenate([arr] * reps)[:batch_size] if reps > 1 else arr[:batch_size])
    return feeds


def measure_latency(
    runner: Runner,
    inputs: np.ndarray | Mapping[str, np.ndarray],
    *,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 10,
    iterations: int = 100,
    duration_s: float | None = None,
) -> list[LatencyStats]:
    """One :class:`LatencyStats` per batch size; ``duration_s`` (if given) runs until that much time passed
    instead of a fixed number of iterations."""
    if warmup < 0 or iterations < 1:
        raise ValueError(f"warmup must be >= 0 and iterations >= 1, got {warmup} and {iterations}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    results = []
    for bs in tqdm(batch_sizes, desc=f"latency {runner.backend}", unit="batch size", disable=None, leave=False):
        feeds = batch_feeds(runner, inputs, int(bs))
        for _ in range(warmup):
            runner.run(feeds)
        times: list[float] = []
        deadline = time.perf_counter() + duration_s if duration_s else None
        while (len(times) < iterations) if deadline is None else (time.perf_counter() < deadline or not times):
            t0 = time.perf_counter()
            runner.run(feeds)
            times.append((time.perf_counter() - t0) * 1000.0)
        stats = LatencyStats.from_times(int(bs), times)
        log.info("%s batch %d: mean %.3f ms, p99 %.3f ms", runner.backend, bs, stats.mean_ms, stats.p99_ms)
        results.append(stats)
    return results
