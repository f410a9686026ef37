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
    """

    def __init__(self, *, num_bins: int = 4096, stride: int = 1, **kwargs) -> None:
        super().__init__(num_bins=num_bins, **kwargs)
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
            raise QuantError(f"{self.name}: stride must be a positive integer, got {stride!r}")
        self.stride = int(stride)
        self.levels = 1 << (self.bits - 1 + int(not self.signed))

    def _channel_range(self, channel: int) -> tuple[float, float]:
        h = self.histogram
        assert h is not None
        abs_hist = h.folded(channel).copy()
        n = abs_hist.size
        width = float(h.threshold[channel]) / n
        if self.levels >= n:  # as many levels as bins: nothing to gain from clipping
            return -n * width, n * width
        abs_hist[0] = abs_hist[1]
        candidates = np.arange(self.levels, n + 1, self.stride)
        kl = np.array([kl_divergence(abs_hist, int(k), self.levels) for k in candidates])
        best = int(candidates[len(kl) - 1 - int(np.argmin(kl[::-1]))])
        return -best * width, best * width
