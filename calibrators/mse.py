"""Range with the least mean squared quantization error over the observed histogram."""

from __future__ import annotations

import numpy as np

from .histogram import HistogramCalibrator
from .params import QuantError, dequantize, params_from_range, quantize

__all__ = ["MSECalibrator"]


class MSECalibrator(HistogramCalibrator):
    """Tries ``num_candidates`` clipping thresholds ``T*k/num_candidates`` and keeps the one whose
    fake-quantized bin centres are closest (weighted by the counts) to the bin centres.

    The error is evaluated with the same :func:`quantize`/:func:`dequantize` the deployed graph
    uses, so rounding and clipping are both priced in.
    """

    def __init__(self, *, num_bins: int = 2048, num_candidates: int = 128, **kwargs) -> None:
        super().__init__(num_bins=num_bins, **kwargs)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)) or num_candidates < 1:
            raise QuantError(f"{self.name}: num_candidates must be a positive integer, got {num_candidates!r}")
        self.num_candidates = int(num_candidates)

    def _channel_range(self, channel: int) -> tuple[float, float]:
        h = self.histogram
        assert h is not None
        counts = h.row(channel)
        used = np.flatnonzero(counts)
        edges = h.edges(channel)
        centres = ((edges[used] + edges[used + 1]) / 2.0).astype(np.float32)
        weights = counts[used].astype(np.float64)
        amax = h.threshold[channel] * np.arange(1, self.num_candidates + 1) / self.num_candidates
        lo = np.maximum(-amax, min(h.min[channel], 0.0))
        hi = np.minimum(amax, max(h.max[channel], 0.0))
        params = params_from_range(lo, hi, bits=self.bits, signed=self.signed, symmetric=self.symmetric, axis=0)
        grid = np.broadcast_to(centres, (amax.size, centres.size))
        err = ((dequantize(quantize(grid, params), params) - grid).astype(np.float64) ** 2 * weights).sum(axis=1)
        best = int(np.argmin(err))
        return float(lo[best]), float(hi[best])
