"""What every calibrator shares: input checks, per-channel layout, the NaN/inf policy.

A calibrator sees a tensor batch by batch (``observe``) and keeps only a bounded summary (a range,
or a fixed-size histogram), so calibrating on a large data set never holds the activations.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import numpy as np

from .params import QuantError, QuantParams, params_from_range, qrange

__all__ = ["Calibrator", "NONFINITE_POLICIES"]

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("raise", "ignore")


class Calibrator(ABC):
    """Streaming range estimator for one tensor.

    ``axis`` selects per-channel statistics along that axis (``None``: one range for the tensor).
    ``nonfinite``: ``"raise"`` (default) stops at the first NaN/inf with a message naming the tensor;
    ``"ignore"`` drops those values, counts them in :attr:`num_nonfinite` and logs one warning.
    Empty arrays are skipped. A tensor that is constant gets the range ``[c, c]``, which
    :func:`params_from_range` widens to include 0 (all zeros: scale 1).
    """

    def __init__(
        self,
        *,
        bits: int = 8,
        signed: bool = True,
        symmetric: bool = True,
        axis: int | None = None,
        nonfinite: str = "raise",
        name: str = "tensor",
    ) -> None:
        qrange(bits, signed)  # validates bits
        if nonfinite not in NONFINITE_POLICIES:
            raise QuantError(f"{name}: nonfinite must be one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))):
            raise QuantError(f"{name}: axis must be None or an integer, got {axis!r}")
        self.bits = int(bits)
        self.signed = bool(signed)
        self.symmetric = bool(symmetric)
        self.axis = None if axis is None else int(axis)
        self.nonfinite = nonfinite
        self.name = name
        self.num_channels: int | None = None
        self.num_observed = 0
        self.num_nonfinite = 0
        self.num_batches = 0

    # -- input ----------------------------------------------------------------------------------
    def _rows(self, arr: np.ndarray) -> np.ndarray:
        """``(channels, values)`` view: one row per channel, or a single row per-tensor."""
        if self.axis is None:
            return arr.reshape(1, -1)
        if arr.ndim == 0 or not -arr.ndim <= self.axis < arr.ndim:
            raise QuantError(f"{self.name}: channel axis {self.axis} is out of range for an array of shape {arr.shape}")
        axis = self.axis % arr.ndim
        if self.axis < 0:
            self.axis = axis  # keep the non-negative axis: it is what ONNX's QDQ nodes take
        rows = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
        if self.num_channels is None:
            self.num_channels = rows.shape[0]
        elif rows.shape[0] != self.num_channels:
            raise QuantError(
                f"{self.name}: axis {axis} has {rows.shape[0]} channels, earlier batches had {self.num_channels}"
            )
        return rows

    def observe(self, array: np.ndarray) -> None:
        """Fold one batch into the statistics."""
        arr = np.asarray(array)
        if arr.dtype.kind not in "fiub":
            raise QuantError(f"{self.name}: cannot calibrate an array of dtype {arr.dtype}")
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        if arr.size == 0:
            log.debug("%s: empty batch skipped", self.name)
            if self.axis is not None and arr.ndim:
                self._rows(arr)
            return
        rows = self._rows(arr)
        valid = None
        finite = np.isfinite(rows)
        if not finite.all():
            bad = int(rows.size - np.count_nonzero(finite))
            if self.nonfinite == "raise":
                raise QuantError(
                    f"{self.name}: batch {self.num_batches} holds {bad} NaN/inf value(s); "
                    "fix the model or data, or calibrate with nonfinite='ignore'"
                )
            if not self.num_nonfinite:
                log.warning("%s: ignoring NaN/inf values (first seen in batch %d)", self.name, self.num_batches)
            self.num_nonfinite += bad
            valid = finite
        self._update(rows, valid)
        self.num_observed += rows.size if valid is None else int(np.count_nonzero(valid))
        self.num_batches += 1

    @staticmethod
    def _row_range(rows: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Per-row min/max over valid values (+inf/-inf for a row without any)."""
        if valid is None:
            return rows.min(axis=1), rows.max(axis=1)
        return np.where(valid, rows, np.inf).min(axis=1), np.where(valid, rows, -np.inf).max(axis=1)

    @abstractmethod
    def _update(self, rows: np.ndarray, valid: np.ndarray | None) -> None:
        """Fold ``rows`` (channels x values, float32) into the state; ``valid`` masks NaN/inf if given."""

    # -- output ---------------------------------------------------------------------------------
    @abstractmethod
    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        """The chosen ``(min, max)`` per channel."""

    def compute(self) -> QuantParams:
        """Scale and zero point for everything observed so far (observation may go on afterwards)."""
        if self.num_observed == 0:
            what = f" ({self.num_nonfinite} NaN/inf values were ignored)" if self.num_nonfinite else ""
            raise QuantError(f"{self.name}: no values were observed{what}; run calibration data through it first")
        lo, hi = self._range()
        empty = ~(np.isfinite(lo) & np.isfinite(hi))
        if empty.any():
            raise QuantError(f"{self.name}: channel(s) {np.flatnonzero(empty).tolist()} saw no finite value")
        try:
            return params_from_range(
                lo, hi, bits=self.bits, signed=self.signed, symmetric=self.symmetric, axis=self.axis
            )
        except QuantError as exc:
            raise QuantError(f"{self.name}: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, bits={self.bits}, signed={self.signed}, "
            f"symmetric={self.symmetric}, axis={self.axis}, batches={self.num_batches})"
        )
