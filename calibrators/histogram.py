"""Fixed-size histograms that grow their range by merging bins: bounded memory on any data set.

Each channel keeps counts over a symmetric range ``[-T, T]`` (onnxruntime's layout for entropy and
percentile). When a batch exceeds ``T``, bins of the same width are appended on both sides, as
onnxruntime does, up to ``2 * num_bins``; past that adjacent pairs are merged and the width doubles.
onnxruntime only appends, so its memory grows with the data's range; on one batch both coincide.
"""

from __future__ import annotations

import numpy as np

from .base import Calibrator
from .params import QuantError

__all__ = ["StreamingHistogram", "HistogramCalibrator"]


class StreamingHistogram:
    """Per channel: ``size[c]`` equal bins of ``width[c]`` over ``[-threshold[c], threshold[c]]``.

    Starts with ``num_bins`` bins over the first batch's ``max|x|``. A later batch beyond the range
    appends bins of the same width on both sides (as onnxruntime does) while at most ``max_bins``
    (default ``2 * num_bins``) are needed; beyond that adjacent pairs are summed and the width
    doubles. Both are exact, and memory stays ``max_bins`` counts per channel.
    """

    def __init__(self, num_channels: int, num_bins: int, max_bins: int | None = None) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 8 or num_bins % 4:
            raise QuantError(f"num_bins must be a multiple of 4 and at least 8, got {num_bins!r}")
        self.num_bins = int(num_bins)
        self.max_bins = 2 * self.num_bins if max_bins is None else int(max_bins)
        if self.max_bins < self.num_bins or self.max_bins % 4:
            raise QuantError(f"max_bins must be a multiple of 4 and at least num_bins, got {max_bins!r}")
        self.counts = np.zeros((num_channels, self.max_bins), dtype=np.int64)
        self.size = np.full(num_channels, self.num_bins, dtype=np.int64)
        self.width = np.zeros(num_channels, dtype=np.float64)
        self.min = np.full(num_channels, np.inf, dtype=np.float64)
        self.max = np.full(num_channels, -np.inf, dtype=np.float64)

    @property
    def num_channels(self) -> int:
        return self.counts.shape[0]

    @property
    def threshold(self) -> np.ndarray:
        return self.size * self.width / 2.0

    def row(self, channel: int) -> np.ndarray:
        return self.counts[channel, : self.size[channel]]

    def edges(self, channel: int) -> np.ndarray:
        t = self.threshold[channel]
        return np.linspace(-t, t, int(self.size[channel]) + 1)

    @staticmethod
    def _needed(amax: float, width: float) -> int:
        """Bins of ``width`` covering ``[-amax, amax]``, rounded up to a multiple of 4."""
        half = int(np.ceil(amax / width))
        return -(-2 * half // 4) * 4

    def _grow(self, channel: int, amax: float) -> None:
        """Widen ``channel`` to cover ``amax``: append bins, merging pairs when they would exceed ``max_bins``."""
        w = float(self.width[channel])
        if w == 0.0:  # everything so far was exactly 0: it stays in the bin starting at 0
            zeros = self.counts[channel].sum()
            self.counts[channel] = 0
            self.counts[channel, self.num_bins // 2] = zeros
            self.width[channel] = 2.0 * amax / self.num_bins
            return
        row = self.row(channel).copy()
        need = self._needed(amax, w)
        while need > self.max_bins:
            if (row.size // 2) % 4:  # keep 0 on a pair boundary and the size a multiple of 4
                row = np.concatenate([[0, 0], row, [0, 0]])
            row = row.reshape(-1, 2).sum(axis=1)
            w *= 2.0
            need = max(self._needed(amax, w), row.size)
        pad = (need - row.size) // 2
        self.counts[channel] = 0
        self.counts[channel, pad : pad + row.size] = row
        self.size[channel] = need
        self.width[channel] = w

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
        t = self.threshold
        width = np.where(self.width > 0, self.width, 1.0)  # zero width: all values were 0, they land at size // 2
        inv = (1.0 / width).astype(np.float32)[:, None]
        idx = ((rows + t.astype(np.float32)[:, None]) * inv).astype(np.int64)
        np.clip(idx, 0, (self.size - 1)[:, None], out=idx)
        if self.num_channels > 1:
            idx += (np.arange(self.num_channels, dtype=np.int64) * self.max_bins)[:, None]
        flat = idx.ravel() if valid is None else idx[valid]
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def folded(self, channel: int) -> np.ndarray:
        """Counts of ``|x|`` over ``[0, threshold]`` in ``size // 2`` bins."""
        row = self.row(channel)
        half = row.size // 2
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
            if h.width[c] > 0 and np.isfinite(lo[c]):
                clo, chi = self._channel_range(c)
                # never wider than what was seen (as onnxruntime clips), but always holding 0
                lo[c] = max(clo, min(h.min[c], 0.0))
                hi[c] = min(chi, max(h.max[c], 0.0))
        return lo, hi

    def _channel_range(self, channel: int) -> tuple[float, float]:
        """The chosen range of one channel whose histogram has a positive threshold."""
        raise NotImplementedError
