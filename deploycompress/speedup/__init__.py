"""Masks to a physically smaller model (see ``docs/speedup.md``)."""

from .core import SpeedupError, masked_model, speedup, speedup_with_report
from .joined import joined_masks
from .masks import MaskError, validate_masks
from .report import LayerReport, NormsChangedWarning, SpeedupReport, SpeedupWarning

__all__ = [
    "LayerReport",
    "MaskError",
    "joined_masks",
    "NormsChangedWarning",
    "SpeedupError",
    "SpeedupReport",
    "SpeedupWarning",
    "masked_model",
    "speedup",
    "speedup_with_report",
    "validate_masks",
]
