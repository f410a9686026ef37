"""How close a deployed model stays to its PyTorch reference, and a user metric on labelled data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ..similarity import row_cosines

__all__ = ["AccuracyStats", "MetricResult", "compare_outputs", "top1_accuracy"]


@dataclass(frozen=True)
class AccuracyStats:
    samples: int
    max_abs_error: float
    mean_abs_error: float
    cosine_similarity: float  # mean over samples
    top1_agreement: float | None  # None unless the output is (N, classes)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MetricResult:
    name: str
    value: float  # deployed model
    reference_value: float  # PyTorch reference
    delta: float  # value - reference_value

    def to_dict(self) -> dict:
        return asdict(self)


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(outputs).argmax(1) == np.asarray(labels).reshape(-1)).mean())


def compare_outputs(outputs: np.ndarray, reference: np.ndarray) -> AccuracyStats:
    out = np.asarray(outputs, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} differs from the reference's {ref.shape}")
    n = out.shape[0] if out.ndim else 1
    a, b = out.reshape(n, -1), ref.reshape(n, -1)
    diff = np.abs(a - b)
    cos = row_cosines(a, b)
    agree = float((out.argmax(1) == ref.argmax(1)).mean()) if out.ndim == 2 and out.shape[1] > 1 else None
    return AccuracyStats(n, float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0, float(cos.mean()), agree)


MetricFn = Callable[[np.ndarray, np.ndarray], float]
