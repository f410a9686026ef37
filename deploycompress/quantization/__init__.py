"""Simulated quantization and the calibration it produces."""

from .calib_config import CALIB_VERSION, CalibConfig, CalibConfigError

__all__ = ["CALIB_VERSION", "CalibConfig", "CalibConfigError"]
