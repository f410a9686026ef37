"""Percentile of the observed values: onnxruntime's PercentileCalibrater on a streaming histogram."""

from __future__ import annotations

import numpy as np

from .histogram import HistogramCalibrator
from .params import QuantError

__all__ = ["PercentileCalibrator"]


class PercentileCalibrator(HistogramCalibrator):
    """Range that holds ``percentile`` % of the values.

    Symmetric: the percentile of ``|x|``. Asymmetric: ``(100 - percentile) / 2`` % is cut from each
    tail. The bound is the outer edge of the bin the percentile falls in, so at least ``percentile`` %
    of the values are inside (onnxruntime takes that bin's inner edge: up to one bin narrower).
    """

    def __init__(self, *, percentile: float = 99.999, num_bins: int = 2048, **kwargs) -> None:
        super().__init__(num_bins=num_bins, **kwargs)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0.0 < percentile <= 100.0:
            raise QuantError(f"{self.name}: percentile must lie in (0, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _channel_range(self, channel: int) -> tuple[float, float]:
        h = self.histogram
        assert h is not None
        t = float(h.threshold[channel])
        if self.symmetric:
            folded = h.folded(channel)
            cdf = np.cumsum(folded) / folded.sum()
            i = min(int(np.searchsorted(cdf, self.percentile / 100.0)), folded.size - 1)
            amax = (i + 1) * t / folded.size
            return -amax, amax
        row = h.row(channel)
        cdf = np.cumsum(row) / row.sum()
        cut = (100.0 - self.percentile) / 200.0
        left = min(int(np.searchsorted(cdf, cut)), row.size - 1)
        right = min(int(np.searchsorted(cdf, 1.0 - cut)), row.size - 1)
        edges = h.edges(channel)
        return float(edges[left]), float(edges[right + 1])
