"""Masks to a physically smaller model (see ``docs/speedup.md``)."""

from .core import SpeedupError, masked_model, speedup, speedup_with_report
from .masks import MaskError, validate_masks
from .report import LayerReport, SpeedupReport

__all__ = [
    "LayerReport",
    "MaskError",
    "SpeedupError",
    "SpeedupReport",
    "masked_model",
    "speedup",
    "speedup_with_report",
    "validate_masks",
]
