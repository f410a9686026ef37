"""Global (or moving-average) min/max: onnxruntime's MinMaxCalibrater, in streaming form."""

from __future__ import annotations

import numpy as np

from .base import Calibrator
from .params import QuantError

__all__ = ["MinMaxCalibrator"]


class MinMaxCalibrator(Calibrator):
    """Range = smallest and largest value seen.

    ``moving_average=True`` follows onnxruntime's rule per batch,
    ``new = old + averaging_constant * (batch - old)``, starting from the first batch's range.
    """

    def __init__(self, *, moving_average: bool = False, averaging_constant: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= averaging_constant <= 1.0:
            raise QuantError(f"{self.name}: averaging_constant must lie in [0, 1], got {averaging_constant}")
        self.moving_average = bool(moving_average)
        self.averaging_constant = float(averaging_constant)
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def _update(self, rows: np.ndarray, valid: np.ndarray | None) -> None:
        lo, hi = self._row_range(rows, valid)
        if self.min is None or self.max is None:
            self.min, self.max = lo, hi
        elif self.moving_average:
            self.min, self.max = self._ema(self.min, lo), self._ema(self.max, hi)
        else:
            self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)

    def _ema(self, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        """A channel that saw no finite value keeps its value; one that had none takes the batch's."""
        with np.errstate(invalid="ignore"):
            moved = old + self.averaging_constant * (new - old)
        out = np.where(np.isfinite(old), moved, new)
        return np.where(np.isfinite(new), out, old).astype(np.float32)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.min is not None and self.max is not None
        return self.min, self.max
