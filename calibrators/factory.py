"""Calibrators by name, so configs and command lines can say ``"entropy"``."""

from __future__ import annotations

import inspect
from typing import Any

from .base import Calibrator
from .entropy import EntropyCalibrator
from .minmax import MinMaxCalibrator
from .mse import MSECalibrator
from .params import QuantError
from .percentile import PercentileCalibrator

__all__ = ["CALIBRATORS", "create_calibrator"]

CALIBRATORS: dict[str, type[Calibrator]] = {
    "minmax": MinMaxCalibrator,
    "percentile": PercentileCalibrator,
    "entropy": EntropyCalibrator,
    "mse": MSECalibrator,
}


def _options(cls: type[Calibrator]) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(vars(klass)["__init__"]).parameters
            names.update(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY)
    return names


def create_calibrator(method: str | type[Calibrator], **kwargs: Any) -> Calibrator:
    """``create_calibrator("percentile", percentile=99.99, bits=8, axis=None)``; unknown options are named."""
    cls = CALIBRATORS.get(method) if isinstance(method, str) else method
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Calibrator)):
        raise QuantError(f"unknown calibrator {method!r}; choose one of {list(CALIBRATORS)}")
    unknown = sorted(set(kwargs) - _options(cls))
    if unknown:
        raise QuantError(f"{cls.__name__} has no option(s) {unknown}; its options are {sorted(_options(cls))}")
    return cls(**kwargs)
