"""KL-divergence calibration: TensorRT's entropy method, vectorised over the candidate thresholds."""

from __future__ import annotations

import numpy as np

from .histogram import HistogramCalibrator
from .params import QuantError

__all__ = ["EntropyCalibrator", "kl_divergence"]


def kl_divergence(abs_hist: np.ndarray, kept: int, levels: int) -> float:
    """KL(P || Q) of clipping ``|x|`` after ``kept`` bins and quantizing those bins to ``levels``.

    P: the kept bins with every clipped count added to the last one. Q: the kept bins merged into
    ``levels`` equal groups, each group's count spread evenly over its non-empty bins. A P bin with
    counts where Q has none makes the divergence infinite (that threshold is never chosen).
    """
    bins = abs_hist[:kept]
    p = bins.astype(np.float64)
    p[-1] += abs_hist[kept:].sum()
    nonzero = bins != 0
    group = (np.arange(kept) * levels) // kept
    merged = np.bincount(group, weights=bins, minlength=levels)
    filled = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, merged[group] / np.maximum(filled[group], 1.0), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return float("inf")
    p /= p_sum
    q /= q_sum
    mask = p > 0
    if np.any(q[mask] == 0):
        return float("inf")
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class EntropyCalibrator(HistogramCalibrator):
    """The ``|x|`` threshold whose quantized histogram loses least information (minimum KL divergence).

    TensorRT's method as in NVIDIA's pytorch-quantization: on the histogram of ``|x|``
    (``num_bins // 2`` bins over ``[0, max|x|]``), with the first bin levelled to the second so a spike
    at 0 (ReLU) does not dominate, try every ``kept`` from ``levels`` to all bins in steps of ``stride``,
    where ``levels`` is the number of positive integer levels (``2**(bits-1)`` signed, ``2**bits``
    unsigned); keep the last minimum. onnxruntime's EntropyCalibrater searches the signed histogram
    instead, with integer-truncated Q: its thresholds differ (see BENCHMARKS.md for by how much).

    One departure from TensorRT's method: a *saturated* tensor keeps its full range. When the bin
    holding the largest magnitude is a point mass (at least ``saturation_ratio`` times the mean of the
    32 bins below it, and at least 16 values), an op clamped the tensor there (ReLU6, Hardtanh, clamp,
    saturated pixels). KL divergence compares only the histogram's shape, so it clips such a spike at
    no cost in KL, but every clamped value then loses ``bound - threshold`` in the next layer: on
    MobileNetV2 one ReLU6 output clipped from 6 to 3.2 cost 0.015 of output cosine alone (BENCHMARKS.md,
    TensorRT vs ModelOpt). ``saturation_ratio=None`` turns this off.
    """

    def __init__(self, *, num_bins: int = 4096, stride: int = 1, saturation_ratio: float | None = 8.0, **kwargs) -> None:
        super().__init__(num_bins=num_bins, **kwargs)
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
            raise QuantError(f"{self.name}: stride must be a positive integer, got {stride!r}")
        if saturation_ratio is not None and not saturation_ratio > 1.0:
            raise QuantError(f"{self.name}: saturation_ratio must be None or greater than 1, got {saturation_ratio!r}")
        self.stride = int(stride)
        self.saturation_ratio = saturation_ratio
        self.levels = 1 << (self.bits - 1 + int(not self.signed))

    def _channel_range(self, channel: int) -> tuple[float, float]:
        h = self.histogram
        assert h is not None
        abs_hist = h.folded(channel).copy()
        n = abs_hist.size
        width = float(h.threshold[channel]) / n
        if self.levels >= n:  # as many levels as bins: nothing to gain from clipping
            return -n * width, n * width
        if self._saturated(abs_hist):
            top = int(np.flatnonzero(abs_hist)[-1]) + 1
            return -top * width, top * width
        abs_hist[0] = abs_hist[1]
        candidates = np.arange(self.levels, n + 1, self.stride)
        kl = np.array([kl_divergence(abs_hist, int(k), self.levels) for k in candidates])
        best = int(candidates[len(kl) - 1 - int(np.argmin(kl[::-1]))])
        return -best * width, best * width

    def _saturated(self, abs_hist: np.ndarray) -> bool:
        """The largest-magnitude bin is a point mass: the tensor was clamped there."""
        if self.saturation_ratio is None:
            return False
        nonzero = np.flatnonzero(abs_hist)
        if nonzero.size < 2:
            return False
        top = int(nonzero[-1])
        below = abs_hist[max(1, top - 32):top]  # bin 0 holds ReLU's zeros
        return bool(abs_hist[top] >= 16 and below.size and abs_hist[top] >= self.saturation_ratio * max(below.mean(), 1.0))
