"""Fixed-size histograms that grow their range by merging bins: bounded memory on any data set.

Each channel keeps ``num_bins`` counts over a symmetric range ``[-T, T]`` (onnxruntime's layout for
entropy and percentile). When a batch exceeds ``T`` the range doubles until it fits, and adjacent bin
pairs are summed into the middle half, an exact merge. onnxruntime instead keeps the bin width and
appends bins, so its memory grows with the data's range; on one batch both histograms coincide.
"""

from __future__ import annotations

import numpy as np

from .base import Calibrator
from .params import QuantError

__all__ = ["StreamingHistogram", "HistogramCalibrator"]


class StreamingHistogram:
    """``counts[c]`` over ``[-threshold[c], threshold[c]]`` in ``num_bins`` equal bins, per channel."""

    def __init__(self, num_channels: int, num_bins: int) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 8 or num_bins % 4:
            raise QuantError(f"num_bins must be a multiple of 4 and at least 8, got {num_bins!r}")
        self.num_bins = int(num_bins)
        self.counts = np.zeros((num_channels, self.num_bins), dtype=np.int64)
        self.threshold = np.zeros(num_channels, dtype=np.float64)
        self.min = np.full(num_channels, np.inf, dtype=np.float64)
        self.max = np.full(num_channels, -np.inf, dtype=np.float64)

    @property
    def num_channels(self) -> int:
        return self.counts.shape[0]

    def edges(self, channel: int) -> np.ndarray:
        t = self.threshold[channel]
        return np.linspace(-t, t, self.num_bins + 1)

    def _grow(self, channel: int, amax: float) -> None:
        """Double the range of ``channel`` until it covers ``amax``, merging bin pairs."""
        t = self.threshold[channel]
        n = self.num_bins
        if t == 0.0:  # everything so far was exactly 0: it stays in the bin starting at 0
            zeros = self.counts[channel].sum()
            self.counts[channel] = 0
            self.counts[channel, n // 2] = zeros
            self.threshold[channel] = amax
            return
        row = self.counts[channel]
        while t < amax:
            merged = row.reshape(n // 2, 2).sum(axis=1)
            row = np.zeros(n, dtype=np.int64)
            row[n // 4 : n // 4 + n // 2] = merged
            t *= 2.0
        self.counts[channel] = row
        self.threshold[channel] = t

    def add(self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, valid: np.ndarray | None) -> None:
        """Count ``rows`` (channels x values); ``lo``/``hi`` are their per-row min/max over valid values."""
        seen = np.isfinite(lo)
        self.min = np.where(seen, np.minimum(self.min, lo), self.min)
        self.max = np.where(seen, np.maximum(self.max, hi), self.max)
        amax = np.where(seen, np.maximum(np.abs(lo), np.abs(hi)), 0.0)
        for c in np.flatnonzero(amax > self.threshold):
            self._grow(int(c), float(amax[c]))
        if valid is not None:
            rows = np.where(valid, rows, np.float32(0.0))  # masked out below; keeps the cast clean
        n = self.num_bins
        t = self.threshold
        safe = np.where(t > 0, t, 1.0)  # a zero threshold means all values were 0: they land at n // 2
        norm = (n / (2.0 * safe)).astype(np.float32)[:, None]
        idx = ((rows + safe.astype(np.float32)[:, None]) * norm).astype(np.int64)
        np.clip(idx, 0, n - 1, out=idx)
        if self.num_channels > 1:
            idx += (np.arange(self.num_channels, dtype=np.int64) * n)[:, None]
        flat = idx.ravel() if valid is None else idx[valid]
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def folded(self, channel: int) -> np.ndarray:
        """Counts of ``|x|`` over ``[0, T]`` in ``num_bins // 2`` bins."""
        row = self.counts[channel]
        half = self.num_bins // 2
        return row[half:] + row[:half][::-1]


class HistogramCalibrator(Calibrator):
    """Base of the calibrators that choose a range from a histogram (percentile, entropy, MSE)."""

    def __init__(self, *, num_bins: int = 2048, **kwargs) -> None:
        super().__init__(**kwargs)
        StreamingHistogram(1, num_bins)  # validates num_bins before any data arrives
        self.num_bins = int(num_bins)
        self.histogram: StreamingHistogram | None = None

    def _update(self, rows: np.ndarray, valid: np.ndarray | None) -> None:
        if self.histogram is None:
            self.histogram = StreamingHistogram(rows.shape[0], self.num_bins)
        lo, hi = self._row_range(rows, valid)
        self.histogram.add(rows, lo, hi, valid)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        h = self.histogram
        assert h is not None
        lo, hi = h.min.copy(), h.max.copy()
        for c in range(h.num_channels):
            if h.threshold[c] > 0 and np.isfinite(lo[c]):
                clo, chi = self._channel_range(c)
                # never wider than what was seen (as onnxruntime clips), but always holding 0
                lo[c] = max(clo, min(h.min[c], 0.0))
                hi[c] = min(chi, max(h.max[c], 0.0))
        return lo, hi

    def _channel_range(self, channel: int) -> tuple[float, float]:
        """The chosen range of one channel whose histogram has a positive threshold."""
        raise NotImplementedError
